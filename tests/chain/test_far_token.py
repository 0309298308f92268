"""FARToken: ERC-20 basics, OpenZeppelin 5 errors, EIP-2612 permit."""

from __future__ import annotations

from eth_account.signers.local import LocalAccount
from web3 import Web3

from devstack.chain import FAR, Deployment, load_artefact, transact
from tests.chain.chain_support import Clock, Contracts, only_event, revert_of, sign_permit
from tests.chain.conftest import FUNDING, SUPPLY

ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"


class TestDeployment:
    def test_metadata_and_supply(self, contracts: Contracts, owner: LocalAccount, alice: LocalAccount) -> None:
        token = contracts.token.functions
        assert token.name().call() == "FAR Token"
        assert token.symbol().call() == "FAR"
        assert token.decimals().call() == 18
        assert token.totalSupply().call() == SUPPLY
        assert token.balanceOf(owner.address).call() == SUPPLY - 2 * FUNDING
        assert token.balanceOf(alice.address).call() == FUNDING

    def test_eip712_domain(self, contracts: Contracts, deployment: Deployment) -> None:
        _, name, version, chain_id, verifying_contract, _, _ = contracts.token.functions.eip712Domain().call()
        assert (name, version, chain_id, verifying_contract) == ("FAR Token", "1", 97, deployment.addresses["FARToken"])

    def test_zero_holder_reverts(self, w3: Web3, owner: LocalAccount) -> None:
        artefact = load_artefact("FARToken")
        factory = w3.eth.contract(abi=artefact.abi, bytecode=artefact.bytecode)
        assert revert_of(w3, owner, factory.constructor(ZERO_ADDRESS, SUPPLY)) == ("ERC20InvalidReceiver", ZERO_ADDRESS)


class TestTransfer:
    def test_transfer_moves_balance_and_emits(
        self, w3: Web3, contracts: Contracts, alice: LocalAccount, bob: LocalAccount
    ) -> None:
        token = contracts.token
        receipt = transact(w3, alice, token.functions.transfer(bob.address, 3 * FAR))
        assert only_event(token, "Transfer", receipt) == {"from": alice.address, "to": bob.address, "value": 3 * FAR}
        assert token.functions.balanceOf(alice.address).call() == FUNDING - 3 * FAR
        assert token.functions.balanceOf(bob.address).call() == FUNDING + 3 * FAR

    def test_more_than_balance_reverts(self, w3: Web3, contracts: Contracts, carol: LocalAccount) -> None:
        call = contracts.token.functions.transfer(carol.address, 1)
        assert revert_of(w3, carol, call) == ("ERC20InsufficientBalance", carol.address, 0, 1)

    def test_approving_the_zero_address_reverts(self, w3: Web3, contracts: Contracts, alice: LocalAccount) -> None:
        call = contracts.token.functions.approve(ZERO_ADDRESS, FAR)
        assert revert_of(w3, alice, call) == ("ERC20InvalidSpender", ZERO_ADDRESS)

    def test_transfer_from_without_allowance_reverts(
        self, w3: Web3, contracts: Contracts, alice: LocalAccount, bob: LocalAccount
    ) -> None:
        call = contracts.token.functions.transferFrom(alice.address, bob.address, FAR)
        assert revert_of(w3, bob, call) == ("ERC20InsufficientAllowance", bob.address, 0, FAR)


class TestPermit:
    def test_permit_sets_allowance_and_uses_the_nonce(
        self, w3: Web3, contracts: Contracts, clock: Clock, alice: LocalAccount, bob: LocalAccount
    ) -> None:
        token = contracts.token
        deadline = clock.now() + 3600
        v, r, s = sign_permit(token, alice, bob.address, 5 * FAR, deadline)
        # Anyone may submit the permit; bob (the spender) does here.
        receipt = transact(w3, bob, token.functions.permit(alice.address, bob.address, 5 * FAR, deadline, v, r, s))
        assert only_event(token, "Approval", receipt) == {
            "owner": alice.address,
            "spender": bob.address,
            "value": 5 * FAR,
        }
        assert token.functions.allowance(alice.address, bob.address).call() == 5 * FAR
        assert token.functions.nonces(alice.address).call() == 1
        transact(w3, bob, token.functions.transferFrom(alice.address, bob.address, 5 * FAR))
        assert token.functions.balanceOf(bob.address).call() == FUNDING + 5 * FAR

    def test_expired_permit_reverts(
        self, w3: Web3, contracts: Contracts, clock: Clock, alice: LocalAccount, bob: LocalAccount
    ) -> None:
        deadline = clock.now() - 1
        v, r, s = sign_permit(contracts.token, alice, bob.address, FAR, deadline)
        call = contracts.token.functions.permit(alice.address, bob.address, FAR, deadline, v, r, s)
        assert revert_of(w3, bob, call) == ("ERC2612ExpiredSignature", deadline)

    def test_permit_signed_by_another_account_reverts(
        self, w3: Web3, contracts: Contracts, clock: Clock, alice: LocalAccount, bob: LocalAccount
    ) -> None:
        deadline = clock.now() + 3600
        v, r, s = sign_permit(contracts.token, bob, bob.address, FAR, deadline, claimed_owner=alice.address)
        call = contracts.token.functions.permit(alice.address, bob.address, FAR, deadline, v, r, s)
        assert revert_of(w3, bob, call) == ("ERC2612InvalidSigner", bob.address, alice.address)

    def test_replayed_permit_reverts(
        self, w3: Web3, contracts: Contracts, clock: Clock, alice: LocalAccount, bob: LocalAccount
    ) -> None:
        token = contracts.token
        deadline = clock.now() + 3600
        v, r, s = sign_permit(token, alice, bob.address, FAR, deadline)
        call = token.functions.permit(alice.address, bob.address, FAR, deadline, v, r, s)
        transact(w3, bob, call)
        name, recovered, expected = revert_of(w3, bob, call)
        # With the nonce used, the same signature recovers to some other address.
        assert (name, expected) == ("ERC2612InvalidSigner", alice.address)
        assert recovered != alice.address
