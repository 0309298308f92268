"""The inference bench's `split` placement: the model on the last CPU, the platform on all the others."""

from __future__ import annotations

import pytest

from bench.inference import split_placement


def test_on_two_cpus_the_model_has_cpu_1_and_the_platform_cpu_0() -> None:
    split = split_placement({1, 0})
    assert (split.model_cpus, split.platform_cpus) == ({1}, {0})
    assert "pinned to CPU 1;" in split.description
    assert split.description.endswith("pinned to CPU 0: the model has hardware of its own, as on a GPU node")


def test_on_more_cpus_the_platform_has_every_one_but_the_models() -> None:
    split = split_placement(range(16))
    assert (split.model_cpus, split.platform_cpus) == ({15}, set(range(15)))
    assert "pinned to CPUs 0-14:" in split.description
    assert "pinned to CPUs 0, 2:" in split_placement({0, 2, 5}).description


def test_one_cpu_cannot_be_split() -> None:
    with pytest.raises(SystemExit, match="two CPUs"):
        split_placement({3})
