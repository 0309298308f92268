"""InferencePayment: per-model prices, paying a job once (approve or permit), withdrawals, owner-only functions."""

from __future__ import annotations

import pytest
from eth_account.signers.local import LocalAccount
from web3 import Web3

from devstack.chain import ChainError, job_key, load_artefact, model_key, transact
from tests.chain.chain_support import Clock, Contracts, only_event, revert_of, sign_permit
from tests.chain.conftest import FUNDING

MODEL = model_key("smollm2-135m-instruct")
PRICE = 10**12  # per token
JOB = job_key("01jd5m0qv3example")
TOKENS = 1_500
AMOUNT = TOKENS * PRICE
ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"


@pytest.fixture
def priced(w3: Web3, contracts: Contracts, owner: LocalAccount) -> None:
    transact(w3, owner, contracts.payment.functions.setPrice(MODEL, PRICE))


def approve(w3: Web3, contracts: Contracts, account: LocalAccount, amount: int) -> None:
    transact(w3, account, contracts.token.functions.approve(contracts.payment.address, amount))


class TestKeys:
    def test_job_and_model_ids_are_keccak_of_utf8(self) -> None:
        # The quote's payment_job_id: keccak256 of the UTF-8 bytes of `{job}`.
        assert job_key("abc") == bytes.fromhex("4e03657aea45a94fc7d47ba826c8d667c0d1e6e33a64a036ec44f58fa12d6c45")
        assert model_key("ü") == bytes(Web3.keccak("ü".encode()))


class TestConstructor:
    def test_token_and_owner(self, contracts: Contracts, owner: LocalAccount) -> None:
        assert contracts.payment.functions.token().call() == contracts.token.address
        assert contracts.payment.functions.owner().call() == owner.address

    def test_zero_owner_reverts(self, w3: Web3, contracts: Contracts, owner: LocalAccount) -> None:
        artefact = load_artefact("InferencePayment")
        factory = w3.eth.contract(abi=artefact.abi, bytecode=artefact.bytecode)
        call = factory.constructor(contracts.token.address, ZERO_ADDRESS)
        assert revert_of(w3, owner, call) == ("OwnableInvalidOwner", ZERO_ADDRESS)


class TestSetPrice:
    def test_owner_sets_and_removes_a_price(self, w3: Web3, contracts: Contracts, owner: LocalAccount) -> None:
        payment = contracts.payment
        receipt = transact(w3, owner, payment.functions.setPrice(MODEL, PRICE))
        assert only_event(payment, "PriceSet", receipt) == {"modelId": MODEL, "pricePerToken": PRICE}
        assert payment.functions.pricePerToken(MODEL).call() == PRICE
        assert payment.functions.quote(MODEL, TOKENS).call() == AMOUNT
        transact(w3, owner, payment.functions.setPrice(MODEL, 0))
        assert revert_of(w3, owner, payment.functions.quote(MODEL, TOKENS)) == ("PriceNotSet", MODEL)

    def test_only_the_owner(self, w3: Web3, contracts: Contracts, alice: LocalAccount) -> None:
        call = contracts.payment.functions.setPrice(MODEL, 1)
        assert revert_of(w3, alice, call) == ("OwnableUnauthorizedAccount", alice.address)
        assert contracts.payment.functions.pricePerToken(MODEL).call() == 0


@pytest.mark.usefixtures("priced")
class TestPay:
    def test_pays_a_job(self, w3: Web3, contracts: Contracts, alice: LocalAccount) -> None:
        token, payment = contracts.token, contracts.payment
        approve(w3, contracts, alice, AMOUNT)
        assert payment.functions.pay(JOB, MODEL, TOKENS).call({"from": alice.address}) == AMOUNT
        receipt = transact(w3, alice, payment.functions.pay(JOB, MODEL, TOKENS))
        assert only_event(payment, "PaymentReceived", receipt) == {
            "jobId": JOB,
            "payer": alice.address,
            "amount": AMOUNT,
        }
        assert only_event(token, "Transfer", receipt) == {"from": alice.address, "to": payment.address, "value": AMOUNT}
        assert token.functions.balanceOf(alice.address).call() == FUNDING - AMOUNT
        assert token.functions.balanceOf(payment.address).call() == AMOUNT
        assert token.functions.allowance(alice.address, payment.address).call() == 0
        assert payment.functions.paymentOf(JOB).call() == [alice.address, AMOUNT]
        assert payment.functions.isPaid(JOB).call() is True

    def test_unpaid_job(self, contracts: Contracts) -> None:
        assert contracts.payment.functions.paymentOf(JOB).call() == [ZERO_ADDRESS, 0]
        assert contracts.payment.functions.isPaid(JOB).call() is False

    def test_a_job_is_paid_once(self, w3: Web3, contracts: Contracts, alice: LocalAccount, bob: LocalAccount) -> None:
        payment = contracts.payment
        approve(w3, contracts, alice, 2 * AMOUNT)
        approve(w3, contracts, bob, AMOUNT)
        transact(w3, alice, payment.functions.pay(JOB, MODEL, TOKENS))
        assert revert_of(w3, alice, payment.functions.pay(JOB, MODEL, TOKENS)) == ("JobAlreadyPaid", JOB, alice.address)
        assert revert_of(w3, bob, payment.functions.pay(JOB, MODEL, 1)) == ("JobAlreadyPaid", JOB, alice.address)
        assert payment.functions.paymentOf(JOB).call() == [alice.address, AMOUNT]
        assert contracts.token.functions.balanceOf(payment.address).call() == AMOUNT

    def test_other_jobs_are_separate(self, w3: Web3, contracts: Contracts, alice: LocalAccount) -> None:
        approve(w3, contracts, alice, 2 * AMOUNT)
        transact(w3, alice, contracts.payment.functions.pay(JOB, MODEL, TOKENS))
        other = job_key("01jd5m0qv3other")
        receipt = transact(w3, alice, contracts.payment.functions.pay(other, MODEL, TOKENS))
        assert only_event(contracts.payment, "PaymentReceived", receipt)["jobId"] == other

    def test_model_without_price_reverts(self, w3: Web3, contracts: Contracts, alice: LocalAccount) -> None:
        approve(w3, contracts, alice, AMOUNT)
        unknown = model_key("no-such-model")
        assert revert_of(w3, alice, contracts.payment.functions.pay(JOB, unknown, TOKENS)) == ("PriceNotSet", unknown)

    def test_zero_tokens_reverts(self, w3: Web3, contracts: Contracts, alice: LocalAccount) -> None:
        assert revert_of(w3, alice, contracts.payment.functions.pay(JOB, MODEL, 0)) == ("ZeroTokens",)

    def test_without_allowance_reverts(self, w3: Web3, contracts: Contracts, alice: LocalAccount) -> None:
        approve(w3, contracts, alice, AMOUNT - 1)
        call = contracts.payment.functions.pay(JOB, MODEL, TOKENS)
        expected = ("ERC20InsufficientAllowance", contracts.payment.address, AMOUNT - 1, AMOUNT)
        assert revert_of(w3, alice, call) == expected
        assert contracts.payment.functions.isPaid(JOB).call() is False

    def test_without_balance_reverts(self, w3: Web3, contracts: Contracts, carol: LocalAccount) -> None:
        approve(w3, contracts, carol, AMOUNT)
        call = contracts.payment.functions.pay(JOB, MODEL, TOKENS)
        assert revert_of(w3, carol, call) == ("ERC20InsufficientBalance", carol.address, 0, AMOUNT)


@pytest.mark.usefixtures("priced")
class TestPayWithPermit:
    def test_pays_with_a_permit(self, w3: Web3, contracts: Contracts, clock: Clock, alice: LocalAccount) -> None:
        token, payment = contracts.token, contracts.payment
        deadline = clock.now() + 600
        v, r, s = sign_permit(token, alice, payment.address, AMOUNT, deadline)
        receipt = transact(w3, alice, payment.functions.payWithPermit(JOB, MODEL, TOKENS, deadline, v, r, s))
        assert only_event(payment, "PaymentReceived", receipt) == {
            "jobId": JOB,
            "payer": alice.address,
            "amount": AMOUNT,
        }
        assert only_event(token, "Approval", receipt)["spender"] == payment.address
        assert token.functions.nonces(alice.address).call() == 1
        assert token.functions.allowance(alice.address, payment.address).call() == 0
        assert token.functions.balanceOf(payment.address).call() == AMOUNT

    def test_a_front_run_permit_does_not_block_the_payment(
        self, w3: Web3, contracts: Contracts, clock: Clock, alice: LocalAccount, bob: LocalAccount
    ) -> None:
        token, payment = contracts.token, contracts.payment
        deadline = clock.now() + 600
        v, r, s = sign_permit(token, alice, payment.address, AMOUNT, deadline)
        # Someone copies the permit from the mempool and submits it first.
        transact(w3, bob, token.functions.permit(alice.address, payment.address, AMOUNT, deadline, v, r, s))
        receipt = transact(w3, alice, payment.functions.payWithPermit(JOB, MODEL, TOKENS, deadline, v, r, s))
        assert only_event(payment, "PaymentReceived", receipt)["payer"] == alice.address
        assert token.functions.balanceOf(payment.address).call() == AMOUNT

    def test_expired_permit_reverts(self, w3: Web3, contracts: Contracts, clock: Clock, alice: LocalAccount) -> None:
        deadline = clock.now() - 1
        v, r, s = sign_permit(contracts.token, alice, contracts.payment.address, AMOUNT, deadline)
        call = contracts.payment.functions.payWithPermit(JOB, MODEL, TOKENS, deadline, v, r, s)
        assert revert_of(w3, alice, call) == ("ERC2612ExpiredSignature", deadline)

    def test_permit_for_another_amount_reverts(
        self, w3: Web3, contracts: Contracts, clock: Clock, alice: LocalAccount
    ) -> None:
        deadline = clock.now() + 600
        v, r, s = sign_permit(contracts.token, alice, contracts.payment.address, AMOUNT - 1, deadline)
        call = contracts.payment.functions.payWithPermit(JOB, MODEL, TOKENS, deadline, v, r, s)
        name, _recovered, expected_owner = revert_of(w3, alice, call)
        assert (name, expected_owner) == ("ERC2612InvalidSigner", alice.address)

    def test_permit_of_another_payer_reverts(
        self, w3: Web3, contracts: Contracts, clock: Clock, alice: LocalAccount, bob: LocalAccount
    ) -> None:
        deadline = clock.now() + 600
        v, r, s = sign_permit(contracts.token, alice, contracts.payment.address, AMOUNT, deadline)
        # bob submits alice's permit as his own payment: the permit is checked against bob.
        call = contracts.payment.functions.payWithPermit(JOB, MODEL, TOKENS, deadline, v, r, s)
        name, _recovered, expected_owner = revert_of(w3, bob, call)
        assert (name, expected_owner) == ("ERC2612InvalidSigner", bob.address)
        assert contracts.token.functions.balanceOf(alice.address).call() == FUNDING

    def test_paid_job_reverts_before_the_permit(
        self, w3: Web3, contracts: Contracts, clock: Clock, alice: LocalAccount, bob: LocalAccount
    ) -> None:
        approve(w3, contracts, alice, AMOUNT)
        transact(w3, alice, contracts.payment.functions.pay(JOB, MODEL, TOKENS))
        deadline = clock.now() + 600
        v, r, s = sign_permit(contracts.token, bob, contracts.payment.address, AMOUNT, deadline)
        call = contracts.payment.functions.payWithPermit(JOB, MODEL, TOKENS, deadline, v, r, s)
        assert revert_of(w3, bob, call) == ("JobAlreadyPaid", JOB, alice.address)
        assert contracts.token.functions.nonces(bob.address).call() == 0


class TestWithdraw:
    @pytest.fixture(autouse=True)
    def _paid(self, priced: None, w3: Web3, contracts: Contracts, alice: LocalAccount) -> None:
        approve(w3, contracts, alice, AMOUNT)
        transact(w3, alice, contracts.payment.functions.pay(JOB, MODEL, TOKENS))

    def test_owner_withdraws(self, w3: Web3, contracts: Contracts, owner: LocalAccount, carol: LocalAccount) -> None:
        token, payment = contracts.token, contracts.payment
        receipt = transact(w3, owner, payment.functions.withdraw(carol.address, AMOUNT - 1))
        assert only_event(payment, "Withdrawn", receipt) == {"to": carol.address, "amount": AMOUNT - 1}
        assert token.functions.balanceOf(carol.address).call() == AMOUNT - 1
        assert token.functions.balanceOf(payment.address).call() == 1

    def test_more_than_the_balance_reverts(self, w3: Web3, contracts: Contracts, owner: LocalAccount) -> None:
        call = contracts.payment.functions.withdraw(owner.address, AMOUNT + 1)
        expected = ("ERC20InsufficientBalance", contracts.payment.address, AMOUNT, AMOUNT + 1)
        assert revert_of(w3, owner, call) == expected

    def test_only_the_owner(self, w3: Web3, contracts: Contracts, alice: LocalAccount) -> None:
        call = contracts.payment.functions.withdraw(alice.address, AMOUNT)
        assert revert_of(w3, alice, call) == ("OwnableUnauthorizedAccount", alice.address)
        assert contracts.token.functions.balanceOf(contracts.payment.address).call() == AMOUNT


def test_transact_reports_a_mined_revert(w3: Web3, contracts: Contracts, alice: LocalAccount) -> None:
    with pytest.raises(ChainError, match="reverted"):
        transact(w3, alice, contracts.payment.functions.pay(JOB, MODEL, 0), gas=200_000)
