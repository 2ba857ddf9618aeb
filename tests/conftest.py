"""Shared fixtures: tiny random models of every family and a tiny dataset, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Without CUDA the Triton kernels run in Triton's interpreter; it must be chosen before they are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from vpstudy.families import FAMILIES
from vpstudy.testing import make_tiny, make_tiny_dataset

ALL_FAMILIES = sorted(FAMILIES)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: make_tiny(family, root / family, seed=0) for family in ALL_FAMILIES}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), n=6, seed=0)


@pytest.fixture(scope="session")
def organism_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped LLaVA organism v1 recorded on the first 64 examples of its evaluation set
    (every text layer, greedy, as ``vpstudy demo`` records it). Tests copy it before changing it."""
    from vpstudy.organism.shipped import example_run

    return example_run(tmp_path_factory.mktemp("organism") / "run", version="v1", samples=64)
