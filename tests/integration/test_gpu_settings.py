"""The gpu service's settings: stake amounts, the telemetry store choice, and one-line errors for bad values."""

from __future__ import annotations

import pytest

from servers.common.config import ConfigError, Env
from servers.gpu.settings import GpuSettings, parse_far_amount

FAR = 10**18


class TestStakeAmount:
    @pytest.mark.parametrize(
        ("raw", "wei"),
        [("1000", 1000 * FAR), ("0.5", FAR // 2), ("0", 0), ("1500000000000000000wei", 3 * FAR // 2), ("7 WEI", 7)],
    )
    def test_far_or_wei(self, raw: str, wei: int) -> None:
        assert parse_far_amount("GPU_MIN_OPERATOR_STAKE", raw) == wei

    @pytest.mark.parametrize("raw", ["-1", "1e-19", "lots", "NaN", "1.5wei"])
    def test_bad_amounts_name_the_variable(self, raw: str) -> None:
        with pytest.raises(ConfigError, match="GPU_MIN_OPERATOR_STAKE"):
            parse_far_amount("GPU_MIN_OPERATOR_STAKE", raw)


class TestGpuSettings:
    def test_defaults_need_no_configuration(self) -> None:
        settings = GpuSettings.from_env(Env({}))
        assert settings.report_interval_s == 10
        assert settings.liveness_ttl_s == 30
        assert settings.chain_id == 97
        assert settings.min_operator_stake_wei is None
        assert settings.operator_allowlist == frozenset()
        assert settings.telemetry.kind == "postgres"
        assert settings.telemetry.create_table is False

    def test_a_dynamodb_endpoint_or_table_selects_dynamodb(self) -> None:
        by_endpoint = GpuSettings.from_env(Env({"AWS_ENDPOINT_URL_DYNAMODB": "http://127.0.0.1:5000"}))
        assert (by_endpoint.telemetry.kind, by_endpoint.telemetry.dynamodb_endpoint) == (
            "dynamodb",
            "http://127.0.0.1:5000",
        )
        by_table = GpuSettings.from_env(Env({"GPU_DYNAMODB_TABLE": "t", "AWS_REGION": "eu-west-1"}))
        assert (by_table.telemetry.kind, by_table.telemetry.dynamodb_region) == ("dynamodb", "eu-west-1")
        forced = GpuSettings.from_env(Env({"GPU_DYNAMODB_TABLE": "t", "GPU_TELEMETRY_STORE": "postgres"}))
        assert forced.telemetry.kind == "postgres"

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("GPU_REPORT_INTERVAL_S", "61"),
            ("GPU_REPORT_INTERVAL_S", "soon"),
            ("GPU_OPERATOR_ALLOWLIST", "0x12"),
            ("GPU_TELEMETRY_STORE", "s3"),
            ("AWS_ENDPOINT_URL_DYNAMODB", "localhost:5000"),
            ("CHAIN_ID", "0"),
        ],
    )
    def test_bad_values_name_the_variable(self, name: str, value: str) -> None:
        with pytest.raises(ConfigError, match=name):
            GpuSettings.from_env(Env({name: value}))
