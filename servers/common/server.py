"""The one `serve()` every server uses: settings, infra clients, interceptors, health, reflection, drain."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from redis.asyncio import Redis
from sqlalchemy import Table

from servers.common import event_loop
from servers.common.access import AccessDeclarationError, access_rules
from servers.common.auth import BearerAuthenticator, RevocationList, TokenVerifier
from servers.common.config import ConfigError, Settings
from servers.common.db import Database, redact
from servers.common.events import EventBus
from servers.common.interceptors import (
    AccessInterceptor,
    AuthInterceptor,
    ErrorInterceptor,
    ObservabilityInterceptor,
    RequestIdInterceptor,
)
from servers.common.observability import configure_logging, configure_tracing, start_metrics_server
from servers.common.outbox import Outbox
from servers.common.pagination import PageTokens

log = structlog.get_logger("far.server")

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
SHUTDOWN_STEP_S = 10.0
"""The most one stopping hook or closer may take; past it the step is cancelled, named in a warning, and the
shutdown goes on (`server.stop` gets its grace plus this)."""


CANCEL_WAIT_S = 1.0
"""How long an overrun shutdown step is given to end once cancelled before the shutdown goes on without it."""


async def _bounded(work: Awaitable[object], limit_s: float) -> bool:
    """Await `work` for at most `limit_s` (its error is raised); False when it overran. An overrun is cancelled
    and given CANCEL_WAIT_S to end, then left behind: unlike `asyncio.wait_for`, which waits for the cancelled
    work however long it takes, a step that does not end on its cancel cannot hold the shutdown."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=limit_s)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task in done:
        task.result()
        return True
    task.cancel()
    task.add_done_callback(lambda ended: ended.cancelled() or ended.exception())  # nothing left unretrieved
    await asyncio.wait({task}, timeout=CANCEL_WAIT_S)
    return False


async def _shutdown_step(kind: str, step: Callable[[], Awaitable[object]]) -> None:
    """Run one shutdown step within SHUTDOWN_STEP_S; an overrun or an error is logged, never raised."""
    name = getattr(step, "__qualname__", repr(step))
    try:
        if not await _bounded(step(), SHUTDOWN_STEP_S):
            log.warning(
                "a shutdown step did not finish in time; cancelled", kind=kind, step=name, limit_s=SHUTDOWN_STEP_S
            )
    except Exception:
        log.exception("error in a shutdown step", kind=kind, step=name)


@dataclass
class Runtime:
    """What a service's setup gets: settings and the shared clients, created once per process."""

    settings: Settings
    page_tokens: PageTokens
    database: Database | None = None
    redis: Redis | None = None
    events: EventBus | None = None
    revocations: RevocationList | None = None
    authenticators: list[BearerAuthenticator] = field(default_factory=list)
    """The service's own bearer credentials, tried before JWTs (see `servers.common.auth.BearerAuthenticator`)."""
    _stopping: list[Callable[[], Awaitable[object]]] = field(default_factory=list)
    _closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def on_stopping(self, hook: Callable[[], Awaitable[object]]) -> None:
        """Run `hook` when the server begins to stop, while calls still run (first registered, first run).

        For what must reach callers before running calls are cancelled, such as a final message on long
        streams. By then health says NOT_SERVING and the drain delay has passed, so clients that reconnect
        go elsewhere; errors are logged and the stop goes on.
        """
        self._stopping.append(hook)

    async def stopping(self) -> None:
        """Run the stopping hooks (`RunningServer.stop()` does, before `server.stop(grace)`)."""
        for hook in self._stopping:
            await _shutdown_step("stopping hook", hook)

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Run `closer` at shutdown, after the server stopped taking calls (last registered, first run)."""
        self._closers.append(closer)

    async def close(self) -> None:
        for closer in reversed(self._closers):
            await _shutdown_step("closer", closer)


@dataclass(frozen=True)
class ServiceSpec:
    """How to build one server: its name, default port, full gRPC service names, and a setup function."""

    name: str
    default_port: int
    service_names: Sequence[str]
    setup: Callable[[grpc.aio.Server, Runtime], Awaitable[None]]
    uses_database: bool = True
    uses_redis: bool = True
    outbox: Table | None = None
    """The service's outbox table (`servers.common.outbox.outbox_table`); its events then survive Redis outages."""


def _database_url(settings: Settings) -> str:
    if settings.database_url:
        return settings.database_url
    from servers.common.embedded import ensure_postgres

    url = ensure_postgres(settings.data_dir / "postgres")
    log.warning("DATABASE_URL is not set: using the embedded PostgreSQL", url=redact(url))
    return url


def _redis_url(settings: Settings) -> str:
    if settings.redis_url:
        return settings.redis_url
    from servers.common.embedded import ensure_redis

    url = ensure_redis(settings.data_dir / "redis").url
    log.warning("REDIS_URL is not set: using the embedded Redis", url=url)
    return url


async def build_runtime(spec: ServiceSpec, settings: Settings) -> Runtime:
    runtime = Runtime(settings=settings, page_tokens=PageTokens(settings.page_token_secret))
    if spec.uses_redis:
        redis = Redis.from_url(_redis_url(settings), decode_responses=False)
        runtime.redis = redis
        runtime.events = EventBus(redis, settings.redis_key_prefix)
        runtime.revocations = RevocationList(redis, settings.redis_key_prefix)
        runtime.on_close(redis.aclose)
    if spec.uses_database:
        outbox = None
        if spec.outbox is not None and runtime.events is not None:
            outbox = Outbox(spec.outbox, runtime.events, source=spec.name)
        database = Database(_database_url(settings), events=runtime.events, outbox=outbox)
        runtime.database = database
        runtime.on_close(database.close)
    return runtime


def _write_ready_file(path: Path, grpc_port: int, metrics_port: int | None) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"grpc_port": grpc_port, "metrics_port": metrics_port, "pid": os.getpid()}))
    tmp.replace(path)


@dataclass
class RunningServer:
    """A started server: its bound port, runtime and health servicer; `stop()` drains and closes it."""

    server: grpc.aio.Server
    port: int
    metrics_port: int | None
    runtime: Runtime
    health: health.aio.HealthServicer

    async def stop(self) -> None:
        settings = self.runtime.settings
        log.info("draining", service=settings.service_name, grace_s=settings.shutdown_grace_s)
        try:
            await _shutdown_step("health", self.health.enter_graceful_shutdown)
            await asyncio.sleep(settings.drain_delay_s)
            await self.runtime.stopping()
            await _stop_grpc(self.server, settings.shutdown_grace_s)
        finally:
            await self.runtime.close()
            log.info("stopped", service=settings.service_name)


async def _stop_grpc(server: grpc.aio.Server, grace_s: float) -> None:
    """`server.stop(grace)`, bounded: a stop that outlives its grace by SHUTDOWN_STEP_S is given up on."""
    if not await _bounded(server.stop(grace_s), grace_s + SHUTDOWN_STEP_S):
        log.warning("the gRPC server did not stop in time; closing anyway", limit_s=grace_s + SHUTDOWN_STEP_S)


async def start_server(spec: ServiceSpec, settings: Settings) -> RunningServer:
    """Build the server with the common interceptors, health and reflection, and start it.

    AccessDeclarationError, before anything is started, when a method of `spec.service_names` has no
    valid `(far.api.v1.access)` declaration in the compiled contracts.
    """
    rules = access_rules(spec.service_names)
    tracing = configure_tracing(spec.name, settings.traces_exporter)
    domain = settings.error_domain
    runtime = await build_runtime(spec, settings)
    server = grpc.aio.server(
        interceptors=[
            RequestIdInterceptor(),
            ObservabilityInterceptor(tracing=tracing),
            # With Redis, revoked (signed-out) access tokens are refused before they expire.
            # With mTLS, the peer certificate's SPIFFE id first (servers/common/tls.py).
            AuthInterceptor(
                TokenVerifier(settings.jwt_keys),
                domain,
                runtime.revocations,
                runtime.authenticators,
                mtls=settings.tls is not None,
            ),
            # Who may call each method, as its contract declares it; ownership checks stay in the services.
            AccessInterceptor(rules, domain),
            ErrorInterceptor(domain),
        ],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    try:
        await spec.setup(server, runtime)
        if runtime.database is not None and runtime.database.outbox is not None:
            relay = asyncio.create_task(runtime.database.run_outbox_relay(), name="outbox-relay")

            async def stop_relay() -> None:
                relay.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await relay

            runtime.on_close(stop_relay)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection([*spec.service_names, health_name, reflection.SERVICE_NAME], server)
        try:
            # With mTLS configured the server has no plaintext port at all.
            if settings.tls is not None:
                port = server.add_secure_port(settings.grpc_listen, settings.tls.server_credentials())
            else:
                port = server.add_insecure_port(settings.grpc_listen)
        except RuntimeError:  # grpcio raises (older versions returned 0) when the address is in use
            port = 0
        if port == 0:
            raise ConfigError(f"GRPC_LISTEN={settings.grpc_listen}: the address cannot be bound")
        metrics_port = start_metrics_server(settings.metrics_listen) if settings.metrics_listen else None
        await server.start()
    except BaseException:
        await runtime.close()
        raise
    for name in ("", *spec.service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    host = settings.grpc_listen.rpartition(":")[0]
    log.info(
        "serving",
        grpc=f"{host}:{port}",
        tls="mtls" if settings.tls else "plaintext",
        event_loop=settings.event_loop,
        metrics_port=metrics_port,
        services=list(spec.service_names),
    )
    return RunningServer(server, port, metrics_port, runtime, health_servicer)


async def serve_async(spec: ServiceSpec, settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT, then stop taking calls, drain and close everything."""
    running = await start_server(spec, settings)
    try:
        if settings.ready_file:
            _write_ready_file(settings.ready_file, running.port, running.metrics_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await running.stop()


def run(spec: ServiceSpec) -> None:
    """Entry point of `python -m servers.<service>`: exit 2 with one line on a configuration error."""
    try:
        settings = Settings.from_env(spec.name, spec.default_port)
    except ConfigError as error:
        print(f"far-{spec.name}: configuration error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.service_name, settings.log_level, settings.log_format)
    try:
        event_loop.run(serve_async(spec, settings), settings.event_loop)
    except ConfigError as error:
        print(f"far-{spec.name}: configuration error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except AccessDeclarationError as error:
        print(f"far-{spec.name}: contract error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
