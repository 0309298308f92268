"""The inference model catalog: the built-in default, a catalog file, and one-line errors for bad entries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devstack.chain import model_key
from servers.common.config import ConfigError, Env
from servers.inference.catalog import DEFAULT_MODELS, Catalog, load_models


def test_the_default_catalog_is_the_dev_fleet_model() -> None:
    (spec,) = load_models(Env({}))
    assert spec is DEFAULT_MODELS[0]
    assert spec.name == "models/smollm2-135m-instruct"
    assert spec.served_as == "smollm2-135m-instruct"
    # The same modelId the dev deployment prices (keccak256 of the id).
    assert spec.chain_key == model_key("smollm2-135m-instruct")
    assert spec.chain_key.hex() == "b448e035e8598b8f5f2ee2830d005f50e35f6d9f8a6d5456eafb058148f3421e"


def test_a_catalog_file_is_read_and_sorted(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    path.write_text(
        json.dumps(
            [
                {"id": "zeta", "context_length": 4096, "max_output_tokens": 512, "triton_model": "zeta_v2"},
                {"id": "alpha", "context_length": 1024, "max_output_tokens": 256, "free": True, "supports_chat": False},
            ]
        )
    )
    models = load_models(Env({"INFERENCE_MODELS_FILE": str(path)}))
    assert [m.id for m in models] == ["alpha", "zeta"]
    assert models[0].free
    assert not models[0].supports_chat
    assert models[1].served_as == "zeta_v2"
    catalog = Catalog(models)
    assert catalog.get("zeta") is models[1]
    assert catalog.get("nope") is None
    assert len(catalog) == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "INFERENCE_MODELS_FILE"),
        ("[]", "non-empty JSON list"),
        ('[{"id": "Bad", "context_length": 10, "max_output_tokens": 5}]', "lower-case"),
        ('[{"id": "a", "context_length": 10, "max_output_tokens": 10}]', "max_output_tokens < context_length"),
        ('[{"id": "a"}]', "needs id, context_length and max_output_tokens"),
        ('[{"id": "a", "context_length": 10, "max_output_tokens": 5, "triton_model": "a b"}]', "triton_model"),
        (
            '[{"id": "a", "context_length": 10, "max_output_tokens": 5}, {"id": "a", "context_length": 9, '
            '"max_output_tokens": 5}]',
            "listed twice",
        ),
    ],
)
def test_bad_catalogs_are_configuration_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "models.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_models(Env({"INFERENCE_MODELS_FILE": str(path)}))
