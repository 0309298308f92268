"""schemathesis against the OpenAPI document, through the real Envoy in front of the services that run.

The run fuzzes the document the edge serves at `/openapi.json`: operations are collected from the committed file
(envoy.OPENAPI_DOCUMENT; pytest collects before any stack runs), and the run first fetches the edge's document and
fails unless it is that same document (`edge_document`). schemathesis.pytest.from_fixture would load it from the
edge directly, but schemathesis 4.32 reads `Function._nodeid`, which pytest 9.2 no longer has.

Every operation of the services in the e2e stack (gamed, auth, gpu, inference) gets a bounded, deterministic run of
generated requests, valid and invalid, each with a fresh signed-in token that holds every role the
operations ask for, so that requests get past 401/403 into the services' own rules. Checks: no 5xx,
an answer within the response-time bound (a hang check; each request also has a timeout), responses
that agree with the document (status, content type, body schema), invalid requests refused, and every
error a `google.rpc.Status` JSON body with an ErrorInfo. Operations of services without a server answer
501 UNIMPLEMENTED by design, with the edge's ErrorInfo naming the service; one request each checks that.

The stack has no chain and no GPU node: inference's Generate and StreamJob never reach their 200 stream here (the
model has no serving node, no job exists), so the fuzz covers their validation and error answers; their streams are
tests/e2e/test_inference_e2e.py's.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from eth_account import Account
from far.gpu.v1 import node_pb2
from google.protobuf import json_format
from schemathesis import Case, CheckContext, Response
from schemathesis.checks import max_response_time, not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core.mutations import Mutation, OperatorKind
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation.meta import CoveragePhaseData, CoverageScenario
from schemathesis.hooks import HookContext
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from devstack import catalog, envoy
from devstack.stack import Stack
from gpu.agent.registration import new_claim, register_request, sign
from servers.common.chain import DEV_CHAIN_ID
from servers.inference.catalog import DEFAULT_MODELS
from tests.e2e.conftest import SERVICES

pytestmark = pytest.mark.e2e

AnyCase = Case[Any]

RUNNING_TAGS = [f"{name.capitalize()}Service" for name in SERVICES]
EXAMPLES_PER_OPERATION = 50
RESPONSE_TIME_LIMIT_S = 5.0
REQUEST_TIMEOUT_S = 10.0
# Every role an operation of a running service asks for (the access declarations), so calls reach the rules.
ROLES = ("user", "publisher", "admin")
# The fuzzer's wallet: it signs in (tokens for its address) and operates the known node (it signs the registration).
FUZZER_KEY = "0x" + "f2" * 32
FUZZER = Account.from_key(FUZZER_KEY).address.lower()
# A game, build, channel and GPU node made before the run (`known_resources`) and the catalog's model: half the valid
# cases name them, so that requests reach the services' rules past "not found"; the other half keep what was
# generated. No job or quote can exist in this stack (no node serves, no price on chain).
KNOWN_PATH_VALUES = {
    "game": "fuzz-known",
    "build": "linux-1",
    "channel": "stable",
    "account": "me",
    "node": "fuzz-node",
    "model": DEFAULT_MODELS[0].id,
}
# Ids a caller picks at creation: valid ones (derived from the generated value) let creates happen.
CREATE_ID_PARAMETERS = ("gameId", "buildId", "channelId")

CONFIG = SchemathesisConfig.from_dict(
    {
        "generation": {"max-examples": EXAMPLES_PER_OPERATION, "deterministic": True, "mode": "all"},
        "checks": {"max_response_time": RESPONSE_TIME_LIMIT_S},
        "suppress-health-check": ["all"],
    }
)
document = schemathesis.openapi.from_path(envoy.OPENAPI_DOCUMENT, config=CONFIG)
served = document.include(tag=RUNNING_TAGS)


def _coin(value: object) -> bool:
    """A deterministic coin flip, so that runs stay reproducible."""
    return zlib.crc32(repr(value).encode()) % 2 == 0


def _is_positive(case: AnyCase, location: ParameterLocation) -> bool:
    component = case.meta.components.get(location) if case.meta is not None else None
    return component is not None and component.mode.is_positive


@served.hook
def map_case(context: HookContext, case: AnyCase) -> AnyCase:
    """Valid cases: half name the known resources (KNOWN_PATH_VALUES), creates pick valid ids."""
    if case.path_parameters and _is_positive(case, ParameterLocation.PATH) and _coin(case.path_parameters):
        case.path_parameters = {k: KNOWN_PATH_VALUES.get(k, v) for k, v in case.path_parameters.items()}
    if case.query and _is_positive(case, ParameterLocation.QUERY):
        for name in CREATE_ID_PARAMETERS:
            if name in case.query:
                case.query[name] = f"f{zlib.crc32(repr(case.query[name]).encode()):08x}"
    return case


def error_body_is_rpc_status(ctx: CheckContext, response: Response, case: AnyCase) -> bool | None:
    """Every 4xx/5xx is the JSON form of `google.rpc.Status` with an ErrorInfo (docs/api-conventions.md)."""
    if response.status_code < 400:
        return None
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), response.headers
    body = json.loads(response.content)
    assert isinstance(body.get("code"), int), body
    assert body["code"] > 0, body
    assert isinstance(body.get("message"), str), body
    infos = [d for d in body.get("details", []) if d.get("@type") == "type.googleapis.com/google.rpc.ErrorInfo"]
    assert len(infos) == 1, body
    assert re.fullmatch(r"[A-Z][A-Z0-9_]*", infos[0].get("reason", "")), body
    assert infos[0].get("domain", "").endswith(".far.network"), body
    return None


def _enum_numbers() -> dict[str, frozenset[int]]:
    """Every enum of the contracts (full name) -> its value numbers, from the descriptor set Envoy uses."""
    numbers: dict[str, frozenset[int]] = {}

    def collect(prefix: str, enums: Any, messages: Any) -> None:
        for enum in enums:
            numbers[f"{prefix}{enum.name}"] = frozenset(value.number for value in enum.value)
        for message in messages:
            collect(f"{prefix}{message.name}.", message.enum_type, message.nested_type)

    for file in catalog.load_descriptor_set().file:
        collect(f"{file.package}.", file.enum_type, file.message_type)
    return numbers


ENUM_NUMBERS = _enum_numbers()


def _operation(case: AnyCase) -> dict[str, Any]:
    operation: dict[str, Any] = document.raw_schema["paths"][case.operation.path][case.method.lower()]
    return operation


def _query_enum_given_by_number(case: AnyCase, name: str) -> bool:
    """Whether query parameter `name` is an enum and was sent as one of its value numbers."""
    operation = _operation(case)
    (parameter,) = [p for p in operation["parameters"] if p["in"] == "query" and p["name"] == name]
    enum = str(parameter["schema"].get("$ref", "")).removeprefix("#/components/schemas/")
    value = str((case.query or {}).get(name))
    return re.fullmatch(r"[0-9]{1,10}", value) is not None and int(value) in ENUM_NUMBERS.get(enum, frozenset())


def _missing_fields_come_from_the_path(case: AnyCase) -> bool:
    """Whether the body leaves out required top-level fields only where the URL path fills a part of them, as
    `/v1/nodes/{node}` fills `node.name`: the service gets those fields set whatever the body says."""
    if not isinstance(case.body, dict):
        return False
    schema = _operation(case)["requestBody"]["content"]["application/json"]["schema"]
    if "$ref" in schema:
        schema = document.raw_schema["components"]["schemas"][schema["$ref"].removeprefix("#/components/schemas/")]
    missing = [name for name in schema.get("required", ()) if name not in case.body]
    bound = {binding.split(".")[0] for binding in _operation(case).get("x-grpc-path-bindings", {})}
    snake = [re.sub(r"[A-Z]", lambda upper: "_" + upper.group(0).lower(), name) for name in missing]
    return bool(missing) and all(field in bound for field in snake)


_ABSENT = object()


def _body_value(body: object, pointer: str) -> object:
    """The value `pointer` (`/properties/a/allOf/0/properties/b/type`, into the body schema) names in the body sent."""
    parts = pointer.strip("/").split("/")
    index = 0
    while index < len(parts):
        if parts[index] != "properties" or index + 1 == len(parts):
            index += 1
            continue
        name = parts[index + 1]
        if not isinstance(body, dict) or name not in body:
            return _ABSENT
        body = body[name]
        index += 2
    return body


def _mutation_read_by_proto_json(case: AnyCase, mutation: Mutation) -> bool:
    if (
        mutation.parameter_location == ParameterLocation.BODY
        and mutation.operator == OperatorKind.REMOVE_REQUIRED_PROPERTY
    ):
        return not mutation.path and _missing_fields_come_from_the_path(case)
    if mutation.parameter_location == ParameterLocation.BODY:
        return mutation.operator == OperatorKind.CHANGE_TYPE and mutation.new_value == "null"
    if mutation.parameter_location == ParameterLocation.QUERY and mutation.parameter:
        return _query_enum_given_by_number(case, mutation.parameter)
    return False


def _read_by_proto_json(case: AnyCase) -> bool:
    """Whether the invalid part of a negative case is a form proto3 JSON also reads (Envoy's transcoder does):
    JSON null for "unset", an enum given by its number, or no body at all, which the transcoder reads as `{}` (the
    service cannot tell the two apart; an empty update is valid, AIP-134). The document shows only the canonical
    forms and marks every body required. Also a required body field left out whose part the URL path fills."""
    data = case.meta.phase.data if case.meta is not None else None
    if isinstance(data, CoveragePhaseData):
        if data.parameter_location == ParameterLocation.QUERY and data.parameter:
            return _query_enum_given_by_number(case, data.parameter)
        if data.parameter_location == ParameterLocation.BODY and data.scenario == CoverageScenario.MISSING_PARAMETER:
            return True
        if data.parameter_location == ParameterLocation.BODY and data.location == "/required":
            return (
                data.scenario == CoverageScenario.OBJECT_MISSING_REQUIRED_PROPERTY
                and _missing_fields_come_from_the_path(case)
            )
        if data.parameter_location == ParameterLocation.BODY and data.location:
            null_given = _body_value(case.body, data.location) is None
            return data.scenario == CoverageScenario.INCORRECT_TYPE and null_given
        return False
    mutations = getattr(data, "mutations", ())
    return bool(mutations) and all(_mutation_read_by_proto_json(case, m) for m in mutations)


def invalid_data_is_refused(ctx: CheckContext, response: Response, case: AnyCase) -> bool | None:
    """schemathesis's negative_data_rejection, less the inputs proto3 JSON defines as valid."""
    if _read_by_proto_json(case):
        return None
    return negative_data_rejection(ctx, response, case)


CHECKS = [
    not_a_server_error,
    max_response_time,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    invalid_data_is_refused,
    error_body_is_rpc_status,
]


@pytest.fixture(scope="module")
def http_session() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


@pytest.fixture(scope="module")
def edge_document(stack: Stack, http_session: requests.Session) -> None:
    """The edge serves the document the run fuzzes (and whose operations it collected)."""
    response = http_session.get(f"{stack.envoy_http_url}/openapi.json", timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200, response.text
    assert response.json() == document.raw_schema, "the edge serves another document than envoy.OPENAPI_DOCUMENT"


@pytest.fixture(scope="module")
def fresh_auth(make_token: Callable[..., str]) -> Callable[[], dict[str, str]]:
    """A new token for every request: generated calls include SignOut, which revokes the token it carries."""
    return lambda: {"Authorization": f"Bearer {make_token(FUZZER, ROLES)}"}


@pytest.fixture(scope="module")
def known_resources(stack: Stack, make_token: Callable[..., str]) -> None:
    """The game, build, channel and node of KNOWN_PATH_VALUES, owned by the fuzzer's wallet."""
    game = KNOWN_PATH_VALUES["game"]
    claim = new_claim(KNOWN_PATH_VALUES["node"], "127.0.0.1:8001", FUZZER_KEY, DEV_CHAIN_ID)
    registration = register_request(claim, sign(claim, FUZZER_KEY), node_pb2.Node(cpu_cores=8))
    auth = {"Authorization": f"Bearer {make_token(FUZZER, ROLES)}"}
    calls: list[tuple[str, dict[str, Any]]] = [
        (f"/v1/games?gameId={game}", {"displayName": "Fuzz target"}),
        (
            f"/v1/games/{game}/builds?buildId=linux-1",
            {
                "platform": "PLATFORM_LINUX",
                "version": "1.0.0",
                "assets": [{"path": "bin/fuzz", "sizeBytes": "1", "sha256": "f2" * 32}],
            },
        ),
        (f"/v1/games/{game}/channels?channelId=stable", {}),
        (f"/v1/games/{game}/channels/stable:promote", {"build": f"games/{game}/builds/linux-1"}),
        ("/v1/nodes:register", json_format.MessageToDict(registration)),
    ]
    with requests.Session() as session:
        for path, body in calls:
            response = session.post(stack.envoy_http_url + path, json=body, headers=auth, timeout=REQUEST_TIMEOUT_S)
            assert response.status_code == 200, response.text


@pytest.mark.usefixtures("edge_document", "known_resources")
@served.parametrize()
@hypothesis.settings(deadline=None)
def test_running_services_hold_their_contract(
    case: AnyCase, stack: Stack, http_session: requests.Session, fresh_auth: Callable[[], dict[str, str]]
) -> None:
    case.call_and_validate(
        base_url=stack.envoy_http_url,
        session=http_session,
        headers=fresh_auth(),
        checks=CHECKS,
        timeout=REQUEST_TIMEOUT_S,
    )


def _placeholder_path(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def _unserved_operations() -> list[Any]:
    """(method, path, gRPC service) of every operation of a service that has no server in the stack."""
    raw: dict[str, Any] = document.raw_schema
    return [
        pytest.param(method.upper(), path, operation["x-grpc-method"].split("/")[1], id=f"{method.upper()} {path}")
        for path, item in raw["paths"].items()
        for method, operation in item.items()
        if isinstance(operation, dict) and operation.get("tags", [""])[0] not in RUNNING_TAGS
    ]


@pytest.mark.parametrize(("method", "path", "service"), _unserved_operations())
def test_services_without_a_server_are_unimplemented(
    method: str,
    path: str,
    service: str,
    stack: Stack,
    http_session: requests.Session,
    fresh_auth: Callable[[], dict[str, str]],
) -> None:
    response = http_session.request(
        method,
        stack.envoy_http_url + _placeholder_path(path),
        json={} if method in ("POST", "PATCH", "PUT") else None,
        headers=fresh_auth(),
        timeout=REQUEST_TIMEOUT_S,
    )
    assert response.status_code == 501, response.text
    body = response.json()
    assert body["code"] == 12
    assert service in body["message"]
    assert body["details"] == [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "SERVICE_NOT_IMPLEMENTED",
            "domain": "edge.far.network",
            "metadata": {"service": service},
        }
    ]
