"""Helpers for the contract tests: sending as an account, decoding reverts and events, EIP-2612 permits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import eth_abi
from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from web3 import Web3
from web3.contract import Contract
from web3.contract.contract import ContractConstructor, ContractFunction
from web3.exceptions import ContractCustomError
from web3.types import TxReceipt

from devstack.chain import Anvil, ChainError, Deployment, load_artefact, transact

REVERTING_TX_GAS = 500_000
SCHEDULED_TX_GAS = 1_000_000


@dataclass
class Contracts:
    token: Contract
    payment: Contract
    staking: Contract


def _error_table() -> dict[bytes, tuple[str, list[str]]]:
    table = {}
    for name in ("FARToken", "InferencePayment", "Staking"):
        for item in load_artefact(name).abi:
            if item["type"] == "error":
                types = [i["type"] for i in item["inputs"]]
                selector = bytes(Web3.keccak(text=f"{item['name']}({','.join(types)})"))[:4]
                table[selector] = (item["name"], types)
    return table


ERRORS = _error_table()


def decode_error(data: str | bytes) -> tuple[Any, ...]:
    """Revert data -> (error name, *args), against the errors of all three contracts' ABIs."""
    raw = bytes(HexBytes(data))
    name, types = ERRORS[raw[:4]]
    args = eth_abi.decode(types, raw[4:])
    return (name, *(Web3.to_checksum_address(a) if t == "address" else a for a, t in zip(args, types, strict=True)))


def revert_of(w3: Web3, sender: LocalAccount, call: ContractFunction | ContractConstructor) -> tuple[Any, ...]:
    """The custom error `call` reverts with when `sender` sends it (simulated, then really sent and mined)."""
    try:
        if isinstance(call, ContractConstructor):
            w3.eth.call({"from": sender.address, "data": call.data_in_transaction})
        else:
            call.call({"from": sender.address})
    except ContractCustomError as exc:
        decoded = decode_error(str(exc.data))
    else:
        raise AssertionError("the call did not revert")
    # The same call as a mined transaction fails too, and changes nothing but the sender's nonce and gas.
    try:
        transact(w3, sender, call, gas=REVERTING_TX_GAS)
    except ChainError:
        return decoded
    raise AssertionError(f"the simulated call reverted with {decoded} but the transaction succeeded")


def events(contract: Contract, event: str, receipt: TxReceipt) -> list[dict[str, Any]]:
    """The `event`s in `receipt` emitted by `contract` itself (logs of other addresses are ignored), as dicts."""
    topic = HexBytes(contract.events[event]().topic)
    decoded = []
    for log in receipt["logs"]:
        if log["address"] != contract.address or not log["topics"] or HexBytes(log["topics"][0]) != topic:
            continue
        decoded.append(dict(contract.events[event]().process_log(log)["args"]))
    return decoded


def only_event(contract: Contract, event: str, receipt: TxReceipt) -> dict[str, Any]:
    found = events(contract, event, receipt)
    assert len(found) == 1, f"expected one {event} from {contract.address}, got {found}"
    return found[0]


def sign_permit(
    token: Contract,
    owner: LocalAccount,
    spender: str,
    value: int,
    deadline: int,
    *,
    nonce: int | None = None,
    claimed_owner: str | None = None,
) -> tuple[int, bytes, bytes]:
    """An EIP-2612 permit signature (v, r, s) by `owner` for `spender` over the token's EIP-712 domain.

    `claimed_owner` puts another address in the message's `owner` field (a forged permit).
    """
    holder = claimed_owner or owner.address
    if nonce is None:
        nonce = token.functions.nonces(holder).call()
    signed = owner.sign_typed_data(
        domain_data={
            "name": "FAR Token",
            "version": "1",
            "chainId": token.w3.eth.chain_id,
            "verifyingContract": token.address,
        },
        message_types={
            "Permit": [
                {"name": "owner", "type": "address"},
                {"name": "spender", "type": "address"},
                {"name": "value", "type": "uint256"},
                {"name": "nonce", "type": "uint256"},
                {"name": "deadline", "type": "uint256"},
            ]
        },
        message_data={"owner": holder, "spender": spender, "value": value, "nonce": nonce, "deadline": deadline},
    )
    return signed.v, signed.r.to_bytes(32, "big"), signed.s.to_bytes(32, "big")


class Clock:
    """Block time on anvil: read the latest block's time, mine the next block at an exact time."""

    def __init__(self, anvil: Anvil, w3: Web3) -> None:
        self.anvil = anvil
        self.w3 = w3

    def now(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def next_block_at(self, timestamp: int) -> None:
        """The next block (the next transaction's, or `mine()`'s) gets this timestamp."""
        self.anvil.rpc("evm_setNextBlockTimestamp", timestamp)

    def transact_at(self, timestamp: int, sender: LocalAccount, call: ContractFunction) -> TxReceipt:
        """Send `call` in a block with this timestamp.

        With a fixed gas limit: anvil estimates gas at the latest block's time, not the next block's.
        """
        self.next_block_at(timestamp)
        return transact(self.w3, sender, call, gas=SCHEDULED_TX_GAS)

    def mine_at(self, timestamp: int) -> None:
        self.next_block_at(timestamp)
        self.anvil.rpc("evm_mine")

    def advance(self, seconds: int) -> int:
        """`evm_increaseTime` by `seconds` and mine a block; returns its time."""
        self.anvil.rpc("evm_increaseTime", seconds)
        self.anvil.rpc("evm_mine")
        return self.now()


def chain_env(anvil: Anvil, deployment: Deployment) -> dict[str, str]:
    """What a service reads to reach this session's anvil and contracts (ChainSettings.from_env)."""
    return {"BSC_RPC_URL": anvil.url, "CHAIN_ID": str(anvil.chain_id), **deployment.env()}
