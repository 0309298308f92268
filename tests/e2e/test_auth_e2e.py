"""auth end to end through Envoy: wallet sign-in as JSON, a role grant, a publisher action on gamed with the
issued token, refresh and sign-out (after which gamed refuses the token); errors as JSON and over gRPC."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from far.auth.v1 import auth_service_pb2, auth_service_pb2_grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2

from devstack.stack import Stack
from tests.e2e.conftest import E2E_ADMIN_KEY

pytestmark = pytest.mark.e2e

# The auth service's default sign-in domains include the local front end's origin.
DOMAIN = "localhost:3000"
URI = "http://localhost:3000/login"


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.envoy_http_url, timeout=10) as client:
        yield client


def sign_in(http: httpx.Client, account: LocalAccount) -> dict[str, Any]:
    """The whole sign-in as a web front end does it: challenge, personal_sign, sign-in."""
    challenge = http.post(
        "/v1/challenges", json={"walletAddress": account.address, "chainId": "97", "domain": DOMAIN, "uri": URI}
    )
    assert challenge.status_code == 200, challenge.text
    message = challenge.json()["message"]
    signature = Account.sign_message(encode_defunct(text=message), account.key).signature.to_0x_hex()
    session = http.post("/v1/sessions:signIn", json={"message": message, "signature": signature})
    assert session.status_code == 200, session.text
    body: dict[str, Any] = session.json()
    return body


def headers(session: dict[str, Any]) -> dict[str, str]:
    return {"authorization": f"Bearer {session['accessToken']}"}


def json_error(response: httpx.Response) -> tuple[str, str]:
    """(reason, domain) of the ErrorInfo in a JSON google.rpc.Status."""
    status = json_format.ParseDict(response.json(), status_pb2.Status())
    (detail,) = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    info = error_details_pb2.ErrorInfo()
    detail.Unpack(info)
    return info.reason, info.domain


def create_game(http: httpx.Client, session: dict[str, Any], game_id: str) -> httpx.Response:
    return http.post(f"/v1/games?gameId={game_id}", json={"displayName": "Signed In"}, headers=headers(session))


class TestSignInOverJson:
    def test_sign_in_grant_publish_refresh_sign_out(self, http: httpx.Client) -> None:
        admin = sign_in(http, Account.from_key(E2E_ADMIN_KEY))
        assert admin["account"]["roles"] == ["ROLE_USER", "ROLE_ADMIN"]

        account = Account.create()
        wallet = account.address.lower()
        user = sign_in(http, account)
        assert user["name"].startswith(f"accounts/{wallet}/sessions/")
        assert user["account"]["roles"] == ["ROLE_USER"]
        assert user["userAgent"].startswith("python-httpx/")
        game_id = f"auth-e2e-{wallet[2:10]}"
        denied = create_game(http, user, game_id)
        assert denied.status_code == 403, denied.text

        granted = http.post(f"/v1/accounts/{wallet}:grantRole", json={"role": "ROLE_PUBLISHER"}, headers=headers(admin))
        assert granted.status_code == 200, granted.text
        assert granted.json()["roles"] == ["ROLE_USER", "ROLE_PUBLISHER"]

        refreshed = http.post("/v1/sessions:refresh", json={"refreshToken": user["refreshToken"]})
        assert refreshed.status_code == 200, refreshed.text
        publisher = refreshed.json()
        assert publisher["name"] == user["name"]
        assert publisher["account"]["roles"] == ["ROLE_USER", "ROLE_PUBLISHER"]
        me = http.get("/v1/accounts/me", headers=headers(publisher))
        assert (me.status_code, me.json()["walletAddress"]) == (200, wallet)

        created = create_game(http, publisher, game_id)
        assert created.status_code == 200, created.text
        assert created.json()["publisher"] == wallet

        signed_out = http.post("/v1/sessions:signOut", json={"refreshToken": publisher["refreshToken"]})
        assert (signed_out.status_code, signed_out.json()) == (200, {})
        refused = http.get(f"/v1/games/{game_id}", headers=headers(publisher))
        assert refused.status_code == 401, refused.text
        assert json_error(refused) == ("TOKEN_REVOKED", "gamed.far.network")
        again = http.post("/v1/sessions:refresh", json={"refreshToken": publisher["refreshToken"]})
        assert again.status_code == 401
        assert json_error(again) == ("SESSION_REVOKED", "auth.far.network")

    def test_refresh_token_reuse_revokes_the_session(self, http: httpx.Client) -> None:
        first = sign_in(http, Account.create())
        second = http.post("/v1/sessions:refresh", json={"refreshToken": first["refreshToken"]}).json()
        reused = http.post("/v1/sessions:refresh", json={"refreshToken": first["refreshToken"]})
        assert reused.status_code == 401
        assert json_error(reused) == ("REFRESH_TOKEN_REUSED", "auth.far.network")
        refused = http.get("/v1/accounts/me", headers=headers(second))
        assert refused.status_code == 401
        assert json_error(refused) == ("TOKEN_REVOKED", "auth.far.network")

    def test_errors_as_json(self, http: httpx.Client) -> None:
        bad = http.post("/v1/challenges", json={"walletAddress": "0x12", "chainId": "1", "domain": DOMAIN, "uri": URI})
        assert bad.status_code == 400
        assert json_error(bad) == ("INVALID_ARGUMENT", "auth.far.network")
        account = Account.create()
        challenge = http.post(
            "/v1/challenges", json={"walletAddress": account.address, "chainId": "97", "domain": DOMAIN, "uri": URI}
        ).json()
        forged = Account.sign_message(encode_defunct(text=challenge["message"]), Account.create().key)
        response = http.post(
            "/v1/sessions:signIn", json={"message": challenge["message"], "signature": forged.signature.to_0x_hex()}
        )
        assert response.status_code == 401
        assert json_error(response) == ("INVALID_SIGNATURE", "auth.far.network")


def test_sign_in_over_grpc_through_envoy(envoy_channel: grpc.Channel) -> None:
    api = auth_service_pb2_grpc.AuthServiceStub(envoy_channel)
    account = Account.create()
    challenge = api.CreateChallenge(
        auth_service_pb2.CreateChallengeRequest(wallet_address=account.address, chain_id=97, domain=DOMAIN, uri=URI),
        timeout=5,
    )
    signature = Account.sign_message(encode_defunct(text=challenge.message), account.key).signature.to_0x_hex()
    session = api.SignIn(auth_service_pb2.SignInRequest(message=challenge.message, signature=signature), timeout=5)
    assert session.account.wallet_address == account.address.lower()
    me = api.GetAccount(
        auth_service_pb2.GetAccountRequest(name="accounts/me"),
        metadata=(("authorization", f"Bearer {session.access_token}"),),
        timeout=5,
    )
    assert me == session.account
