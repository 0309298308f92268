"""Configuration from environment variables only. A malformed value stops the process with one line."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from servers.common.auth import JwtKeys
from servers.common.event_loop import DEFAULT_EVENT_LOOP, EVENT_LOOPS
from servers.common.tls import ServerTls, TlsFilesError


class ConfigError(Exception):
    """A missing or malformed environment variable; the message names it and says what is expected."""


class Env:
    """Typed reads of environment variables; each failure is a ConfigError naming the variable."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    def text(self, name: str, default: str | None = None) -> str | None:
        value = self._environ.get(name, "").strip()
        return value if value else default

    def required(self, name: str, hint: str) -> str:
        value = self.text(name)
        if value is None:
            raise ConfigError(f"{name} is not set: {hint}")
        return value

    def integer(self, name: str, default: int, *, minimum: int = 0, maximum: int = 2**31) -> int:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not an integer") from None
        if not minimum <= value <= maximum:
            raise ConfigError(f"{name}={value} must be between {minimum} and {maximum}")
        return value

    def number(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"{name}={raw!r} is not a finite number")
        if value < minimum:
            raise ConfigError(f"{name}={value} must be at least {minimum}")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = (self.text(name) or default).lower()
        if value not in choices:
            raise ConfigError(f"{name}={value!r} must be one of {', '.join(choices)}")
        return value

    def url(self, name: str, schemes: tuple[str, ...]) -> str | None:
        """A URL with one of `schemes`, or None when unset (meaning: use the embedded default)."""
        value = self.text(name)
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in schemes:
            raise ConfigError(f"{name} must be a {' or '.join(s + '://' for s in schemes)} URL")
        if not (parts.netloc or parts.query or (parts.scheme == "unix" and parts.path)):
            raise ConfigError(f"{name} has no host")
        return value

    def listen_address(self, name: str, default: str | None) -> str | None:
        """`host:port` (port 0 = any free port); the empty string turns the listener off."""
        raw = self._environ.get(name)
        value = default if raw is None else raw.strip()
        if not value:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"{name}={value!r} must be host:port, e.g. 127.0.0.1:50056")
        return value


@dataclass(frozen=True)
class Settings:
    """The settings every server shares. Service-specific settings are read with `Env` by the service."""

    service_name: str
    grpc_listen: str
    metrics_listen: str | None
    ready_file: Path | None
    database_url: str | None
    redis_url: str | None
    redis_key_prefix: str
    bsc_rpc_url: str | None
    jwt_keys: JwtKeys
    page_token_secret: bytes
    data_dir: Path
    log_level: str
    log_format: str
    event_loop: str
    traces_exporter: str
    drain_delay_s: float
    shutdown_grace_s: float
    tls: ServerTls | None = None
    """mTLS (GRPC_TLS_*): the server then listens on TLS only and requires a client certificate."""

    @property
    def error_domain(self) -> str:
        """The ErrorInfo domain of this service's errors."""
        return f"{self.service_name}.far.network"

    @classmethod
    def from_env(cls, service_name: str, default_grpc_port: int, environ: Mapping[str, str] | None = None) -> Settings:
        env = Env(environ)
        name = env.text("SERVICE_NAME", service_name) or service_name
        jwt_secret = env.required("JWT_SECRET", "set it to a random string of at least 32 characters")
        if len(jwt_secret) < 32:
            raise ConfigError("JWT_SECRET must be at least 32 characters long")
        secrets = {env.text("JWT_KEY_ID", "k1") or "k1": jwt_secret}
        for item in filter(None, (env.text("JWT_PREVIOUS_SECRETS") or "").split(",")):
            kid, sep, secret = item.strip().partition(":")
            if not sep or not kid or len(secret) < 32:
                raise ConfigError("JWT_PREVIOUS_SECRETS must be kid:secret pairs, secrets of 32+ characters")
            if kid in secrets:
                raise ConfigError(f"JWT_PREVIOUS_SECRETS repeats the key id {kid!r}")
            secrets[kid] = secret
        current_kid = next(iter(secrets))
        grpc_listen = env.listen_address("GRPC_LISTEN", f"127.0.0.1:{default_grpc_port}")
        if grpc_listen is None:
            raise ConfigError("GRPC_LISTEN is empty: it must be host:port, e.g. 127.0.0.1:50056")
        ready_file = env.text("READY_FILE")
        return cls(
            service_name=name,
            grpc_listen=grpc_listen,
            metrics_listen=env.listen_address("METRICS_LISTEN", ""),
            ready_file=Path(ready_file) if ready_file else None,
            database_url=env.url("DATABASE_URL", ("postgresql", "postgres", "postgresql+asyncpg")),
            redis_url=env.url("REDIS_URL", ("redis", "rediss", "unix")),
            redis_key_prefix=env.text("REDIS_KEY_PREFIX", "far:") or "far:",
            bsc_rpc_url=env.url("BSC_RPC_URL", ("http", "https", "ws", "wss")),
            jwt_keys=JwtKeys(
                current_kid=current_kid,
                secrets=secrets,
                issuer=env.text("JWT_ISSUER", "far-auth") or "far-auth",
                audience=env.text("JWT_AUDIENCE", "far-platform") or "far-platform",
            ),
            page_token_secret=hashlib.sha256(b"far-page-token:" + jwt_secret.encode()).digest(),
            data_dir=Path(env.text("FAR_DATA_DIR", ".run/data") or ".run/data"),
            log_level=env.choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
            log_format=env.choice("LOG_FORMAT", "json", ("json", "console")),
            event_loop=env.choice("EVENT_LOOP", DEFAULT_EVENT_LOOP, EVENT_LOOPS),
            traces_exporter=env.choice("OTEL_TRACES_EXPORTER", "none", ("none", "console", "otlp")),
            drain_delay_s=env.number("DRAIN_DELAY_SECONDS", 0.5),
            shutdown_grace_s=env.number("SHUTDOWN_GRACE_SECONDS", 5.0),
            tls=_server_tls(env, grpc_listen),
        )


TLS_VARIABLES = ("GRPC_TLS_CERT_FILE", "GRPC_TLS_KEY_FILE", "GRPC_TLS_CLIENT_CA_FILE")


LOOPBACK_HOSTS = frozenset({"localhost", "::1", "[::1]"})


def is_loopback(listen: str) -> bool:
    host = listen.rpartition(":")[0].lower()
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def _server_tls(env: Env, grpc_listen: str) -> ServerTls | None:
    """The server's certificate, key and client CA from GRPC_TLS_*: all three, or none for plaintext, which a
    server serves only on a loopback address unless GRPC_ALLOW_PLAINTEXT=true says a sidecar does the TLS."""
    paths = {name: env.text(name) for name in TLS_VARIABLES}
    given = [name for name, value in paths.items() if value]
    if not given:
        allowed = env.choice("GRPC_ALLOW_PLAINTEXT", "false", ("true", "false")) == "true"
        if not allowed and not is_loopback(grpc_listen):
            raise ConfigError(
                f"GRPC_LISTEN={grpc_listen} is reachable from other machines, so the server needs mTLS: set "
                f"{', '.join(TLS_VARIABLES)} (or GRPC_ALLOW_PLAINTEXT=true where a sidecar terminates mTLS)"
            )
        return None
    if len(given) < len(TLS_VARIABLES):
        missing = ", ".join(name for name in TLS_VARIABLES if name not in given)
        raise ConfigError(f"{', '.join(given)} set but not {missing}: mTLS needs all of {', '.join(TLS_VARIABLES)}")
    cert, key, ca = (Path(paths[name] or "") for name in TLS_VARIABLES)
    try:
        return ServerTls.load(cert, key, ca)
    except TlsFilesError as error:
        raise ConfigError(f"GRPC_TLS_*: {error}") from None
