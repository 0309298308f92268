"""far.auth.v1 sign-in: CreateChallenge and SignIn (EIP-4361) against real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
import jwt
import pytest
from far.auth.v1 import auth_service_pb2, auth_service_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from redis.asyncio import Redis

from servers.auth import siwe
from servers.common.auth import JwtKeys
from servers.common.server import RunningServer
from tests.integration.auth_support import (
    ADMIN,
    BOOTSTRAP_ADMIN,
    CHAIN_ID,
    DOMAIN,
    OTHER_DOMAIN,
    OTHER_URI,
    URI,
    USER,
    Stub,
    challenge,
    expect_auth_error,
    new_wallet,
    sign,
    sign_in,
    wallet_of,
)
from tests.integration.conftest import MovableClock
from tests.integration.gamed_support import outcome

pytestmark = pytest.mark.integration

INVALID = grpc.StatusCode.INVALID_ARGUMENT
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def request(**fields: object) -> auth_service_pb2.CreateChallengeRequest:
    values: dict[str, object] = {
        "wallet_address": new_wallet().address,
        "chain_id": CHAIN_ID,
        "domain": DOMAIN,
        "uri": URI,
    }
    return auth_service_pb2.CreateChallengeRequest(**{**values, **fields})  # type: ignore[arg-type]


def sign_in_request(message: str, signature: str) -> auth_service_pb2.SignInRequest:
    return auth_service_pb2.SignInRequest(message=message, signature=signature)


def edited(message: str, old: str, new: str) -> str:
    assert old in message
    return message.replace(old, new, 1)


class TestCreateChallenge:
    async def test_issues_the_eip4361_message(self, auth_api: Stub) -> None:
        account = new_wallet()
        before = datetime.now(UTC).replace(microsecond=0)
        issued = await auth_api.CreateChallenge(request(wallet_address=account.address.lower()))
        issue_time = issued.issue_time.ToDatetime(UTC)
        assert before <= issue_time <= datetime.now(UTC)
        assert issued.expire_time.ToDatetime(UTC) - issue_time == timedelta(minutes=5)
        assert len(issued.nonce) == 16
        assert issued.nonce.isalnum()
        assert issued.message == (
            f"{DOMAIN} wants you to sign in with your Ethereum account:\n"
            f"{account.address}\n"  # EIP-55 checksummed, whatever the case asked for
            "\n"
            "Sign in to FAR.\n"
            "\n"
            f"URI: {URI}\n"
            "Version: 1\n"
            f"Chain ID: {CHAIN_ID}\n"
            f"Nonce: {issued.nonce}\n"
            f"Issued At: {issue_time.strftime('%Y-%m-%dT%H:%M:%SZ')}\n"
            f"Expiration Time: {issued.expire_time.ToDatetime(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"
        )
        parsed = siwe.parse_message(issued.message)
        assert (parsed.domain, parsed.uri, parsed.chain_id, parsed.nonce) == (DOMAIN, URI, CHAIN_ID, issued.nonce)

    async def test_the_nonce_lives_in_redis_until_the_challenge_expires(
        self, auth_api: Stub, redis_client: Redis, redis_key_prefix: str
    ) -> None:
        issued = await auth_api.CreateChallenge(request())
        key = f"{redis_key_prefix}auth:challenge:{issued.nonce}"
        ttl_ms = await redis_client.pttl(key)
        remaining = (issued.expire_time.ToDatetime(UTC) - datetime.now(UTC)).total_seconds() * 1000
        assert 0 < ttl_ms <= 300_000
        assert abs(ttl_ms - remaining) < 2_000, (ttl_ms, remaining)
        account = new_wallet()
        own = await challenge(auth_api, account)
        await auth_api.SignIn(sign_in_request(own.message, sign(account, own.message)))
        assert await redis_client.exists(f"{redis_key_prefix}auth:challenge:{own.nonce}") == 0

    async def test_each_challenge_has_its_own_nonce(self, auth_api: Stub) -> None:
        account = new_wallet()
        nonces = {(await challenge(auth_api, account)).nonce for _ in range(3)}
        assert len(nonces) == 3

    async def test_another_configured_domain_and_chain(self, auth_api: Stub) -> None:
        issued = await auth_api.CreateChallenge(request(domain=OTHER_DOMAIN, uri=OTHER_URI, chain_id=56))
        assert issued.message.startswith(f"{OTHER_DOMAIN} wants you")
        assert "\nChain ID: 56\n" in issued.message

    async def test_every_missing_field_at_once(self, auth_api: Stub) -> None:
        await expect_auth_error(
            auth_api.CreateChallenge(auth_service_pb2.CreateChallengeRequest()),
            INVALID,
            fields=["wallet_address", "chain_id", "domain", "uri"],
        )

    @pytest.mark.parametrize(
        ("fields", "bad"),
        [
            ({"wallet_address": "0x1234"}, "wallet_address"),
            ({"wallet_address": "0x" + "g" * 40}, "wallet_address"),
            # a mixed-case address must carry a right EIP-55 checksum
            ({"wallet_address": "0x52908400098527886E0F7030069857D2E4169EE7".replace("E", "e", 1)}, "wallet_address"),
            ({"domain": "app.far.test/evil"}, "domain"),
            ({"domain": "app.far.test\nURI: https://evil"}, "domain"),
            ({"uri": "https://app.far.test/\nNonce: 1"}, "uri"),
            ({"uri": "https://elsewhere.test/login"}, "uri"),
            ({"uri": "ftp://app.far.test/"}, "uri"),
            ({"uri": "https://app.far.test/" + "x" * 2048}, "uri"),
        ],
    )
    async def test_bad_field(self, auth_api: Stub, fields: dict[str, str], bad: str) -> None:
        await expect_auth_error(auth_api.CreateChallenge(request(**fields)), INVALID, fields=[bad])

    async def test_domain_not_allowed(self, auth_api: Stub) -> None:
        await expect_auth_error(
            auth_api.CreateChallenge(request(domain="evil.test", uri="https://evil.test/")),
            INVALID,
            "DOMAIN_NOT_ALLOWED",
            fields=["domain"],
        )

    async def test_chain_not_supported(self, auth_api: Stub) -> None:
        await expect_auth_error(
            auth_api.CreateChallenge(request(chain_id=1)), INVALID, "CHAIN_NOT_SUPPORTED", fields=["chain_id"]
        )

    async def test_rate_limited_per_wallet(self, auth_api: Stub, clock: MovableClock) -> None:
        # The test server allows 5 challenges per wallet and minute; start at the top of a minute.
        now = datetime.now(UTC)
        clock.advance(timedelta(seconds=60 - now.second - now.microsecond / 1e6 + 0.5))
        account = new_wallet()
        for _ in range(5):
            await challenge(auth_api, account)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await challenge(auth_api, account)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(raised.value)  # type: ignore[arg-type]
        assert status is not None
        infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
        retry = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
        info, retry_info = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
        infos[0].Unpack(info)
        retry[0].Unpack(retry_info)
        assert (info.reason, info.domain) == ("RATE_LIMITED", "auth.far.network")
        assert 0 < retry_info.retry_delay.ToTimedelta().total_seconds() <= 60
        await challenge(auth_api, new_wallet())  # other wallets are not affected
        clock.advance(timedelta(minutes=1))
        await challenge(auth_api, account)  # a new minute


class TestSignIn:
    async def test_happy_path(self, auth_api: Stub, auth_server: RunningServer, jwt_keys: JwtKeys) -> None:
        account = new_wallet()
        wallet = wallet_of(account)
        issued = await challenge(auth_api, account)
        options = [("grpc.primary_user_agent", "far-tests/1.0")]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{auth_server.port}", options=options) as channel:
            session = await auth_service_pb2_grpc.AuthServiceStub(channel).SignIn(
                sign_in_request(issued.message, sign(account, issued.message))
            )
        assert session.name.startswith(f"accounts/{wallet}/sessions/s")
        assert session.account.name == f"accounts/{wallet}"
        assert session.account.wallet_address == wallet
        assert list(session.account.roles) == [USER]
        assert session.account.last_sign_in_time == session.create_time
        assert session.create_time == session.refresh_time
        assert session.user_agent.startswith("far-tests/1.0 grpc-python")
        assert 40 <= len(session.refresh_token) <= 256
        access_ttl = session.access_token_expire_time.ToDatetime(UTC) - session.create_time.ToDatetime(UTC)
        assert timedelta(seconds=899) <= access_ttl <= timedelta(seconds=900)
        refresh_ttl = session.refresh_token_expire_time.ToDatetime(UTC) - session.create_time.ToDatetime(UTC)
        assert refresh_ttl == timedelta(days=30)

        header = jwt.get_unverified_header(session.access_token)
        assert (header["alg"], header["kid"]) == ("HS256", "k1")
        claims = jwt.decode(session.access_token, jwt_keys.secrets["k1"], algorithms=["HS256"], audience="far-platform")
        assert claims["iss"] == "far-auth"
        assert claims["sub"] == wallet
        assert claims["roles"] == ["user"]
        assert claims["sid"] == session.name.rsplit("/", 1)[1]
        assert claims["exp"] == session.access_token_expire_time.seconds
        assert claims["exp"] - claims["iat"] == 900
        assert len(claims["jti"]) == 32

    async def test_signature_with_v_as_0_or_1(self, auth_api: Stub) -> None:
        account = new_wallet()
        issued = await challenge(auth_api, account)
        signature = sign(account, issued.message)
        v = int(signature[-2:], 16) - 27
        session = await auth_api.SignIn(sign_in_request(issued.message, f"{signature[:-2]}{v:02x}"))
        assert session.account.wallet_address == wallet_of(account)

    async def test_second_sign_in_is_a_second_session_of_the_same_account(self, auth_api: Stub) -> None:
        account = new_wallet()
        first = await sign_in(auth_api, account)
        second = await sign_in(auth_api, account)
        assert first.name != second.name
        assert second.account.create_time == first.account.create_time
        assert second.account.last_sign_in_time.ToDatetime() > first.account.last_sign_in_time.ToDatetime()

    async def test_replayed_nonce(self, auth_api: Stub) -> None:
        account = new_wallet()
        issued = await challenge(auth_api, account)
        signed = sign_in_request(issued.message, sign(account, issued.message))
        await auth_api.SignIn(signed)
        await expect_auth_error(auth_api.SignIn(signed), UNAUTHENTICATED, "CHALLENGE_NOT_FOUND")

    async def test_concurrent_sign_ins_with_one_nonce_give_one_session(self, auth_api: Stub) -> None:
        account = new_wallet()
        issued = await challenge(auth_api, account)
        signed = sign_in_request(issued.message, sign(account, issued.message))
        results = await asyncio.gather(*(outcome(auth_api.SignIn(signed)) for _ in range(8)))
        assert sorted(results) == ["OK"] + ["UNAUTHENTICATED/CHALLENGE_NOT_FOUND"] * 7

    async def test_a_failed_signature_consumes_the_nonce(self, auth_api: Stub) -> None:
        account = new_wallet()
        issued = await challenge(auth_api, account)
        await expect_auth_error(
            auth_api.SignIn(sign_in_request(issued.message, sign(new_wallet(), issued.message))),
            UNAUTHENTICATED,
            "INVALID_SIGNATURE",
        )
        await expect_auth_error(
            auth_api.SignIn(sign_in_request(issued.message, sign(account, issued.message))),
            UNAUTHENTICATED,
            "CHALLENGE_NOT_FOUND",
        )

    async def test_unknown_nonce(self, auth_api: Stub) -> None:
        account = new_wallet()
        issued = await challenge(auth_api, account)
        message = edited(issued.message, f"Nonce: {issued.nonce}", "Nonce: abcdefgh12345678")
        await expect_auth_error(
            auth_api.SignIn(sign_in_request(message, sign(account, message))), UNAUTHENTICATED, "CHALLENGE_NOT_FOUND"
        )

    async def test_expired_message(self, auth_api: Stub, clock: MovableClock) -> None:
        account = new_wallet()
        issued = await challenge(auth_api, account)
        signed = sign_in_request(issued.message, sign(account, issued.message))
        clock.advance(timedelta(minutes=5, seconds=1))
        await expect_auth_error(auth_api.SignIn(signed), UNAUTHENTICATED, "MESSAGE_EXPIRED")

    async def test_message_from_the_future(self, auth_api: Stub, clock: MovableClock) -> None:
        account = new_wallet()
        issued = await challenge(auth_api, account)
        signed = sign_in_request(issued.message, sign(account, issued.message))
        clock.advance(timedelta(minutes=-2))
        await expect_auth_error(auth_api.SignIn(signed), UNAUTHENTICATED, "MESSAGE_NOT_YET_VALID")

    async def test_cross_domain_message(self, auth_api: Stub) -> None:
        # A phishing site asks the wallet to sign the challenge rewritten for its own domain.
        account = new_wallet()
        issued = await challenge(auth_api, account)
        message = edited(issued.message, f"{DOMAIN} wants you", "evil.test wants you")
        message = edited(message, f"URI: {URI}", "URI: https://evil.test/login")
        await expect_auth_error(
            auth_api.SignIn(sign_in_request(message, sign(account, message))), UNAUTHENTICATED, "DOMAIN_MISMATCH"
        )

    async def test_message_moved_to_another_configured_domain(self, auth_api: Stub) -> None:
        account = new_wallet()
        issued = await challenge(auth_api, account)
        message = edited(issued.message, f"{DOMAIN} wants you", f"{OTHER_DOMAIN} wants you")
        message = edited(message, f"URI: {URI}", f"URI: {OTHER_URI}")
        await expect_auth_error(
            auth_api.SignIn(sign_in_request(message, sign(account, message))), UNAUTHENTICATED, "DOMAIN_MISMATCH"
        )

    @pytest.mark.parametrize("uri", ["https://evil.test/login", "https://app.far.test/elsewhere"])
    async def test_wrong_uri(self, auth_api: Stub, uri: str) -> None:
        account = new_wallet()
        issued = await challenge(auth_api, account)
        message = edited(issued.message, f"URI: {URI}", f"URI: {uri}")
        await expect_auth_error(
            auth_api.SignIn(sign_in_request(message, sign(account, message))), UNAUTHENTICATED, "URI_MISMATCH"
        )

    @pytest.mark.parametrize("chain_id", [1, 56])
    async def test_wrong_chain(self, auth_api: Stub, chain_id: int) -> None:
        # 1 is not configured; 56 is, but the challenge was issued for 97.
        account = new_wallet()
        issued = await challenge(auth_api, account)
        message = edited(issued.message, f"Chain ID: {CHAIN_ID}", f"Chain ID: {chain_id}")
        await expect_auth_error(
            auth_api.SignIn(sign_in_request(message, sign(account, message))), UNAUTHENTICATED, "CHAIN_MISMATCH"
        )

    async def test_other_edits_are_a_mismatch(self, auth_api: Stub) -> None:
        account = new_wallet()
        issued = await challenge(auth_api, account)
        message = edited(issued.message, "Sign in to FAR.", "Send all my tokens.")
        await expect_auth_error(
            auth_api.SignIn(sign_in_request(message, sign(account, message))), UNAUTHENTICATED, "MESSAGE_MISMATCH"
        )

    async def test_challenge_of_another_wallet(self, auth_api: Stub) -> None:
        # The attacker signs the victim's challenge text with the victim's address swapped for theirs.
        victim, attacker = new_wallet(), new_wallet()
        issued = await challenge(auth_api, victim)
        message = edited(issued.message, victim.address, attacker.address)
        await expect_auth_error(
            auth_api.SignIn(sign_in_request(message, sign(attacker, message))), UNAUTHENTICATED, "MESSAGE_MISMATCH"
        )

    async def test_signature_by_another_key(self, auth_api: Stub) -> None:
        account = new_wallet()
        issued = await challenge(auth_api, account)
        await expect_auth_error(
            auth_api.SignIn(sign_in_request(issued.message, sign(new_wallet(), issued.message))),
            UNAUTHENTICATED,
            "INVALID_SIGNATURE",
        )

    async def test_signature_that_recovers_nothing(self, auth_api: Stub) -> None:
        account = new_wallet()
        issued = await challenge(auth_api, account)
        await expect_auth_error(
            auth_api.SignIn(sign_in_request(issued.message, "0x" + "00" * 65)), UNAUTHENTICATED, "INVALID_SIGNATURE"
        )

    async def test_missing_fields(self, auth_api: Stub) -> None:
        await expect_auth_error(
            auth_api.SignIn(auth_service_pb2.SignInRequest()), INVALID, fields=["message", "signature"]
        )

    @pytest.mark.parametrize("signature", ["0x1234", "ab" * 65, "0x" + "zz" * 65, "0x" + "ab" * 66])
    async def test_malformed_signature(self, auth_api: Stub, signature: str) -> None:
        issued = await challenge(auth_api, new_wallet())
        await expect_auth_error(
            auth_api.SignIn(sign_in_request(issued.message, signature)), INVALID, fields=["signature"]
        )

    @pytest.mark.parametrize(
        "message",
        [
            "hello",
            "app.far.test wants you to sign in with your Ethereum account:\n0x1234\n\nURI: https://app.far.test/",
            "x" * 4097,
        ],
    )
    async def test_malformed_message(self, auth_api: Stub, message: str) -> None:
        await expect_auth_error(
            auth_api.SignIn(sign_in_request(message, "0x" + "ab" * 65)), INVALID, fields=["message"]
        )

    async def test_message_with_crlf_line_ends(self, auth_api: Stub) -> None:
        account = new_wallet()
        issued = await challenge(auth_api, account)
        message = issued.message.replace("\n", "\r\n")
        await expect_auth_error(
            auth_api.SignIn(sign_in_request(message, sign(account, message))), INVALID, fields=["message"]
        )

    async def test_bootstrap_admin_gets_admin_at_first_sign_in(self, auth_api: Stub) -> None:
        session = await sign_in(auth_api, BOOTSTRAP_ADMIN)
        assert list(session.account.roles) == [USER, ADMIN]
        claims = jwt.decode(session.access_token, options={"verify_signature": False})
        assert claims["roles"] == ["admin", "user"]
