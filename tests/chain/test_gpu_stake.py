"""Stake-gated node registration against anvil: the operator's FAR in the Staking contract (`stakedOf`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from eth_account.signers.local import LocalAccount
from far.gpu.v1 import gpu_service_pb2_grpc
from web3 import Web3

from devstack.chain import FAR, Anvil, Deployment, transact
from devstack.processes import free_port
from tests.chain.chain_support import Contracts
from tests.integration.gpu_support import GpuStub, Operator, running_gpu, unique_node_id
from tests.integration.rich_errors import expect_error

MINIMUM = 500 * FAR
DOMAIN = "gpu.far.network"
pytestmark = pytest.mark.integration


def chain_env(rpc_url: str, deployment: Deployment) -> dict[str, str]:
    return {
        "BSC_RPC_URL": rpc_url,
        "CHAIN_ID": str(deployment.chain_id),
        "GPU_MIN_OPERATOR_STAKE": "500",
        **deployment.env(),
    }


@pytest.fixture(scope="module")
async def gated_gpu(service_env: dict[str, str], anvil: Anvil, deployment: Deployment) -> AsyncIterator[GpuStub]:
    async with (
        running_gpu(service_env, chain_env(anvil.url, deployment)) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        yield gpu_service_pb2_grpc.GpuServiceStub(channel)


class TestStakeGate:
    async def test_below_the_minimum_is_refused_with_the_amounts(self, gated_gpu: GpuStub, carol: LocalAccount) -> None:
        error = await expect_error(
            gated_gpu.RegisterNode(Operator(carol).registration(unique_node_id())),
            grpc.StatusCode.FAILED_PRECONDITION,
            "INSUFFICIENT_STAKE",
            domain=DOMAIN,
        )
        assert dict(error.info.metadata) == {"required": str(MINIMUM), "staked": "0"}

    async def test_after_staking_the_node_registers_with_its_stake(
        self, gated_gpu: GpuStub, w3: Web3, contracts: Contracts, alice: LocalAccount
    ) -> None:
        operator = Operator(alice)
        transact(w3, alice, contracts.staking.functions.stake(MINIMUM - 1))
        await expect_error(
            gated_gpu.RegisterNode(operator.registration(unique_node_id())),
            grpc.StatusCode.FAILED_PRECONDITION,
            "INSUFFICIENT_STAKE",
            domain=DOMAIN,
        )
        transact(w3, alice, contracts.staking.functions.stake(101 * FAR))
        response = await gated_gpu.RegisterNode(operator.registration(unique_node_id()))
        stake = response.node.stake
        assert (stake.value, stake.symbol, stake.decimals) == (str(MINIMUM - 1 + 101 * FAR), "FAR", 18)

    async def test_an_unreachable_chain_is_unavailable(
        self, service_env: dict[str, str], deployment: Deployment, alice: LocalAccount
    ) -> None:
        nowhere = f"http://127.0.0.1:{free_port()}"
        async with (
            running_gpu(service_env, chain_env(nowhere, deployment)) as running,
            grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
        ):
            gpu = gpu_service_pb2_grpc.GpuServiceStub(channel)
            await expect_error(
                gpu.RegisterNode(Operator(alice).registration(unique_node_id())),
                grpc.StatusCode.UNAVAILABLE,
                "CHAIN_UNAVAILABLE",
                domain=DOMAIN,
            )
