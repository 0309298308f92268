"""devstack/chain.py: the dev chain of `make run` (anvil, deployment, funding, deployments file, env)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from devstack.chain import (
    DEV_ACCOUNT_FUNDING,
    DEV_STAKING_REWARD,
    Anvil,
    addresses_from_env,
    contract_at,
    dev_account,
    devstack_chain,
    model_key,
    start_anvil,
)
from devstack.processes import PortInUse

TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"


def test_dev_chain_deploys_funds_and_writes_the_deployments_file(tmp_path: Path) -> None:
    lines: list[str] = []
    env, chain = devstack_chain({"ANVIL_PORT": "0"}, tmp_path, tmp_path / "logs", lines.append)
    assert chain is not None
    try:
        w3 = chain.anvil.web3()
        assert w3.eth.chain_id == 97
        assert set(env) == {"BSC_RPC_URL", "FAR_TOKEN_ADDRESS", "FAR_INFERENCE_PAYMENT_ADDRESS", "FAR_STAKING_ADDRESS"}
        # The same deployer and order give the same addresses on every fresh anvil.
        assert env["FAR_TOKEN_ADDRESS"] == TOKEN
        document = json.loads((tmp_path / "chain" / "deployments.json").read_text())
        assert document["chainId"] == 97
        assert document["rpcUrl"] == env["BSC_RPC_URL"]
        assert {name: c["address"] for name, c in document["contracts"].items()} == chain.deployment.addresses
        assert document["contracts"]["FARToken"]["env"] == "FAR_TOKEN_ADDRESS"

        token = contract_at(w3, "FARToken", env["FAR_TOKEN_ADDRESS"])
        payment = contract_at(w3, "InferencePayment", env["FAR_INFERENCE_PAYMENT_ADDRESS"])
        staking = contract_at(w3, "Staking", env["FAR_STAKING_ADDRESS"])
        assert document["devAccounts"]["funded"] == [dev_account(i).address for i in range(1, 6)]
        for address in document["devAccounts"]["funded"]:
            assert token.functions.balanceOf(address).call() == DEV_ACCOUNT_FUNDING
        assert payment.functions.pricePerToken(model_key("smollm2-135m-instruct")).call() == 10**12
        assert token.functions.balanceOf(staking.address).call() == DEV_STAKING_REWARD
        assert staking.functions.periodFinish().call() > w3.eth.get_block("latest")["timestamp"]
        assert any("FAR_STAKING_ADDRESS=" in line for line in lines)
    finally:
        chain.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(chain.anvil.pid, 0)


def test_with_bsc_rpc_url_nothing_is_deployed(tmp_path: Path) -> None:
    environ = {
        "BSC_RPC_URL": "https://bsc.example",
        "FAR_TOKEN_ADDRESS": TOKEN.lower(),
        "FAR_INFERENCE_PAYMENT_ADDRESS": "0x" + "ab" * 20,
        "FAR_STAKING_ADDRESS": "0x" + "cd" * 20,
    }
    env, chain = devstack_chain(environ, tmp_path, tmp_path / "logs", lambda _: None)
    assert (env, chain) == ({}, None)
    assert not (tmp_path / "chain").exists()


def test_with_bsc_rpc_url_the_addresses_must_be_given() -> None:
    with pytest.raises(
        ValueError, match=r"FAR_TOKEN_ADDRESS='0x12' is not .*; FAR_INFERENCE_PAYMENT_ADDRESS is not set"
    ):
        addresses_from_env({"FAR_TOKEN_ADDRESS": "0x12", "FAR_STAKING_ADDRESS": "0x" + "cd" * 20})


def test_bad_anvil_port(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ANVIL_PORT='x' is not a port number"):
        devstack_chain({"ANVIL_PORT": "x"}, tmp_path, tmp_path, lambda _: None)


def test_a_taken_port_is_refused(anvil: Anvil, tmp_path: Path) -> None:
    port = int(anvil.url.rsplit(":", 1)[1])
    with pytest.raises(PortInUse, match=f"port {port}"):
        start_anvil(tmp_path / "anvil.log", port=port)
