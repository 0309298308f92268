"""A running set of FAR servers behind Envoy: what `make run` and the end-to-end tests start.

    with Stack(["gamed"], env={"DATABASE_URL": ..., "REDIS_URL": ..., "JWT_SECRET": ...},
               run_dir=tmp_path) as stack:
        grpc.secure_channel(stack.grpc_target("gamed"),                  # the server itself (mTLS)
                            stack.client_credentials("service", "e2e"))
        grpc.insecure_channel(stack.envoy_grpc_target)                   # through Envoy's web listener
        grpc.secure_channel(stack.envoy_partner_target,                  # Envoy's partner listener
                            stack.client_credentials("partner", "game-server"))
        httpx.get(f"{stack.envoy_http_url}/v1/games")                    # JSON through Envoy

By default (`mtls=True`) the stack has a dev PKI in `run_dir/pki` (devstack/pki.py): every server listens
on mTLS only (GRPC_TLS_*), Envoy reaches them with its own certificate and serves the partner listener.
Servers start first (each with READY_FILE; port 0 means "pick one", read back from the file), then
Envoy with a config rendered for the ports they got. `stop()` stops servers, then Envoy.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from devstack import catalog
from devstack import envoy as envoy_config
from devstack.catalog import Service
from devstack.pki import DevPki
from devstack.processes import (
    ManagedProcess,
    ProcessDied,
    free_port,
    http_get,
    read_ready_file,
    require_free_ports,
    stop_all,
    wait_until,
)

if TYPE_CHECKING:
    import grpc

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def python_env(base: Mapping[str, str]) -> dict[str, str]:
    """`base` with the repository and generated/python importable (also without an installed project)."""
    env = dict(base)
    paths = [str(catalog.ROOT), str(catalog.ROOT / "generated" / "python")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_migrations(services: Sequence[str], env: Mapping[str, str], *, log_path: Path, timeout: float = 120.0) -> None:
    """`python -m servers.common.migrations upgrade <services>` with `env` (DATABASE_URL); raises on failure."""
    if not services:
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = ManagedProcess(
        "migrations",
        [sys.executable, "-m", "servers.common.migrations", "upgrade", *services],
        log_path=log_path,
        env=python_env({**os.environ, **env}),
        cwd=catalog.ROOT,
    ).start()
    try:
        wait_until(lambda: proc.returncode is not None, timeout=timeout, what="migrations")
    finally:
        proc.stop(timeout=5)
    if proc.returncode != 0:
        raise RuntimeError(f"migrations failed (status {proc.returncode}); last lines of {log_path}:\n{proc.tail()}")


@dataclass(frozen=True)
class ServerInfo:
    service: Service
    process: ManagedProcess
    grpc_port: int
    metrics_port: int | None


@dataclass(frozen=True)
class EndpointRow:
    """One line of the endpoint table `make run` prints."""

    service: str
    grpc: str
    rest: str
    metrics: str
    health: str


class Stack:
    """Servers for `services` plus (optionally) Envoy in front of them, all stopped by `stop()`.

    `env` is added to the environment of every server (DATABASE_URL, REDIS_URL, JWT_SECRET, ...).
    Ports are 0 ("pick a free one") unless given: `grpc_ports` / `metrics_ports` per service,
    `envoy_web_port` / `envoy_admin_port` / `envoy_partner_port`. `commands` replaces `python -m
    servers.<name>` for a service (a stand-in server in a test). `metrics=False` leaves METRICS_LISTEN
    empty. `mtls=False` runs plaintext servers and no partner listener, as before mTLS.

    `replicas` runs several processes of a service (free ports only): Envoy's cluster for the service lists
    them all and spreads calls over them; `servers[name]` is the first, `replicas[name]` all of them.
    """

    def __init__(
        self,
        services: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        run_dir: Path,
        envoy: bool = True,
        host: str = "127.0.0.1",
        grpc_ports: Mapping[str, int] | None = None,
        metrics_ports: Mapping[str, int] | None = None,
        metrics: bool = True,
        envoy_web_port: int = 0,
        envoy_admin_port: int = 0,
        envoy_partner_port: int = 0,
        mtls: bool = True,
        envoy_listen_host: str | None = None,
        envoy_concurrency: int | None = 2,
        descriptor_path: Path = catalog.DESCRIPTOR_SET,
        commands: Mapping[str, Sequence[str]] | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 15.0,
        progress: Progress | None = None,
        replicas: Mapping[str, int] | None = None,
    ) -> None:
        self.services = [catalog.get(name) for name in services]
        if len({s.name for s in self.services}) != len(self.services):
            raise ValueError(f"a service is listed twice: {list(services)}")
        self.replica_counts = {s.name: (replicas or {}).get(s.name, 1) for s in self.services}
        for name, count in self.replica_counts.items():
            if count < 1:
                raise ValueError(f"{name}: replicas must be at least 1, not {count}")
            if count > 1 and ((grpc_ports or {}).get(name) or (metrics_ports or {}).get(name)):
                raise ValueError(f"{name}: several replicas cannot share a fixed port")
        self.env = dict(env or {})
        self.run_dir = Path(run_dir).resolve()
        self.envoy_enabled = envoy
        self.host = host
        self.grpc_ports = dict(grpc_ports or {})
        self.metrics_ports = dict(metrics_ports or {})
        self.metrics = metrics
        self._web_port_wanted = envoy_web_port
        self._admin_port_wanted = envoy_admin_port
        self._partner_port_wanted = envoy_partner_port
        self.mtls = mtls
        self.pki: DevPki | None = None
        self.envoy_listen_host = envoy_listen_host or host
        self.envoy_concurrency = envoy_concurrency
        self.descriptor_path = descriptor_path
        self.commands = {name: list(argv) for name, argv in (commands or {}).items()}
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.progress = progress or _quiet
        self.replicas: dict[str, list[ServerInfo]] = {}
        self.envoy_process: ManagedProcess | None = None
        self.envoy_web_port: int | None = None
        self.envoy_admin_port: int | None = None
        self.envoy_partner_port: int | None = None
        self._processes: list[ManagedProcess] = []

    # --- paths and addresses ---------------------------------------------------------------------

    @property
    def servers(self) -> dict[str, ServerInfo]:
        """Each running service's first replica (its only one, unless `replicas` said otherwise)."""
        return {name: infos[0] for name, infos in self.replicas.items()}

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def envoy_config_path(self) -> Path:
        return self.run_dir / "envoy.json"

    def _ready_file(self, service: Service, replica: int = 0) -> Path:
        return self.run_dir / "ready" / f"{_replica_name(service.name, replica)}.json"

    def grpc_target(self, service: str, replica: int = 0) -> str:
        """`127.0.0.1:PORT` of the service's own gRPC server (not through Envoy); its `replica`-th process."""
        return f"{self._connect_host(self.host)}:{self._server(service, replica).grpc_port}"

    def metrics_url(self, service: str, replica: int = 0) -> str | None:
        port = self._server(service, replica).metrics_port
        return f"http://{self._connect_host(self.host)}:{port}/metrics" if port else None

    @property
    def envoy_grpc_target(self) -> str:
        """Envoy's web listener as a gRPC target (h2c): `127.0.0.1:PORT`."""
        return f"{self._connect_host(self.envoy_listen_host)}:{self._require(self.envoy_web_port)}"

    @property
    def envoy_partner_target(self) -> str:
        """Envoy's partner listener (gRPC over mTLS): `127.0.0.1:PORT`."""
        return f"{self._connect_host(self.envoy_listen_host)}:{self._require(self.envoy_partner_port)}"

    def client_credentials(self, kind: str, name: str) -> grpc.ChannelCredentials:
        """gRPC credentials presenting `spiffe://far.network/<kind>/<name>` (issued by the stack's CA if
        new) and trusting only that CA; for the servers' ports and the partner listener."""
        import grpc

        if self.pki is None:
            raise RuntimeError("this stack runs without mTLS (mtls=False)")
        cert, key = self.pki.ensure_identity(kind, name).read()
        return grpc.ssl_channel_credentials(self.pki.ca_file.read_bytes(), key, cert)

    @property
    def envoy_http_url(self) -> str:
        return f"http://{self.envoy_grpc_target}"

    @property
    def envoy_admin_url(self) -> str:
        return f"http://{envoy_config.ADMIN_HOST}:{self._require(self.envoy_admin_port)}"

    def _server(self, name: str, replica: int = 0) -> ServerInfo:
        try:
            return self.replicas[name][replica]
        except KeyError:
            raise KeyError(f"{name} is not running in this stack (running: {', '.join(self.servers)})") from None
        except IndexError:
            raise IndexError(f"{name} runs {len(self.replicas[name])} replica(s), not {replica + 1}") from None

    def _require(self, port: int | None) -> int:
        if port is None:
            raise RuntimeError("Envoy is not running in this stack")
        return port

    @staticmethod
    def _connect_host(host: str) -> str:
        return "127.0.0.1" if host in ("0.0.0.0", "") else host

    # --- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> Self:
        """Start the servers, then Envoy; wait until all serve and Envoy sees them healthy.

        On any failure everything started so far is stopped before the exception propagates.
        """
        try:
            self._check_fixed_ports()
            if self.mtls:
                self.pki = DevPki.ensure(
                    self.run_dir / "pki", services=[s.name for s in self.services], partners=catalog.PARTNERS
                )
            self._start_servers()
            if self.envoy_enabled:
                self._start_envoy()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop servers (together), then Envoy. Safe to call twice."""
        servers = [info.process for infos in self.replicas.values() for info in infos]
        servers += [p for p in self._processes if p not in servers and p is not self.envoy_process]
        stop_all(servers, timeout=self.stop_timeout)
        if self.envoy_process is not None:
            self.envoy_process.stop(timeout=self.stop_timeout)

    def check_alive(self) -> None:
        """Raise ProcessDied if a server or Envoy has exited."""
        for proc in self._processes:
            proc.check()

    def processes(self) -> list[ManagedProcess]:
        return list(self._processes)

    # --- servers -----------------------------------------------------------------------------------

    def _check_fixed_ports(self) -> None:
        fixed: dict[str, int] = {}
        for service in self.services:
            fixed[f"{service.name} gRPC"] = self.grpc_ports.get(service.name, 0)
            if self.metrics:
                fixed[f"{service.name} metrics"] = self.metrics_ports.get(service.name, 0)
        require_free_ports(self.host, fixed)
        if self.envoy_enabled:
            listeners = {"Envoy web listener": self._web_port_wanted}
            if self.mtls:
                listeners["Envoy partner listener"] = self._partner_port_wanted
            require_free_ports(self.envoy_listen_host, listeners)
            require_free_ports(envoy_config.ADMIN_HOST, {"Envoy admin": self._admin_port_wanted})

    def _server_argv(self, service: Service) -> list[str]:
        if service.name in self.commands:
            return self.commands[service.name]
        if not service.implemented:
            raise RuntimeError(f"{service.name} has no server yet (no module servers.{service.name}.__main__)")
        return [sys.executable, "-m", service.module]

    def _server_env(self, service: Service, replica: int = 0) -> dict[str, str]:
        grpc_port = self.grpc_ports.get(service.name, 0)
        metrics_listen = f"{self.host}:{self.metrics_ports.get(service.name, 0)}" if self.metrics else ""
        env = python_env({**os.environ, **self.env})
        env.setdefault("LOG_FORMAT", "json")
        env.setdefault("LOG_LEVEL", "info")
        env.update(
            SERVICE_NAME=service.name,
            GRPC_LISTEN=f"{self.host}:{grpc_port}",
            METRICS_LISTEN=metrics_listen,
            READY_FILE=str(self._ready_file(service, replica)),
        )
        if self.pki is not None:
            files = self.pki.service(service.name)
            env.update(
                GRPC_TLS_CERT_FILE=str(files.cert),
                GRPC_TLS_KEY_FILE=str(files.key),
                GRPC_TLS_CLIENT_CA_FILE=str(self.pki.ca_file),
            )
        return env

    def _waves(self) -> list[list[Service]]:
        """The services in start order: a service linked to another of this stack (catalog.LINKS) starts after it."""
        names = {s.name for s in self.services}
        waves: list[list[Service]] = []
        placed: set[str] = set()
        pending = list(self.services)
        while pending:
            wave = [
                s for s in pending if all(t in placed or t not in names for t in catalog.LINKS.get(s.name, {}).values())
            ]
            if not wave:
                raise ValueError(f"services link to each other in a cycle: {[s.name for s in pending]}")
            waves.append(wave)
            placed |= {s.name for s in wave}
            pending = [s for s in pending if s.name not in placed]
        return waves

    def _linked_env(self, service: Service) -> dict[str, str]:
        return {
            variable: self.grpc_target(target)
            for variable, target in catalog.LINKS.get(service.name, {}).items()
            if target in self.servers
        }

    def _start_servers(self) -> None:
        for wave in self._waves():
            self._start_wave(wave)

    def _start_wave(self, wave: Sequence[Service]) -> None:
        starting: list[tuple[Service, int, ManagedProcess]] = []
        for service in wave:
            for replica in range(self.replica_counts[service.name]):
                name = _replica_name(service.name, replica)
                ready = self._ready_file(service, replica)
                ready.parent.mkdir(parents=True, exist_ok=True)
                ready.unlink(missing_ok=True)
                proc = ManagedProcess(
                    name,
                    self._server_argv(service),
                    log_path=self.log_dir / f"{name}.log",
                    env={**self._server_env(service, replica), **self._linked_env(service)},
                    cwd=catalog.ROOT,
                ).start()
                self._processes.append(proc)
                starting.append((service, replica, proc))
                self.progress(f"{name}: started (pid {proc.pid}), log {proc.log_path}")
        for service, replica, proc in starting:
            ready_path = self._ready_file(service, replica)
            data: dict[str, Any] = wait_until(
                partial(read_ready_file, ready_path),
                timeout=self.start_timeout,
                what=f"{proc.name} to serve ({ready_path})",
                watch=[proc],
            )
            metrics_port = data.get("metrics_port")
            info = ServerInfo(
                service=service,
                process=proc,
                grpc_port=int(data["grpc_port"]),
                metrics_port=int(metrics_port) if metrics_port else None,
            )
            self.replicas.setdefault(service.name, []).append(info)
            self.progress(f"{proc.name}: serving gRPC on {self.host}:{info.grpc_port}")

    # --- Envoy -------------------------------------------------------------------------------------

    def _edge_tls(self, env: Mapping[str, str]) -> envoy_config.EdgeTls | None:
        if self.pki is None:
            return None
        edge = self.pki.edge()
        return envoy_config.EdgeTls(self.pki.ca_file, edge.cert, edge.key, envoy_config.partner_ids_from_env(env))

    def render_envoy(self, web_port: int, admin_port: int, partner_port: int | None = None) -> dict[str, Any]:
        upstreams = {
            name: [f"{self._connect_host(self.host)}:{info.grpc_port}" for info in infos]
            for name, infos in self.replicas.items()
        }
        env = {**os.environ, **self.env}
        tls = self._edge_tls(env)
        options = envoy_config.EdgeOptions(
            web_port=web_port,
            admin_port=admin_port,
            tls=tls,
            partner_port=partner_port if tls is not None else None,
            listen_host=self.envoy_listen_host,
            access_log_path=str(self.log_dir / "envoy-access.log"),
            # The servers' own JWT settings: the edge verifies tokens with the same keys.
            jwt=envoy_config.JwtSettings.from_env(env),
            **envoy_config.EdgeOptions.edge_settings_from_env(env),
        )
        return envoy_config.render(catalog.SERVICES, self.descriptor_path, upstreams, options)

    def _start_envoy(self) -> None:
        picked = not self._web_port_wanted or not self._admin_port_wanted or not self._partner_port_wanted
        attempts = 3 if picked else 1
        for attempt in range(attempts):
            web_port = self._web_port_wanted or free_port(self.envoy_listen_host)
            admin_port = self._admin_port_wanted or free_port(envoy_config.ADMIN_HOST)
            partner_port = (self._partner_port_wanted or free_port(self.envoy_listen_host)) if self.mtls else None
            envoy_config.write(self.render_envoy(web_port, admin_port, partner_port), self.envoy_config_path)
            proc = ManagedProcess(
                "envoy",
                envoy_config.envoy_argv(self.envoy_config_path, concurrency=self.envoy_concurrency),
                log_path=self.log_dir / "envoy.log",
                cwd=self.run_dir,
            ).start()
            self.envoy_process = proc
            self._processes.append(proc)
            self.progress(f"envoy: started (pid {proc.pid}), config {self.envoy_config_path}, log {proc.log_path}")
            self.envoy_web_port, self.envoy_admin_port = web_port, admin_port
            self.envoy_partner_port = partner_port
            try:
                wait_until(self._envoy_ready, timeout=self.start_timeout, what="Envoy to be ready", watch=[proc])
            except ProcessDied:
                # A port picked a moment ago may have been taken since: pick again.
                lost_race = "ddress already in use" in proc.tail(40)
                self._processes.remove(proc)
                self.envoy_process = None
                if attempt + 1 < attempts and lost_race:
                    continue
                raise
            break
        wait_until(
            self._unhealthy_clusters_or_none,
            timeout=self.start_timeout,
            what="Envoy to see every server healthy",
            watch=self._processes,
            interval=0.1,
        )
        self.progress(f"envoy: ready, web {self.envoy_http_url}, admin {self.envoy_admin_url}")

    def _envoy_ready(self) -> bool:
        status, body = http_get(f"{self.envoy_admin_url}/ready", timeout=1.0)
        return status == 200 and body.strip() == "LIVE"

    def unhealthy_clusters(self) -> dict[str, str]:
        """Routed clusters whose hosts Envoy does not (yet) consider healthy, with the reason."""
        status, body = http_get(f"{self.envoy_admin_url}/clusters?format=json", timeout=2.0)
        if status != 200:
            return {name: f"admin answered {status}" for name in self.servers}
        problems: dict[str, str] = {}
        clusters = {c.get("name"): c for c in json.loads(body).get("cluster_statuses", [])}
        for name in self.servers:
            hosts = clusters.get(name, {}).get("host_statuses", [])
            if not hosts:
                problems[name] = "no hosts"
            for host in hosts:
                health = host.get("health_status", {})
                flags = sorted(k for k, v in health.items() if k != "eds_health_status" and v is True)
                if flags or health.get("eds_health_status") not in (None, "HEALTHY"):
                    problems[name] = ", ".join(flags) or str(health.get("eds_health_status"))
        return problems

    def _unhealthy_clusters_or_none(self) -> bool:
        return not self.unhealthy_clusters()

    # --- reporting ---------------------------------------------------------------------------------

    def endpoint_rows(self, health: Mapping[str, str] | None = None) -> list[EndpointRow]:
        described = catalog.describe(catalog.load_descriptor_set(self.descriptor_path))
        rows = []
        for service in catalog.SERVICES:
            info = self.servers.get(service.name)
            found = described.get(service.service_name)
            rest = " ".join(found.rest_prefixes) if found and found.rest_prefixes else "-"
            if info is None:
                rows.append(EndpointRow(service.name, "-", rest, "-", "UNIMPLEMENTED"))
                continue
            rows.append(
                EndpointRow(
                    service=service.name,
                    grpc=f"{self._connect_host(self.host)}:{info.grpc_port}",
                    rest=rest,
                    metrics=self.metrics_url(service.name) or "-",
                    health=(health or {}).get(service.name, "-"),
                )
            )
        return rows

    def iter_log_files(self) -> Iterator[Path]:
        yield from sorted(self.log_dir.glob("*.log"))


def grpc_health(
    target: str, service: str = "", timeout: float = 2.0, credentials: grpc.ChannelCredentials | None = None
) -> str:
    """The grpc.health.v1 status name of `service` at `target`, or the error code's name."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            return code.name if code is not None else "ERROR"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def wait_healthy(stack: Stack, timeout: float = 30.0) -> dict[str, str]:
    """Wait until every server of `stack` answers SERVING for its full service name; the statuses."""

    # Asked as the edge asks: with Envoy's certificate when the servers want one.
    credentials = stack.client_credentials("edge", "envoy") if stack.pki is not None else None

    def serving(target: str, service: str) -> str | None:
        status = grpc_health(target, service, credentials=credentials)
        return status if status == "SERVING" else None

    deadline = time.monotonic() + timeout
    statuses: dict[str, str] = {}
    for name, infos in stack.replicas.items():
        for replica, info in enumerate(infos):
            statuses[name] = wait_until(
                partial(serving, stack.grpc_target(name, replica), info.service.service_name),
                timeout=max(0.1, deadline - time.monotonic()),
                what=f"{info.process.name} to report SERVING",
                watch=[info.process],
                interval=0.2,
            )
    return statuses


def _replica_name(service: str, replica: int) -> str:
    """A replica's name in logs and ready files: the service's for the first, `<service>-<n>` for the others."""
    return service if replica == 0 else f"{service}-{replica}"
