"""Server-side pieces that don't need Flower: client sampling, profiles, global evaluation."""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fedpeft.strategies import ClientProfile, Method

from fedpeft.core.config import FedConfig, parse_rank_mix
from fedpeft.core.keys import NEXT_RANK
from fedpeft.core.payload import Payload
from fedpeft.core.training import autocast, resolve_device
from fedpeft.core.workspace import Workspace


def client_profile(cfg: FedConfig, partition_id: int, node_id: int = 0,
                   reported_rank: int | None = None) -> ClientProfile:
    """The profile the server assumes for a client: the rank the client last reported (its node
    config or its own rank pruning), else its share of ``federation.rank_mix``, else model.rank."""
    rank = reported_rank or assigned_rank(cfg, partition_id)
    return ClientProfile(partition_id=partition_id, rank=rank, node_id=node_id)


@functools.lru_cache(maxsize=16)
def _assigned_ranks(rank_mix: str, clients: int, seed: int) -> tuple[int, ...]:
    """Each rank's share of the clients, rounded by largest remainder (so the counts add up to
    ``clients``), then shuffled by seed: the same clients get the same ranks in every run."""
    pairs = parse_rank_mix(rank_mix)
    quotas = [fraction * clients for _, fraction in pairs]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(pairs)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: clients - sum(counts)]:
        counts[i] += 1
    ranks = np.repeat([rank for rank, _ in pairs], counts)
    return tuple(int(r) for r in np.random.default_rng([seed, 4]).permutation(ranks))


def assigned_rank(cfg: FedConfig, partition_id: int) -> int:
    """The LoRA rank ``federation.rank_mix`` gives client ``partition_id`` (model.rank if none)."""
    fed = cfg.federation
    if not parse_rank_mix(fed.rank_mix):
        return cfg.model.rank
    ranks = _assigned_ranks(fed.rank_mix, fed.clients, fed.seed)
    return ranks[partition_id % len(ranks)]


MAX_REPORTED_RANK = 4096


def reported_rank(metrics: Mapping[str, Any], limit: int = MAX_REPORTED_RANK) -> int | None:
    """The rank a client says it holds from now on (``next_rank`` in its reply), if sane: at
    most ``limit`` (:func:`rank_limit`: a larger rank only adds bytes to its downlinks)."""
    value = metrics.get(NEXT_RANK)
    if not isinstance(value, int | float) or not 1 <= value <= min(limit, MAX_REPORTED_RANK):
        return None  # absent, NaN or out of range
    return int(value) if value == int(value) else None


def rank_limit(adapter: Mapping[str, Any]) -> int:
    """The largest LoRA rank that means anything for an adapter (its tensors by key): the
    smallest dimension of the layers it wraps; ``MAX_REPORTED_RANK`` without LoRA factors."""
    dims = [min(int(t.shape[-1]), int(adapter[k.replace("lora_A", "lora_B")].shape[0]))
            for k, t in adapter.items()
            if k.endswith("lora_A.weight") and k.replace("lora_A", "lora_B") in adapter]
    return min([*dims, MAX_REPORTED_RANK])


@dataclass
class EvalResult:
    """``accuracy`` is None for a task without labels; ``extra``: the task's other metrics
    (perplexity); ``samples``: (prompt, greedy completion) pairs where the task makes them."""

    accuracy: float | None
    loss: float
    examples: int
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)
    samples: list[tuple[str, str]] = field(default_factory=list)


def evaluate_global(cfg: FedConfig, method: Method, state: Payload, workspace: Workspace,
                    subset: int, export: bool = False) -> EvalResult:
    """The global model on the held-out split (or its fixed subset): the task's metrics and,
    unless ``export``, its sample completions. ``export``:
    of what ``adapter/`` holds instead (``method.export``), i.e. what ``fedpeft
    evaluate OUT/adapter`` reports."""
    start = time.perf_counter()
    device = resolve_device(cfg.train.device)
    adapter = workspace.adapter_model(cfg.model.rank)
    adapter.model.to(device)
    adapter.reset_base()
    if export:
        adapter.load(method.export(state).tensors)
    else:
        method.load_global(adapter, state)
    with autocast(cfg.train.precision, device, adapter.model):  # train.precision: eval too
        ev = workspace.task.evaluate(adapter.model, workspace.test_set(subset),
                                     cfg.eval.batch_size, device)
    # greedy completions in float32: samples.md shows what `fedpeft generate` and plain peft
    # print for the same adapter (a bfloat16 rounding can flip a greedy token)
    samples = [] if export else workspace.task.samples(adapter.model, workspace.test_data(),
                                                       device)
    return EvalResult(ev.accuracy, ev.loss, ev.examples, time.perf_counter() - start, ev.extra,
                      samples)


def append_samples(path: Path, server_round: int, samples: list[tuple[str, str]]) -> None:
    """Add a round's greedy completions to ``samples.md`` (nothing when there are none)."""
    if not samples:
        return
    lines = [f"## Round {server_round}", ""]
    for prompt, completion in samples:
        lines += ["**Prompt**", "", "```", prompt.rstrip(), "```", "", "**Completion**", "",
                  "```", completion.rstrip(), "```", ""]
    with path.open("a") as f:
        if f.tell() == 0:
            f.write("# Greedy completions of fixed held-out prompts, per evaluated round\n\n")
        f.write("\n".join(lines) + "\n")


def eval_due(cfg: FedConfig, server_round: int) -> bool:
    """Round 0 and the last round always; in between every ``eval.every`` rounds."""
    last = cfg.federation.rounds
    return server_round in (0, last) or server_round % cfg.eval.every == 0


def eval_subset(cfg: FedConfig, server_round: int) -> int:
    """The final round is scored on the whole held-out split."""
    return 0 if server_round == cfg.federation.rounds else cfg.eval.subset
