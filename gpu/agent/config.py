"""The node agent's settings, from environment variables only; a bad value stops it with one line (exit 2).

The operator's private key is read from a file (AGENT_OPERATOR_KEY_FILE) so that it never shows on a
command line or in the process's environment, and the file must not be readable by others (as ssh
insists for its keys).
"""

from __future__ import annotations

import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import grpc

from gpu.triton import MODEL_REPOSITORY
from servers.common.config import ConfigError, Env
from servers.common.event_loop import DEFAULT_EVENT_LOOP, EVENT_LOOPS

DEV_CHAIN_ID = 97

NODE_ID = re.compile(r"^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
REGION = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
LABEL_KEY = re.compile(r"^[a-z0-9_.-]{1,63}\Z")
PRIVATE_KEY = re.compile(r"^0x[0-9a-fA-F]{64}\Z")
HOST_PORT = re.compile(r"^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]{1,253}):[0-9]{1,5}\Z")


@dataclass(frozen=True)
class TlsFiles:
    """TLS to the gpu service: the CA that signed its certificate, and a client certificate for mTLS."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )


@dataclass(frozen=True)
class TritonAttach:
    """A Triton already running: its gRPC address (host:port) and Prometheus metrics URL."""

    grpc_address: str
    metrics_url: str


@dataclass(frozen=True)
class TritonLaunch:
    """Start a tritonserver (gpu/triton.py) on this model repository, keeping its files in `workdir`."""

    model_repository: Path
    workdir: Path
    load_models: tuple[str, ...]
    trace_url: str | None = None
    """An OTLP/HTTP collector (`host:port/v1/traces`) for Triton's OpenTelemetry traces; None: no tracing."""


@dataclass(frozen=True)
class AgentSettings:
    node_id: str
    gpu_service: str
    tls: TlsFiles | None
    operator_key: str = field(repr=False)
    chain_id: int
    region: str
    labels: Mapping[str, str]
    # What the inference service dials (host:port); None: the Triton gRPC address.
    endpoint: str | None
    endpoint_tls: bool
    triton: TritonAttach | TritonLaunch
    log_level: str
    log_format: str
    event_loop: str

    @property
    def node_name(self) -> str:
        return f"nodes/{self.node_id}"

    def channel(self) -> grpc.aio.Channel:
        """A channel to the gpu service: TLS when configured, plaintext otherwise."""
        if self.tls is None:
            return grpc.aio.insecure_channel(self.gpu_service)
        options = [("grpc.ssl_target_name_override", self.tls.server_name)] if self.tls.server_name else []
        return grpc.aio.secure_channel(self.gpu_service, self.tls.channel_credentials(), options=options)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AgentSettings:
        """AGENT_NODE_ID, AGENT_GPU_SERVICE (host:port), AGENT_OPERATOR_KEY_FILE (required);
        AGENT_TLS_CA_FILE [+ AGENT_TLS_CERT_FILE and AGENT_TLS_KEY_FILE for mTLS, AGENT_TLS_SERVER_NAME];
        AGENT_CHAIN_ID (97), AGENT_REGION (local), AGENT_LABELS (k=v,k=v), AGENT_ENDPOINT (host:port the
        platform reaches Triton at; default Triton's gRPC address), AGENT_ENDPOINT_TLS (false);
        Triton: AGENT_TRITON_GRPC + AGENT_TRITON_METRICS to attach, or AGENT_START_TRITON=1 with
        AGENT_MODEL_REPOSITORY (gpu/models), AGENT_TRITON_WORKDIR (.run/triton-<node id>) and
        AGENT_TRITON_LOAD_MODELS (none; placement loads models), AGENT_TRITON_TRACE_URL (none: Triton does not
        trace; `host:port/v1/traces` of an OTLP/HTTP collector); LOG_LEVEL, LOG_FORMAT."""
        env = Env(environ)
        node_id = env.required("AGENT_NODE_ID", "set it to this node's id, e.g. gpu-node-1")
        if not NODE_ID.match(node_id):
            raise ConfigError(
                f"AGENT_NODE_ID={node_id!r} must be 1-63 lower-case letters, digits and hyphens, "
                "starting with a letter and not ending with a hyphen"
            )
        region = env.text("AGENT_REGION", "local") or "local"
        if not REGION.match(region):
            raise ConfigError(f"AGENT_REGION={region!r} must be a lower-case region code, e.g. eu-west-1")
        return cls(
            node_id=node_id,
            gpu_service=_host_port(env, "AGENT_GPU_SERVICE", required=True) or "",
            tls=_tls_files(env),
            operator_key=_operator_key(env),
            chain_id=env.integer("AGENT_CHAIN_ID", DEV_CHAIN_ID, minimum=1, maximum=2**53),
            region=region,
            labels=_labels(env.text("AGENT_LABELS") or ""),
            endpoint=_host_port(env, "AGENT_ENDPOINT", required=False),
            endpoint_tls=_flag(env, "AGENT_ENDPOINT_TLS"),
            triton=_triton(env, node_id),
            log_level=env.choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
            log_format=env.choice("LOG_FORMAT", "json", ("json", "console")),
            event_loop=env.choice("EVENT_LOOP", DEFAULT_EVENT_LOOP, EVENT_LOOPS),
        )


def _host_port(env: Env, name: str, *, required: bool) -> str | None:
    value = env.required(name, "set it to host:port") if required else env.text(name)
    if value is not None and (not HOST_PORT.match(value) or int(value.rpartition(":")[2]) > 65535):
        raise ConfigError(f"{name}={value!r} must be host:port, e.g. 127.0.0.1:50057")
    return value


def _flag(env: Env, name: str) -> bool:
    return env.choice(name, "false", ("true", "false", "1", "0", "yes", "no")) in ("true", "1", "yes")


def _existing_file(env: Env, name: str) -> Path | None:
    value = env.text(name)
    if value is None:
        return None
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"{name}={value!r} is not a readable file")
    return path


def _tls_files(env: Env) -> TlsFiles | None:
    ca = _existing_file(env, "AGENT_TLS_CA_FILE")
    cert = _existing_file(env, "AGENT_TLS_CERT_FILE")
    key = _existing_file(env, "AGENT_TLS_KEY_FILE")
    if (cert is None) != (key is None):
        raise ConfigError("AGENT_TLS_CERT_FILE and AGENT_TLS_KEY_FILE must be set together (mTLS client certificate)")
    if ca is None:
        if cert is not None:
            raise ConfigError("AGENT_TLS_CERT_FILE needs AGENT_TLS_CA_FILE (the CA of the gpu service's certificate)")
        return None
    return TlsFiles(ca=ca, cert=cert, key=key, server_name=env.text("AGENT_TLS_SERVER_NAME"))


def _operator_key(env: Env) -> str:
    name = "AGENT_OPERATOR_KEY_FILE"
    path = _existing_file(env, name)
    if path is None:
        raise ConfigError(f"{name} is not set: point it at a file holding the operator wallet's 0x-hex private key")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{name}={str(path)!r} is accessible by group or others: chmod 600 it")
    key = path.read_text().strip()
    if not PRIVATE_KEY.match(key):
        raise ConfigError(f"{name}={str(path)!r} must hold one 0x-prefixed 32-byte hex private key")
    return key


def _labels(raw: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not LABEL_KEY.match(key) or len(value) > 255:
            raise ConfigError(
                f"AGENT_LABELS: {item!r} must be key=value (key: 1-63 of a-z 0-9 _ . -; value: at most 255 characters)"
            )
        labels[key] = value
    if len(labels) > 32:
        raise ConfigError("AGENT_LABELS has more than 32 labels")
    return labels


def _triton(env: Env, node_id: str) -> TritonAttach | TritonLaunch:
    grpc_address = _host_port(env, "AGENT_TRITON_GRPC", required=False)
    metrics_url = env.url("AGENT_TRITON_METRICS", ("http", "https"))
    if _flag(env, "AGENT_START_TRITON"):
        if grpc_address or metrics_url:
            raise ConfigError(
                "AGENT_START_TRITON=1 starts Triton: leave AGENT_TRITON_GRPC and AGENT_TRITON_METRICS unset"
            )
        repository = Path(env.text("AGENT_MODEL_REPOSITORY") or MODEL_REPOSITORY)
        if not repository.is_dir():
            raise ConfigError(f"AGENT_MODEL_REPOSITORY={str(repository)!r} is not a directory")
        workdir = Path(env.text("AGENT_TRITON_WORKDIR") or f".run/triton-{node_id}")
        models = tuple(filter(None, (m.strip() for m in (env.text("AGENT_TRITON_LOAD_MODELS") or "").split(","))))
        trace_url = env.text("AGENT_TRITON_TRACE_URL") or None
        return TritonLaunch(model_repository=repository, workdir=workdir, load_models=models, trace_url=trace_url)
    if grpc_address is None or metrics_url is None:
        raise ConfigError(
            "AGENT_TRITON_GRPC (host:port) and AGENT_TRITON_METRICS (http://host:port/metrics) must be set "
            "to attach to a running Triton, or AGENT_START_TRITON=1 to start one"
        )
    if not urlsplit(metrics_url).path.strip("/"):
        metrics_url = metrics_url.rstrip("/") + "/metrics"
    return TritonAttach(grpc_address=grpc_address, metrics_url=metrics_url)
