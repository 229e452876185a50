"""Fixtures of the crash test.

``DURABILITY_BROKER`` selects the broker (``ferry``, the default, or ``mosquitto``); the other
``DURABILITY_*`` knobs are described in README.md and ``durability_support.Settings``.

The broker is started on a fixed free port of 127.0.0.1 with its data directory under the test's
tmp_path; the test SIGKILLs and restarts it (same port, same directory). Teardown ends it, by PID.
The test's summary is printed at the end of the pytest run whether or not ``-s`` is given.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from durability_support import (SUMMARY, FerryBroker, MosquittoBroker, Settings,
                                ferry_source_binary, free_port)


@pytest.fixture(scope="session")
def settings() -> Settings:
    try:
        return Settings.from_env()
    except ValueError as err:
        raise pytest.UsageError(str(err)) from None


@pytest.fixture
def run_id() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def broker(settings: Settings, tmp_path: Path):
    if settings.broker == "ferry":
        binary = ferry_source_binary()
        if not binary.is_file():
            pytest.fail(f"Ferry binary not found at {binary}; build it (cargo build) or set "
                        "FERRY_BIN", pytrace=False)
        proc = FerryBroker(tmp_path, free_port(), binary)
    else:
        proc = MosquittoBroker(tmp_path, free_port())
        if not Path(proc.binary).is_file():
            pytest.fail(f"mosquitto not found at {proc.binary} (set MOSQUITTO_BIN)", pytrace=False)
    try:
        yield proc
    finally:
        proc.stop()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001
    if SUMMARY:
        terminalreporter.section("durability crash test")
        for line in SUMMARY:
            terminalreporter.write_line(line)
