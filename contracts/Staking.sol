// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";

/// @title Staking with streamed rewards
/// @notice Accounts stake `stakingToken` and earn `rewardToken` (both FAR in the platform's main
/// pool), streamed at a constant `rewardRate` per second over a reward period and shared in
/// proportion to stake (the Synthetix StakingRewards scheme).
///
/// The owner funds a period with `notifyRewardAmount(reward)`: the reward is pulled from the owner
/// and paid out over `rewardsDuration` seconds from that block, at `rewardRate = reward /
/// rewardsDuration` (rounded down). Funding again before the period ends rolls what is left of the
/// old period into the new rate: `(reward + leftover) / rewardsDuration`, and restarts the period.
/// After `periodFinish` nothing more accrues until the next funding. Rewards accrue only while
/// something is staked; what a period streams while nothing is staked stays in the contract.
/// Because every reward is pulled in when it is announced, the rewards owed are always held here,
/// also when the staking and reward tokens are the same.
contract Staking is Ownable, ReentrancyGuard {
    using SafeERC20 for IERC20;

    uint256 private constant PRECISION = 1e18;

    /// @notice The token accounts stake.
    IERC20 public immutable stakingToken;
    /// @notice The token rewards are paid in.
    IERC20 public immutable rewardToken;

    /// @notice When the current reward period ends (unix seconds); 0 before the first funding.
    uint256 public periodFinish;
    /// @notice Rewards streamed per second until `periodFinish`, in the reward token's smallest unit.
    uint256 public rewardRate;
    /// @notice The length of the next reward period, in seconds.
    uint256 public rewardsDuration;
    /// @notice When `rewardPerTokenStored` was last brought up to date.
    uint256 public lastUpdateTime;
    /// @notice Rewards per staked token (scaled by 1e18) accrued up to `lastUpdateTime`.
    uint256 public rewardPerTokenStored;
    /// @notice The sum of all stakes.
    uint256 public totalStaked;

    /// @notice An account's stake.
    mapping(address account => uint256 amount) public stakedOf;
    /// @notice `rewardPerToken()` as of an account's last update.
    mapping(address account => uint256 value) public userRewardPerTokenPaid;
    /// @notice Rewards earned by an account up to its last update and not yet claimed.
    mapping(address account => uint256 amount) public rewards;

    /// @notice `account` staked `amount`.
    event Staked(address indexed account, uint256 amount);
    /// @notice `account` took `amount` of its stake back.
    event Unstaked(address indexed account, uint256 amount);
    /// @notice `account` claimed `reward`.
    event RewardPaid(address indexed account, uint256 reward);
    /// @notice The owner funded a reward period: `reward` added, streamed at `rewardRate` per
    /// second (leftover of the previous period included) until `periodFinish`.
    event RewardAdded(uint256 reward, uint256 rewardRate, uint256 periodFinish);
    /// @notice The owner changed the length of the next reward periods.
    event RewardsDurationUpdated(uint256 rewardsDuration);

    /// @notice An amount (stake, unstake, reward) must be positive.
    error ZeroAmount();
    /// @notice Unstaking more than the account's stake.
    error InsufficientStake(uint256 staked, uint256 requested);
    /// @notice `claim` with no reward earned.
    error NothingToClaim();
    /// @notice The reward period has not ended yet (`setRewardsDuration`).
    error RewardPeriodActive(uint256 periodFinish);
    /// @notice A reward period must last at least one second.
    error ZeroDuration();
    /// @notice The reward (with the previous period's leftover) is less than one unit per second
    /// of the period, so the rate would be 0.
    error RewardTooSmall(uint256 reward, uint256 rewardsDuration);

    /// @param stakingToken_ The token to stake.
    /// @param rewardToken_ The token rewards are paid in (may be the same).
    /// @param rewardsDuration_ The length of reward periods, in seconds (`ZeroDuration` if 0).
    /// @param initialOwner Funds rewards and sets the duration (`OwnableInvalidOwner(0)` if zero).
    constructor(IERC20 stakingToken_, IERC20 rewardToken_, uint256 rewardsDuration_, address initialOwner)
        Ownable(initialOwner)
    {
        if (rewardsDuration_ == 0) revert ZeroDuration();
        stakingToken = stakingToken_;
        rewardToken = rewardToken_;
        rewardsDuration = rewardsDuration_;
    }

    modifier updateReward(address account) {
        rewardPerTokenStored = rewardPerToken();
        lastUpdateTime = lastTimeRewardApplicable();
        if (account != address(0)) {
            rewards[account] = earned(account);
            userRewardPerTokenPaid[account] = rewardPerTokenStored;
        }
        _;
    }

    /// @notice The current time, or the end of the reward period if that came first.
    function lastTimeRewardApplicable() public view returns (uint256) {
        return block.timestamp < periodFinish ? block.timestamp : periodFinish;
    }

    /// @notice Rewards per staked token (scaled by 1e18) accrued since the contract began.
    function rewardPerToken() public view returns (uint256) {
        if (totalStaked == 0) {
            return rewardPerTokenStored;
        }
        return rewardPerTokenStored + ((lastTimeRewardApplicable() - lastUpdateTime) * rewardRate * PRECISION) / totalStaked;
    }

    /// @notice The rewards `account` has earned and not claimed, as of this block.
    function earned(address account) public view returns (uint256) {
        return (stakedOf[account] * (rewardPerToken() - userRewardPerTokenPaid[account])) / PRECISION + rewards[account];
    }

    /// @notice The rewards one full period streams at the current rate.
    function rewardForDuration() external view returns (uint256) {
        return rewardRate * rewardsDuration;
    }

    /// @notice Stakes `amount` from the caller, who must have approved this contract for it.
    /// @dev Reverts `ZeroAmount` and the token's `ERC20InsufficientAllowance` / `ERC20InsufficientBalance`.
    function stake(uint256 amount) external nonReentrant updateReward(msg.sender) {
        _stake(amount);
    }

    /// @notice `stake` with an EIP-2612 permit the caller signed for this contract, for exactly
    /// `amount` and `deadline`. The permit is skipped when the allowance already covers `amount`
    /// (so a front-run permit does not block the stake); otherwise its errors come back as they are.
    function stakeWithPermit(uint256 amount, uint256 deadline, uint8 v, bytes32 r, bytes32 s)
        external
        nonReentrant
        updateReward(msg.sender)
    {
        if (stakingToken.allowance(msg.sender, address(this)) < amount) {
            IERC20Permit(address(stakingToken)).permit(msg.sender, address(this), amount, deadline, v, r, s);
        }
        _stake(amount);
    }

    /// @notice Takes `amount` of the caller's stake back. Rewards earned so far stay claimable.
    /// @dev Reverts `ZeroAmount`, `InsufficientStake(staked, requested)`.
    function unstake(uint256 amount) public nonReentrant updateReward(msg.sender) {
        if (amount == 0) revert ZeroAmount();
        uint256 staked = stakedOf[msg.sender];
        if (amount > staked) revert InsufficientStake(staked, amount);
        totalStaked -= amount;
        stakedOf[msg.sender] = staked - amount;
        emit Unstaked(msg.sender, amount);
        stakingToken.safeTransfer(msg.sender, amount);
    }

    /// @notice Pays the caller the rewards it has earned.
    /// @dev Reverts `NothingToClaim` when there are none.
    /// @return reward The amount paid.
    function claim() public nonReentrant updateReward(msg.sender) returns (uint256 reward) {
        reward = rewards[msg.sender];
        if (reward == 0) revert NothingToClaim();
        rewards[msg.sender] = 0;
        emit RewardPaid(msg.sender, reward);
        rewardToken.safeTransfer(msg.sender, reward);
    }

    /// @notice Unstakes everything the caller staked and claims its rewards, if any.
    /// @dev Reverts `ZeroAmount` when the caller has no stake.
    function exit() external {
        unstake(stakedOf[msg.sender]);
        if (rewards[msg.sender] > 0) {
            claim();
        }
    }

    /// @notice Funds a reward period of `rewardsDuration` seconds starting now with `reward`,
    /// pulled from the owner (who must have approved this contract for it); the previous period's
    /// leftover rolls in. Owner only (`OwnableUnauthorizedAccount`).
    /// @dev Reverts `ZeroAmount`, `RewardTooSmall(reward, rewardsDuration)`, and the token's
    /// `ERC20InsufficientAllowance` / `ERC20InsufficientBalance`.
    function notifyRewardAmount(uint256 reward) external onlyOwner nonReentrant updateReward(address(0)) {
        if (reward == 0) revert ZeroAmount();
        uint256 total = reward;
        if (block.timestamp < periodFinish) {
            total += (periodFinish - block.timestamp) * rewardRate;
        }
        uint256 rate = total / rewardsDuration;
        if (rate == 0) revert RewardTooSmall(reward, rewardsDuration);
        rewardRate = rate;
        lastUpdateTime = block.timestamp;
        periodFinish = block.timestamp + rewardsDuration;
        emit RewardAdded(reward, rate, periodFinish);
        rewardToken.safeTransferFrom(msg.sender, address(this), reward);
    }

    /// @notice Sets the length of the next reward periods, once the current one has ended. Owner
    /// only (`OwnableUnauthorizedAccount`).
    /// @dev Reverts `RewardPeriodActive(periodFinish)`, `ZeroDuration`.
    function setRewardsDuration(uint256 duration) external onlyOwner {
        if (block.timestamp <= periodFinish) revert RewardPeriodActive(periodFinish);
        if (duration == 0) revert ZeroDuration();
        rewardsDuration = duration;
        emit RewardsDurationUpdated(duration);
    }

    function _stake(uint256 amount) private {
        if (amount == 0) revert ZeroAmount();
        totalStaked += amount;
        stakedOf[msg.sender] += amount;
        emit Staked(msg.sender, amount);
        stakingToken.safeTransferFrom(msg.sender, address(this), amount);
    }
}
