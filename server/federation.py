"""Server-side pieces that don't need Flower: client sampling, profiles, global evaluation."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from fedpeft.strategies import ClientProfile, Method

from fedpeft.config import FedConfig
from fedpeft.payload import Payload
from fedpeft.runtime import Workspace
from fedpeft.training import evaluate, resolve_device


def sample_clients(num_clients: int, per_round: int, seed: int, server_round: int) -> list[int]:
    """Indices of the clients sampled in ``server_round`` (deterministic by seed and round)."""
    rng = np.random.default_rng([seed, server_round, 7])
    return sorted(rng.choice(num_clients, size=min(per_round, num_clients), replace=False).tolist())


def client_profile(cfg: FedConfig, partition_id: int, node_id: int = 0) -> ClientProfile:
    """The profile the server assumes for a client (one rank for all in homogeneous runs)."""
    return ClientProfile(partition_id=partition_id, rank=cfg.model.rank, node_id=node_id)


@dataclass
class EvalResult:
    accuracy: float
    loss: float
    examples: int
    seconds: float


def evaluate_global(cfg: FedConfig, method: Method, state: Payload, workspace: Workspace,
                    subset: int) -> EvalResult:
    """Accuracy of the global adapter on the held-out split (or its fixed subset)."""
    start = time.perf_counter()
    device = resolve_device(cfg.train.device)
    adapter = workspace.adapter_model(cfg.model.rank)
    adapter.model.to(device)
    method.load_global(adapter, state)
    data = workspace.test_set(subset)
    accuracy, loss = evaluate(adapter.model, data, cfg.eval.batch_size, device)
    return EvalResult(accuracy, loss, len(data), time.perf_counter() - start)


def eval_due(cfg: FedConfig, server_round: int) -> bool:
    """Round 0 and the last round always; in between every ``eval.every`` rounds."""
    last = cfg.federation.rounds
    return server_round in (0, last) or server_round % cfg.eval.every == 0


def eval_subset(cfg: FedConfig, server_round: int) -> int:
    """The final round is scored on the whole held-out split."""
    return 0 if server_round == cfg.federation.rounds else cfg.eval.subset
