"""The one list of FAR services: names, packages, ports. Everything else derives from it.

The descriptor set (`generated/descriptors/far.binpb`) is the other source: it says which services
have contracts, what their REST paths are and who may call each method (`method_access`).
`check_descriptor` makes the two agree.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from far.api.v1 import access_pb2
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

from servers.common.access import rule_from

ROOT = Path(__file__).resolve().parent.parent
DESCRIPTOR_SET = ROOT / "generated" / "descriptors" / "far.binpb"

ENVOY_WEB_PORT = 8080
# The partner listener: gRPC over TLS with required client certificates from the platform CA.
ENVOY_PARTNER_PORT = 8443
ENVOY_ADMIN_PORT = 9901
REALTIME_SOCKETIO_PORT = 3001

_FAR_PACKAGE = re.compile(r"^far\.([a-z][a-z0-9]*)\.v(\d+)$")


@dataclass(frozen=True)
class Service:
    """One FAR service: one proto package, one gRPC service, one server process."""

    name: str
    grpc_port: int
    metrics_port: int
    version: str = "v1"

    @property
    def package(self) -> str:
        return f"far.{self.name}.{self.version}"

    @property
    def service_name(self) -> str:
        """The full gRPC service name, e.g. `far.gamed.v1.GamedService`."""
        return f"{self.package}.{self.name.capitalize()}Service"

    @property
    def grpc_prefix(self) -> str:
        """The HTTP/2 path prefix of every method of the service: `/far.gamed.v1.GamedService/`."""
        return f"/{self.service_name}/"

    @property
    def module(self) -> str:
        return f"servers.{self.name}"

    @property
    def implemented(self) -> bool:
        """A server exists when `python -m servers.<name>` can run."""
        try:
            return importlib.util.find_spec(f"{self.module}.__main__") is not None
        except ModuleNotFoundError:
            return False


SERVICES: tuple[Service, ...] = (
    Service("auth", grpc_port=50051, metrics_port=9101),
    Service("inference", grpc_port=50052, metrics_port=9102),
    Service("realtime", grpc_port=50053, metrics_port=9103),
    Service("gaming", grpc_port=50054, metrics_port=9104),
    Service("desci", grpc_port=50055, metrics_port=9105),
    Service("gamed", grpc_port=50056, metrics_port=9106),
    Service("gpu", grpc_port=50057, metrics_port=9107),
    Service("staking", grpc_port=50058, metrics_port=9108),
)
BY_NAME: Mapping[str, Service] = {s.name: s for s in SERVICES}

# Partner identities whose client certificates the partner listener admits (their SPIFFE ids:
# devstack/pki.py); the access declarations name the same ids (`partners: "game-server"`).
PARTNERS: tuple[str, ...] = ("game-server", "node-agent")

# Which servers call which: the environment variable that gives a server another service's gRPC address.
# The stack starts the called service first and sets the variable to where it actually serves.
LINKS: Mapping[str, Mapping[str, str]] = {
    "inference": {"INFERENCE_GPU_SERVICE": "gpu"},
}


@dataclass(frozen=True)
class RouteRateLimit:
    """A token bucket at the edge shared by `methods` (gRPC paths), over every way to call them: gRPC,
    gRPC-Web and each REST binding. On top of the listener's own bucket (EDGE_RATE_LIMIT_RPS)."""

    name: str
    methods: tuple[str, ...]
    requests_per_second: int
    burst: int


# Tighter than the listener's default where a call is cheap to send and costly or sensitive to answer:
# sign-in mints nonces (Redis) and verifies signatures; each Envoy holds its own buckets.
ROUTE_RATE_LIMITS: tuple[RouteRateLimit, ...] = (
    RouteRateLimit(
        "auth-sign-in",
        (
            "/far.auth.v1.AuthService/CreateChallenge",
            "/far.auth.v1.AuthService/SignIn",
            "/far.auth.v1.AuthService/RefreshSession",
        ),
        requests_per_second=50,
        burst=100,
    ),
)


def get(name: str) -> Service:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown service {name!r}; known: {', '.join(BY_NAME)}") from None


def implemented_services(services: Iterable[Service] = SERVICES) -> list[Service]:
    return [s for s in services if s.implemented]


class CatalogMismatch(ValueError):
    """The descriptor set and the catalog disagree about which services exist."""


@dataclass(frozen=True)
class DescribedService:
    """What the descriptor set says about one service."""

    service_name: str
    methods: tuple[str, ...]
    rest_prefixes: tuple[str, ...]
    access: Mapping[str, dict[str, Any]] = field(default_factory=dict, hash=False)
    """Method name -> its `(far.api.v1.access)` declaration as JSON (`{"level": "public"}`)."""


def load_descriptor_set(path: Path = DESCRIPTOR_SET) -> descriptor_pb2.FileDescriptorSet:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"no descriptor set at {path}; run `make generate`") from None
    return descriptor_pb2.FileDescriptorSet.FromString(data)


def _http_rules(method: descriptor_pb2.MethodDescriptorProto) -> list[http_pb2.HttpRule]:
    # Parsed as a known extension because importing annotations_pb2 registered it.
    if not method.options.HasExtension(annotations_pb2.http):
        return []
    rule = method.options.Extensions[annotations_pb2.http]
    return [rule, *rule.additional_bindings]


def _rest_prefix(rule: http_pb2.HttpRule) -> str | None:
    """`/v1/{name=games/*}/builds` -> `/v1/games`: the literal path up to the first wildcard."""
    kind = rule.WhichOneof("pattern")
    pattern = rule.custom.path if kind == "custom" else getattr(rule, kind) if kind else ""
    if not pattern:
        return None
    expanded = re.sub(r"\{[^}=]+=([^}]*)\}", r"\1", pattern)
    expanded = re.sub(r"\{[^}]*\}", "*", expanded).split(":", 1)[0]
    literal: list[str] = []
    for segment in expanded.strip("/").split("/"):
        if "*" in segment:
            break
        literal.append(segment)
    return "/" + "/".join(literal) if literal else None


def access_of(method: descriptor_pb2.MethodDescriptorProto) -> dict[str, Any]:
    """A method's `(far.api.v1.access)` declaration as JSON: `{"level": "roles", "roles": ["publisher"]}`.

    `{"level": "undeclared"}` for a method without one (tests/unit/test_access_declarations.py fails on it).
    """
    # Parsed as a known extension because importing access_pb2 registered it.
    if not method.options.HasExtension(access_pb2.access):
        return {"level": "undeclared"}
    return rule_from(method.options.Extensions[access_pb2.access]).as_json()


def method_access(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, dict[str, Any]]:
    """Who may call each method of every `far.*` service: gRPC path (`/far.gamed.v1.GamedService/GetGame`) -> access."""
    return {
        f"/{file.package}.{svc.name}/{method.name}": access_of(method)
        for file in fds.file
        if file.package.startswith("far.")
        for svc in file.service
        for method in svc.method
    }


def describe(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, DescribedService]:
    """Every `far.*` service in the descriptor set, keyed by full service name."""
    found: dict[str, DescribedService] = {}
    for file in fds.file:
        if not file.package.startswith("far."):
            continue
        for svc in file.service:
            full = f"{file.package}.{svc.name}"
            prefixes: set[str] = set()
            for method in svc.method:
                for rule in _http_rules(method):
                    prefix = _rest_prefix(rule)
                    if prefix:
                        prefixes.add(prefix)
            found[full] = DescribedService(
                service_name=full,
                methods=tuple(m.name for m in svc.method),
                rest_prefixes=tuple(sorted(prefixes)),
                access={m.name: access_of(m) for m in svc.method},
            )
    return found


def check_descriptor(
    fds: descriptor_pb2.FileDescriptorSet,
    services: Iterable[Service] = SERVICES,
    *,
    require: Iterable[Service] = (),
) -> dict[str, DescribedService]:
    """Check the descriptor set against the catalog and return what it describes.

    Every `far.*` service in the descriptor must be in the catalog under the name the catalog gives
    it; every service in `require` (those about to run) must be in the descriptor. A catalog
    service without a contract yet is fine: the edge answers UNIMPLEMENTED for it.
    """
    described = describe(fds)
    known = {s.service_name for s in services}
    problems: list[str] = []
    for full in sorted(described):
        if full in known:
            continue
        package = full.rsplit(".", 1)[0]
        match = _FAR_PACKAGE.match(package)
        if match and match.group(1) in BY_NAME:
            problems.append(
                f"{full} in the descriptor set, but the catalog calls it {get(match.group(1)).service_name}"
            )
        else:
            problems.append(f"{full} in the descriptor set is not in devstack/catalog.py")
    problems += [
        f"{s.service_name} runs but is not in the descriptor set (run `make generate`)"
        for s in require
        if s.service_name not in described
    ]
    if problems:
        raise CatalogMismatch("; ".join(problems))
    return described
