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
test, writes every thread's Python stack to the terminal, runs the callbacks given to `on_hang` (the run's
conftest stops the embedded PostgreSQL and Redis and the processes devstack started) and exits the process
with status 1. That thread needs the GIL; if it cannot get it, `faulthandler`'s C thread writes the stacks
and exits `BACKSTOP_S` later (at most one limit later). Processes that devstack started from the main
thread then still get SIGTERM from the kernel (PR_SET_PDEATHSIG); those started from other threads (the
tests' tritonservers, moto) and the embedded servers are left running.

PYTEST_DONT_REWRITE: it has no asserts to rewrite, and tests/conftest.py imports it before pytest loads it.
"""

from __future__ import annotations

import faulthandler
import os
import threading
import time
from collections.abc import Callable, Generator
from typing import IO

import pytest

LIMIT_FACTOR = 2.0  # past pytest-timeout's own limit, so a hang it can break is left to it
LIMIT_ENV = "FAR_TEST_WATCHDOG_S"  # seconds, to override the limit; 0 turns the watchdog off (to attach a debugger)
BACKSTOP_S = 30.0  # the time the watchdog's thread has to write and clean up before the C thread exits

_limit_key = pytest.StashKey[float]()
_watchdog: Watchdog | None = None


def limit_for(config: pytest.Config) -> float:
    """The watchdog's limit in seconds: `LIMIT_ENV` if set, else `LIMIT_FACTOR` x the test timeout in force
    (`--timeout`, else the ini's `timeout`); 0, off, when that timeout is off or the run stops in pdb."""
    override = os.environ.get(LIMIT_ENV, "").strip()
    if override:
        return max(0.0, float(override))
    if config.getoption("usepdb", False):
        return 0.0
    timeout = config.getoption("timeout", None)
    if timeout is None:
        try:
            timeout = config.getini("timeout")
        except ValueError:  # pytest-timeout is not loaded (`-p no:timeout`)
            timeout = 0
    return max(0.0, float(timeout or 0)) * LIMIT_FACTOR


def on_hang(callback: Callable[[], object]) -> None:
    """Run `callback` (from the watchdog's thread, last registered first) if a test hangs; no-op when off."""
    if _watchdog is not None:
        _watchdog.cleanups.append(callback)


class Watchdog:
    """One thread that ends the process when the armed test outlives its deadline."""

    def __init__(self, stream: IO[str]) -> None:
        self.cleanups: list[Callable[[], object]] = []
        self._stream = stream
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._armed: tuple[float, float, str] | None = None  # (deadline, limit, test)
        threading.Thread(target=self._watch, name="test-watchdog", daemon=True).start()

    def arm(self, test: str, limit_s: float) -> None:
        with self._lock:
            self._armed = (time.monotonic() + limit_s, limit_s, test)
        self._changed.set()
        faulthandler.dump_traceback_later(limit_s + min(BACKSTOP_S, limit_s), exit=True, file=self._stream)

    def disarm(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        with self._lock:
            self._armed = None
        self._changed.set()

    def _watch(self) -> None:
        while True:
            with self._lock:
                armed = self._armed
            if self._changed.wait(None if armed is None else max(0.0, armed[0] - time.monotonic())):
                self._changed.clear()  # re-armed or disarmed: read the new deadline
                continue
            with self._lock:
                if self._armed is armed and armed is not None:
                    self._expire(armed[2], armed[1])

    def _expire(self, test: str, limit_s: float) -> None:
        out = self._stream
        out.write(f"\n+++ watchdog: {test} still running after {limit_s:g} s; every thread's stack:\n")
        out.flush()
        faulthandler.dump_traceback(file=out, all_threads=True)
        for cleanup in reversed(self.cleanups):
            try:
                cleanup()
            except Exception as error:  # the others still run
                out.write(f"+++ watchdog: cleanup {cleanup!r} failed: {error!r}\n")
        out.write("+++ watchdog: ending the run (exit status 1)\n")
        out.flush()
        os._exit(1)


def pytest_configure(config: pytest.Config) -> None:
    global _watchdog
    limit = limit_for(config)
    config.stash[_limit_key] = limit
    if limit > 0:
        # The terminal's own descriptor, taken before pytest's capture replaces sys.stderr (as pytest's
        # faulthandler plugin does): faulthandler writes to a file descriptor, not to a Python object.
        _watchdog = Watchdog(os.fdopen(os.dup(2), "w"))


def pytest_unconfigure(config: pytest.Config) -> None:
    global _watchdog
    if _watchdog is not None:
        _watchdog.disarm()
        _watchdog = None  # its thread, a daemon, idles until the process ends


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    watchdog = _watchdog
    if watchdog is not None:
        watchdog.arm(item.nodeid, item.config.stash[_limit_key])
    try:
        yield
    finally:
        if watchdog is not None:
            watchdog.disarm()
