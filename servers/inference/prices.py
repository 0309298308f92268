"""Prices per token from the InferencePayment contract, held in memory and refreshed in the background."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import structlog

from servers.common.chain import Chain
from servers.inference.catalog import ModelSpec

log = structlog.get_logger("far.inference.prices")


class Prices:
    """`price(model)`: the contract's price per token (smallest unit); None while unknown or not set on chain.

    Free models cost 0 without asking the chain. `refresh` reads every paid model's price; `run` does it every
    `interval_s` until cancelled. A failed refresh keeps the last prices (logged): a chain outage does not
    stop quoting at the last known price, and payments are verified on chain anyway.
    """

    def __init__(self, chain: Chain | None, models: Iterable[ModelSpec]) -> None:
        self._chain = chain
        self._models = tuple(models)
        self._prices: dict[str, int | None] = {spec.id: (0 if spec.free else None) for spec in self._models}

    def price(self, spec: ModelSpec) -> int | None:
        return 0 if spec.free else self._prices.get(spec.id)

    async def refresh(self) -> None:
        if self._chain is None:
            return
        contract = self._chain.inference_payment
        for spec in self._models:
            if spec.free:
                continue
            read = contract.functions.pricePerToken(spec.chain_key).call
            price = int(await self._chain.retrying("pricePerToken", read))
            self._prices[spec.id] = price or None  # 0 on chain means "no price set": not sold

    async def run(self, interval_s: float = 30.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.refresh()
            except Exception as error:  # keep the last prices; the next round tries again
                log.warning("price refresh failed", error=str(error))
