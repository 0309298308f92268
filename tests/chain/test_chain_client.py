"""servers.common.chain against the real anvil: settings, contract handles, retries on transport errors, reverts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import pytest
from aiohttp import web
from eth_abi.abi import encode
from eth_account.signers.local import LocalAccount
from web3.exceptions import ContractCustomError, Web3RPCError

from devstack.chain import Anvil, Deployment, model_key
from servers.common.chain import Chain, ChainSettings, ChainUnavailable, RevertReason, decode_revert
from servers.common.config import ConfigError
from servers.common.errors import Unavailable
from tests.chain.chain_support import chain_env
from tests.chain.conftest import FUNDING

TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"  # a checksummed address
BAD_CHECKSUM = TOKEN.replace("F", "f", 1)


def base_env() -> dict[str, str]:
    return {
        "BSC_RPC_URL": "http://127.0.0.1:8545",
        "FAR_TOKEN_ADDRESS": TOKEN,
        "FAR_INFERENCE_PAYMENT_ADDRESS": TOKEN.lower(),
        "FAR_STAKING_ADDRESS": "0x" + "AB" * 20,
    }


class TestChainSettings:
    def test_reads_everything(self) -> None:
        settings = ChainSettings.from_env({**base_env(), "CHAIN_ID": "56", "CHAIN_CONFIRMATIONS": "20"})
        assert settings.rpc_url == "http://127.0.0.1:8545"
        assert settings.chain_id == 56
        assert settings.confirmations == 20
        assert settings.token_address == TOKEN
        assert settings.inference_payment_address == TOKEN  # lower-case in, checksummed out
        assert settings.block_time_s == 3.0

    def test_defaults(self) -> None:
        assert ChainSettings.from_env(base_env()).chain_id == 97
        assert ChainSettings.from_env(base_env()).confirmations == 1
        assert ChainSettings.from_env({**base_env(), "CHAIN_ID": "56"}).confirmations == 15

    @pytest.mark.parametrize(
        ("changes", "message"),
        [
            ({"BSC_RPC_URL": ""}, "BSC_RPC_URL is not set"),
            ({"BSC_RPC_URL": "ws://127.0.0.1:8546"}, "BSC_RPC_URL must be a http:// or https:// URL"),
            ({"CHAIN_ID": "bsc"}, "CHAIN_ID='bsc' is not an integer"),
            ({"CHAIN_ID": "0"}, "CHAIN_ID=0 must be between 1"),
            ({"CHAIN_CONFIRMATIONS": "0"}, "CHAIN_CONFIRMATIONS=0 must be between 1"),
            ({"CHAIN_CONFIRMATIONS": "many"}, "CHAIN_CONFIRMATIONS='many' is not an integer"),
            ({"FAR_TOKEN_ADDRESS": ""}, "FAR_TOKEN_ADDRESS is not set"),
            ({"FAR_STAKING_ADDRESS": "0x1234"}, "FAR_STAKING_ADDRESS='0x1234' is not a 0x-prefixed 20-byte"),
            (
                {"FAR_TOKEN_ADDRESS": TOKEN.replace("F", "f", 1)},
                "FAR_TOKEN_ADDRESS=" + repr(TOKEN.replace("F", "f", 1)),
            ),
        ],
    )
    def test_malformed_is_one_line(self, changes: dict[str, str], message: str) -> None:
        with pytest.raises(ConfigError) as caught:
            ChainSettings.from_env({**base_env(), **changes})
        assert str(caught.value).startswith(message)
        assert "\n" not in str(caught.value)


class TestChain:
    async def test_check_and_reads(self, chain: Chain, deployment: Deployment, alice: LocalAccount) -> None:
        await chain.check()
        assert await chain.block_number() >= deployment.blocks["Staking"]
        assert await chain.token.functions.balanceOf(alice.address).call() == FUNDING
        assert await chain.inference_payment.functions.token().call() == chain.token.address
        assert await chain.staking.functions.stakingToken().call() == chain.token.address
        assert await chain.receipt("0x" + "00" * 32) is None
        assert await chain.transaction("0x" + "00" * 32) is None
        assert await chain.block(10**9) is None
        block = await chain.block(deployment.blocks["FARToken"])
        assert block is not None
        assert block["number"] == deployment.blocks["FARToken"]

    async def test_check_refuses_another_chain(self, anvil: Anvil, deployment: Deployment) -> None:
        settings = ChainSettings.from_env({**chain_env(anvil, deployment), "CHAIN_ID": "56"})
        client = Chain(settings)
        try:
            with pytest.raises(ConfigError, match="answers with chain id 97, but CHAIN_ID is 56"):
                await client.check()
        finally:
            await client.close()

    async def test_custom_errors_are_decoded(self, chain: Chain, owner: LocalAccount, alice: LocalAccount) -> None:
        model = model_key("no-such-model")
        with pytest.raises(ContractCustomError) as caught:
            await chain.inference_payment.functions.quote(model, 1).call()
        assert decode_revert(caught.value) == RevertReason("PriceNotSet", (model,))
        # The token's errors, as InferencePayment passes them through, are named too.
        with pytest.raises(ContractCustomError) as caught:
            await chain.token.functions.transferFrom(owner.address, alice.address, 1).call({"from": alice.address})
        assert decode_revert(caught.value) == RevertReason("ERC20InsufficientAllowance", (alice.address, 0, 1))


class TestDecodeRevert:
    def test_error_string_and_panic(self) -> None:
        assert decode_revert("0x08c379a0" + encode(["string"], ["no"]).hex()) == RevertReason("Error", ("no",))
        assert decode_revert(bytes.fromhex("4e487b71") + encode(["uint256"], [0x11])) == RevertReason("Panic", (17,))

    def test_custom_error_with_an_address(self) -> None:
        data = bytes.fromhex("118cdaa7") + encode(["address"], [TOKEN])  # OwnableUnauthorizedAccount(address)
        assert decode_revert(data) == RevertReason("OwnableUnauthorizedAccount", (TOKEN,))

    @pytest.mark.parametrize("data", [None, "", "0x", "0xdeadbeef", "0x08c379a0ff", "not hex"])
    def test_unknown_or_malformed_is_none(self, data: str | None) -> None:
        assert decode_revert(data) is None


class FlakyProxy:
    """An HTTP server in front of anvil that answers the first `failures` requests with `status`."""

    def __init__(self, upstream: str, failures: int, status: int = 503) -> None:
        self.upstream = upstream
        self.failures = failures
        self.status = status
        self.requests = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.requests <= self.failures:
            return web.Response(status=self.status, text="try later")
        body = await request.read()
        async with (
            aiohttp.ClientSession() as session,
            session.post(self.upstream, data=body, headers={"content-type": "application/json"}) as answer,
        ):
            return web.Response(body=await answer.read(), content_type="application/json")


async def start_proxy(anvil: Anvil, runners: list[web.AppRunner], failures: int, status: int = 503) -> FlakyProxy:
    proxy = FlakyProxy(anvil.url, failures, status)
    app = web.Application()
    app.router.add_post("/", proxy.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    runners.append(runner)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    proxy.url = f"http://127.0.0.1:{port}"
    return proxy


@pytest.fixture
async def runners() -> AsyncIterator[list[web.AppRunner]]:
    started: list[web.AppRunner] = []
    try:
        yield started
    finally:
        for runner in started:
            await runner.cleanup()


class TestRetries:
    async def client(self, chain: Chain, url: str, retries: int) -> Chain:
        return Chain(replace(chain.settings, rpc_url=url), retries=retries, backoff_s=0.01, timeout_s=2)

    async def test_transport_errors_are_retried(self, anvil: Anvil, chain: Chain, runners: list[web.AppRunner]) -> None:
        proxy = await start_proxy(anvil, runners, failures=2)
        client = await self.client(chain, proxy.url, retries=3)
        try:
            assert await client.block_number() == await chain.block_number()
        finally:
            await client.close()
        assert proxy.requests == 3

    async def test_gives_up_as_chain_unavailable(
        self, anvil: Anvil, chain: Chain, runners: list[web.AppRunner]
    ) -> None:
        proxy = await start_proxy(anvil, runners, failures=100, status=502)
        client = await self.client(chain, proxy.url, retries=2)
        try:
            with pytest.raises(ChainUnavailable) as caught:
                await client.block_number()
        finally:
            await client.close()
        assert proxy.requests == 3
        assert isinstance(caught.value, Unavailable)
        assert caught.value.reason == "CHAIN_UNAVAILABLE"
        assert caught.value.metadata == {"call": "eth_blockNumber"}

    async def test_unreachable_node(self, chain: Chain) -> None:
        client = await self.client(chain, "http://127.0.0.1:1", retries=1)
        try:
            with pytest.raises(ChainUnavailable):
                await client.receipt("0x" + "11" * 32)
        finally:
            await client.close()

    async def test_client_errors_are_not_retried(
        self, anvil: Anvil, chain: Chain, runners: list[web.AppRunner]
    ) -> None:
        proxy = await start_proxy(anvil, runners, failures=100, status=400)
        client = await self.client(chain, proxy.url, retries=3)
        try:
            with pytest.raises(aiohttp.ClientResponseError):
                await client.block_number()
        finally:
            await client.close()
        assert proxy.requests == 1

    async def test_rpc_errors_are_not_retried(self, chain: Chain) -> None:
        with pytest.raises(Web3RPCError):
            await chain.retrying("eth_nope", lambda: chain.w3.manager.coro_request("eth_nope", []))
