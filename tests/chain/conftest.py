"""A real anvil per test session (free port, chain id 97, Cancun; stopped by PID even when tests fail),
the contracts deployed once from generated/contracts/, and every test run inside an EVM snapshot that
is reverted afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from eth_account.signers.local import LocalAccount
from web3 import Web3

from devstack.chain import FAR, Anvil, Deployment, contract_at, deploy_platform, dev_account, start_anvil, transact
from servers.common.chain import Chain, ChainSettings
from tests.chain.chain_support import Clock, Contracts, chain_env

REWARDS_DURATION = 7 * 24 * 3600
SUPPLY = 1_000_000 * FAR
FUNDING = 10_000 * FAR
STAKING_ALLOWANCE = 100_000 * FAR


@pytest.fixture(scope="session")
def anvil(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Anvil]:
    node = start_anvil(tmp_path_factory.mktemp("anvil") / "anvil.log")
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def w3(anvil: Anvil) -> Web3:
    return anvil.web3()


@pytest.fixture(scope="session")
def owner() -> LocalAccount:
    return dev_account(0)


@pytest.fixture(scope="session")
def alice() -> LocalAccount:
    return dev_account(1)


@pytest.fixture(scope="session")
def bob() -> LocalAccount:
    return dev_account(2)


@pytest.fixture(scope="session")
def carol() -> LocalAccount:
    """Holds no FAR."""
    return dev_account(3)


@pytest.fixture(scope="session")
def deployment(w3: Web3, owner: LocalAccount, alice: LocalAccount, bob: LocalAccount) -> Deployment:
    deployed = deploy_platform(w3, owner, supply=SUPPLY, rewards_duration=REWARDS_DURATION)
    token = contract_at(w3, "FARToken", deployed.addresses["FARToken"])
    for account in (alice, bob):
        transact(w3, owner, token.functions.transfer(account.address, FUNDING))
    # Staking tests start with the staking contract approved (owner for rewards, alice and bob for stakes);
    # done once here rather than per test, where it would cost three transactions each time.
    staking = deployed.addresses["Staking"]
    for account, amount in ((owner, STAKING_ALLOWANCE), (alice, FUNDING), (bob, FUNDING)):
        transact(w3, account, token.functions.approve(staking, amount))
    return deployed


@pytest.fixture(scope="session")
def contracts(w3: Web3, deployment: Deployment) -> Contracts:
    return Contracts(
        token=contract_at(w3, "FARToken", deployment.addresses["FARToken"]),
        payment=contract_at(w3, "InferencePayment", deployment.addresses["InferencePayment"]),
        staking=contract_at(w3, "Staking", deployment.addresses["Staking"]),
    )


@pytest.fixture(autouse=True)
def _isolated(anvil: Anvil, contracts: Contracts) -> Iterator[None]:
    snapshot = anvil.rpc("evm_snapshot")
    try:
        yield
    finally:
        assert anvil.rpc("evm_revert", snapshot) is True


@pytest.fixture
def clock(anvil: Anvil, w3: Web3) -> Clock:
    return Clock(anvil, w3)


@pytest.fixture
async def chain(anvil: Anvil, deployment: Deployment) -> AsyncIterator[Chain]:
    """The platform's chain client (servers.common.chain) on this session's anvil and contracts."""
    client = Chain(ChainSettings.from_env(chain_env(anvil, deployment)), backoff_s=0.01)
    try:
        yield client
    finally:
        await client.close()
