"""The models the platform sells: their limits from configuration, their prices from the chain.

The catalog is a JSON list in `INFERENCE_MODELS_FILE` (the built-in default is the one model the dev
fleet serves). The price per token is what the InferencePayment contract charges (`pricePerToken`,
set by the owner with `setPrice`, announced by `PriceSet`): the chain is the one source of truth, so a
quote can never ask for another amount than the contract takes. Prices are read once at start and
refreshed in the background (`Prices.refresh`), never on a request's path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from web3 import Web3

from servers.common.config import ConfigError, Env

_MODEL_ID = re.compile(r"[a-z][a-z0-9-]{0,62}\Z")
_TRITON_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}\Z")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model of the catalog, as configured."""

    id: str
    display_name: str
    description: str
    context_length: int
    max_output_tokens: int
    supports_chat: bool = True
    free: bool = False
    """A free model needs no quote and no payment; a paid one needs its price set on chain."""
    triton_model: str = ""
    """The model's name in the nodes' Triton repositories (the id when empty)."""

    @property
    def name(self) -> str:
        return f"models/{self.id}"

    @property
    def served_as(self) -> str:
        return self.triton_model or self.id

    @property
    def chain_key(self) -> bytes:
        """The contract's `modelId`: keccak256 of the UTF-8 bytes of the id."""
        return bytes(Web3.keccak(text=self.id))


DEFAULT_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        id="smollm2-135m-instruct",
        display_name="SmolLM2 135M Instruct",
        description="Hugging Face SmolLM2-135M-Instruct (GGUF Q4_1) served by llama.cpp behind Triton.",
        context_length=2048,
        max_output_tokens=1024,
        supports_chat=True,
    ),
)


def _spec(entry: Mapping[str, Any], where: str) -> ModelSpec:
    try:
        spec = ModelSpec(
            id=str(entry["id"]),
            display_name=str(entry.get("display_name") or entry["id"]),
            description=str(entry.get("description", "")),
            context_length=int(entry["context_length"]),
            max_output_tokens=int(entry["max_output_tokens"]),
            supports_chat=bool(entry.get("supports_chat", True)),
            free=bool(entry.get("free", False)),
            triton_model=str(entry.get("triton_model", "")),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"{where}: a model needs id, context_length and max_output_tokens ({error})") from None
    if not _MODEL_ID.match(spec.id):
        raise ConfigError(f"{where}: model id {spec.id!r} must be 1-63 lower-case letters, digits and hyphens")
    if spec.triton_model and not _TRITON_NAME.match(spec.triton_model):
        raise ConfigError(f"{where}: triton_model {spec.triton_model!r} is not a Triton model name")
    if not 0 < spec.max_output_tokens < spec.context_length:
        raise ConfigError(f"{where}: model {spec.id}: need 0 < max_output_tokens < context_length")
    return spec


def load_models(env: Env) -> tuple[ModelSpec, ...]:
    """The catalog from `INFERENCE_MODELS_FILE`, or the built-in default; ConfigError names what is wrong."""
    path = env.text("INFERENCE_MODELS_FILE")
    if not path:
        return DEFAULT_MODELS
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"INFERENCE_MODELS_FILE={path}: {error}") from None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"INFERENCE_MODELS_FILE={path}: expected a non-empty JSON list of models")
    specs = tuple(_spec(entry, f"INFERENCE_MODELS_FILE={path}") for entry in entries)
    ids = [spec.id for spec in specs]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"INFERENCE_MODELS_FILE={path}: a model id is listed twice")
    return tuple(sorted(specs, key=lambda spec: spec.id))


class Catalog:
    """The configured models by id, in id order."""

    def __init__(self, models: Sequence[ModelSpec]) -> None:
        self._models = {spec.id: spec for spec in sorted(models, key=lambda spec: spec.id)}

    def __iter__(self) -> Any:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def get(self, model_id: str) -> ModelSpec | None:
        return self._models.get(model_id)
