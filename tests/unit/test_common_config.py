"""servers.common.config: Settings.from_env, and what `python -m servers.<service>` does with bad settings."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from devstack.pki import DevPki
from servers.common.config import ConfigError, Env, Settings

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s" * 32
OLD_SECRET = "o" * 32


def settings(**env: str) -> Settings:
    return Settings.from_env("gamed", 50056, environ={"JWT_SECRET": SECRET, **env})


def config_error(**env: str) -> str:
    with pytest.raises(ConfigError) as error:
        Settings.from_env("gamed", 50056, environ=env)
    message = str(error.value)
    assert "\n" not in message
    return message


class TestDefaults:
    def test_only_jwt_secret_set(self) -> None:
        s = settings()
        assert s.service_name == "gamed"
        assert s.grpc_listen == "127.0.0.1:50056"
        assert s.metrics_listen is None
        assert s.ready_file is None
        assert s.database_url is None
        assert s.redis_url is None
        assert s.bsc_rpc_url is None
        assert s.redis_key_prefix == "far:"
        assert s.data_dir == Path(".run/data")
        assert (s.log_level, s.log_format, s.traces_exporter) == ("info", "json", "none")
        assert s.event_loop == "uvloop"
        assert (s.drain_delay_s, s.shutdown_grace_s) == (0.5, 5.0)
        assert s.jwt_keys.current_kid == "k1"
        assert dict(s.jwt_keys.secrets) == {"k1": SECRET}
        assert (s.jwt_keys.issuer, s.jwt_keys.audience) == ("far-auth", "far-platform")
        assert s.page_token_secret == hashlib.sha256(b"far-page-token:" + SECRET.encode()).digest()

    def test_empty_values_mean_the_default(self) -> None:
        s = settings(LOG_LEVEL="", REDIS_KEY_PREFIX="  ", DATABASE_URL="", DRAIN_DELAY_SECONDS="")
        assert (s.log_level, s.redis_key_prefix, s.database_url, s.drain_delay_s) == ("info", "far:", None, 0.5)

    def test_values_are_read(self, tmp_path: Path) -> None:
        s = settings(
            SERVICE_NAME="gamed-canary",
            GRPC_LISTEN="0.0.0.0:0",
            GRPC_ALLOW_PLAINTEXT="true",
            METRICS_LISTEN="127.0.0.1:9100",
            READY_FILE=str(tmp_path / "ready.json"),
            DATABASE_URL="postgresql://far@db:5432/far",
            REDIS_URL="redis://cache:6379/0",
            REDIS_KEY_PREFIX="x:",
            BSC_RPC_URL="https://bsc.example",
            JWT_KEY_ID="k7",
            JWT_ISSUER="iss",
            JWT_AUDIENCE="aud",
            FAR_DATA_DIR="/var/far",
            LOG_LEVEL="DEBUG",
            LOG_FORMAT="console",
            EVENT_LOOP="asyncio",
            OTEL_TRACES_EXPORTER="otlp",
            DRAIN_DELAY_SECONDS="0",
            SHUTDOWN_GRACE_SECONDS="2.5",
        )
        assert s.service_name == "gamed-canary"
        assert s.grpc_listen == "0.0.0.0:0"
        assert s.metrics_listen == "127.0.0.1:9100"
        assert s.ready_file == tmp_path / "ready.json"
        assert s.database_url == "postgresql://far@db:5432/far"
        assert s.redis_url == "redis://cache:6379/0"
        assert s.redis_key_prefix == "x:"
        assert s.bsc_rpc_url == "https://bsc.example"
        assert s.jwt_keys.current_kid == "k7"
        assert (s.jwt_keys.issuer, s.jwt_keys.audience) == ("iss", "aud")
        assert s.data_dir == Path("/var/far")
        assert (s.log_level, s.log_format, s.traces_exporter) == ("debug", "console", "otlp")
        assert s.event_loop == "asyncio"
        assert (s.drain_delay_s, s.shutdown_grace_s) == (0.0, 2.5)

    @pytest.mark.parametrize(
        "url",
        [
            "postgres://u:p@h/db",
            "postgresql+asyncpg://u@h:5432/db",
            "postgresql:///far?host=/run/postgresql",
        ],
    )
    def test_database_url_forms(self, url: str) -> None:
        assert settings(DATABASE_URL=url).database_url == url

    @pytest.mark.parametrize(
        "url", ["rediss://h:6380", "unix:///tmp/redis.sock", "unix:///tmp/redis.sock?db=0", "redis://localhost"]
    )
    def test_redis_url_forms(self, url: str) -> None:
        assert settings(REDIS_URL=url).redis_url == url

    def test_error_domain_follows_the_service_name(self) -> None:
        assert settings().error_domain == "gamed.far.network"
        assert settings(SERVICE_NAME="auth").error_domain == "auth.far.network"


class TestJwtSecret:
    def test_missing(self) -> None:
        message = config_error()
        assert message.startswith("JWT_SECRET is not set")

    def test_blank_is_missing(self) -> None:
        assert config_error(JWT_SECRET="   ").startswith("JWT_SECRET is not set")

    def test_short(self) -> None:
        assert config_error(JWT_SECRET="x" * 31) == "JWT_SECRET must be at least 32 characters long"


class TestPreviousSecrets:
    def test_pairs_are_added_after_the_current_key(self) -> None:
        s = settings(JWT_KEY_ID="k3", JWT_PREVIOUS_SECRETS=f" k2:{OLD_SECRET} , k1:{'p' * 40},")
        assert s.jwt_keys.current_kid == "k3"
        assert dict(s.jwt_keys.secrets) == {"k3": SECRET, "k2": OLD_SECRET, "k1": "p" * 40}

    def test_a_secret_may_contain_colons(self) -> None:
        secret = "a:b" * 11
        assert settings(JWT_PREVIOUS_SECRETS=f"k0:{secret}").jwt_keys.secrets["k0"] == secret

    @pytest.mark.parametrize("value", ["k0", f":{OLD_SECRET}", "k0:short", OLD_SECRET])
    def test_malformed(self, value: str) -> None:
        message = config_error(JWT_SECRET=SECRET, JWT_PREVIOUS_SECRETS=value)
        assert message.startswith("JWT_PREVIOUS_SECRETS must be kid:secret pairs")

    def test_the_current_key_id_cannot_be_replaced(self) -> None:
        message = config_error(JWT_SECRET=SECRET, JWT_PREVIOUS_SECRETS=f"k1:{OLD_SECRET}")
        assert message == "JWT_PREVIOUS_SECRETS repeats the key id 'k1'"


class TestMalformedValues:
    @pytest.mark.parametrize(
        ("name", "value", "expected"),
        [
            ("DATABASE_URL", "mysql://h/db", "DATABASE_URL must be a postgresql:// or postgres://"),
            ("DATABASE_URL", "localhost:5432/far", "DATABASE_URL must be a postgresql://"),
            ("DATABASE_URL", "postgresql://", "DATABASE_URL has no host"),
            ("REDIS_URL", "http://h:6379", "REDIS_URL must be a redis:// or rediss:// or unix:// URL"),
            ("REDIS_URL", "redis://", "REDIS_URL has no host"),
            ("REDIS_URL", "unix://", "REDIS_URL has no host"),
            ("BSC_RPC_URL", "ftp://node", "BSC_RPC_URL must be a http://"),
            ("GRPC_LISTEN", "127.0.0.1", "GRPC_LISTEN='127.0.0.1' must be host:port"),
            ("GRPC_LISTEN", ":50056", "GRPC_LISTEN=':50056' must be host:port"),
            ("GRPC_LISTEN", "h:port", "GRPC_LISTEN='h:port' must be host:port"),
            ("GRPC_LISTEN", "h:65536", "GRPC_LISTEN='h:65536' must be host:port"),
            ("GRPC_LISTEN", "", "GRPC_LISTEN is empty"),
            ("METRICS_LISTEN", "9100", "METRICS_LISTEN='9100' must be host:port"),
            ("LOG_LEVEL", "verbose", "LOG_LEVEL='verbose' must be one of debug, info, warning, error"),
            ("LOG_FORMAT", "xml", "LOG_FORMAT='xml' must be one of json, console"),
            ("EVENT_LOOP", "trio", "EVENT_LOOP='trio' must be one of uvloop, asyncio"),
            ("OTEL_TRACES_EXPORTER", "jaeger", "OTEL_TRACES_EXPORTER='jaeger' must be one of none, console, otlp"),
            ("DRAIN_DELAY_SECONDS", "soon", "DRAIN_DELAY_SECONDS='soon' is not a number"),
            ("DRAIN_DELAY_SECONDS", "-1", "DRAIN_DELAY_SECONDS=-1.0 must be at least 0.0"),
            ("SHUTDOWN_GRACE_SECONDS", "nan", "SHUTDOWN_GRACE_SECONDS='nan' is not a finite number"),
            ("SHUTDOWN_GRACE_SECONDS", "inf", "SHUTDOWN_GRACE_SECONDS='inf' is not a finite number"),
        ],
    )
    def test_one_line_naming_the_variable(self, name: str, value: str, expected: str) -> None:
        message = config_error(JWT_SECRET=SECRET, **{name: value})
        assert message.startswith(expected)

    @pytest.mark.parametrize("listen", ["[::]:50056", "0.0.0.0:0", "localhost:65535", "unix-host.internal:1"])
    def test_listen_address_forms(self, listen: str) -> None:
        assert settings(GRPC_LISTEN=listen, GRPC_ALLOW_PLAINTEXT="true").grpc_listen == listen

    @pytest.mark.parametrize("listen", ["127.0.0.1:0", "127.0.0.2:50056", "localhost:1", "[::1]:50056"])
    def test_plaintext_on_loopback(self, listen: str) -> None:
        assert settings(GRPC_LISTEN=listen).tls is None

    @pytest.mark.parametrize("listen", ["0.0.0.0:50056", "[::]:50056", "10.0.0.7:50056", "gamed.internal:50056"])
    def test_plaintext_beyond_loopback_is_refused(self, listen: str) -> None:
        message = config_error(JWT_SECRET=SECRET, GRPC_LISTEN=listen)
        assert message.startswith(f"GRPC_LISTEN={listen} is reachable from other machines, so the server needs mTLS")
        assert settings(GRPC_LISTEN=listen, GRPC_ALLOW_PLAINTEXT="true").tls is None

    def test_allow_plaintext_is_true_or_false(self) -> None:
        message = config_error(JWT_SECRET=SECRET, GRPC_ALLOW_PLAINTEXT="yes")
        assert message.startswith("GRPC_ALLOW_PLAINTEXT='yes' must be one of true, false")

    def test_metrics_listen_empty_turns_it_off(self) -> None:
        assert settings(METRICS_LISTEN="").metrics_listen is None


class TestEnvInteger:
    def test_default_and_value(self) -> None:
        env = Env({"N": " 42 "})
        assert env.integer("N", 7) == 42
        assert env.integer("MISSING", 7) == 7

    @pytest.mark.parametrize(("raw", "expected"), [("4.5", "N='4.5' is not an integer"), ("x", "N='x' is not an")])
    def test_not_an_integer(self, raw: str, expected: str) -> None:
        with pytest.raises(ConfigError) as error:
            Env({"N": raw}).integer("N", 1)
        assert str(error.value).startswith(expected)

    def test_out_of_range(self) -> None:
        with pytest.raises(ConfigError, match=r"^N=11 must be between 1 and 10$"):
            Env({"N": "11"}).integer("N", 1, minimum=1, maximum=10)

    def test_required(self) -> None:
        with pytest.raises(ConfigError, match=r"^BUCKET is not set: name the bucket$"):
            Env({}).required("BUCKET", "name the bucket")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return DevPki.ensure(tmp_path_factory.mktemp("pki"), services=["gamed", "auth"])


def tls_env(pki: DevPki, service: str = "gamed") -> dict[str, str]:
    files = pki.service(service)
    return {
        "GRPC_TLS_CERT_FILE": str(files.cert),
        "GRPC_TLS_KEY_FILE": str(files.key),
        "GRPC_TLS_CLIENT_CA_FILE": str(pki.ca_file),
    }


class TestTls:
    def test_none_means_plaintext(self) -> None:
        assert settings().tls is None
        assert settings(GRPC_TLS_CERT_FILE="", GRPC_TLS_KEY_FILE=" ").tls is None

    def test_all_three_load_the_files(self, pki: DevPki) -> None:
        tls = settings(**tls_env(pki)).tls
        assert tls is not None
        assert tls.cert_chain == pki.service("gamed").cert.read_bytes()
        assert tls.client_ca == pki.ca_file.read_bytes()
        assert "PRIVATE" not in repr(tls)

    @pytest.mark.parametrize("left_out", ["GRPC_TLS_CERT_FILE", "GRPC_TLS_KEY_FILE", "GRPC_TLS_CLIENT_CA_FILE"])
    def test_all_or_none(self, pki: DevPki, left_out: str) -> None:
        env = {k: v for k, v in tls_env(pki).items() if k != left_out}
        message = config_error(JWT_SECRET=SECRET, **env)
        assert f"but not {left_out}" in message
        assert "mTLS needs all of GRPC_TLS_CERT_FILE, GRPC_TLS_KEY_FILE, GRPC_TLS_CLIENT_CA_FILE" in message

    def test_missing_file(self, pki: DevPki, tmp_path: Path) -> None:
        missing = tmp_path / "nope.pem"
        message = config_error(JWT_SECRET=SECRET, **{**tls_env(pki), "GRPC_TLS_CLIENT_CA_FILE": str(missing)})
        assert message.startswith(f"GRPC_TLS_*: {missing}:")

    def test_not_a_certificate(self, pki: DevPki) -> None:
        env = {**tls_env(pki), "GRPC_TLS_CERT_FILE": str(pki.service("gamed").key)}
        assert "no PEM certificate" in config_error(JWT_SECRET=SECRET, **env)

    def test_key_of_another_certificate(self, pki: DevPki) -> None:
        env = {**tls_env(pki), "GRPC_TLS_KEY_FILE": str(pki.service("auth").key)}
        assert "is not the key of the certificate" in config_error(JWT_SECRET=SECRET, **env)


class TestProcess:
    def test_missing_jwt_secret_exits_2_with_one_line(self, tmp_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "JWT_SECRET"}
        env["FAR_DATA_DIR"] = str(tmp_path)
        result = subprocess.run(
            [sys.executable, "-m", "servers.gamed"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("far-gamed: configuration error: JWT_SECRET is not set")
        assert result.stdout == ""
