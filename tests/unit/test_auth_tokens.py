"""servers.common.auth as the auth service uses it: session tokens (`sid`, kept `jti` and `exp`)."""

from __future__ import annotations

import time

import jwt
import pytest

from servers.common.auth import JwtKeys, TokenIssuer, TokenVerifier
from servers.common.errors import Unauthenticated

SECRET = "session-secret-" + "3" * 32
KEYS = JwtKeys(current_kid="k1", secrets={"k1": SECRET})
WALLET = "0x" + "cd" * 20


class TestIssueToken:
    def test_keeps_the_token_id_and_expiry_and_carries_the_session(self) -> None:
        issued = TokenIssuer(KEYS).issue_token(WALLET, ["user", "publisher"], ttl_s=600, session_id="sabc")
        claims = jwt.decode(issued.token, SECRET, algorithms=["HS256"], audience="far-platform")
        assert (claims["jti"], claims["exp"], claims["sid"]) == (issued.token_id, issued.expires_at, "sabc")
        principal = TokenVerifier(KEYS).verify(issued.token)
        assert principal.session_id == "sabc"
        assert (principal.token_id, principal.expires_at) == (issued.token_id, issued.expires_at)

    def test_issued_at_a_given_time(self) -> None:
        now = time.time() - 100
        issued = TokenIssuer(KEYS).issue_token(WALLET, ["user"], ttl_s=900, now=now)
        claims = jwt.decode(issued.token, options={"verify_signature": False})
        assert (claims["iat"], claims["exp"]) == (int(now), int(now) + 900)

    def test_tokens_outside_a_session_have_no_sid(self) -> None:
        token = TokenIssuer(KEYS).issue(WALLET, ["user"])
        assert "sid" not in jwt.decode(token, options={"verify_signature": False})
        assert TokenVerifier(KEYS).verify(token).session_id == ""

    def test_a_malformed_sid_is_invalid(self) -> None:
        now = int(time.time())
        claims = {"iss": "far-auth", "aud": "far-platform", "sub": WALLET, "iat": now, "exp": now + 60, "jti": "j"}
        token = jwt.encode({**claims, "sid": ["s1"]}, SECRET, algorithm="HS256", headers={"kid": "k1"})
        with pytest.raises(Unauthenticated) as error:
            TokenVerifier(KEYS).verify(token)
        assert error.value.reason == "TOKEN_INVALID"
