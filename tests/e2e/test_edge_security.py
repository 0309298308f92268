"""The edge's security, each case a real request through Envoy: tokens refused by jwt_authn (missing, expired,
bad signature, alg none, wrong audience, in the query string), the same over gRPC, what only the services
can refuse (a revoked token, a role escalation, another account's session), and sign-in messages the auth
service refuses (a replayed nonce, a message rewritten for another domain or another chain)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import jwt
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from far.auth.v1 import auth_service_pb2, auth_service_pb2_grpc
from far.gamed.v1 import game_pb2, gamed_service_pb2, gamed_service_pb2_grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2

from devstack.stack import Stack
from tests.conftest import wallet
from tests.e2e.test_auth_e2e import DOMAIN, URI, headers, sign_in

pytestmark = pytest.mark.e2e

PUBLISHER = wallet(0xED6E)
EDGE = "edge.far.network"


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.envoy_http_url, timeout=10) as client:
        yield client


def claims(subject: str = PUBLISHER, *, audience: str = "far-platform", ttl_s: int = 900) -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": "far-auth",
        "aud": audience,
        "sub": subject,
        "roles": ["publisher"],
        "iat": now,
        "exp": now + ttl_s,
        "jti": uuid.uuid4().hex,
    }


@pytest.fixture(scope="module")
def bad_tokens(jwt_secret: str) -> dict[str, str]:
    """Tokens jwt_authn must refuse, with the HTTP status it refuses them with."""
    return {
        "expired": jwt.encode(claims(ttl_s=-120), jwt_secret, algorithm="HS256", headers={"kid": "k1"}),
        "bad-signature": jwt.encode(claims(), "y" * 40, algorithm="HS256", headers={"kid": "k1"}),
        "alg-none": jwt.encode(claims(), None, algorithm="none", headers={"kid": "k1"}),
        "unknown-kid": jwt.encode(claims(), jwt_secret, algorithm="HS256", headers={"kid": "k9"}),
        "wrong-audience": jwt.encode(
            claims(audience="someone-else"), jwt_secret, algorithm="HS256", headers={"kid": "k1"}
        ),
        "garbage": "not.a.jwt",
    }


REFUSED_WITH = {"wrong-audience": 403}


def edge_error(response: httpx.Response) -> tuple[int, str, str]:
    """(code, reason, domain) of a JSON google.rpc.Status with one ErrorInfo."""
    assert response.headers["content-type"].startswith("application/json"), response.text
    status = json_format.ParseDict(response.json(), status_pb2.Status())
    (detail,) = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    info = error_details_pb2.ErrorInfo()
    detail.Unpack(info)
    return status.code, info.reason, info.domain


def create_game(http: httpx.Client, **kwargs: Any) -> httpx.Response:
    return http.post(f"/v1/games?gameId=edge-{uuid.uuid4().hex[:8]}", json={"displayName": "Edge"}, **kwargs)


class TestJwtAtTheEdgeOverJson:
    def test_anonymous_read_of_a_public_method_passes(self, http: httpx.Client) -> None:
        assert http.get("/v1/games").status_code == 200

    def test_anonymous_call_of_a_protected_method_is_refused_by_the_edge(self, http: httpx.Client) -> None:
        response = create_game(http)
        assert response.status_code == 401
        assert edge_error(response) == (16, "UNAUTHENTICATED", EDGE)

    @pytest.mark.parametrize(
        "kind", ["expired", "bad-signature", "alg-none", "unknown-kid", "wrong-audience", "garbage"]
    )
    def test_bad_token_is_refused_by_the_edge(self, http: httpx.Client, bad_tokens: dict[str, str], kind: str) -> None:
        status = REFUSED_WITH.get(kind, 401)
        response = create_game(http, headers={"authorization": f"Bearer {bad_tokens[kind]}"})
        assert response.status_code == status, response.text
        assert edge_error(response)[1:] == ({401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED"}[status], EDGE)
        # A public method needs no token, but one that comes must be valid.
        public = http.get("/v1/games", headers={"authorization": f"Bearer {bad_tokens[kind]}"})
        assert public.status_code == status, public.text

    @pytest.mark.parametrize("path", ["/v1/games/", "/v1//games", "/v1/./games", "/v1/games/."])
    def test_path_variants_are_refused_by_the_edge(self, http: httpx.Client, path: str) -> None:
        response = http.post(f"{path}?gameId=edge-variant", json={"displayName": "Edge"})
        assert response.status_code == 401, response.text
        assert edge_error(response) == (16, "UNAUTHENTICATED", EDGE)

    def test_token_in_the_query_string_is_not_taken(self, http: httpx.Client, make_token: Callable[..., str]) -> None:
        token = make_token(PUBLISHER, ("publisher",))
        response = http.post(f"/v1/games?gameId=edge-q&access_token={token}", json={"displayName": "Edge"})
        assert response.status_code == 401
        assert edge_error(response)[1:] == ("UNAUTHENTICATED", EDGE)

    def test_valid_token_passes(self, http: httpx.Client, make_token: Callable[..., str]) -> None:
        response = create_game(http, headers={"authorization": f"Bearer {make_token(PUBLISHER, ('publisher',))}"})
        assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def gamed(envoy_channel: grpc.Channel) -> gamed_service_pb2_grpc.GamedServiceStub:
    return gamed_service_pb2_grpc.GamedServiceStub(envoy_channel)


class TestJwtAtTheEdgeOverGrpc:
    def call(self, gamed: gamed_service_pb2_grpc.GamedServiceStub, token: str | None) -> tuple[grpc.StatusCode, str]:
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        try:
            gamed.CreateGame(
                gamed_service_pb2.CreateGameRequest(
                    game_id=f"edge-{uuid.uuid4().hex[:8]}", game=game_pb2.Game(display_name="Edge")
                ),
                metadata=metadata,
                timeout=5,
            )
        except grpc.RpcError as exc:
            call = exc if isinstance(exc, grpc.Call) else None
            return (call.code(), call.details() or "") if call else (grpc.StatusCode.UNKNOWN, "")
        return grpc.StatusCode.OK, ""

    def test_public_method_without_token(self, gamed: gamed_service_pb2_grpc.GamedServiceStub) -> None:
        gamed.ListGames(gamed_service_pb2.ListGamesRequest(), timeout=5)

    def test_tokens(
        self, gamed: gamed_service_pb2_grpc.GamedServiceStub, bad_tokens: dict[str, str], make_token: Callable[..., str]
    ) -> None:
        # jwt_authn's own messages ("Jwt is missing", "Jwt verification fails", ...): refused at the edge.
        assert self.call(gamed, None) == (grpc.StatusCode.UNAUTHENTICATED, "Jwt is missing")
        for kind, token in bad_tokens.items():
            wanted = grpc.StatusCode.PERMISSION_DENIED if kind == "wrong-audience" else grpc.StatusCode.UNAUTHENTICATED
            code, message = self.call(gamed, token)
            assert (code, "Jwt" in message) == (wanted, True), (kind, message)
        assert self.call(gamed, make_token(PUBLISHER, ("publisher",))) == (grpc.StatusCode.OK, "")


class TestWhatOnlyTheServicesRefuse:
    def test_revoked_token_after_sign_out(self, http: httpx.Client) -> None:
        session = sign_in(http, Account.create())
        assert http.get("/v1/accounts/me", headers=headers(session)).status_code == 200
        signed_out = http.post("/v1/sessions:signOut", json={"refreshToken": session["refreshToken"]})
        assert signed_out.status_code == 200, signed_out.text
        refused = http.get("/v1/accounts/me", headers=headers(session))
        assert refused.status_code == 401
        assert edge_error(refused) == (16, "TOKEN_REVOKED", "auth.far.network")

    def test_role_escalation(self, http: httpx.Client) -> None:
        session = sign_in(http, Account.create())
        wallet_address = session["account"]["walletAddress"]
        for name in (f"accounts/{wallet_address}", "accounts/me"):
            response = http.post(f"/v1/{name}:grantRole", json={"role": "ROLE_ADMIN"}, headers=headers(session))
            assert response.status_code == 403, response.text
            assert edge_error(response) == (7, "MISSING_ROLE", "auth.far.network")
        me = http.get("/v1/accounts/me", headers=headers(session)).json()
        assert me["roles"] == ["ROLE_USER"]

    def test_another_accounts_session(self, http: httpx.Client, envoy_channel: grpc.Channel) -> None:
        victim, attacker = sign_in(http, Account.create()), sign_in(http, Account.create())
        response = http.post(f"/v1/{victim['name']}:revoke", json={}, headers=headers(attacker))
        assert response.status_code == 404, response.text
        assert edge_error(response) == (5, "SESSION_NOT_FOUND", "auth.far.network")
        victims = f"/v1/accounts/{victim['account']['walletAddress']}/sessions"
        assert http.get(victims, headers=headers(attacker)).status_code == 404
        with pytest.raises(grpc.RpcError) as raised:
            auth_service_pb2_grpc.AuthServiceStub(envoy_channel).RevokeSession(
                auth_service_pb2.RevokeSessionRequest(name=victim["name"]),
                metadata=(("authorization", f"Bearer {attacker['accessToken']}"),),
                timeout=5,
            )
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert http.get("/v1/accounts/me", headers=headers(victim)).status_code == 200


def personal_sign(account: LocalAccount, message: str) -> str:
    return Account.sign_message(encode_defunct(text=message), account.key).signature.to_0x_hex()


def challenge_message(http: httpx.Client, account: LocalAccount) -> str:
    response = http.post(
        "/v1/challenges", json={"walletAddress": account.address, "chainId": "97", "domain": DOMAIN, "uri": URI}
    )
    assert response.status_code == 200, response.text
    message: str = response.json()["message"]
    return message


def rewritten(message: str, old: str, new: str) -> str:
    assert old in message
    return message.replace(old, new, 1)


class TestSignInMessagesRefused:
    def sign_in(self, http: httpx.Client, account: LocalAccount, message: str) -> httpx.Response:
        return http.post("/v1/sessions:signIn", json={"message": message, "signature": personal_sign(account, message)})

    def test_replayed_nonce(self, http: httpx.Client) -> None:
        account = Account.create()
        message = challenge_message(http, account)
        first = self.sign_in(http, account, message)
        assert first.status_code == 200, first.text
        replayed = self.sign_in(http, account, message)
        assert replayed.status_code == 401, replayed.text
        assert edge_error(replayed) == (16, "CHALLENGE_NOT_FOUND", "auth.far.network")

    @pytest.mark.parametrize(
        ("domain", "uri"),
        [
            # A phishing site has the wallet sign the platform's challenge rewritten for its own domain.
            ("evil.example", "https://evil.example/login"),
            # Another of the platform's own sign-in domains, but not the one the challenge was issued for.
            ("localhost:8080", "http://localhost:8080/login"),
        ],
    )
    def test_message_rewritten_for_another_domain(self, http: httpx.Client, domain: str, uri: str) -> None:
        account = Account.create()
        message = challenge_message(http, account)
        message = rewritten(message, f"{DOMAIN} wants you", f"{domain} wants you")
        message = rewritten(message, f"URI: {URI}", f"URI: {uri}")
        refused = self.sign_in(http, account, message)
        assert refused.status_code == 401, refused.text
        assert edge_error(refused) == (16, "DOMAIN_MISMATCH", "auth.far.network")

    def test_challenge_for_another_domain_is_not_issued(self, http: httpx.Client) -> None:
        refused = http.post(
            "/v1/challenges",
            json={
                "walletAddress": Account.create().address,
                "chainId": "97",
                "domain": "evil.example",
                "uri": "https://evil.example/login",
            },
        )
        assert refused.status_code == 400, refused.text
        assert edge_error(refused) == (3, "DOMAIN_NOT_ALLOWED", "auth.far.network")

    @pytest.mark.parametrize("chain_id", ["1", "56"])
    def test_message_rewritten_for_another_chain(self, http: httpx.Client, chain_id: str) -> None:
        # The stack signs in on BSC testnet (97) only: BSC mainnet's and Ethereum's ids are refused.
        account = Account.create()
        message = rewritten(challenge_message(http, account), "Chain ID: 97", f"Chain ID: {chain_id}")
        refused = self.sign_in(http, account, message)
        assert refused.status_code == 401, refused.text
        assert edge_error(refused) == (16, "CHAIN_MISMATCH", "auth.far.network")
        # The refused sign-in consumed nothing a later honest one needs: a fresh challenge still works.
        assert sign_in(http, account)["account"]["walletAddress"].lower() == account.address.lower()
