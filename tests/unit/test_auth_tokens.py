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


class TestVerifiedTokens:
    """A token that verified is answered from memory until it expires; anything else is verified in full."""

    @staticmethod
    def _counting_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
        calls: list[str] = []
        decode = jwt.decode

        def counted(token: str, *args: object, **kwargs: object) -> object:
            calls.append(token)
            return decode(token, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(jwt, "decode", counted)
        return calls

    def test_a_verified_token_is_not_verified_again(self, monkeypatch: pytest.MonkeyPatch) -> None:
        decodes = self._counting_decodes(monkeypatch)
        verifier = TokenVerifier(KEYS)
        issued = TokenIssuer(KEYS).issue_token(WALLET, ["user"], ttl_s=600, session_id="s1")
        first = verifier.verify(issued.token)
        assert verifier.verify(issued.token) == first
        assert (first.token_id, first.session_id, first.roles) == (issued.token_id, "s1", frozenset({"user"}))
        assert decodes == [issued.token]

    def test_a_remembered_token_is_refused_once_it_expires(self) -> None:
        now = [time.time()]
        verifier = TokenVerifier(KEYS, leeway_s=5.0, clock=lambda: now[0])
        issued = TokenIssuer(KEYS).issue_token(WALLET, ["user"], ttl_s=60)
        verifier.verify(issued.token)
        now[0] = issued.expires_at + 4.0  # within the leeway: still good
        assert verifier.verify(issued.token).token_id == issued.token_id
        now[0] = issued.expires_at + 5.0
        with pytest.raises(Unauthenticated) as error:
            verifier.verify(issued.token)
        assert error.value.reason == "TOKEN_EXPIRED"

    def test_a_token_with_another_signature_is_verified_in_full(self) -> None:
        verifier = TokenVerifier(KEYS)
        token = TokenIssuer(KEYS).issue(WALLET, ["user"])
        verifier.verify(token)
        header, payload, signature = token.split(".")
        forged = f"{header}.{payload}.{signature[:-4]}AAAA"
        with pytest.raises(Unauthenticated) as error:
            verifier.verify(forged)
        assert error.value.reason == "TOKEN_INVALID"

    def test_a_refused_token_is_refused_every_time(self, monkeypatch: pytest.MonkeyPatch) -> None:
        decodes = self._counting_decodes(monkeypatch)
        verifier = TokenVerifier(KEYS)
        token = TokenIssuer(JwtKeys("k1", {"k1": "another-secret-" + "9" * 32})).issue(WALLET, ["user"])
        for _ in range(2):
            with pytest.raises(Unauthenticated):
                verifier.verify(token)
        assert decodes == [token, token]

    def test_the_oldest_token_is_forgotten_past_the_cache_size(self, monkeypatch: pytest.MonkeyPatch) -> None:
        decodes = self._counting_decodes(monkeypatch)
        verifier = TokenVerifier(KEYS, cache_size=2)
        tokens = [TokenIssuer(KEYS).issue(WALLET, ["user"]) for _ in range(3)]
        for token in tokens:
            verifier.verify(token)
        verifier.verify(tokens[2])
        verifier.verify(tokens[1])
        assert decodes == tokens
        verifier.verify(tokens[0])
        assert decodes == [*tokens, tokens[0]]
