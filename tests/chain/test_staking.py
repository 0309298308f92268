"""Staking: stake / unstake / claim / exit, reward periods (notifyRewardAmount), earned() over time, period end."""

from __future__ import annotations

import pytest
from eth_account.signers.local import LocalAccount
from web3 import Web3

from devstack.chain import FAR, load_artefact, transact
from tests.chain.chain_support import Clock, Contracts, only_event, revert_of, sign_permit
from tests.chain.conftest import FUNDING, REWARDS_DURATION, STAKING_ALLOWANCE

D = REWARDS_DURATION
RATE = 10**15  # reward units per second
REWARD = RATE * D
assert STAKING_ALLOWANCE >= 10 * REWARD
ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"


@pytest.fixture
def t0(clock: Clock) -> int:
    """A time a little ahead of the chain's clock, where each test's story starts."""
    return clock.now() + 10


def stake_at(clock: Clock, contracts: Contracts, account: LocalAccount, amount: int, at: int) -> None:
    clock.transact_at(at, account, contracts.staking.functions.stake(amount))


def notify_at(clock: Clock, contracts: Contracts, owner: LocalAccount, reward: int, at: int) -> None:
    clock.transact_at(at, owner, contracts.staking.functions.notifyRewardAmount(reward))


def earned(contracts: Contracts, account: LocalAccount) -> int:
    value: int = contracts.staking.functions.earned(account.address).call()
    return value


class TestConstructor:
    def test_configuration(self, contracts: Contracts, owner: LocalAccount) -> None:
        staking = contracts.staking.functions
        assert staking.stakingToken().call() == contracts.token.address
        assert staking.rewardToken().call() == contracts.token.address
        assert staking.rewardsDuration().call() == D
        assert staking.owner().call() == owner.address
        assert (staking.periodFinish().call(), staking.rewardRate().call(), staking.totalStaked().call()) == (0, 0, 0)

    def test_zero_duration_reverts(self, w3: Web3, contracts: Contracts, owner: LocalAccount) -> None:
        factory = w3.eth.contract(abi=load_artefact("Staking").abi, bytecode=load_artefact("Staking").bytecode)
        token = contracts.token.address
        assert revert_of(w3, owner, factory.constructor(token, token, 0, owner.address)) == ("ZeroDuration",)

    def test_zero_owner_reverts(self, w3: Web3, contracts: Contracts, owner: LocalAccount) -> None:
        factory = w3.eth.contract(abi=load_artefact("Staking").abi, bytecode=load_artefact("Staking").bytecode)
        token = contracts.token.address
        call = factory.constructor(token, token, D, ZERO_ADDRESS)
        assert revert_of(w3, owner, call) == ("OwnableInvalidOwner", ZERO_ADDRESS)


class TestStake:
    def test_stake(self, w3: Web3, contracts: Contracts, alice: LocalAccount) -> None:
        token, staking = contracts.token, contracts.staking
        receipt = transact(w3, alice, staking.functions.stake(100 * FAR))
        assert only_event(staking, "Staked", receipt) == {"account": alice.address, "amount": 100 * FAR}
        assert only_event(token, "Transfer", receipt) == {
            "from": alice.address,
            "to": staking.address,
            "value": 100 * FAR,
        }
        assert staking.functions.stakedOf(alice.address).call() == 100 * FAR
        assert staking.functions.totalStaked().call() == 100 * FAR
        assert token.functions.balanceOf(alice.address).call() == FUNDING - 100 * FAR

    def test_zero_reverts(self, w3: Web3, contracts: Contracts, alice: LocalAccount) -> None:
        assert revert_of(w3, alice, contracts.staking.functions.stake(0)) == ("ZeroAmount",)

    def test_without_allowance_reverts(self, w3: Web3, contracts: Contracts, carol: LocalAccount) -> None:
        call = contracts.staking.functions.stake(FAR)
        assert revert_of(w3, carol, call) == ("ERC20InsufficientAllowance", contracts.staking.address, 0, FAR)

    def test_without_balance_reverts(self, w3: Web3, contracts: Contracts, carol: LocalAccount) -> None:
        transact(w3, carol, contracts.token.functions.approve(contracts.staking.address, FAR))
        call = contracts.staking.functions.stake(FAR)
        assert revert_of(w3, carol, call) == ("ERC20InsufficientBalance", carol.address, 0, FAR)
        assert contracts.staking.functions.totalStaked().call() == 0


class TestStakeWithPermit:
    def test_stake_with_a_permit(
        self, w3: Web3, contracts: Contracts, clock: Clock, carol: LocalAccount, owner: LocalAccount
    ) -> None:
        token, staking = contracts.token, contracts.staking
        transact(w3, owner, token.functions.transfer(carol.address, 10 * FAR))
        deadline = clock.now() + 600
        v, r, s = sign_permit(token, carol, staking.address, 10 * FAR, deadline)
        receipt = transact(w3, carol, staking.functions.stakeWithPermit(10 * FAR, deadline, v, r, s))
        assert only_event(staking, "Staked", receipt) == {"account": carol.address, "amount": 10 * FAR}
        assert token.functions.nonces(carol.address).call() == 1
        assert staking.functions.stakedOf(carol.address).call() == 10 * FAR
        assert token.functions.balanceOf(carol.address).call() == 0

    def test_bad_permit_reverts(
        self, w3: Web3, contracts: Contracts, clock: Clock, carol: LocalAccount, owner: LocalAccount
    ) -> None:
        transact(w3, owner, contracts.token.functions.transfer(carol.address, 10 * FAR))
        deadline = clock.now() + 600
        v, r, s = sign_permit(contracts.token, carol, contracts.staking.address, 10 * FAR, deadline)
        call = contracts.staking.functions.stakeWithPermit(9 * FAR, deadline, v, r, s)
        name, _recovered, expected_owner = revert_of(w3, carol, call)
        assert (name, expected_owner) == ("ERC2612InvalidSigner", carol.address)

    def test_expired_permit_reverts(self, w3: Web3, contracts: Contracts, clock: Clock, carol: LocalAccount) -> None:
        deadline = clock.now() - 1
        v, r, s = sign_permit(contracts.token, carol, contracts.staking.address, FAR, deadline)
        call = contracts.staking.functions.stakeWithPermit(FAR, deadline, v, r, s)
        assert revert_of(w3, carol, call) == ("ERC2612ExpiredSignature", deadline)


class TestNotifyRewardAmount:
    def test_starts_a_period(self, w3: Web3, contracts: Contracts, clock: Clock, owner: LocalAccount, t0: int) -> None:
        staking = contracts.staking
        receipt = clock.transact_at(t0, owner, staking.functions.notifyRewardAmount(REWARD))
        assert only_event(staking, "RewardAdded", receipt) == {
            "reward": REWARD,
            "rewardRate": RATE,
            "periodFinish": t0 + D,
        }
        assert only_event(contracts.token, "Transfer", receipt) == {
            "from": owner.address,
            "to": staking.address,
            "value": REWARD,
        }
        assert staking.functions.rewardRate().call() == RATE
        assert staking.functions.periodFinish().call() == t0 + D
        assert staking.functions.lastUpdateTime().call() == t0
        assert staking.functions.rewardForDuration().call() == REWARD
        assert contracts.token.functions.balanceOf(staking.address).call() == REWARD

    def test_rate_rounds_down(self, w3: Web3, contracts: Contracts, owner: LocalAccount) -> None:
        receipt = transact(w3, owner, contracts.staking.functions.notifyRewardAmount(REWARD + D - 1))
        assert only_event(contracts.staking, "RewardAdded", receipt)["rewardRate"] == RATE

    def test_funding_again_rolls_the_leftover_over(
        self, w3: Web3, contracts: Contracts, clock: Clock, owner: LocalAccount, t0: int
    ) -> None:
        staking = contracts.staking
        notify_at(clock, contracts, owner, REWARD, t0)
        receipt = clock.transact_at(t0 + D // 2, owner, staking.functions.notifyRewardAmount(REWARD))
        # Half the first period is left: (REWARD + D/2 * RATE) / D = 1.5 * RATE, for a full new period.
        expected = {"reward": REWARD, "rewardRate": RATE * 3 // 2, "periodFinish": t0 + D // 2 + D}
        assert only_event(staking, "RewardAdded", receipt) == expected

    def test_after_the_end_nothing_rolls_over(
        self, w3: Web3, contracts: Contracts, clock: Clock, owner: LocalAccount, t0: int
    ) -> None:
        notify_at(clock, contracts, owner, REWARD, t0)
        receipt = clock.transact_at(t0 + D + 100, owner, contracts.staking.functions.notifyRewardAmount(2 * REWARD))
        expected = {"reward": 2 * REWARD, "rewardRate": 2 * RATE, "periodFinish": t0 + 2 * D + 100}
        assert only_event(contracts.staking, "RewardAdded", receipt) == expected

    def test_only_the_owner(self, w3: Web3, contracts: Contracts, alice: LocalAccount) -> None:
        call = contracts.staking.functions.notifyRewardAmount(REWARD)
        assert revert_of(w3, alice, call) == ("OwnableUnauthorizedAccount", alice.address)

    def test_zero_reverts(self, w3: Web3, contracts: Contracts, owner: LocalAccount) -> None:
        assert revert_of(w3, owner, contracts.staking.functions.notifyRewardAmount(0)) == ("ZeroAmount",)

    def test_too_small_for_the_duration_reverts(self, w3: Web3, contracts: Contracts, owner: LocalAccount) -> None:
        call = contracts.staking.functions.notifyRewardAmount(D - 1)
        assert revert_of(w3, owner, call) == ("RewardTooSmall", D - 1, D)

    def test_without_allowance_reverts(self, w3: Web3, contracts: Contracts, owner: LocalAccount) -> None:
        transact(w3, owner, contracts.token.functions.approve(contracts.staking.address, 0))
        call = contracts.staking.functions.notifyRewardAmount(REWARD)
        assert revert_of(w3, owner, call) == ("ERC20InsufficientAllowance", contracts.staking.address, 0, REWARD)
        assert contracts.staking.functions.rewardRate().call() == 0


class TestEarned:
    def test_a_single_staker_earns_the_rate(
        self, w3: Web3, contracts: Contracts, clock: Clock, owner: LocalAccount, alice: LocalAccount, t0: int
    ) -> None:
        stake_at(clock, contracts, alice, 100 * FAR, t0)
        notify_at(clock, contracts, owner, REWARD, t0 + 10)
        assert earned(contracts, alice) == 0
        clock.mine_at(t0 + 10 + 1000)
        assert earned(contracts, alice) == 1000 * RATE
        clock.mine_at(t0 + 10 + 5000)
        assert earned(contracts, alice) == 5000 * RATE

    def test_stakers_share_in_proportion(
        self,
        w3: Web3,
        contracts: Contracts,
        clock: Clock,
        owner: LocalAccount,
        alice: LocalAccount,
        bob: LocalAccount,
        t0: int,
    ) -> None:
        stake_at(clock, contracts, alice, 100 * FAR, t0)
        notify_at(clock, contracts, owner, REWARD, t0 + 1)
        stake_at(clock, contracts, bob, 300 * FAR, t0 + 1001)
        clock.mine_at(t0 + 2001)
        # 1000 s alone, then 1000 s with a quarter of the stake.
        assert earned(contracts, alice) == 1000 * RATE + 250 * RATE
        assert earned(contracts, bob) == 750 * RATE
        assert contracts.staking.functions.rewardPerToken().call() == (1000 * RATE * FAR) // (100 * FAR) + (
            1000 * RATE * FAR
        ) // (400 * FAR)

    def test_nothing_accrues_while_nothing_is_staked(
        self, w3: Web3, contracts: Contracts, clock: Clock, owner: LocalAccount, alice: LocalAccount, t0: int
    ) -> None:
        notify_at(clock, contracts, owner, REWARD, t0)
        stake_at(clock, contracts, alice, 100 * FAR, t0 + 100)
        clock.mine_at(t0 + 200)
        assert earned(contracts, alice) == 100 * RATE

    def test_period_end_stops_rewards(
        self, w3: Web3, contracts: Contracts, clock: Clock, owner: LocalAccount, alice: LocalAccount, t0: int
    ) -> None:
        staking = contracts.staking
        stake_at(clock, contracts, alice, 100 * FAR, t0)
        notify_at(clock, contracts, owner, REWARD, t0 + 1)
        clock.mine_at(t0 + 1 + D)
        assert earned(contracts, alice) == REWARD
        clock.mine_at(t0 + 1 + D + 3600)
        assert earned(contracts, alice) == REWARD
        assert staking.functions.lastTimeRewardApplicable().call() == t0 + 1 + D
        # The whole reward is paid out, and not a unit more.
        receipt = transact(w3, alice, staking.functions.claim())
        assert only_event(staking, "RewardPaid", receipt) == {"account": alice.address, "reward": REWARD}
        assert contracts.token.functions.balanceOf(staking.address).call() == 100 * FAR

    def test_increase_time_moves_earned(
        self, w3: Web3, contracts: Contracts, clock: Clock, owner: LocalAccount, alice: LocalAccount
    ) -> None:
        transact(w3, alice, contracts.staking.functions.stake(100 * FAR))
        transact(w3, owner, contracts.staking.functions.notifyRewardAmount(REWARD))
        start = clock.now()
        now = clock.advance(3600)
        assert now >= start + 3600
        assert earned(contracts, alice) == (now - start) * RATE


class TestClaim:
    def test_claim_pays_and_resets(
        self, w3: Web3, contracts: Contracts, clock: Clock, owner: LocalAccount, alice: LocalAccount, t0: int
    ) -> None:
        token, staking = contracts.token, contracts.staking
        stake_at(clock, contracts, alice, 100 * FAR, t0)
        notify_at(clock, contracts, owner, REWARD, t0 + 1)
        receipt = clock.transact_at(t0 + 1 + 500, alice, staking.functions.claim())
        assert only_event(staking, "RewardPaid", receipt) == {"account": alice.address, "reward": 500 * RATE}
        assert only_event(token, "Transfer", receipt) == {
            "from": staking.address,
            "to": alice.address,
            "value": 500 * RATE,
        }
        assert token.functions.balanceOf(alice.address).call() == FUNDING - 100 * FAR + 500 * RATE
        assert earned(contracts, alice) == 0
        assert staking.functions.rewards(alice.address).call() == 0

    def test_nothing_to_claim_reverts(self, w3: Web3, contracts: Contracts, alice: LocalAccount) -> None:
        assert revert_of(w3, alice, contracts.staking.functions.claim()) == ("NothingToClaim",)

    def test_claiming_twice_in_a_block_reverts(
        self, w3: Web3, contracts: Contracts, clock: Clock, owner: LocalAccount, alice: LocalAccount, t0: int
    ) -> None:
        stake_at(clock, contracts, alice, 100 * FAR, t0)
        notify_at(clock, contracts, owner, REWARD, t0 + 1)
        clock.mine_at(t0 + 1 + D + 1)
        transact(w3, alice, contracts.staking.functions.claim())
        # The period has ended, so nothing accrues between the two.
        assert revert_of(w3, alice, contracts.staking.functions.claim()) == ("NothingToClaim",)


class TestUnstake:
    def test_unstake_part(self, w3: Web3, contracts: Contracts, alice: LocalAccount) -> None:
        token, staking = contracts.token, contracts.staking
        transact(w3, alice, staking.functions.stake(100 * FAR))
        receipt = transact(w3, alice, staking.functions.unstake(40 * FAR))
        assert only_event(staking, "Unstaked", receipt) == {"account": alice.address, "amount": 40 * FAR}
        assert only_event(token, "Transfer", receipt) == {
            "from": staking.address,
            "to": alice.address,
            "value": 40 * FAR,
        }
        assert staking.functions.stakedOf(alice.address).call() == 60 * FAR
        assert staking.functions.totalStaked().call() == 60 * FAR
        assert token.functions.balanceOf(alice.address).call() == FUNDING - 60 * FAR

    def test_more_than_staked_reverts(self, w3: Web3, contracts: Contracts, alice: LocalAccount) -> None:
        transact(w3, alice, contracts.staking.functions.stake(60 * FAR))
        call = contracts.staking.functions.unstake(60 * FAR + 1)
        assert revert_of(w3, alice, call) == ("InsufficientStake", 60 * FAR, 60 * FAR + 1)

    def test_zero_reverts(self, w3: Web3, contracts: Contracts, alice: LocalAccount) -> None:
        assert revert_of(w3, alice, contracts.staking.functions.unstake(0)) == ("ZeroAmount",)

    def test_rewards_stay_claimable_after_unstaking(
        self, w3: Web3, contracts: Contracts, clock: Clock, owner: LocalAccount, alice: LocalAccount, t0: int
    ) -> None:
        stake_at(clock, contracts, alice, 100 * FAR, t0)
        notify_at(clock, contracts, owner, REWARD, t0 + 1)
        clock.transact_at(t0 + 1001, alice, contracts.staking.functions.unstake(100 * FAR))
        clock.mine_at(t0 + 5001)
        assert earned(contracts, alice) == 1000 * RATE
        receipt = transact(w3, alice, contracts.staking.functions.claim())
        assert only_event(contracts.staking, "RewardPaid", receipt)["reward"] == 1000 * RATE


class TestExit:
    def test_exit_unstakes_and_claims(
        self, w3: Web3, contracts: Contracts, clock: Clock, owner: LocalAccount, alice: LocalAccount, t0: int
    ) -> None:
        token, staking = contracts.token, contracts.staking
        stake_at(clock, contracts, alice, 100 * FAR, t0)
        notify_at(clock, contracts, owner, REWARD, t0 + 1)
        receipt = clock.transact_at(t0 + 1001, alice, staking.functions.exit())
        assert only_event(staking, "Unstaked", receipt) == {"account": alice.address, "amount": 100 * FAR}
        assert only_event(staking, "RewardPaid", receipt) == {"account": alice.address, "reward": 1000 * RATE}
        assert token.functions.balanceOf(alice.address).call() == FUNDING + 1000 * RATE
        assert staking.functions.stakedOf(alice.address).call() == 0

    def test_exit_without_rewards_only_unstakes(self, w3: Web3, contracts: Contracts, alice: LocalAccount) -> None:
        transact(w3, alice, contracts.staking.functions.stake(100 * FAR))
        receipt = transact(w3, alice, contracts.staking.functions.exit())
        assert only_event(contracts.staking, "Unstaked", receipt)["amount"] == 100 * FAR
        assert contracts.token.functions.balanceOf(alice.address).call() == FUNDING

    def test_exit_without_stake_reverts(self, w3: Web3, contracts: Contracts, alice: LocalAccount) -> None:
        assert revert_of(w3, alice, contracts.staking.functions.exit()) == ("ZeroAmount",)

    def test_everyone_can_leave_with_everything_owed(
        self,
        w3: Web3,
        contracts: Contracts,
        clock: Clock,
        owner: LocalAccount,
        alice: LocalAccount,
        bob: LocalAccount,
        t0: int,
    ) -> None:
        # Staking and reward token are the same: stakes and rewards must both come back out in full.
        stake_at(clock, contracts, alice, 100 * FAR, t0)
        notify_at(clock, contracts, owner, REWARD, t0 + 1)
        stake_at(clock, contracts, bob, 200 * FAR, t0 + 1 + D // 3)
        clock.transact_at(t0 + 2 * D, alice, contracts.staking.functions.exit())
        transact(w3, bob, contracts.staking.functions.exit())
        balances = [contracts.token.functions.balanceOf(a.address).call() - FUNDING for a in (alice, bob)]
        assert sum(balances) <= REWARD
        assert REWARD - sum(balances) < 10  # rounding dust only
        assert contracts.token.functions.balanceOf(contracts.staking.address).call() == REWARD - sum(balances)
        assert contracts.staking.functions.totalStaked().call() == 0


class TestSetRewardsDuration:
    def test_before_any_period(self, w3: Web3, contracts: Contracts, owner: LocalAccount) -> None:
        receipt = transact(w3, owner, contracts.staking.functions.setRewardsDuration(3600))
        assert only_event(contracts.staking, "RewardsDurationUpdated", receipt) == {"rewardsDuration": 3600}
        receipt = transact(w3, owner, contracts.staking.functions.notifyRewardAmount(3600 * RATE))
        assert only_event(contracts.staking, "RewardAdded", receipt)["rewardRate"] == RATE

    def test_during_a_period_reverts(
        self, w3: Web3, contracts: Contracts, clock: Clock, owner: LocalAccount, t0: int
    ) -> None:
        notify_at(clock, contracts, owner, REWARD, t0)
        call = contracts.staking.functions.setRewardsDuration(3600)
        assert revert_of(w3, owner, call) == ("RewardPeriodActive", t0 + D)
        assert contracts.staking.functions.rewardsDuration().call() == D

    def test_after_the_period(self, w3: Web3, contracts: Contracts, clock: Clock, owner: LocalAccount, t0: int) -> None:
        notify_at(clock, contracts, owner, REWARD, t0)
        clock.mine_at(t0 + D + 1)
        assert revert_of(w3, owner, contracts.staking.functions.setRewardsDuration(0)) == ("ZeroDuration",)
        receipt = transact(w3, owner, contracts.staking.functions.setRewardsDuration(2 * D))
        assert only_event(contracts.staking, "RewardsDurationUpdated", receipt) == {"rewardsDuration": 2 * D}
        assert contracts.staking.functions.rewardsDuration().call() == 2 * D

    def test_only_the_owner(self, w3: Web3, contracts: Contracts, alice: LocalAccount) -> None:
        call = contracts.staking.functions.setRewardsDuration(3600)
        assert revert_of(w3, alice, call) == ("OwnableUnauthorizedAccount", alice.address)
