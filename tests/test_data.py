from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedpeft.core.config import ConfigError, DataConfig
from fedpeft.core.data import load_task_data, load_user_file, partition_indices


def test_rotten_tomatoes_fixed_split() -> None:
    train, test = load_task_data(DataConfig())
    assert len(test) == 1000
    assert len(train) + len(test) == 7403 + 5405
    assert train.label_names == ("rotten", "fresh")
    assert not set(train.texts[:200]) & set(test.texts)
    _, again_test = load_task_data(DataConfig(test_size=1000))
    assert again_test.texts == test.texts


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "movie"])
def test_partitions_cover_train_once_and_are_deterministic(partitioner: str) -> None:
    cfg = DataConfig(partitioner=partitioner, dirichlet_alpha=1.0)
    train, _ = load_task_data(cfg)
    parts = partition_indices(cfg, 50)
    assert len(parts) == 50
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == len(train)
    assert min(len(p) for p in parts) >= cfg.min_partition_size
    other_seed = partition_indices(DataConfig(partitioner=partitioner, dirichlet_alpha=1.0,
                                              seed=1), 50)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other_seed, strict=True))
    again = partition_indices(DataConfig(partitioner=partitioner, dirichlet_alpha=1.0), 50)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_iid_is_balanced_and_dirichlet_is_skewed() -> None:
    train, _ = load_task_data(DataConfig())
    iid = partition_indices(DataConfig(partitioner="iid"), 20)
    skew = partition_indices(DataConfig(partitioner="dirichlet", dirichlet_alpha=0.3), 20)
    iid_frac = [train.labels[p].mean() for p in iid]
    skew_frac = [train.labels[p].mean() for p in skew]
    assert np.std(iid_frac) < 0.06
    assert np.std(skew_frac) > 2 * np.std(iid_frac)


def test_movie_partition_keeps_movies_whole() -> None:
    cfg = DataConfig(partitioner="movie")
    train, _ = load_task_data(cfg)
    owners: dict[str, int] = {}
    for client, part in enumerate(partition_indices(cfg, 100)):
        for i in part:
            assert owners.setdefault(train.groups[i], client) == client


def test_user_files(tmp_path: Path) -> None:
    csv = tmp_path / "d.csv"
    csv.write_text("review,stars\ngood film,pos\nbad film,neg\nok film,pos\n")
    data = load_user_file(DataConfig(dataset="file", path=str(csv), text_column="review",
                                     label_column="stars"))
    assert data.label_names == ("neg", "pos")
    assert data.labels.tolist() == [1, 0, 1]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    assert load_user_file(DataConfig(dataset="file", path=str(jsonl))).labels.tolist() == [0, 1]


def test_user_file_errors(tmp_path: Path) -> None:
    csv = tmp_path / "d.csv"
    csv.write_text("body,label\nx,1\n")
    with pytest.raises(ConfigError, match=r"has no text column 'text'.*columns found: body, label"):
        load_user_file(DataConfig(dataset="file", path=str(csv)))
    csv.write_text("text,label\nx,pos\ny,maybe\n")
    with pytest.raises(ConfigError, match=r"labels \['maybe'\] are outside the task's classes"):
        load_user_file(DataConfig(dataset="file", path=str(csv), labels=["neg", "pos"]))
    with pytest.raises(ConfigError, match="does not exist"):
        load_user_file(DataConfig(dataset="file", path=str(tmp_path / "none.csv")))


def test_too_many_clients_for_movies() -> None:
    with pytest.raises(ConfigError, match="movies for 5000 clients"):
        partition_indices(DataConfig(partitioner="movie"), 5000)
