"""Shared fixtures. Tests never reach a hub: models are built here or provisioned from PyPI packages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Set before anything imports transformers, Ray or DeepSpeed.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray is imported: loopback only
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A cache that survives between runs of one checkout (the default model is converted once).
os.environ.setdefault("RLHF_HOME", str(REPO / ".cache" / "rlhf-test"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, hidden 128) with a real BPE tokenizer and ChatML template."""
    from rlhf.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from rlhf.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))
