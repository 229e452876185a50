"""Crash test (issue 4): nothing acknowledged is lost across SIGKILLs.

1. Start the broker (same port and data directory for the whole run).
2. Create persistent subscribers (3.1.1 clean session 0, 5.0 clean start 0 + session expiry),
   subscribe them at QoS 1, take them offline. One more persistent subscriber ("roam") comes and
   goes during the run, so messages in flight to a connected session are covered too.
3. Publishers send numbered QoS 1 messages (``P<i>:<seq>``), retained publishers send numbered
   retained QoS 1 messages (``R<i>:<seq>``) over a set of topics, and (Ferry only) a worker
   creates instances, parent topics, groups, AccessKeys, device credentials, tokens and admin
   keys with ``ferry ctl``. A message counts as acknowledged only when its PUBACK arrived with a
   success code; a metadata creation only when ``ferry ctl`` exited 0.
4. Meanwhile the broker is SIGKILLed at random moments (``DURABILITY_KILLS``, default 20) and
   restarted; publishers reconnect and continue.
5. After the last restart: every acknowledged message must reach every matching subscriber at
   least once (duplicates and ordering are reported, not failed); every retained topic must hold
   a message at least as new as the last acknowledged one; every acknowledged piece of metadata
   must be listed by ``ferry ctl … list --json``.
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time

import pytest

from durability_support import (SUMMARY, V5, V311, BrokerStartError, DrainTracker, FerryBroker,
                                MetaWorker,
                                Publisher, Roamer, Subscriber, analyse_queue, check_retained,
                                collect_retained, group_lost, kill_schedule_text,
                                last_acked_per_topic, loss_timing, per_incarnation_acks,
                                verify_metadata)

QUEUE_TOPICS = 2
RETAINED_TOPICS_PER_PUBLISHER = 4


def say(line: str = "") -> None:
    """A summary line; conftest prints them all at the end of the pytest run."""
    SUMMARY.append(line)


def test_crash_sigkill(settings, broker, run_id, tmp_path):
    rng = random.Random(settings.seed)
    prefix = f"dur/{run_id}"
    q_topics = [f"{prefix}/q/{k}" for k in range(QUEUE_TOPICS)]
    say(f"broker {broker.kind} on 127.0.0.1:{broker.port}, data in {tmp_path}, seed "
        f"{settings.seed} (DURABILITY_SEED), {settings.kills} SIG{settings.signal}s requested")
    if settings.signal != "KILL":
        say("CONTROL RUN: graceful restarts (DURABILITY_SIGNAL=TERM), not a crash test")

    try:
        broker.start()
    except BrokerStartError as err:
        pytest.fail(str(err), pytrace=False)

    # -- persistent subscribers, then offline --------------------------------------------
    subscribers = [
        Subscriber("q0-v3", V311, [q_topics[0]], run_id, broker),
        Subscriber("q0-v5", V5, [q_topics[0]], run_id, broker),
        Subscriber("q1-v3", V311, [q_topics[1]], run_id, broker),
        Subscriber("q1-v5", V5, [q_topics[1]], run_id, broker),
        # A v5 session is persistent because of its expiry, whatever the clean start flag of
        # the CONNECT that created it: this one is created with clean start 1.
        Subscriber("all-v5-cs1", V5, [f"{prefix}/q/+"], run_id, broker, create_clean_start=True),
        Subscriber("roam-v3", V311, [f"{prefix}/q/#"], run_id, broker),
    ]
    for sub in subscribers:
        assert sub.connect(first=True), f"{sub.label}: no CONNACK\n{broker.log_tail()}"
        codes = sub.subscribe()
        assert codes and all(c == 1 for c in codes), f"{sub.label}: SUBACK {codes}"
        sub.close()
    time.sleep(settings.settle)

    # -- load, metadata and kills --------------------------------------------------------
    stop = threading.Event()
    publishers = [
        Publisher(f"P{i}", V311 if i < 2 else V5, [q_topics[i % QUEUE_TOPICS]], False,
                  settings.rate, settings.window, broker, stop, run_id)
        for i in range(4)
    ]
    retainers = [
        Publisher(f"R{i}", V311 if i == 0 else V5,
                  [f"{prefix}/r/{i}/{k}" for k in range(RETAINED_TOPICS_PER_PUBLISHER)], True,
                  settings.retain_rate, settings.window, broker, stop, run_id)
        for i in range(2)
    ]
    retained_gate = threading.Event()
    retained_gate.set()
    for r in retainers:
        r.gate = retained_gate
    roamer = Roamer(subscribers[-1], broker, stop, rng.randrange(2**31))
    meta = (MetaWorker(broker, stop, run_id, settings.meta_interval)
            if isinstance(broker, FerryBroker) else None)
    workers: list[threading.Thread] = [*publishers, *retainers, roamer] + ([meta] if meta else [])
    for w in workers:
        w.start()

    failures: list[str] = []
    phase_started = time.monotonic()
    kills = 0
    restart_ok = True
    retained_checks = 0
    retained_bad: list[str] = []
    while kills < settings.kills:
        if time.monotonic() - phase_started > settings.budget:
            failures.append(f"kill phase budget of {settings.budget:.0f}s used up after {kills} "
                            f"kills (DURABILITY_BUDGET)")
            break
        time.sleep(rng.uniform(settings.kill_min, settings.kill_max))
        if not broker.alive():
            failures.append(f"the broker exited by itself (code {broker.proc.returncode}) in "
                            f"incarnation {broker.incarnation}:\n{broker.log_tail(20)}")
            restart_ok = False
            break
        retained_gate.clear()  # the retained publishers reconnect only after the check
        broker.kill(settings.signal)
        kills += 1
        time.sleep(rng.uniform(0, settings.down_max))
        snapshot = last_acked_per_topic(retainers)  # all acknowledged by the dead broker
        try:
            broker.start()
        except BrokerStartError as err:
            failures.append(f"restart after SIG{settings.signal} #{kills} failed: {err}")
            restart_ok = False
            retained_gate.set()
            break
        # Retained messages are overwritten, so they are checked after every restart: each
        # topic must hold the last message acknowledged before the kill, or a newer one.
        got, _suback = collect_retained(broker.port, f"{prefix}/r/#", list(snapshot), run_id,
                                        settings.retained_wait)
        retained_checks += len(snapshot)
        retained_bad += [f"after SIG{settings.signal} #{kills}: {b}" for b in
                         check_retained(got, snapshot, broker)]
        retained_gate.set()
    phase_seconds = time.monotonic() - phase_started
    if restart_ok:
        time.sleep(settings.final_run)
    stop.set()
    for w in workers:
        w.join(20)
        if w.is_alive():
            failures.append(f"worker {w.name} did not stop within 20s")
        if getattr(w, "error", None) is not None:
            failures.append(f"worker {w.name} crashed: {w.error!r}")
    if restart_ok and kills < settings.kills:
        failures.append(f"only {kills} of {settings.kills} kills done")

    acked_total = sum(len(p.acked) for p in publishers)
    per_inc = per_incarnation_acks(publishers)
    incs = [per_inc.get(i, 0) for i in range(broker.incarnation + 1)]
    say(f"kills: {kills} SIG{settings.signal}s in {phase_seconds:.1f}s, "
        f"{broker.incarnation + 1} incarnations, "
        f"{kill_schedule_text(broker)}")
    say(f"publishers: {len(publishers)} queue (QoS 1, {settings.rate:g}/s each, window "
        f"{settings.window}), {len(retainers)} retained; connections "
        f"{sum(p.connections for p in publishers + retainers)}, sent "
        f"{sum(p.next_seq for p in publishers)}, acknowledged {acked_total}, negative PUBACKs "
        f"{sum(len(p.nacked) for p in publishers + retainers)}")
    if incs:
        say(f"acknowledged per incarnation: min {min(incs)}, median {statistics.median(incs):g}, "
            f"max {max(incs)}; incarnations without any: {sum(1 for x in incs if x == 0)}")
    if acked_total == 0:
        failures.append("no QoS 1 message was acknowledged at all: the test proves nothing")

    if not restart_ok:
        _finish(failures, tmp_path, {})
        return

    # -- retained messages: once more now that the retained publishers have stopped --------
    snapshot = last_acked_per_topic(retainers)
    got, suback = collect_retained(broker.port, f"{prefix}/r/#", list(snapshot), run_id,
                                   max(settings.retained_wait, 3.0))
    retained_checks += len(snapshot)
    retained_bad += [f"at the end: {b}" for b in check_retained(got, snapshot, broker)]
    say(f"retained: {sum(len(r.acked) for r in retainers)} acknowledged over "
        f"{sum(len(r.topics) for r in retainers)} topics; checked after every restart and at the "
        f"end with a new subscriber: {retained_checks - len(retained_bad)}/{retained_checks} "
        f"topic checks found the last acknowledged message or a newer one")
    for line in retained_bad[:8]:
        say(f"  RETAINED {line}")
    if suback not in (0, 1):
        failures.append(f"retained: the final check's subscription failed (SUBACK {suback})")
    if retained_bad:
        failures.append(f"retained: {len(retained_bad)} of {retained_checks} topic checks found "
                        f"an older message or none, e.g. {retained_bad[0]}")

    # -- metadata (Ferry) ----------------------------------------------------------------
    meta_missing: list[str] = []
    if meta is not None:
        missing, problems = verify_metadata(broker, meta.ok)
        meta_missing = missing
        kinds = sorted({op.kind for op in meta.ok} | set(meta.failed))
        ok_by_kind = {k: sum(1 for op in meta.ok if op.kind == k) for k in kinds}
        say(f"metadata: {len(meta.ok)} `ferry ctl` creations exited 0 ("
            + ", ".join(f"{k} {ok_by_kind[k]}" for k in kinds) + f"), "
            f"{sum(meta.failed.values())} failed (broker down); after the last restart "
            f"{len(meta.ok) - len(missing)}/{len(meta.ok)} found")
        for line in missing[:8]:
            say(f"  METADATA missing: {line}")
        for line in problems[:5]:
            say(f"  METADATA problem: {line}")
        if missing:
            failures.append(f"metadata: {len(missing)} of {len(meta.ok)} acknowledged creations "
                            f"are gone, e.g. {missing[0]}")
        if problems:
            failures.append(f"metadata: {len(problems)} problems, e.g. {problems[0]}")
        if not meta.ok:
            failures.append("metadata: no `ferry ctl` creation succeeded at all"
                            + (f" ({meta.failure_samples[0]})" if meta.failure_samples else ""))
    else:
        say("metadata: not applicable to this broker")

    # -- drain the persistent subscribers ------------------------------------------------
    drain_started = time.monotonic()
    for sub in subscribers:
        deadline = time.monotonic() + 10
        while not sub.connect() and time.monotonic() < deadline:
            time.sleep(0.2)
        if sub.client is None:
            failures.append(f"{sub.label}: cannot reconnect for the drain")
    trackers = [DrainTracker(sub, publishers) for sub in subscribers]
    while time.monotonic() - drain_started < settings.drain_max:
        last = max([drain_started] + [s.last_receive() for s in subscribers])
        complete = sum(t.missing() for t in trackers) == 0
        if time.monotonic() - last >= (settings.quiet if complete else settings.quiet_incomplete):
            break
        time.sleep(0.2)
    drain_seconds = time.monotonic() - drain_started
    for sub in subscribers:
        sub.close()
    if drain_seconds >= settings.drain_max:
        failures.append(f"the drain was still receiving after {settings.drain_max:.0f}s "
                        "(DURABILITY_DRAIN_MAX)")

    reports = analyse_queue(publishers, subscribers)
    if not broker.alive():
        failures.append(f"the broker exited by itself (code {broker.proc.returncode}) during "
                        f"the checks:\n{broker.log_tail(20)}")
    say(f"drain: {drain_seconds:.1f}s (ends {settings.quiet:g}s after the last message once "
        f"everything arrived, {settings.quiet_incomplete:g}s while anything is missing)")
    say(f"{'subscriber':44} {'expected':>8} {'delivered':>9} {'lost':>6} {'dups':>6} "
        f"{'unacked':>7} {'ooo':>5} session")
    for rep in reports:
        say(f"{rep.label[:44]:44} {rep.expected:8} {rep.delivered_acked:9} {len(rep.lost):6} "
            f"{rep.duplicates:6} {rep.delivered_unacked:7} {rep.out_of_order:5} "
            f"{'present' if rep.session_present else 'NOT present'}")
    lost_total = sum(len(r.lost) for r in reports)
    expected_total = sum(r.expected for r in reports)
    say(f"queue totals: acknowledged {acked_total} messages = {expected_total} expected "
        f"deliveries; delivered {sum(r.delivered_acked for r in reports)}; lost {lost_total}; "
        f"duplicates {sum(r.duplicates for r in reports)} (with DUP flag "
        f"{sum(r.dup_flagged for r in reports)}); delivered without a PUBACK "
        f"{sum(r.delivered_unacked for r in reports)}; first deliveries out of order per "
        f"publisher {sum(r.out_of_order for r in reports)}")
    say("  (dups: extra copies, reported only; unacked: delivered although the PUBACK never "
        "reached the publisher, allowed; ooo: first deliveries below a higher sequence number "
        "already seen from the same publisher)")
    for rep in reports:
        if rep.lost:
            per_inc, before = loss_timing(rep.lost, publishers, broker)
            timing = (f"; PUBACKs {min(before):.2f}-{max(before):.2f}s before the kill that "
                      "ended that incarnation" if before else "")
            say(f"  LOST {rep.label}: {len(rep.lost)} — {group_lost(rep.lost)}")
            say(f"       acknowledged in incarnations "
                + ", ".join(f"#{i}: {n}" for i, n in sorted(per_inc.items())[:12])
                + (" …" if len(per_inc) > 12 else "") + timing)
        if rep.phantoms:
            say(f"  PHANTOM {rep.label}: {len(rep.phantoms)}, e.g. {rep.phantoms[0]}")
            failures.append(f"{rep.label}: {len(rep.phantoms)} messages that were never sent, "
                            f"e.g. {rep.phantoms[0]}")
        if rep.session_present is False:
            failures.append(f"{rep.label}: persistent session gone (session present = 0)")
    if lost_total:
        worst = next(r for r in reports if r.lost)
        failures.insert(0, f"LOST {lost_total} acknowledged deliveries of {expected_total}; first "
                           f"missing at {worst.label}: {group_lost(worst.lost, 5)}")

    _finish(failures, tmp_path, {
        "broker": broker.kind, "seed": settings.seed, "kills": kills,
        "acknowledged": acked_total, "expected_deliveries": expected_total,
        "lost": lost_total, "duplicates": sum(r.duplicates for r in reports),
        "retained_checked": retained_checks, "retained_bad": retained_bad,
        "metadata_ok": len(meta.ok) if meta else None, "metadata_missing": meta_missing,
    })


def _finish(failures: list[str], tmp_path, data: dict) -> None:
    data["failures"] = failures
    (tmp_path / "summary.json").write_text(json.dumps(data, indent=2))
    say(f"result: {'FAIL' if failures else 'PASS'} (details in {tmp_path / 'summary.json'})")
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)
