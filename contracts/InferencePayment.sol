// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";

/// @title Inference payments
/// @notice Wallets pay here, in the payment token (FAR), for inference jobs of the FAR platform.
///
/// A job is paid by its id, `jobId` = keccak256 of the UTF-8 bytes of the job id the inference
/// service gave in its quote (`{job}` of `jobs/{job}`, the quote's `payment_job_id`), for a number
/// of tokens of one model, `modelId` = keccak256 of the UTF-8 bytes of the model id (`{model}` of
/// `models/{model}`). The amount is `tokens * pricePerToken[modelId]`, the model's price per token
/// that the owner sets. Each job can be paid once, by anyone, and the payment is final: the
/// contract emits `PaymentReceived`, which the inference service checks (emitter address, job id,
/// payer, amount) before it runs the job. The owner withdraws what was paid.
contract InferencePayment is Ownable {
    using SafeERC20 for IERC20;

    /// @notice A job's payment: who paid and how much (zero address and 0 when unpaid).
    struct Payment {
        address payer;
        uint256 amount;
    }

    /// @notice The token payments are made in (FARToken).
    IERC20 public immutable token;

    /// @notice The price of one token of a model, in the payment token's smallest unit; 0 = no price.
    mapping(bytes32 modelId => uint256 price) public pricePerToken;

    mapping(bytes32 jobId => Payment payment) private _payments;

    /// @notice A job was paid: `amount` of the payment token moved from `payer` to this contract.
    event PaymentReceived(bytes32 indexed jobId, address indexed payer, uint256 amount);

    /// @notice The owner set a model's price per token (0 removes it: the model cannot be paid for).
    event PriceSet(bytes32 indexed modelId, uint256 pricePerToken);

    /// @notice The owner withdrew `amount` of the payment token to `to`.
    event Withdrawn(address indexed to, uint256 amount);

    /// @notice The job has been paid already (by `payer`); a job is paid once.
    error JobAlreadyPaid(bytes32 jobId, address payer);

    /// @notice The model has no price (never set, or set to 0): it cannot be paid for here.
    error PriceNotSet(bytes32 modelId);

    /// @notice A payment must be for at least one token.
    error ZeroTokens();

    /// @param token_ The payment token (an ERC-20 with EIP-2612 permit for `payWithPermit`).
    /// @param initialOwner Sets prices and withdraws (reverts `OwnableInvalidOwner(0)` if zero).
    constructor(IERC20 token_, address initialOwner) Ownable(initialOwner) {
        token = token_;
    }

    /// @notice The price of `tokens` tokens of a model: `tokens * pricePerToken[modelId]`.
    /// @dev Reverts `PriceNotSet(modelId)` when the model has no price.
    function quote(bytes32 modelId, uint256 tokens) public view returns (uint256 amount) {
        uint256 price = pricePerToken[modelId];
        if (price == 0) revert PriceNotSet(modelId);
        return tokens * price;
    }

    /// @notice Who paid a job and how much; the zero address and 0 when it is unpaid.
    function paymentOf(bytes32 jobId) external view returns (address payer, uint256 amount) {
        Payment storage payment = _payments[jobId];
        return (payment.payer, payment.amount);
    }

    /// @notice Whether the job has been paid.
    function isPaid(bytes32 jobId) external view returns (bool) {
        return _payments[jobId].payer != address(0);
    }

    /// @notice Pays job `jobId`: `quote(modelId, tokens)` moves from the caller to this contract,
    /// which must be allowed to spend it (`approve` first, or use `payWithPermit`).
    /// @dev Reverts `ZeroTokens`, `PriceNotSet(modelId)`, `JobAlreadyPaid(jobId, payer)`, and the
    /// token's `ERC20InsufficientAllowance` / `ERC20InsufficientBalance`.
    /// @return amount The amount paid.
    function pay(bytes32 jobId, bytes32 modelId, uint256 tokens) external returns (uint256 amount) {
        amount = _checkPayment(jobId, modelId, tokens);
        _collect(jobId, amount);
    }

    /// @notice `pay` with an EIP-2612 permit the caller signed for this contract, for exactly the
    /// amount (`quote(modelId, tokens)`) and `deadline`: approval and payment in one transaction.
    /// @dev When the allowance already covers the amount (the permit was submitted by someone
    /// else first, or the caller approved), the permit is skipped, so front-running it does not
    /// block the payment. Otherwise the token's `ERC2612ExpiredSignature` / `ERC2612InvalidSigner`
    /// come back as they are; the errors of `pay` as well.
    function payWithPermit(bytes32 jobId, bytes32 modelId, uint256 tokens, uint256 deadline, uint8 v, bytes32 r, bytes32 s)
        external
        returns (uint256 amount)
    {
        amount = _checkPayment(jobId, modelId, tokens);
        if (token.allowance(msg.sender, address(this)) < amount) {
            IERC20Permit(address(token)).permit(msg.sender, address(this), amount, deadline, v, r, s);
        }
        _collect(jobId, amount);
    }

    /// @notice Sets a model's price per token, in the payment token's smallest unit; 0 removes it.
    /// Jobs already paid keep what they paid. Owner only (`OwnableUnauthorizedAccount`).
    function setPrice(bytes32 modelId, uint256 price) external onlyOwner {
        pricePerToken[modelId] = price;
        emit PriceSet(modelId, price);
    }

    /// @notice Sends `amount` of the payment token held here to `to`. Owner only
    /// (`OwnableUnauthorizedAccount`); more than the balance is the token's `ERC20InsufficientBalance`.
    function withdraw(address to, uint256 amount) external onlyOwner {
        token.safeTransfer(to, amount);
        emit Withdrawn(to, amount);
    }

    function _checkPayment(bytes32 jobId, bytes32 modelId, uint256 tokens) private view returns (uint256) {
        if (tokens == 0) revert ZeroTokens();
        address paidBy = _payments[jobId].payer;
        if (paidBy != address(0)) revert JobAlreadyPaid(jobId, paidBy);
        return quote(modelId, tokens);
    }

    function _collect(bytes32 jobId, uint256 amount) private {
        _payments[jobId] = Payment({payer: msg.sender, amount: amount});
        emit PaymentReceived(jobId, msg.sender, amount);
        token.safeTransferFrom(msg.sender, address(this), amount);
    }
}
