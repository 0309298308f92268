"""servers.common.auth: access tokens (issue, verify, rotate), roles, and wallet signatures."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct

from servers.common.auth import (
    ANONYMOUS,
    JwtKeys,
    Principal,
    Role,
    TokenIssuer,
    TokenVerifier,
    recover_wallet,
    require_role,
    require_signed_in,
)
from servers.common.errors import PermissionDenied, Unauthenticated

SECRET = "current-secret-" + "0" * 32
OLD_SECRET = "previous-secret-" + "1" * 32
KEYS = JwtKeys(current_kid="k1", secrets={"k1": SECRET})
WALLET = "0x" + "ab" * 20


def verify(token: str, keys: JwtKeys = KEYS) -> Principal:
    return TokenVerifier(keys).verify(token)


def rejected(token: str, keys: JwtKeys = KEYS) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as error:
        verify(token, keys)
    return error.value


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "iss": "far-auth",
        "aud": "far-platform",
        "sub": WALLET,
        "roles": ["user"],
        "iat": now,
        "exp": now + 60,
        "jti": "j1",
    }
    return {k: v for k, v in {**base, **overrides}.items() if v is not None}


def signed(payload: dict[str, Any], secret: str = SECRET, kid: str | None = "k1") -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers={"kid": kid} if kid else None)


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


class TestRoundTrip:
    def test_issue_then_verify(self) -> None:
        before = time.time()
        token = TokenIssuer(KEYS).issue(WALLET.upper().replace("0X", "0x"), ["publisher", "user", "user"], ttl_s=600)
        principal = verify(token)
        assert principal.subject == WALLET
        assert principal.roles == frozenset({"publisher", "user"})
        assert len(principal.token_id) == 32
        assert before + 598 <= principal.expires_at <= time.time() + 600
        assert principal.is_authenticated
        header = jwt.get_unverified_header(token)
        assert (header["alg"], header["kid"]) == ("HS256", "k1")

    def test_each_token_has_its_own_id(self) -> None:
        issuer = TokenIssuer(KEYS)
        assert verify(issuer.issue(WALLET, [])).token_id != verify(issuer.issue(WALLET, [])).token_id

    def test_token_without_kid_uses_the_current_key(self) -> None:
        assert verify(signed(claims(), kid=None)).subject == WALLET

    def test_subject_is_lower_cased_on_verify_too(self) -> None:
        assert verify(signed(claims(sub="0xABCDEF"))).subject == "0xabcdef"


class TestRejected:
    def test_expired(self) -> None:
        error = rejected(TokenIssuer(KEYS).issue(WALLET, ["user"], ttl_s=-60))
        assert error.reason == "TOKEN_EXPIRED"

    def test_expired_within_the_leeway_still_verifies(self) -> None:
        assert verify(signed(claims(exp=int(time.time()) - 2))).subject == WALLET

    def test_wrong_signature(self) -> None:
        assert rejected(signed(claims(), secret="another-secret-" + "2" * 32)).reason == "TOKEN_INVALID"

    def test_wrong_audience(self) -> None:
        other = JwtKeys(current_kid="k1", secrets={"k1": SECRET}, audience="someone-else")
        assert rejected(TokenIssuer(other).issue(WALLET, ["user"])).reason == "TOKEN_INVALID"

    def test_wrong_issuer(self) -> None:
        other = JwtKeys(current_kid="k1", secrets={"k1": SECRET}, issuer="mallory")
        assert rejected(TokenIssuer(other).issue(WALLET, ["user"])).reason == "TOKEN_INVALID"

    def test_alg_none(self) -> None:
        token = jwt.encode(claims(), None, algorithm="none", headers={"kid": "k1"})
        assert rejected(token).reason == "TOKEN_INVALID"

    def test_alg_none_without_kid(self) -> None:
        token = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims())}."
        assert rejected(token).reason == "TOKEN_INVALID"

    def test_unknown_kid(self) -> None:
        unknown = JwtKeys(current_kid="k9", secrets={"k9": SECRET})
        error = rejected(TokenIssuer(unknown).issue(WALLET, ["user"]))
        assert error.reason == "TOKEN_INVALID"
        assert "unknown key" in error.message

    def test_kid_that_is_not_a_string(self) -> None:
        token = f"{b64({'alg': 'HS256', 'typ': 'JWT', 'kid': ['k1']})}.{b64(claims())}.c2ln"
        assert rejected(token).reason == "TOKEN_INVALID"

    @pytest.mark.parametrize("missing", ["exp", "iat", "sub", "jti", "iss", "aud"])
    def test_missing_claim(self, missing: str) -> None:
        payload = claims()
        del payload[missing]
        assert rejected(signed(payload)).reason == "TOKEN_INVALID"

    @pytest.mark.parametrize("roles", ["admin", [1], {"admin": True}])
    def test_malformed_roles(self, roles: Any) -> None:
        assert rejected(signed(claims(roles=roles))).reason == "TOKEN_INVALID"

    @pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "a.b", "...."])
    def test_not_a_jwt(self, token: str) -> None:
        assert rejected(token).reason == "TOKEN_INVALID"


class TestRotation:
    def test_a_token_signed_with_a_previous_key_still_verifies(self) -> None:
        old_token = TokenIssuer(JwtKeys(current_kid="k1", secrets={"k1": OLD_SECRET})).issue(WALLET, ["user"])
        rotated = JwtKeys(current_kid="k2", secrets={"k2": SECRET, "k1": OLD_SECRET})
        assert verify(old_token, rotated).subject == WALLET
        new_token = TokenIssuer(rotated).issue(WALLET, ["user"])
        assert jwt.get_unverified_header(new_token)["kid"] == "k2"
        assert verify(new_token, rotated).subject == WALLET

    def test_a_retired_key_no_longer_verifies(self) -> None:
        old_token = TokenIssuer(JwtKeys(current_kid="k1", secrets={"k1": OLD_SECRET})).issue(WALLET, ["user"])
        assert rejected(old_token, JwtKeys(current_kid="k2", secrets={"k2": SECRET})).reason == "TOKEN_INVALID"

    def test_the_current_kid_needs_a_secret(self) -> None:
        with pytest.raises(ValueError, match="'k2'"):
            JwtKeys(current_kid="k2", secrets={"k1": SECRET})


class TestRoles:
    def test_anonymous(self) -> None:
        assert not ANONYMOUS.is_authenticated
        with pytest.raises(Unauthenticated):
            require_signed_in(ANONYMOUS)
        with pytest.raises(Unauthenticated):
            require_role(ANONYMOUS, Role.PUBLISHER)

    def test_signed_in(self) -> None:
        user = Principal(subject=WALLET, roles=frozenset({"user"}))
        assert require_signed_in(user) is user

    def test_missing_role(self) -> None:
        user = Principal(subject=WALLET, roles=frozenset({"user"}))
        with pytest.raises(PermissionDenied) as error:
            require_role(user, Role.PUBLISHER, Role.ORGANIZER)
        assert error.value.reason == "MISSING_ROLE"
        assert error.value.message == "this method needs the publisher or organizer role"

    def test_any_of_the_roles(self) -> None:
        organizer = Principal(subject=WALLET, roles=frozenset({"organizer"}))
        assert require_role(organizer, Role.PUBLISHER, Role.ORGANIZER) is organizer
        assert not organizer.is_admin

    def test_admin_has_every_role(self) -> None:
        admin = Principal(subject=WALLET, roles=frozenset({"admin"}))
        assert admin.is_admin
        assert require_role(admin, Role.REVIEWER) is admin


class TestRecoverWallet:
    account = Account.from_key("0x" + "11" * 32)
    message = "Sign in to FAR\nnonce: 8f2c"

    def test_returns_the_signer_lower_case(self) -> None:
        signature = Account.sign_message(encode_defunct(text=self.message), self.account.key).signature
        assert recover_wallet(self.message, "0x" + signature.hex().removeprefix("0x")) == self.account.address.lower()

    def test_another_message_recovers_another_address(self) -> None:
        signature = Account.sign_message(encode_defunct(text=self.message), self.account.key).signature
        assert recover_wallet(self.message + "!", signature.hex()) != self.account.address.lower()

    @pytest.mark.parametrize("signature", ["", "0x", "not hex", "0x" + "00" * 65, "0x" + "ab" * 64])
    def test_bad_signature(self, signature: str) -> None:
        with pytest.raises(Unauthenticated) as error:
            recover_wallet(self.message, signature)
        assert error.value.reason == "BAD_SIGNATURE"
