#!/usr/bin/env python3
"""Run the Eclipse Paho interoperability client tests against a broker.

The Paho suite (github.com/eclipse/paho.mqtt.testing, folder
``interoperability/``) is not vendored in this repository.  Its test scripts
(``client_test.py`` for MQTT 3.1.1, ``client_test5.py`` for MQTT 5.0) parse
``-h``/``-p`` in their own ``__main__`` block and then hand ``sys.argv`` to
``unittest.main()``, which makes them awkward to drive.  This wrapper imports
the script as a module instead, sets the module globals the script's main
block would have set, and runs the ``Test`` case programmatically.

Extras over running the scripts directly:
  * ``--exclude`` to skip tests (v5 skips ``test_subscribe_failure`` by
    default: it needs a broker-specific topic that refuses subscriptions),
  * a per-test summary table with durations,
  * hang protection.  Several suite tests spin in unbounded ``while`` loops
    waiting for a message or a DISCONNECT and never return if the broker
    misbehaves (against Mosquitto 2.0.11, ``test_flow_control2`` spins
    forever).  Two layers:
      - ``--test-timeout`` (soft, default 120 s): SIGALRM raises TestHung in
        the test's thread; the test is reported as HUNG and the run goes on
        with the next test;
      - ``--timeout`` (hard, default 600 s): if a single test, or the suite's
        class set-up, is still running after this, the wrapper prints the
        name of the hung test plus the stacks of all threads and exits with
        status 3 (covers hangs the soft timeout cannot interrupt).

Exit status: 0 all selected tests passed, 1 some failed/errored,
2 usage or import problem, 3 watchdog timeout.
"""

import argparse
import faulthandler
import importlib
import logging
import os
import signal
import sys
import threading
import time
import unittest

SUITES = {
    # suite name -> (module file name without .py, protocol label)
    "v3": ("client_test", "MQTT 3.1.1"),
    "v5": ("client_test5", "MQTT 5.0"),
}

# Tests skipped unless --no-default-excludes is given.
DEFAULT_EXCLUDES = {
    "v3": [],
    # Needs a topic filter ("test/nosubscribe") that the broker refuses with
    # SUBACK 0x80; that is broker configuration, not protocol behaviour.
    "v5": ["test_subscribe_failure"],
}

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 3


class TestHung(BaseException):
    """Raised (via SIGALRM) in a test that exceeded --test-timeout.

    Derives from BaseException so ``assertRaises(Exception)`` blocks in the
    suite do not mistake it for the exception they expect.  (Bare ``except:``
    clauses in the suite still swallow it; those tests then fail anyway.)
    """


class SoftTimer:
    """Per-test soft timeout using SIGALRM (main thread only)."""

    def __init__(self, limit):
        self.limit = limit if limit and limit > 0 else 0
        self.label = None
        self.fired = False
        if self.limit:
            signal.signal(signal.SIGALRM, self._handler)

    def arm(self, label):
        self.label = label
        self.fired = False
        if self.limit:
            signal.setitimer(signal.ITIMER_REAL, self.limit)

    def disarm(self):
        self.label = None
        if self.limit:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _handler(self, signum, frame):
        if self.label is None:
            return
        self.fired = True
        label, self.label = self.label, None
        sys.stdout.flush()
        sys.stderr.write("\n*** %s exceeded --test-timeout %s s; interrupting it "
                         "(stack at interruption follows) ***\n"
                         % (label, self.limit))
        faulthandler.dump_traceback(file=sys.stderr, all_threads=False)
        sys.stderr.flush()
        raise TestHung("%s did not finish within %s s (hung)"
                       % (label, self.limit))


# --------------------------------------------------------------------------
# module preparation
# --------------------------------------------------------------------------

def configure_module(mod, suite, host, port):
    """Give the imported test module the globals its __main__ block sets."""
    mod.host = host
    mod.port = port
    base_topics = ["TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA"]
    base_wild = ["TopicA/+", "+/C", "#", "/#", "/+", "+/+", "TopicA/#"]
    mod.nosubscribe_topics = ("test/nosubscribe",)
    if suite == "v3":
        mod.topics = tuple(base_topics)
        mod.wildtopics = tuple(base_wild)
    else:
        # client_test5's main block prefixes the topics, but Test.setUpClass
        # calls setData(), which puts the unprefixed names back.  Only the
        # shared-subscription test uses topic_prefix afterwards.  We mirror
        # that exactly so results match running the script by hand.
        mod.topic_prefix = "client_test5/"
        mod.topics = [mod.topic_prefix + t for t in base_topics]
        mod.wildtopics = [mod.topic_prefix + t for t in base_wild]


class _TracebackShim:
    """Stands in for the ``traceback`` module inside the test module.

    Many suite tests wrap their body in ``try/except: traceback.print_exc()``
    and then fail with an uninformative ``assertEqual(succeeded, True)``.
    Recording the exception that was printed lets the summary show the real
    reason (e.g. ``AssertionError: return code should be 0x80 ...``).
    """

    def __init__(self, real, recorder_ref):
        self._real = real
        self._recorder_ref = recorder_ref

    def print_exc(self, *args, **kwargs):
        recorder = self._recorder_ref()
        if recorder is not None:
            recorder.note_exception(sys.exc_info())
        return self._real.print_exc(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._real, name)


def import_suite(suite_dir, module_name):
    script = os.path.join(suite_dir, module_name + ".py")
    if not os.path.isfile(script):
        raise FileNotFoundError(
            "%s not found; point --suite-dir (or PAHO_SUITE_DIR) at the "
            "'interoperability' folder of eclipse/paho.mqtt.testing" % script)
    if suite_dir not in sys.path:
        sys.path.insert(0, suite_dir)
    return importlib.import_module(module_name), script


# --------------------------------------------------------------------------
# watchdog
# --------------------------------------------------------------------------

class Watchdog:
    """Kills the process if one phase (a test, or class set-up) overruns."""

    def __init__(self, limit, on_expire):
        self.limit = limit
        self.on_expire = on_expire
        self.lock = threading.Lock()
        self.label = None
        self.deadline = None
        self.started = None
        if limit and limit > 0:
            t = threading.Thread(target=self._run, name="paho-watchdog",
                                 daemon=True)
            t.start()

    def arm(self, label):
        with self.lock:
            self.label = label
            self.started = time.monotonic()
            self.deadline = self.started + self.limit if self.limit else None

    def disarm(self):
        with self.lock:
            self.deadline = None

    def _run(self):
        while True:
            time.sleep(0.5)
            with self.lock:
                expired = (self.deadline is not None
                           and time.monotonic() > self.deadline)
                label, started = self.label, self.started
            if expired:
                self.on_expire(label, time.monotonic() - started)
                return


# --------------------------------------------------------------------------
# result collection
# --------------------------------------------------------------------------

class Recorder:
    """Shared state between the unittest result object and the watchdog."""

    def __init__(self, watchdog_limit, soft_limit):
        self.rows = []          # (name, status, seconds, detail)
        self.noted = None       # last exception the suite printed itself
        self.current = None
        self.current_start = None
        self.out = sys.stdout
        if soft_limit and watchdog_limit and soft_limit >= watchdog_limit:
            soft_limit = 0      # the hard limit would always win
        self.soft = SoftTimer(soft_limit)
        self.watchdog = Watchdog(watchdog_limit, self._expired)
        # class set-up (cleanup of sessions + retained messages) runs before
        # the first startTest; guard it too.
        self.watchdog.arm("Test.setUpClass (suite cleanup)")
        self.soft.arm("Test.setUpClass (suite cleanup)")

    def note_exception(self, exc_info):
        if exc_info and exc_info[1] is not None:
            self.noted = exc_info

    def _expired(self, label, elapsed):
        try:
            sys.stdout.flush()
            sys.stderr.write(
                "\n\n*** WATCHDOG: %s still running after %.0f s "
                "(limit %s s) - treating it as hung ***\n"
                % (label, elapsed, self.watchdog.limit))
            sys.stderr.write("*** stacks of all threads follow ***\n")
            sys.stderr.flush()
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            self.rows.append((label, "HUNG", elapsed, "watchdog timeout"))
            print_summary(self.rows, sys.stderr)
            sys.stderr.flush()
        finally:
            os._exit(EXIT_TIMEOUT)


def make_result_class(recorder):
    class SummaryResult(unittest.TextTestResult):

        def startTest(self, test):
            recorder.current = test
            recorder.current_start = time.monotonic()
            recorder.noted = None
            recorder.watchdog.arm(short_name(test))
            recorder.soft.arm(short_name(test))
            super().startTest(test)

        def stopTest(self, test):
            recorder.soft.disarm()
            super().stopTest(test)
            recorder.watchdog.arm("Test (between tests / class teardown)")

        def _elapsed(self):
            if recorder.current_start is None:
                return 0.0
            return time.monotonic() - recorder.current_start

        def _row(self, test, status, detail=""):
            name = short_name(test)
            recorder.rows.append((name, status, self._elapsed(), detail))

        def addSuccess(self, test):
            super().addSuccess(test)
            self._row(test, "PASS")

        def _detail(self, err):
            # prefer the exception the test swallowed and printed itself
            if recorder.noted is not None:
                return last_line(recorder.noted)
            return last_line(err)

        def addFailure(self, test, err):
            super().addFailure(test, err)
            if recorder.soft.fired:
                self._row(test, "HUNG", "interrupted by --test-timeout; "
                          + self._detail(err))
            else:
                self._row(test, "FAIL", self._detail(err))

        def addError(self, test, err):
            super().addError(test, err)
            # errors in setUpClass arrive with a placeholder "test"
            if recorder.soft.fired or isinstance(err[1], TestHung):
                self._row(test, "HUNG", last_line(err))
            else:
                self._row(test, "ERROR", self._detail(err))

        def addSkip(self, test, reason):
            super().addSkip(test, reason)
            self._row(test, "SKIP", reason)

        def addExpectedFailure(self, test, err):
            super().addExpectedFailure(test, err)
            self._row(test, "XFAIL")

        def addUnexpectedSuccess(self, test):
            super().addUnexpectedSuccess(test)
            self._row(test, "XPASS")

    return SummaryResult


def short_name(test):
    method = getattr(test, "_testMethodName", None)
    if method:
        return method
    return str(test)      # e.g. "setUpClass (client_test5.Test)"


def last_line(err):
    exc = err[1]
    text = ("%s: %s" % (type(exc).__name__, exc)).strip().rstrip(":")
    text = " ".join(text.split())
    return text if len(text) <= 150 else text[:147] + "..."


def print_summary(rows, stream):
    stream.write("\n" + "=" * 78 + "\nPaho conformance summary\n" + "-" * 78 + "\n")
    for name, status, secs, detail in rows:
        line = "%-6s %-34s %6.1fs" % (status, name, secs)
        if detail:
            line += "  " + detail
        stream.write(line + "\n")
    counts = {}
    for _, status, _, _ in rows:
        counts[status] = counts.get(status, 0) + 1
    stream.write("-" * 78 + "\n")
    stream.write("  ".join("%s=%d" % kv for kv in sorted(counts.items()))
                 + "  total=%d\n" % len(rows))
    stream.write("=" * 78 + "\n")
    stream.flush()


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Run the Eclipse Paho interoperability tests "
                    "(client_test.py / client_test5.py) against a broker.")
    p.add_argument("--suite", choices=sorted(SUITES), required=True,
                   help="v3 = client_test.py (MQTT 3.1.1), "
                        "v5 = client_test5.py (MQTT 5.0)")
    p.add_argument("--host", default="127.0.0.1",
                   help="broker address (default %(default)s)")
    p.add_argument("--port", type=int, default=1883,
                   help="broker TCP port (default %(default)s)")
    p.add_argument("--suite-dir",
                   default=os.environ.get("PAHO_SUITE_DIR",
                                          "/work/paho-testing/interoperability"),
                   help="path of the suite's 'interoperability' folder "
                        "(default: $PAHO_SUITE_DIR or %(default)s)")
    p.add_argument("--exclude", action="append", default=[], metavar="TESTNAME",
                   help="skip this test (repeatable), e.g. test_keepalive")
    p.add_argument("--no-default-excludes", action="store_true",
                   help="also run tests excluded by default "
                        "(v5: test_subscribe_failure)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="hard watchdog: print the hung test and all thread "
                        "stacks and exit (status 3) if a single test, or the "
                        "suite's class set-up, runs longer than this; "
                        "0 disables (default %(default)s)")
    p.add_argument("--test-timeout", type=float, default=120.0,
                   metavar="SECONDS",
                   help="soft per-test limit: interrupt a test running longer "
                        "than this, report it as HUNG and continue with the "
                        "next test; 0 disables (default %(default)s)")
    p.add_argument("--list", action="store_true",
                   help="list the tests that would run and exit")
    p.add_argument("--debug", action="store_true",
                   help="enable the suite's client packet logging")
    p.add_argument("tests", nargs="*", metavar="TESTNAME",
                   help="run only these tests (default: all)")
    return p.parse_args(argv)


def normalise(name):
    # accept "test_x", "Test.test_x" and "client_test5.Test.test_x"
    return name.rsplit(".", 1)[-1]


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    module_name, label = SUITES[args.suite]
    suite_dir = os.path.abspath(args.suite_dir)

    try:
        mod, script = import_suite(suite_dir, module_name)
    except Exception as exc:   # noqa: BLE001 - report any import problem
        print("run-paho: cannot import %s from %s: %s"
              % (module_name, suite_dir, exc), file=sys.stderr)
        return EXIT_USAGE

    configure_module(mod, args.suite, args.host, args.port)
    # what the script's main block does before unittest.main()
    logging.getLogger().setLevel(logging.DEBUG if args.debug else logging.ERROR)
    if args.debug:
        logging.getLogger("mqtt-client").setLevel(logging.DEBUG)
    # unittest must never see our own options
    sys.argv = [script]

    loader = unittest.TestLoader()
    all_names = loader.getTestCaseNames(mod.Test)   # sorted, like unittest.main
    excludes = set(normalise(n) for n in args.exclude)
    if not args.no_default_excludes:
        excludes.update(DEFAULT_EXCLUDES[args.suite])
    wanted = [normalise(n) for n in args.tests]

    unknown = [n for n in list(excludes) + wanted if n not in all_names]
    if unknown:
        print("run-paho: unknown test name(s): %s\navailable: %s"
              % (", ".join(sorted(set(unknown))), ", ".join(all_names)),
              file=sys.stderr)
        return EXIT_USAGE

    selected = [n for n in all_names
                if (not wanted or n in wanted) and n not in excludes]
    skipped = [n for n in all_names if n not in selected]

    if args.list:
        for n in all_names:
            print(("  run  " if n in selected else "  skip ") + n)
        return EXIT_OK

    print("run-paho: %s suite (%s) from %s" % (args.suite, label, script))
    print("run-paho: broker %s:%d, %d test(s) selected, skipping: %s"
          % (args.host, args.port, len(selected),
             ", ".join(skipped) or "none"))
    print("run-paho: per-test timeouts: soft %s, hard %s"
          % ("%g s" % args.test_timeout if args.test_timeout > 0 else "off",
             "%g s" % args.timeout if args.timeout > 0 else "off"))
    sys.stdout.flush()

    if not selected:
        print("run-paho: nothing to run", file=sys.stderr)
        return EXIT_USAGE

    suite = unittest.TestSuite(mod.Test(n) for n in selected)
    recorder = Recorder(args.timeout, args.test_timeout)
    mod.traceback = _TracebackShim(mod.traceback, lambda: recorder)
    runner = unittest.TextTestRunner(stream=sys.stdout, verbosity=2,
                                     resultclass=make_result_class(recorder))
    started = time.monotonic()
    result = runner.run(suite)
    recorder.soft.disarm()
    recorder.watchdog.disarm()

    rows = list(recorder.rows)
    ran = set(name for name, _, _, _ in rows)
    for n in selected:
        if n not in ran:      # e.g. setUpClass failed, nothing executed
            rows.append((n, "NOTRUN", 0.0, ""))
    for n in skipped:
        if n in excludes:       # not listed when merely not selected
            rows.append((n, "EXCL", 0.0, "excluded"))
    print_summary(rows, sys.stdout)
    print("run-paho: finished in %.0f s" % (time.monotonic() - started))
    sys.stdout.flush()

    ok = result.wasSuccessful() and all(
        status in ("PASS", "SKIP", "EXCL", "XFAIL") for _, status, _, _ in rows)
    return EXIT_OK if ok else EXIT_FAIL


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The suite's clients start bare _thread receiver threads; exit without
    # waiting for them.
    os._exit(code)
