"""The gpu service's own settings (environment variables `GPU_*`, plus the platform's CHAIN_ID)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from servers.common.chain import DEV_CHAIN_ID
from servers.common.config import ConfigError, Env
from servers.common.validation import WALLET_ADDRESS
from servers.gpu.telemetry_store import RETENTION_DAYS

FAR_DECIMALS = 18
_WEI = re.compile(r"^([0-9]+)\s*wei\Z", re.IGNORECASE)


def parse_far_amount(name: str, raw: str) -> int:
    """`1000` or `0.5` (FAR) or `1500000000000000000wei` -> wei; a ConfigError naming `name` otherwise."""
    match = _WEI.match(raw)
    if match:
        return int(match.group(1))
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise ConfigError(f"{name}={raw!r} must be an amount of FAR (e.g. 1000 or 0.5) or of wei (e.g. 5wei)") from None
    wei = value.scaleb(FAR_DECIMALS)
    if not value.is_finite() or value < 0 or wei != wei.to_integral_value():
        raise ConfigError(f"{name}={raw!r} must be a non-negative FAR amount with at most 18 decimals")
    return int(wei)


@dataclass(frozen=True)
class TelemetryStoreSettings:
    """Where telemetry history goes: `postgres` (default) or `dynamodb` (a table in AWS or a stand-in)."""

    kind: str
    dynamodb_table: str
    dynamodb_endpoint: str | None
    dynamodb_region: str
    create_table: bool
    retention_days: int


@dataclass(frozen=True)
class GpuSettings:
    report_interval_s: float
    chain_id: int
    min_operator_stake_wei: int | None
    operator_allowlist: frozenset[str]
    telemetry: TelemetryStoreSettings

    @property
    def liveness_ttl_s(self) -> float:
        """A node counts as silent after this long without a report (3 report intervals)."""
        return 3 * self.report_interval_s

    @classmethod
    def from_env(cls, env: Env) -> GpuSettings:
        """GPU_REPORT_INTERVAL_S (10), CHAIN_ID (97), GPU_MIN_OPERATOR_STAKE (unset: no stake gate),
        GPU_OPERATOR_ALLOWLIST (comma-separated wallets; unset: any operator), GPU_TELEMETRY_STORE
        (`postgres`, or `dynamodb` when AWS_ENDPOINT_URL_DYNAMODB or GPU_DYNAMODB_TABLE is set),
        GPU_DYNAMODB_TABLE (far-gpu-telemetry), GPU_DYNAMODB_REGION (AWS_REGION, us-east-1),
        GPU_DYNAMODB_CREATE_TABLE (false; dev and tests only), GPU_TELEMETRY_RETENTION_DAYS (30)."""
        interval = env.number("GPU_REPORT_INTERVAL_S", 10.0, minimum=0.05)
        if interval > 60:
            raise ConfigError(f"GPU_REPORT_INTERVAL_S={interval} must be at most 60 seconds")
        stake_raw = env.text("GPU_MIN_OPERATOR_STAKE")
        allowlist = [item.strip().lower() for item in (env.text("GPU_OPERATOR_ALLOWLIST") or "").split(",")]
        for wallet in filter(None, allowlist):
            if not WALLET_ADDRESS.match(wallet):
                raise ConfigError(f"GPU_OPERATOR_ALLOWLIST: {wallet!r} is not a 0x-prefixed 20-byte address")
        endpoint = env.url("AWS_ENDPOINT_URL_DYNAMODB", ("http", "https"))
        table = env.text("GPU_DYNAMODB_TABLE")
        default_store = "dynamodb" if endpoint or table else "postgres"
        return cls(
            report_interval_s=interval,
            chain_id=env.integer("CHAIN_ID", DEV_CHAIN_ID, minimum=1, maximum=2**53),
            min_operator_stake_wei=None if stake_raw is None else parse_far_amount("GPU_MIN_OPERATOR_STAKE", stake_raw),
            operator_allowlist=frozenset(filter(None, allowlist)),
            telemetry=TelemetryStoreSettings(
                kind=env.choice("GPU_TELEMETRY_STORE", default_store, ("postgres", "dynamodb")),
                dynamodb_table=table or "far-gpu-telemetry",
                dynamodb_endpoint=endpoint,
                dynamodb_region=env.text("GPU_DYNAMODB_REGION") or env.text("AWS_REGION") or "us-east-1",
                create_table=env.choice("GPU_DYNAMODB_CREATE_TABLE", "false", ("true", "false")) == "true",
                retention_days=env.integer("GPU_TELEMETRY_RETENTION_DAYS", RETENTION_DAYS, minimum=1, maximum=3650),
            ),
        )
