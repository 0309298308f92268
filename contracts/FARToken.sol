// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Permit.sol";

/// @title FAR token
/// @notice The FAR platform's ERC-20 token: name "FAR Token", symbol "FAR", 18 decimals, with
/// EIP-2612 `permit` (EIP-712 domain: name "FAR Token", version "1", this chain and address), so a
/// wallet can approve and pay or stake in one transaction.
/// @dev The whole supply is minted once, at deployment, to `holder`; nobody can mint later.
/// Reverts use OpenZeppelin 5's ERC-6093 errors (`ERC20InsufficientBalance`,
/// `ERC20InsufficientAllowance`, `ERC20InvalidReceiver`, ...) and EIP-2612's
/// (`ERC2612ExpiredSignature`, `ERC2612InvalidSigner`).
contract FARToken is ERC20, ERC20Permit {
    /// @param holder Receives the whole supply (reverts `ERC20InvalidReceiver(0)` if zero).
    /// @param initialSupply The fixed total supply, in the smallest unit (1 FAR = 10**18).
    constructor(address holder, uint256 initialSupply) ERC20("FAR Token", "FAR") ERC20Permit("FAR Token") {
        _mint(holder, initialSupply);
    }
}
