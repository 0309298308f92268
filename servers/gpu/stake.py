"""The operator stake gate: FAR staked in the Staking contract (`stakedOf`) against the platform's minimum."""

from __future__ import annotations

from eth_utils.address import to_checksum_address

from servers.common.chain import Chain
from servers.common.errors import FailedPrecondition


class StakeGate:
    def __init__(self, chain: Chain, minimum_wei: int) -> None:
        self._chain = chain
        self.minimum_wei = minimum_wei

    async def staked(self, operator: str) -> int:
        """The operator's stake in wei; UNAVAILABLE `CHAIN_UNAVAILABLE` when the chain cannot be read."""
        call = self._chain.staking.functions.stakedOf(to_checksum_address(operator)).call
        return int(await self._chain.retrying("Staking.stakedOf", call))

    async def require(self, operator: str) -> int:
        """The operator's stake; FAILED_PRECONDITION `INSUFFICIENT_STAKE` when it is below the minimum."""
        staked = await self.staked(operator)
        if staked < self.minimum_wei:
            raise FailedPrecondition(
                f"the operator has {staked} wei of FAR staked; registering a node needs {self.minimum_wei}",
                reason="INSUFFICIENT_STAKE",
                metadata={"required": str(self.minimum_wei), "staked": str(staked)},
            )
        return staked
