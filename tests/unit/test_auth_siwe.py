"""servers.auth: the EIP-4361 message format and parser, and the AUTH_* settings."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from servers.auth.settings import AuthSettings
from servers.auth.siwe import MessageSyntaxError, SiweMessage, format_message, parse_message
from servers.common.config import ConfigError, Env

# The example of EIP-4361 itself.
EIP_EXAMPLE = """service.invalid wants you to sign in with your Ethereum account:
0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2

I accept the ServiceOrg Terms of Service: https://service.invalid/tos

URI: https://service.invalid/login
Version: 1
Chain ID: 1
Nonce: 32891756
Issued At: 2021-09-30T16:25:24Z
Resources:
- ipfs://bafybeiemxf5abjwjbikoz4mc3a3dla6ual3jsgpdr4cjr3oz3evfyavhwq/
- https://example.com/my-web2-claim.json"""

ADDRESS = "0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2"
ISSUED = datetime(2026, 11, 25, 4, 5, 13, tzinfo=UTC)


def message(**fields: object) -> SiweMessage:
    values: dict[str, object] = {
        "domain": "app.far.network",
        "address": ADDRESS,
        "statement": "Sign in to FAR.",
        "uri": "https://app.far.network/login",
        "version": "1",
        "chain_id": 97,
        "nonce": "abcDEF1234567890",
        "issued_at": ISSUED,
        "expiration_time": datetime(2026, 11, 25, 4, 10, 13, tzinfo=UTC),
    }
    return SiweMessage(**{**values, **fields})  # type: ignore[arg-type]


class TestFormat:
    def test_the_far_challenge(self) -> None:
        assert format_message(message()) == (
            "app.far.network wants you to sign in with your Ethereum account:\n"
            f"{ADDRESS}\n"
            "\n"
            "Sign in to FAR.\n"
            "\n"
            "URI: https://app.far.network/login\n"
            "Version: 1\n"
            "Chain ID: 97\n"
            "Nonce: abcDEF1234567890\n"
            "Issued At: 2026-11-25T04:05:13Z\n"
            "Expiration Time: 2026-11-25T04:10:13Z"
        )

    @pytest.mark.parametrize(
        "fields",
        [
            {},
            {"statement": None},
            {"expiration_time": None},
            {"scheme": "https", "not_before": ISSUED, "request_id": "req-1", "resources": ("ipfs://x", "https://y/z")},
        ],
    )
    def test_round_trip(self, fields: dict[str, object]) -> None:
        original = message(**fields)
        assert parse_message(format_message(original)) == original


class TestParse:
    def test_the_eip_example(self) -> None:
        parsed = parse_message(EIP_EXAMPLE)
        assert parsed.domain == "service.invalid"
        assert parsed.address == ADDRESS
        assert parsed.statement == "I accept the ServiceOrg Terms of Service: https://service.invalid/tos"
        assert (parsed.chain_id, parsed.nonce, parsed.version) == (1, "32891756", "1")
        assert parsed.issued_at == datetime(2021, 9, 30, 16, 25, 24, tzinfo=UTC)
        assert parsed.expiration_time is None
        assert len(parsed.resources) == 2

    def test_times_with_offsets_and_fractions_are_utc(self) -> None:
        text = format_message(message()).replace("04:05:13Z", "06:05:13.5+02:00")
        assert parse_message(text).issued_at == ISSUED.replace(microsecond=500000)

    @pytest.mark.parametrize(
        ("old", "new", "why"),
        [
            (" wants you to sign in with your Ethereum account:", " wants you to sign in:", "first line"),
            ("app.far.network wants", "app far wants", "domain"),
            (ADDRESS, ADDRESS.lower().replace("c02", "c0z"), "address"),
            (ADDRESS, ADDRESS.replace("C02aaA", "C02AAA"), "EIP-55"),
            ("Version: 1", "Version: 2", "Version"),
            ("Chain ID: 97", "Chain ID: 0", "Chain ID"),
            ("Chain ID: 97", "Chain ID: 9x", "Chain ID"),
            ("Nonce: abcDEF1234567890", "Nonce: short", "Nonce"),
            ("Nonce: abcDEF1234567890", "Nonce: abc-DEF-1234", "Nonce"),
            ("Issued At: 2026-11-25T04:05:13Z", "Issued At: yesterday", "Issued At"),
            ("Issued At: 2026-11-25T04:05:13Z", "Issued At: 2026-13-25T04:05:13Z", "Issued At"),
            ("URI: https://app.far.network/login", "URI: not a uri", "URI"),
            ("Sign in to FAR.\n\n", "Sign in to FAR.\n", "blank line"),
            ("\n\nSign in to FAR.\n\n", "\n\n", "two blank lines"),
            ("Expiration Time: 2026-11-25T04:10:13Z", "Expiration Time: 2026-11-25T04:10:13Z\nSurprise: yes", "line"),
        ],
    )
    def test_malformed(self, old: str, new: str, why: str) -> None:
        text = format_message(message())
        assert old in text
        with pytest.raises(MessageSyntaxError, match=why):
            parse_message(text.replace(old, new, 1))

    @pytest.mark.parametrize("text", ["", "hello", "\n\n\n", EIP_EXAMPLE.replace("\n", "\r\n")])
    def test_not_a_message_at_all(self, text: str) -> None:
        with pytest.raises(MessageSyntaxError):
            parse_message(text)

    def test_truncated(self) -> None:
        text = format_message(message())
        for end in range(0, text.index("Issued At"), 7):
            with pytest.raises(MessageSyntaxError):
                parse_message(text[:end])


class TestSettings:
    def test_defaults(self) -> None:
        settings = AuthSettings.from_env(Env({}))
        assert settings.domains == {"localhost:3000", "localhost:8080"}
        assert settings.chain_ids == {97}
        assert (settings.access_ttl_s, settings.refresh_ttl_s, settings.nonce_ttl_s) == (900, 30 * 86400, 300)
        assert settings.challenges_per_minute == 20
        assert settings.bootstrap_admins == frozenset()

    def test_lists(self) -> None:
        settings = AuthSettings.from_env(
            Env(
                {
                    "AUTH_SIWE_DOMAINS": " App.Far.Network , localhost:3000",
                    "AUTH_CHAIN_IDS": "56, 97",
                    "AUTH_BOOTSTRAP_ADMINS": f"{ADDRESS},0x{'ab' * 20}",
                }
            )
        )
        assert settings.domains == {"app.far.network", "localhost:3000"}
        assert settings.chain_ids == {56, 97}
        assert settings.bootstrap_admins == {ADDRESS.lower(), "0x" + "ab" * 20}

    @pytest.mark.parametrize(
        ("name", "value", "error"),
        [
            ("AUTH_SIWE_DOMAINS", "https://app.far.network", "AUTH_SIWE_DOMAINS"),
            ("AUTH_SIWE_DOMAINS", ",", "lists nothing"),
            ("AUTH_CHAIN_IDS", "bsc", "AUTH_CHAIN_IDS"),
            ("AUTH_CHAIN_IDS", "0", "AUTH_CHAIN_IDS"),
            ("AUTH_BOOTSTRAP_ADMINS", "0x1234", "AUTH_BOOTSTRAP_ADMINS"),
            ("AUTH_ACCESS_TTL_SECONDS", "5", "AUTH_ACCESS_TTL_SECONDS"),
            ("AUTH_NONCE_TTL_SECONDS", "five", "AUTH_NONCE_TTL_SECONDS"),
        ],
    )
    def test_bad_values_stop_the_server(self, name: str, value: str, error: str) -> None:
        with pytest.raises(ConfigError, match=error):
            AuthSettings.from_env(Env({name: value}))
