"""The OpenAPI generator (tools/openapi.py) on the real gamed contract and on a contract of corner cases.

Run: python -m pytest tests/unit/test_openapi.py
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # plain `pytest` does not put the repository root on the path
    sys.path.insert(0, str(ROOT))

from tools.openapi import write_openapi  # noqa: E402

Json = dict[str, Any]

GAMED_PROTOS = sorted(
    str(p.relative_to(ROOT / "protos"))
    for d in ("far/gamed", "far/type")
    for p in (ROOT / "protos" / d).rglob("*.proto")
)
GOOGLE_RPC = ["google/rpc/status.proto", "google/rpc/error_details.proto"]

EDGE_PROTO = """\
syntax = "proto3";

package far.edge.v1;

import "google/api/annotations.proto";
import "google/api/field_behavior.proto";
import "google/api/resource.proto";
import "google/protobuf/any.proto";
import "google/protobuf/empty.proto";
import "google/protobuf/struct.proto";
import "google/protobuf/timestamp.proto";
import "google/protobuf/wrappers.proto";

// Corner cases of the OpenAPI generator.
service EdgeService {
  // Streams the events of a folder. The last event says how the stream ended.
  rpc WatchFolder(WatchFolderRequest) returns (stream Event) {
    option (google.api.http) = {get: "/v1/{name=folders/**}:watch"};
  }

  // Uploads a file in chunks.
  rpc Upload(stream Chunk) returns (UploadSummary) {
    option (google.api.http) = {post: "/v1/uploads" body: "*"};
  }

  // Returns a ticket by number.
  rpc GetTicket(GetTicketRequest) returns (Ticket) {
    option (google.api.http) = {get: "/v1/tickets/{number}"};
  }

  // Compares two policies.
  rpc ComparePolicies(ComparePoliciesRequest) returns (google.protobuf.Empty) {
    option (google.api.http) = {get: "/v1/{name=orgs/*/policies/*}/versus/{other=orgs/*/policies/*}"};
  }

  // Searches nodes, e.g. by state. Returns only the nodes.
  rpc Search(SearchRequest) returns (SearchResponse) {
    option (google.api.http) = {get: "/v1/nodes:search" response_body: "results"};
  }
}

// Request for WatchFolder.
message WatchFolderRequest {
  // The folder, `folders/{path=**}`.
  string name = 1 [(google.api.field_behavior) = REQUIRED];
}

// Something that happened.
message Event {
  // What happened.
  string kind = 1;
}

// A piece of an upload.
message Chunk {
  // The bytes.
  bytes data = 1;
  // Where they go.
  int64 offset = 2;
}

// What an upload stored.
message UploadSummary {
  // Bytes stored.
  uint64 size = 1;
}

// Request for GetTicket.
message GetTicketRequest {
  // The ticket number.
  int64 number = 1;
}

// A ticket.
message Ticket {
  option (google.api.resource) = {
    type: "edge.far.network/Ticket"
    pattern: "tickets/{ticket}"
  };
  // The resource name.
  string name = 1;
}

// Request for ComparePolicies.
message ComparePoliciesRequest {
  // The first policy.
  string name = 1;
  // The second policy.
  string other = 2;
  // Whether to compare strictly.
  bool strict = 3;
}

// Request for Search.
message SearchRequest {
  // The filter.
  Filter filter = 1 [(google.api.field_behavior) = REQUIRED];
  // Tags, all of which must match.
  repeated string tags = 2;
  // More filters (not expressible in a query string).
  repeated Filter more = 3;
  // Labels (not expressible in a query string).
  map<string, string> labels = 4;
  // Only nodes changed since.
  google.protobuf.Timestamp since = 5;
  // Anything (not expressible in a query string).
  google.protobuf.Struct extra = 6;
  // At most this many.
  google.protobuf.Int32Value limit = 7;
}

// A filter.
message Filter {
  // The state.
  Node.State state = 1 [(google.api.field_behavior) = REQUIRED];
  // The range.
  Range range = 2;
  // A chained filter (recursive).
  Filter next = 3;
}

// A range.
message Range {
  // The lower bound.
  int64 min = 1;
  // The upper bound.
  int64 max = 2;
}

// Response for Search.
message SearchResponse {
  // The nodes.
  repeated Node results = 1;
  // The token for the next page.
  string next_page_token = 2;
}

// A node of a tree.
message Node {
  // The state of a node.
  enum State {
    // Never used.
    STATE_UNSPECIFIED = 0;
    // Live.
    STATE_LIVE = 1;
  }
  // The children.
  repeated Node children = 1;
  // The parent.
  Node parent = 2 [(google.api.field_behavior) = OUTPUT_ONLY];
  // Labels.
  map<string, google.protobuf.Value> labels = 3;
  // Attributes.
  google.protobuf.Struct attrs = 4;
  // An extension.
  google.protobuf.Any extra = 5;
  // A limit.
  google.protobuf.Int32Value limit = 6;
  // Items.
  google.protobuf.ListValue items = 7;
  // A blob.
  bytes blob = 8;
  // A small number.
  uint32 small = 9;
  // A ratio.
  double ratio = 10;
  // A big number.
  fixed64 big = 11;
  // What kind of node.
  oneof kind {
    // A leaf label.
    string leaf = 12;
    // A branch count.
    int32 branches = 13;
  }
  // A note.
  optional string note = 14;
  // The state.
  State state = 15;
}
"""


def _googleapis_include() -> Path:
    spec = importlib.util.find_spec("google.api.http_pb2")
    assert spec is not None
    assert spec.origin is not None
    return Path(spec.origin).parent.parent.parent


def _wkt_include() -> Path:
    spec = importlib.util.find_spec("grpc_tools")
    assert spec is not None
    assert spec.origin is not None
    return Path(spec.origin).parent / "_proto"


def _descriptor_set(out: Path, protos: list[str], *includes: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        *(f"-I{path}" for path in includes),
        f"-I{_googleapis_include()}",
        f"-I{_wkt_include()}",
        f"--descriptor_set_out={out}",
        "--include_imports",
        "--include_source_info",
        *protos,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def gamed_descriptor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("gamed")
    return _descriptor_set(tmp / "far.binpb", [*GAMED_PROTOS, *GOOGLE_RPC], ROOT / "protos")


@pytest.fixture(scope="module")
def doc_path(gamed_descriptor: Path) -> Path:
    out = gamed_descriptor.parent / "out" / "far.openapi.json"
    write_openapi(gamed_descriptor, out)
    return out


@pytest.fixture(scope="module")
def doc(doc_path: Path) -> Json:
    loaded: Json = json.loads(doc_path.read_text(encoding="utf-8"))
    return loaded


@pytest.fixture(scope="module")
def edge_doc(tmp_path_factory: pytest.TempPathFactory) -> Json:
    tmp = tmp_path_factory.mktemp("edge")
    proto = tmp / "protos" / "far" / "edge" / "v1" / "edge_service.proto"
    proto.parent.mkdir(parents=True)
    proto.write_text(EDGE_PROTO)
    descriptor = _descriptor_set(tmp / "edge.binpb", ["far/edge/v1/edge_service.proto", *GOOGLE_RPC], tmp / "protos")
    write_openapi(descriptor, tmp / "edge.openapi.json")
    loaded: Json = json.loads((tmp / "edge.openapi.json").read_text(encoding="utf-8"))
    return loaded


def resolve(document: Json, schema: Json) -> Json:
    """Follow a $ref, or a single-element allOf wrapper around one."""
    while True:
        if "$ref" in schema:
            ref = schema["$ref"]
            assert ref.startswith("#/"), ref
            node: Any = document
            for part in ref[2:].split("/"):
                node = node[part]
            schema = node
        elif len(schema.get("allOf", [])) == 1:
            schema = schema["allOf"][0]
        else:
            return schema


def component(document: Json, name: str) -> Json:
    schema: Json = document["components"]["schemas"][name]
    return schema


def params(operation: Json) -> dict[tuple[str, str], Json]:
    return {(p["in"], p["name"]): p for p in operation.get("parameters", [])}


def body_schema(document: Json, operation: Json) -> Json:
    return resolve(document, operation["requestBody"]["content"]["application/json"]["schema"])


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


# ------------------------------------------------------------------------------------------------------
# The gamed contract


def test_top_level(doc: Json) -> None:
    assert doc["openapi"] == "3.0.3"
    assert doc["info"]["title"] == "FAR platform API"
    assert doc["info"]["version"] == "v1"
    assert doc["info"]["description"]
    assert doc["servers"] == [{"url": "/"}]
    assert doc["security"] == [{}, {"bearerAuth": []}]
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": doc["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    tags = {t["name"]: t for t in doc["tags"]}
    assert tags["GamedService"]["description"].startswith("The game distribution catalog")


def test_every_http_rule_is_an_operation(doc: Json) -> None:
    operations = [op for item in doc["paths"].values() for op in item.values()]
    grpc_methods = {op["x-grpc-method"] for op in operations}
    # 18 RPCs, GenerateDownloadLinks twice (additional_bindings).
    assert len(operations) == 19
    assert len(grpc_methods) == 18
    assert len({op["operationId"] for op in operations}) == 19
    for op in operations:
        assert op["tags"] == ["GamedService"]
        assert op["operationId"].startswith("GamedService_")
        assert op["summary"]
        assert op["responses"]["default"] == {"$ref": "#/components/responses/Error"}
        assert "application/json" in op["responses"]["200"]["content"]


def test_get_game(doc: Json) -> None:
    op = doc["paths"]["/v1/games/{game}"]["get"]
    assert op["operationId"] == "GamedService_GetGame"
    assert op["x-grpc-method"] == "/far.gamed.v1.GamedService/GetGame"
    assert op["summary"] == "Returns a game"
    assert op["description"].startswith("Returns a game. NOT_FOUND (`GAME_NOT_FOUND`)")
    assert op["x-grpc-path-bindings"] == {"name": "games/{game}"}
    game = params(op)[("path", "game")]
    assert game["required"] is True
    assert game["schema"] == {"type": "string"}
    assert "`name`" in game["description"]
    assert set(params(op)) == {("path", "game")}
    assert "requestBody" not in op
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/far.gamed.v1.Game"
    }


def test_list_games_query_parameters(doc: Json) -> None:
    op = doc["paths"]["/v1/games"]["get"]
    query = params(op)
    assert set(query) == {
        ("query", name)
        for name in ("pageSize", "pageToken", "query", "genre", "platform", "publisher", "state", "orderBy")
    }
    assert query[("query", "pageSize")]["schema"] == {"type": "integer", "format": "int32", "minimum": 0}
    assert "1-100" in query[("query", "pageSize")]["description"]
    platform = resolve(doc, query[("query", "platform")]["schema"])
    assert platform["type"] == "string"
    assert platform["enum"] == [
        "PLATFORM_UNSPECIFIED",
        "PLATFORM_WINDOWS",
        "PLATFORM_MACOS",
        "PLATFORM_LINUX",
        "PLATFORM_ANDROID",
        "PLATFORM_IOS",
        "PLATFORM_WEB",
    ]
    assert query[("query", "state")]["schema"] == {"$ref": "#/components/schemas/far.gamed.v1.Game.State"}
    state = component(doc, "far.gamed.v1.Game.State")
    assert state["enum"] == ["STATE_UNSPECIFIED", "STATE_DRAFT", "STATE_PUBLISHED", "STATE_ARCHIVED"]
    assert "- `STATE_PUBLISHED`: Listed in the public catalog" in state["description"]
    assert "requestBody" not in op
    listed = component(doc, "far.gamed.v1.ListGamesResponse")["properties"]
    assert listed["games"] == {
        "type": "array",
        "items": {"$ref": "#/components/schemas/far.gamed.v1.Game"},
        "description": "The games of this page.",
    }


def test_every_page_size_is_non_negative(doc: Json) -> None:
    # AIP-158: 0 asks for the default page size; a negative one is INVALID_ARGUMENT.
    page_sizes = [
        parameter["schema"]
        for item in doc["paths"].values()
        for operation in item.values()
        for parameter in operation.get("parameters", [])
        if parameter["name"] == "pageSize"
    ]
    assert page_sizes
    assert all(schema == {"type": "integer", "format": "int32", "minimum": 0} for schema in page_sizes)


def test_update_game_patch_body(doc: Json) -> None:
    op = doc["paths"]["/v1/games/{game}"]["patch"]
    assert op["operationId"] == "GamedService_UpdateGame"
    assert op["x-grpc-path-bindings"] == {"game.name": "games/{game}"}
    assert set(params(op)) == {("path", "game")}  # body "*": no query parameters
    body = body_schema(doc, op)
    assert set(body["properties"]) == {"game", "updateMask"}
    assert body["properties"]["updateMask"]["type"] == "string"
    assert resolve(doc, body["properties"]["game"]) is component(doc, "far.gamed.v1.Game")
    assert "`game.name` is taken from the URL path" in body["properties"]["game"]["description"]
    assert body["required"] == ["game"]
    assert op["requestBody"]["required"] is True


def test_create_game_body_field(doc: Json) -> None:
    op = doc["paths"]["/v1/games"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/far.gamed.v1.Game"
    }
    assert op["requestBody"]["required"] is True
    game_id = params(op)[("query", "gameId")]
    assert game_id["required"] is True
    assert game_id["schema"] == {"type": "string"}
    assert set(params(op)) == {("query", "gameId")}


def test_message_schemas(doc: Json) -> None:
    asset = component(doc, "far.gamed.v1.Asset")
    assert asset["properties"]["sizeBytes"]["type"] == "string"
    assert asset["properties"]["sizeBytes"]["format"] == "int64"
    assert asset["required"] == ["path", "sizeBytes", "sha256"]
    assert asset["description"] == "One file of a build."

    game = component(doc, "far.gamed.v1.Game")
    assert game["type"] == "object"
    assert game["description"].startswith("A game in the distribution catalog.")
    props = game["properties"]
    assert props["createTime"]["type"] == "string"
    assert props["createTime"]["format"] == "date-time"
    assert props["createTime"]["readOnly"] is True
    assert props["publisher"]["readOnly"] is True
    assert "readOnly" not in props["displayName"]
    assert "displayName" in game["required"]
    assert props["displayName"]["description"] == "The title shown to players, 1-200 characters."
    assert props["genres"]["type"] == "array"
    assert props["genres"]["items"] == {"type": "string"}
    assert props["platforms"]["items"] == {"$ref": "#/components/schemas/far.gamed.v1.Platform"}
    assert props["state"]["allOf"] == [{"$ref": "#/components/schemas/far.gamed.v1.Game.State"}]

    build = component(doc, "far.gamed.v1.Build")["properties"]
    assert build["totalSizeBytes"]["format"] == "int64"
    assert build["releaseNotes"]["type"] == "string"  # json_name, lowerCamelCase
    assert build["assets"]["items"] == {"$ref": "#/components/schemas/far.gamed.v1.Asset"}

    link = component(doc, "far.gamed.v1.AssetLink")["properties"]
    assert link["headers"]["type"] == "object"
    assert link["headers"]["additionalProperties"] == {"type": "string"}

    request = component(doc, "far.gamed.v1.GenerateUploadLinksResponse")["properties"]
    assert request["expireTime"]["format"] == "date-time"
    # Request messages only ever read from the path and query are not components.
    assert "far.gamed.v1.GetGameRequest" not in doc["components"]["schemas"]


def test_generate_download_links_additional_binding(doc: Json) -> None:
    by_build = doc["paths"]["/v1/games/{game}/builds/{build}:downloadLinks"]["get"]
    by_channel = doc["paths"]["/v1/games/{game}/channels/{channel}:downloadLinks"]["get"]
    assert by_build["operationId"] == "GamedService_GenerateDownloadLinks"
    assert by_channel["operationId"] == "GamedService_GenerateDownloadLinks_2"
    assert by_build["x-grpc-method"] == by_channel["x-grpc-method"]
    assert by_build["x-grpc-path-bindings"] == {"build": "games/{game}/builds/{build}"}
    assert by_channel["x-grpc-path-bindings"] == {"channel": "games/{game}/channels/{channel}"}
    # The other member of the `target` oneof is not offered as a query parameter.
    assert set(params(by_build)) == {
        ("path", "game"),
        ("path", "build"),
        ("query", "platform"),
        ("query", "ttl"),
    }
    assert set(params(by_channel)) == {
        ("path", "game"),
        ("path", "channel"),
        ("query", "platform"),
        ("query", "ttl"),
    }
    ttl = params(by_channel)[("query", "ttl")]["schema"]
    assert ttl["type"] == "string"
    assert ttl["pattern"] == r"^-?[0-9]+(\.[0-9]{1,9})?s$"
    response = component(doc, "far.gamed.v1.GenerateDownloadLinksResponse")
    assert response["properties"]["links"]["items"] == {"$ref": "#/components/schemas/far.gamed.v1.AssetLink"}


def test_promote_custom_verb(doc: Json) -> None:
    op = doc["paths"]["/v1/games/{game}/channels/{channel}:promote"]["post"]
    assert op["operationId"] == "GamedService_PromoteBuild"
    assert set(params(op)) == {("path", "game"), ("path", "channel")}
    assert op["x-grpc-path-bindings"] == {"name": "games/{game}/channels/{channel}"}
    body = body_schema(doc, op)
    assert set(body["properties"]) == {"build"}  # `name` is in the path
    assert body["required"] == ["build"]
    assert "/v1/games/{game}/channels/{channel}:rollback" in doc["paths"]
    assert "/v1/games/{game}/builds/{build}:generateUploadLinks" in doc["paths"]


def test_nested_collections(doc: Json) -> None:
    op = doc["paths"]["/v1/games/{game}/channels/{channel}/releases"]["get"]
    assert op["x-grpc-path-bindings"] == {"parent": "games/{game}/channels/{channel}"}
    assert set(params(op)) == {
        ("path", "game"),
        ("path", "channel"),
        ("query", "pageSize"),
        ("query", "pageToken"),
        ("query", "platform"),
    }
    assert set(doc["paths"]["/v1/games/{game}/builds/{build}"]) == {"get", "delete"}
    delete = doc["paths"]["/v1/games/{game}"]["delete"]
    assert set(params(delete)) == {("path", "game"), ("query", "etag")}
    assert delete["responses"]["200"]["content"]["application/json"]["schema"] == {"type": "object"}


def test_error_schemas(doc: Json) -> None:
    error = doc["components"]["responses"]["Error"]
    status = resolve(doc, error["content"]["application/json"]["schema"])
    assert status is component(doc, "google.rpc.Status")
    assert status["properties"]["code"]["type"] == "integer"
    assert status["properties"]["message"]["type"] == "string"
    details = status["properties"]["details"]
    assert details["type"] == "array"
    assert details["items"]["properties"]["@type"]["type"] == "string"
    schemas = doc["components"]["schemas"]
    assert {"google.rpc.ErrorInfo", "google.rpc.BadRequest", "google.rpc.RetryInfo"} <= set(schemas)
    assert schemas["google.rpc.ErrorInfo"]["properties"]["metadata"]["additionalProperties"] == {"type": "string"}
    violations = schemas["google.rpc.BadRequest"]["properties"]["fieldViolations"]["items"]
    assert resolve(doc, violations)["properties"]["field"]["type"] == "string"
    assert schemas["google.rpc.RetryInfo"]["properties"]["retryDelay"]["type"] == "string"


def test_every_ref_resolves(doc: Json) -> None:
    refs = set(_refs(doc))
    assert refs
    for ref in refs:
        assert ref.startswith(("#/components/schemas/", "#/components/responses/")), ref
        resolve(doc, {"$ref": ref})
    # Every component is used, but for the error details, which travel inside `google.rpc.Status.details`.
    schemas = doc["components"]["schemas"]
    used = {ref.rsplit("/", 1)[1] for ref in refs if ref.startswith("#/components/schemas/")}
    assert used | {"google.rpc.ErrorInfo", "google.rpc.BadRequest", "google.rpc.RetryInfo"} == set(schemas)


def test_structure(doc: Json) -> None:
    for path, item in doc["paths"].items():
        assert path.startswith("/v1/")
        names = {segment[1:-1] for segment in path.replace(":", "/").split("/") if segment.startswith("{")}
        for method, op in item.items():
            assert method in {"get", "post", "patch", "delete", "put"}
            path_params = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert path_params == names, (method, path)
            keys = [(p["in"], p["name"]) for p in op.get("parameters", [])]
            assert len(keys) == len(set(keys))


def test_deterministic(gamed_descriptor: Path, doc_path: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.json"
    write_openapi(gamed_descriptor, again)
    text = doc_path.read_text(encoding="utf-8")
    assert again.read_bytes() == doc_path.read_bytes()
    assert text.endswith("}\n")
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_cli(gamed_descriptor: Path, doc_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.json"
    result = subprocess.run(
        [sys.executable, "-m", "tools.openapi", str(gamed_descriptor), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == doc_path.read_bytes()


def test_openapi_spec_validator(doc: Json, edge_doc: Json) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(doc)
    validator.validate(edge_doc)


# ------------------------------------------------------------------------------------------------------
# Corner cases


def test_server_streaming_and_multi_segment(edge_doc: Json) -> None:
    op = edge_doc["paths"]["/v1/folders/{folder}:watch"]["get"]
    assert op["x-grpc-streaming"] == "server"
    content = op["responses"]["200"]["content"]
    event = {"$ref": "#/components/schemas/far.edge.v1.Event"}
    assert content["application/json"]["schema"] == {"type": "array", "items": event}
    assert content["application/x-ndjson"]["schema"] == event
    assert "stream" in op["responses"]["200"]["description"]
    folder = params(op)[("path", "folder")]
    assert folder["x-grpc-multi-segment"] is True
    assert "may contain `/`" in folder["description"]
    assert op["x-grpc-path-bindings"] == {"name": "folders/{folder=**}"}


def test_client_streaming(edge_doc: Json) -> None:
    op = edge_doc["paths"]["/v1/uploads"]["post"]
    assert op["x-grpc-streaming"] == "client"
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"type": "array", "items": {"$ref": "#/components/schemas/far.edge.v1.Chunk"}}
    summary = component(edge_doc, "far.edge.v1.UploadSummary")
    assert summary["properties"]["size"]["format"] == "uint64"


def test_plain_variable_and_fallback_names(edge_doc: Json) -> None:
    ticket = edge_doc["paths"]["/v1/tickets/{number}"]["get"]
    assert params(ticket)[("path", "number")]["schema"]["format"] == "int64"
    assert "x-grpc-path-bindings" not in ticket
    compare_path = "/v1/orgs/{org}/policies/{policy}/versus/orgs/{org_2}/policies/{policy_2}"
    compare = edge_doc["paths"][compare_path]["get"]
    assert compare["x-grpc-path-bindings"] == {
        "name": "orgs/{org}/policies/{policy}",
        "other": "orgs/{org_2}/policies/{policy_2}",
    }
    assert set(params(compare)) == {
        ("path", "org"),
        ("path", "policy"),
        ("path", "org_2"),
        ("path", "policy_2"),
        ("query", "strict"),
    }


def test_nested_query_parameters_and_response_body(edge_doc: Json) -> None:
    op = edge_doc["paths"]["/v1/nodes:search"]["get"]
    assert op["summary"] == "Searches nodes, e.g. by state"
    query = params(op)
    assert set(query) == {
        ("query", name) for name in ("filter.state", "filter.range.min", "filter.range.max", "tags", "since", "limit")
    }
    assert query[("query", "filter.state")]["required"] is True
    assert "required" not in query[("query", "filter.range.min")]
    assert query[("query", "tags")]["schema"] == {"type": "array", "items": {"type": "string"}}
    assert query[("query", "tags")]["explode"] is True
    assert query[("query", "since")]["schema"]["format"] == "date-time"
    assert query[("query", "limit")]["schema"]["nullable"] is True
    schema = op["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema == {"type": "array", "items": {"$ref": "#/components/schemas/far.edge.v1.Node"}}


def test_well_known_types_and_recursion(edge_doc: Json) -> None:
    node = component(edge_doc, "far.edge.v1.Node")
    props = node["properties"]
    assert props["children"]["items"] == {"$ref": "#/components/schemas/far.edge.v1.Node"}
    assert props["parent"]["allOf"] == [{"$ref": "#/components/schemas/far.edge.v1.Node"}]
    assert props["parent"]["readOnly"] is True
    assert props["labels"]["additionalProperties"] == {}
    assert props["attrs"]["type"] == "object"
    assert props["extra"]["properties"]["@type"]["type"] == "string"
    assert props["limit"]["type"] == "integer"
    assert props["limit"]["nullable"] is True
    assert props["items"]["type"] == "array"
    assert props["blob"]["format"] == "byte"
    assert props["small"]["type"] == "integer"
    assert props["small"]["minimum"] == 0
    assert props["ratio"] == {"type": "number", "format": "double", "description": "A ratio."}
    assert props["big"]["type"] == "string"
    assert "oneof `kind`" in props["leaf"]["description"]
    assert "oneof" not in props["note"]["description"]  # proto3 optional is not a oneof to JSON
    assert "Oneof `kind`: at most one of `leaf`, `branches`." in node["description"]
    refs = set(_refs(edge_doc))
    for ref in refs:
        resolve(edge_doc, {"$ref": ref})
