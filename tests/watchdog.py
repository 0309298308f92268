"""A hung test ends the run with every thread's stack, and stops what the run started, instead of hanging it.

pytest-timeout (`timeout` in pyproject.toml) fails a test that overruns by raising from its SIGALRM handler,
and the run goes on. That cannot always end a hang. The handler's exception is raised in whatever Python
frame the main thread is running: under the test's event loop that may be a task other than the stuck one,
which it kills or which swallows it, while the test goes on waiting (and the handler fires once per test).
A main thread blocked in native code (a lock inside a C extension, the GIL held by a thread that waits)
never runs the handler at all. Either way the run hangs with nothing printed: CI's run on 2026-12-07 sat in
a test_gpu_serving teardown until its 5,400 s limit.

This plugin watches each test (its setup, call and teardown; for the last test of a session that includes
the session fixtures' teardown). Past `LIMIT_FACTOR` times the test timeout a thread of its own names the
test, writes every thread's Python stack to the terminal, runs the callbacks given to `on_hang` in the order
given (the run's conftest stops the processes devstack started, then the embedded servers) and exits the
process with status 1. That thread needs the GIL; if it cannot get it, `faulthandler`'s C thread writes the
stacks and exits `BACKSTOP_S` later (at most one limit later). The limit follows pytest-timeout's setting
for the test (`@pytest.mark.timeout`, `--timeout`, the ini, `PYTEST_TIMEOUT`); entering pdb turns the
watchdog off for the rest of the run. When the C thread ends the run, processes that devstack started from
the main thread still get SIGTERM from the kernel (PR_SET_PDEATHSIG); those started from other threads (the
tests' tritonservers, moto) and the embedded servers are left running.

PYTEST_DONT_REWRITE: it has no asserts to rewrite, and tests/conftest.py imports it before pytest loads it.
"""

from __future__ import annotations

import faulthandler
import os
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import IO

import pytest

LIMIT_FACTOR = 2.0  # past pytest-timeout's own limit, so a hang it can break is left to it
LIMIT_ENV = "FAR_TEST_WATCHDOG_S"  # seconds, to override the limit; 0 turns the watchdog off (to attach a debugger)
BACKSTOP_S = 60.0  # the time the watchdog's thread has to write and clean up before the C thread exits

_watchdog: Watchdog | None = None


def run_timeout(config: pytest.Config) -> float:
    """pytest-timeout's limit for the run: `--timeout`, else the ini's `timeout`, else `PYTEST_TIMEOUT`; 0: off."""
    timeout = config.getoption("timeout", None)
    if timeout is None:
        try:
            timeout = config.getini("timeout") or None
        except ValueError:  # pytest-timeout is not loaded (`-p no:timeout`)
            return 0.0
    if timeout is None:
        timeout = os.environ.get("PYTEST_TIMEOUT") or 0
    return max(0.0, float(timeout))


def limit_for(item: pytest.Item, run_timeout_s: float) -> float:
    """The watchdog's limit for `item` in seconds: `LIMIT_FACTOR` x the test's timeout (its `timeout` mark's,
    else the run's); 0, off, when that timeout is off."""
    timeout = run_timeout_s
    mark = item.get_closest_marker("timeout")
    if mark is not None:
        value = mark.args[0] if mark.args else mark.kwargs.get("timeout")
        if value is not None:
            timeout = max(0.0, float(value))
    return timeout * LIMIT_FACTOR


def on_hang(callback: Callable[[], object]) -> None:
    """Run `callback` (from the watchdog's thread, in the order given) if a test hangs; a no-op when off."""
    if _watchdog is not None:
        _watchdog.cleanups.append(callback)


@dataclass(frozen=True)
class _Armed:
    test: str
    limit_s: float
    deadline: float  # time.monotonic(): the watchdog's thread acts
    backstop: float  # time.monotonic(): faulthandler's C thread acts


class Watchdog:
    """One thread that ends the process when the armed test outlives its deadline."""

    def __init__(self, stream: IO[str], run_timeout_s: float, limit_s: float | None) -> None:
        self.cleanups: list[Callable[[], object]] = []
        self.run_timeout_s = run_timeout_s
        self.limit_s = limit_s  # every test's, from `LIMIT_ENV`; None: each test's own (`limit_for`)
        self._stream = stream
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._armed: _Armed | None = None
        self._expiring = False
        threading.Thread(target=self._watch, name="test-watchdog", daemon=True).start()

    def arm(self, test: str, limit_s: float) -> None:
        now = time.monotonic()
        with self._lock:
            if self._expiring:
                return
            self._armed = _Armed(test, limit_s, now + limit_s, now + limit_s + min(BACKSTOP_S, limit_s))
            self._arm_backstop(self._armed)
        self._changed.set()

    def rearm_backstop(self) -> None:
        """Put faulthandler's timer back (pytest's faulthandler plugin cancels it when a test fails)."""
        with self._lock:
            if self._armed is not None:
                self._arm_backstop(self._armed)

    def disarm(self) -> None:
        with self._lock:
            if self._expiring:
                return  # the run is ending: the backstop stays armed behind the cleanups
            self._armed = None
            faulthandler.cancel_dump_traceback_later()
        self._changed.set()

    def _arm_backstop(self, armed: _Armed) -> None:
        left = max(0.001, armed.backstop - time.monotonic())
        faulthandler.dump_traceback_later(left, exit=True, file=self._stream)

    def _watch(self) -> None:
        while True:
            with self._lock:
                armed = self._armed
            if self._changed.wait(None if armed is None else max(0.0, armed.deadline - time.monotonic())):
                self._changed.clear()  # re-armed or disarmed: read the new deadline
                continue
            with self._lock:
                if armed is None or self._armed is not armed:
                    continue
                self._expiring = True
            self._expire(armed)

    def _expire(self, armed: _Armed) -> None:
        out = self._stream
        out.write(f"\n+++ watchdog: {armed.test} still running after {armed.limit_s:g} s; every thread's stack:\n")
        out.flush()
        faulthandler.dump_traceback(file=out, all_threads=True)
        for cleanup in self.cleanups:
            out.write(f"+++ watchdog: cleanup {cleanup!r}\n")
            out.flush()
            try:
                cleanup()
            except Exception as error:  # the others still run
                out.write(f"+++ watchdog: cleanup {cleanup!r} failed: {error!r}\n")
        out.write("+++ watchdog: ending the run (exit status 1)\n")
        out.flush()
        os._exit(1)


def pytest_configure(config: pytest.Config) -> None:
    global _watchdog
    override = os.environ.get(LIMIT_ENV, "").strip()
    limit = float(override) if override else None
    if config.getoption("usepdb", False) or (limit is not None and limit <= 0):
        return
    # The terminal's own descriptor, taken before pytest's capture replaces sys.stderr (as pytest's
    # faulthandler plugin does): faulthandler writes to a file descriptor, not to a Python object.
    _watchdog = Watchdog(os.fdopen(os.dup(2), "w"), run_timeout(config), limit)


def pytest_unconfigure(config: pytest.Config) -> None:
    global _watchdog
    if _watchdog is not None:
        _watchdog.disarm()
        _watchdog = None  # its thread, a daemon, idles until the process ends


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    watchdog = _watchdog
    if watchdog is None:
        yield
        return
    limit = watchdog.limit_s if watchdog.limit_s is not None else limit_for(item, watchdog.run_timeout_s)
    if limit > 0:
        watchdog.arm(item.nodeid, limit)
    try:
        yield
    finally:
        watchdog.disarm()


@pytest.hookimpl(trylast=True)
def pytest_exception_interact() -> None:
    if _watchdog is not None:
        _watchdog.rearm_backstop()


@pytest.hookimpl(trylast=True)
def pytest_enter_pdb() -> None:
    global _watchdog
    if _watchdog is not None:  # someone is debugging: no limit from here on
        _watchdog.disarm()
        _watchdog = None
