"""Per-process cache of everything expensive: tokenizer, data, encodings and models.

A simulation actor serves many virtual clients one after another; it builds the frozen base and
tokenises the data once, then only swaps adapter tensors. Keyed by the parts of the config that
determine them, so a new run with a different model or data gets a fresh workspace.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from fedpeft.core.adapters import AdapterModel, build_adapter_model
from fedpeft.core.config import ConfigError, DataConfig, FedConfig, ModelConfig
from fedpeft.core.data import (
    TextData,
    holdout_split,
    load_partition,
    load_task_data,
    load_user_file,
    load_validation,
)
from fedpeft.core.fingerprint import base_fingerprint
from fedpeft.core.models import CAUSAL_LM, infer_task, load_tokenizer
from fedpeft.core.tasks import Batchable, Task, task_class


def set_torch_threads(n: int) -> None:
    """Pin intra-op threads (once per process); oversubscribing 2 cores costs more than it buys."""
    n = max(1, n)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@dataclass
class Workspace:
    model_cfg: ModelConfig
    data_cfg: DataConfig
    train: TextData
    test: TextData
    tokenizer: object
    task: Task
    _models: dict[int, AdapterModel] = field(default_factory=dict)
    _partitions: dict[tuple[int, int, float, int], Batchable] = field(default_factory=dict)
    _test: dict[int, Batchable] = field(default_factory=dict)
    _test_data: dict[int, TextData] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.train.label_names)

    def adapter_model(self, rank: int) -> AdapterModel:
        """The process's model with a LoRA adapter of ``rank`` (built once, then reused)."""
        if rank not in self._models:
            self._models[rank] = build_adapter_model(self.model_cfg, self.num_labels, rank)
        return self._models[rank]

    def base_fingerprint(self) -> str:
        """The digest of this process's frozen base (``fedpeft.core.fingerprint``): hashed once
        per process and model section, not per workspace (a fresh workspace per client round,
        ``simulation.reuse_workspace = false``, does not hash the base again)."""
        adapter = next(iter(self._models.values()), None) or self.adapter_model(self.model_cfg.rank)
        return base_fingerprint(self.model_cfg, self.num_labels, adapter.params)

    def partition(self, partition_id: int, num_clients: int, holdout: float = 0.0) -> Batchable:
        """A client's training examples: its partition less its evaluation holdout
        (``holdout``: the share held out, ``fedpeft.core.data.holdout_split``; 0 = none)."""
        return self._client_part(partition_id, num_clients, holdout, 0)

    def holdout(self, partition_id: int, num_clients: int, fraction: float) -> Batchable:
        """A client's held-out examples (``eval.client_holdout``), never trained on."""
        return self._client_part(partition_id, num_clients, fraction, 1)

    def client_examples(self, partition_id: int, num_clients: int) -> TextData:
        """All of a client's examples, before any holdout."""
        return load_partition(self.data_cfg, num_clients, partition_id)

    def _client_part(self, partition_id: int, num_clients: int, holdout: float,
                     part: int) -> Batchable:
        key = (partition_id, num_clients, holdout if holdout > 0 else 0.0, part)
        if key not in self._partitions:
            data = self.client_examples(partition_id, num_clients)
            if holdout > 0:
                pid = None if isinstance(self, LocalWorkspace) else partition_id
                data = holdout_split(data, holdout, self.data_cfg.seed, pid)[part]
            self._partitions[key] = self.task.encode(data)
        return self._partitions[key]

    def test_data(self, subset: int = 0) -> TextData:
        """The held-out split, or a fixed stratification-free subset of it (same every round)."""
        if subset not in self._test_data:
            data = self.test
            if 0 < subset < len(data):
                rng = np.random.default_rng(self.data_cfg.seed + 1)
                data = data.subset(np.sort(rng.permutation(len(data))[:subset]))
            self._test_data[subset] = data
        return self._test_data[subset]

    def test_set(self, subset: int = 0) -> Batchable:
        """:meth:`test_data`, encoded by the task."""
        if subset not in self._test:
            self._test[subset] = self.task.encode(self.test_data(subset))
        return self._test[subset]


@functools.lru_cache(maxsize=2)
def _workspace(model_json: str, data_json: str, split: str = "test") -> Workspace:
    """``split``: what ``test`` holds, the test split or the validation split (eval.split)."""
    model, data = ModelConfig(**json.loads(model_json)), DataConfig(**json.loads(data_json))
    train, test = load_task_data(data)
    if split == "validation":
        test = load_validation(data)
    tokenizer = load_tokenizer(model.name)
    task = task_class(model)(model, data, tokenizer, train.label_names)
    return Workspace(model, data, train, test, tokenizer, task)


def clear_workspaces() -> None:
    """Forget the cached workspaces (an experiment that changes the model between runs)."""
    _workspace.cache_clear()


def get_workspace(cfg: FedConfig) -> Workspace:
    """The process's workspace for this model, data and eval.split (nothing else matters);
    a fresh one every call with ``simulation.reuse_workspace = false`` (the benchmark's
    ablation: model built and partition tokenised per client round)."""
    as_json = functools.partial(json.dumps, sort_keys=True)
    key = (as_json(asdict(cfg.model)), as_json(asdict(cfg.data)), cfg.eval.split)
    if not cfg.simulation.reuse_workspace:
        return _workspace.__wrapped__(*key)
    return _workspace(*key)


@dataclass
class LocalWorkspace(Workspace):
    """A deployed device's workspace: its own data file is its partition, whatever partition id
    the server sends, and it never loads the task's data (the device may not have it)."""

    def client_examples(self, partition_id: int, num_clients: int) -> TextData:
        return self.train  # the device's whole file


@functools.lru_cache(maxsize=2)
def _local_workspace(model_json: str, data_json: str, path: str, mtime_ns: int) -> LocalWorkspace:
    del mtime_ns  # only part of the cache key: an edited file is read again
    model = ModelConfig(**json.loads(model_json))
    # the whole file is this device's partition: the run's split column (data.partition_by,
    # a simulation's natural split) need not be in it
    data = DataConfig(**{**json.loads(data_json), "dataset": "file", "path": path,
                         "partition_by": ""})
    local = load_user_file(data)  # the run's text/label columns and class names
    check_same_kind(local, data)
    tokenizer = load_tokenizer(model.name)
    empty = local.subset(np.arange(0, dtype=np.int64))
    task = task_class(model)(model, data, tokenizer, local.label_names)
    return LocalWorkspace(model, data, local, empty, tokenizer, task)


@functools.lru_cache(maxsize=2)
def _data_free_workspace(model_json: str, data_json: str) -> Workspace:
    model, data = ModelConfig(**json.loads(model_json)), DataConfig(**json.loads(data_json))
    labels = tuple(data.labels)
    if not labels and infer_task(model) != CAUSAL_LM:
        raise ConfigError(
            "eval.where = 'clients': the coordinator reads no data, so a classification run "
            "must declare its classes: data.labels = ['...', '...'] (in the order of the label "
            "indices)")
    chats = () if not labels else None  # no classes: a chat/instruction task
    empty = TextData((), np.zeros(0, dtype=np.int64), labels, None, chats)
    tokenizer = load_tokenizer(model.name)
    task = task_class(model)(model, data, tokenizer, labels)
    return Workspace(model, data, empty, empty, tokenizer, task)


def data_free_workspace(cfg: FedConfig) -> Workspace:
    """A coordinator's workspace when only the clients evaluate (``eval.where = 'clients'``, a
    deployment): the model, the tokenizer and the task's classes (``data.labels``; none for a
    chat task), and no examples at all: no data file is read."""
    as_json = functools.partial(json.dumps, sort_keys=True)
    return _data_free_workspace(as_json(asdict(cfg.model)), as_json(asdict(cfg.data)))


def check_same_kind(local: TextData, data: DataConfig) -> None:
    """A device's file holds the run's kind of examples: labelled texts for a run with classes
    (``data.labels``, which the coordinator always fills in), chats for a run without."""
    name = os.path.basename(data.path)
    if data.labels and local.chats is not None:
        raise ConfigError(f"{name} holds chat/instruction examples, but this run is a label task "
                          f"(classes {list(data.labels)}): give this device a file with "
                          f"{data.text_column!r} and {data.label_column!r} columns")
    if not data.labels and local.chats is None:
        raise ConfigError(f"{name} holds labelled texts, but this run trains a causal LM on "
                          "chat/instruction examples: give this device a file in one of the "
                          "schemas messages; instruction + output; prompt + completion")


def get_local_workspace(cfg: FedConfig, path: str) -> LocalWorkspace:
    """The process's workspace for a device that trains on its own CSV/JSONL file ``path``.

    The class names come from ``data.labels`` of the run (the coordinator fills them in), so
    every device maps labels to the same indices even when its file lacks a class."""
    as_json = functools.partial(json.dumps, sort_keys=True)
    resolved = os.path.abspath(os.path.expanduser(path))
    mtime = os.stat(resolved).st_mtime_ns if os.path.exists(resolved) else 0
    return _local_workspace(as_json(asdict(cfg.model)), as_json(asdict(cfg.data)), resolved, mtime)


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
