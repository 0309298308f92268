"""Quotes: the price of a job, where to pay it, and the job id it reserves. Kept in Redis, never in PostgreSQL.

A quote is small, short-lived and read once (when its job starts), so it lives in Redis as the serialized
`far.inference.v1.Quote`, expiring `redeem_window` after its `expire_time` (the contract: a paid quote can be
redeemed for 24 hours after it expires). Quotes are private: another account's quote is QUOTE_NOT_FOUND.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from far.inference.v1 import quote_pb2
from far.type.v1 import token_amount_pb2
from redis.asyncio import Redis
from web3 import Web3

from servers.common.errors import FailedPrecondition, NotFound, ResourceExhausted
from servers.common.names import parse_name
from servers.common.validation import Violations
from servers.inference.catalog import Catalog, ModelSpec
from servers.inference.prices import Prices

QUOTE_PATTERN = "quotes/{quote}"
MODEL_PATTERN = "models/{model}"
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
PAYMENT_SYMBOL = "FAR"
PAYMENT_DECIMALS = 18


def new_id(prefix: str) -> str:
    """A generated resource id: a letter, then 24 random lower-case letters and digits (~124 bits)."""
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def payment_job_id(job_id: str) -> str:
    """The contract's `jobId` for a job: 0x + keccak256 of the UTF-8 bytes of the job id."""
    return "0x" + bytes(Web3.keccak(text=job_id)).hex()


def token_amount(value: int) -> token_amount_pb2.TokenAmount:
    return token_amount_pb2.TokenAmount(value=str(value), symbol=PAYMENT_SYMBOL, decimals=PAYMENT_DECIMALS)


@dataclass(frozen=True, slots=True)
class QuotePolicy:
    """How long a quote may be paid, how long a paid one may be redeemed, how many an account may ask for."""

    payable_s: int = 600
    redeem_window_s: int = 24 * 3600
    per_minute: int = 60


class Quotes:
    def __init__(
        self,
        redis: Redis,
        prefix: str,
        catalog: Catalog,
        prices: Prices,
        *,
        chain_id: int,
        payment_contract: str,
        policy: QuotePolicy | None = None,
    ) -> None:
        self._redis = redis
        self._prefix = f"{prefix}inference:quotes:"
        self._limits = f"{prefix}inference:quote-rate:"
        self._catalog = catalog
        self._prices = prices
        self._chain_id = chain_id
        self._payment_contract = payment_contract.lower()
        self.policy = policy or QuotePolicy()

    def model(self, name: str, field: str) -> ModelSpec:
        """The catalog model named `name` (`models/{model}`); INVALID_ARGUMENT or NOT_FOUND (`MODEL_NOT_FOUND`)."""
        model_id = parse_name(MODEL_PATTERN, name, field=field)["model"]
        spec = self._catalog.get(model_id)
        if spec is None:
            raise NotFound(f"there is no model {name}", reason="MODEL_NOT_FOUND", metadata={"model": name})
        return spec

    async def _rate_limit(self, owner: str) -> None:
        window = int(time.time() // 60)
        key = f"{self._limits}{owner}:{window}"
        pipe = self._redis.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, 120)
        count, _ = await pipe.execute()
        if int(count) > self.policy.per_minute:
            raise ResourceExhausted(
                f"at most {self.policy.per_minute} quotes a minute per account",
                reason="RATE_LIMITED",
                retry_after_s=60 - time.time() % 60,
            )

    async def create(self, owner: str, request: quote_pb2.Quote, *, now: float | None = None) -> quote_pb2.Quote:
        """Price a job for `owner` and reserve its id; errors as CreateQuote's."""
        spec = self.model(request.model, "quote.model")
        problems = Violations()
        if not 1 <= request.max_tokens <= spec.max_output_tokens:
            problems.add("quote.max_tokens", f"must be 1-{spec.max_output_tokens} for {spec.name}")
        room = spec.context_length - max(request.max_tokens, 1)
        if not 0 <= request.max_prompt_tokens <= room:
            problems.add("quote.max_prompt_tokens", f"must be 0-{room} (context {spec.context_length} - max_tokens)")
        problems.raise_if_any()
        price_per_token = self._prices.price(spec)
        if price_per_token is None:
            raise FailedPrecondition(
                f"{spec.name} has no price on chain yet", reason="MODEL_UNAVAILABLE", metadata={"model": spec.name}
            )
        await self._rate_limit(owner)
        now = time.time() if now is None else now
        prompt_tokens = request.max_prompt_tokens or room
        job_id = new_id("j")
        quote = quote_pb2.Quote(
            name=f"quotes/{new_id('q')}",
            model=spec.name,
            max_tokens=request.max_tokens,
            max_prompt_tokens=prompt_tokens,
            price_per_token=token_amount(price_per_token),
            price=token_amount((prompt_tokens + request.max_tokens) * price_per_token),
            chain_id=self._chain_id,
            payment_contract=self._payment_contract,
            job=f"jobs/{job_id}",
            payment_job_id=payment_job_id(job_id),
            owner=owner,
        )
        quote.create_time.FromNanoseconds(int(now * 1e9))
        quote.expire_time.FromSeconds(int(now) + self.policy.payable_s)
        ttl = self.policy.payable_s + self.policy.redeem_window_s
        await self._redis.set(self._key(quote.name), quote.SerializeToString(), ex=ttl)
        return quote

    def _key(self, name: str) -> str:
        return self._prefix + parse_name(QUOTE_PATTERN, name)["quote"]

    async def get(self, owner: str, name: str, *, field: str = "name") -> quote_pb2.Quote:
        """The caller's quote; NOT_FOUND (`QUOTE_NOT_FOUND`) for unknown, expired or another account's."""
        quote_id = parse_name(QUOTE_PATTERN, name, field=field)["quote"]
        data = await self._redis.get(self._prefix + quote_id)
        quote = quote_pb2.Quote.FromString(data) if isinstance(data, bytes) else None
        if quote is None or quote.owner != owner:
            raise NotFound(f"there is no quote {name}", reason="QUOTE_NOT_FOUND", metadata={"quote": name})
        return quote
