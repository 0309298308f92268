"""A hung test ends the run with every thread's stack, instead of hanging it until CI's own limit.

pytest-timeout (`timeout` in pyproject.toml) fails a test that overruns by raising from its SIGALRM handler,
and the run goes on. That cannot always end a hang. The handler's exception is raised in whatever Python
frame the main thread is running: under the test's event loop that may be a task other than the stuck one,
which it kills or which swallows it, while the test goes on waiting (and the handler fires once per test).
A main thread blocked in native code (a lock inside a C extension, the GIL held by a thread that waits)
never runs the handler at all. Either way the run hangs with nothing printed: CI's run on 2026-12-07 sat in
a test_gpu_serving teardown until its 5,400 s limit.

This plugin arms `faulthandler`'s watchdog for each test (its setup, call and teardown, which for the last
test of a session includes the session fixtures' teardown).
That watchdog is a C thread: past `LIMIT_FACTOR` times the test timeout it writes the Python stack of every
thread to the terminal, even with the GIL held elsewhere, and exits the process with status 1. The servers
and tools the tests started get SIGTERM from the kernel as the process dies (devstack.processes sets
PR_SET_PDEATHSIG on them).
"""

from __future__ import annotations

import faulthandler
import os
from collections.abc import Generator
from typing import IO

import pytest

LIMIT_FACTOR = 2.0  # past pytest-timeout's own limit, so a hang it can break is left to it
LIMIT_ENV = "FAR_TEST_WATCHDOG_S"  # seconds, to override the limit; 0 turns the watchdog off (to attach a debugger)

_stream: IO[str] | None = None
_limit_key = pytest.StashKey[float]()


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


def pytest_configure(config: pytest.Config) -> None:
    global _stream
    # The terminal's own descriptor, taken before pytest's capture replaces sys.stderr (as pytest's
    # faulthandler plugin does): the C watchdog writes to a file descriptor, not to a Python object.
    _stream = os.fdopen(os.dup(2), "w")
    config.stash[_limit_key] = limit_for(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    global _stream
    faulthandler.cancel_dump_traceback_later()
    if _stream is not None:
        _stream.close()
        _stream = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    limit = item.config.stash[_limit_key]
    if _stream is not None and limit > 0:
        faulthandler.dump_traceback_later(limit, exit=True, file=_stream)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
