"""Child processes with their own log files, stopped by PID, never outliving the Python that started them.

Every process runs in its own session (a Ctrl-C in the terminal reaches only devstack, which then
stops things in order), writes stdout and stderr to one log file, and is recorded in a registry that
an atexit hook empties. On Linux a child started from the main thread also gets SIGTERM from the
kernel if its parent dies without cleaning up (SIGKILL, a crash).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1


class ProcessDied(RuntimeError):
    """A process exited while it should have been starting or running."""

    def __init__(self, process: ManagedProcess, when: str) -> None:
        self.process = process
        code = process.returncode
        how = f"signal {-code}" if code is not None and code < 0 else f"status {code}"
        super().__init__(
            f"{process.name} exited with {how} {when}; last lines of {process.log_path}:\n" + process.tail()
        )


class PortInUse(RuntimeError):
    """A fixed port that a process should listen on is taken."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ManagedProcess:
    """One child process, its log file and its PID."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None
        self._reaped = False

    def start(self) -> ManagedProcess:
        if self._popen is not None:
            raise RuntimeError(f"{self.name} was already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # The PDEATHSIG tie is to the starting *thread*: only take it from the main thread, which
        # lives as long as the process does. A preexec_fn makes subprocess fork rather than vfork, so
        # gRPC's fork handlers run in the child: the starting process needs GRPC_ENABLE_FORK_SUPPORT=false
        # (devstack/__init__.py sets it) or the child may abort before exec (grpc/grpc#43055).
        on_linux_main_thread = sys.platform == "linux" and threading.current_thread() is threading.main_thread()
        with self.log_path.open("wb") as log:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent if on_linux_main_thread else None,
            )
        _REGISTRY.add(self)
        return self

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise RuntimeError(f"{self.name} has not been started")
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    @property
    def started(self) -> bool:
        return self._popen is not None

    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def check(self, when: str = "while running") -> None:
        """Raise ProcessDied if the process has exited (`when` completes the message)."""
        if self._popen is not None and self._popen.poll() is not None:
            raise ProcessDied(self, when)

    def terminate(self) -> None:
        """Ask the process to stop (SIGTERM); `wait_stopped` finishes the job."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)

    def wait_stopped(self, deadline: float) -> int | None:
        """Wait for the process until `deadline` (time.monotonic), then SIGKILL its whole group."""
        if self._popen is None:
            return None
        if self._reaped:
            return self._popen.returncode
        try:
            self._popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._kill_group()
            self._popen.wait(timeout=5)
        # Anything it started and left behind in its session goes too. Only now: once reaped, its
        # PID (= its process group id) may later belong to someone else.
        self._kill_group()
        self._reaped = True
        _REGISTRY.discard(self)
        return self._popen.returncode

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to `timeout` seconds, SIGKILL. Returns the exit status."""
        self.terminate()
        return self.wait_stopped(time.monotonic() + timeout)

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def __repr__(self) -> str:
        state = "not started" if self._popen is None else f"pid {self.pid}, returncode {self.returncode}"
        return f"ManagedProcess({self.name!r}, {state})"


_REGISTRY: set[ManagedProcess] = set()


def stop_all(processes: Iterable[ManagedProcess], timeout: float = 15.0) -> dict[str, int | None]:
    """Stop several processes together: SIGTERM to all, then wait for each within one deadline."""
    procs = [p for p in processes if p.started]
    for proc in procs:
        proc.terminate()
    deadline = time.monotonic() + timeout
    return {proc.name: proc.wait_stopped(deadline) for proc in procs}


@atexit.register
def stop_leftovers() -> None:
    """Stop every process started here that is still running (at exit, or when a test run must end)."""
    stop_all(list(_REGISTRY), timeout=10.0)


# --- Waiting ---------------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout: float,
    what: str,
    watch: Iterable[ManagedProcess] = (),
    interval: float = 0.05,
) -> Any:
    """Poll `predicate` until it returns something truthy (returned) or `timeout` passes.

    Raises ProcessDied as soon as a watched process exits, TimeoutError after `timeout`.
    """
    watched = list(watch)
    deadline = time.monotonic() + timeout
    while True:
        for proc in watched:
            proc.check(f"while waiting for {what}")
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = "".join(f"\n--- {p.name} ({p.log_path}):\n{p.tail(10)}" for p in watched)
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(interval)


def read_ready_file(path: Path) -> dict[str, Any] | None:
    """The JSON a server writes once it serves, or None while it is not there (written by rename)."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """GET `url`: (status, body), or (0, reason) when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback admin URLs
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc)


# --- Ports -----------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind to 0, read, release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def require_free_ports(host: str, ports: Mapping[str, int]) -> None:
    """Raise PortInUse naming every fixed port (by what it is for) that something else holds."""
    taken = [f"{port} ({what})" for what, port in ports.items() if port and not port_free(host, port)]
    if taken:
        raise PortInUse(f"port{'s' if len(taken) > 1 else ''} already in use on {host}: {', '.join(taken)}")
