"""One client's round, free of Flower: load the downlink, train locally, build the uplink.

The ClientApp wraps this for Flower; the single-process reference loop in ``simulations/`` calls
it directly, so both do exactly the same work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from fedpeft.strategies import Method

from fedpeft.config import FedConfig
from fedpeft.payload import ClientState, Payload
from fedpeft.runtime import Workspace
from fedpeft.training import make_optimizer, resolve_device, train_steps


@dataclass
class ClientResult:
    payload: Payload
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def learning_rate(cfg: FedConfig, method: Method) -> float:
    """``train.lr``, or the method's own default when it is 0."""
    return cfg.train.lr or method.default_lr or 0.002


def client_round(
    cfg: FedConfig,
    method: Method,
    workspace: Workspace,
    downlink: Payload,
    *,
    partition_id: int,
    rank: int,
    server_round: int,
    client_state: ClientState,
) -> ClientResult:
    start = time.perf_counter()
    device = resolve_device(cfg.train.device)
    data = workspace.partition(partition_id, cfg.federation.clients)
    adapter = workspace.adapter_model(rank)
    adapter.model.to(device)
    method.load(adapter, downlink, client_state)
    adapter.set_trainable(method.trainable(adapter))
    params = [adapter.params[k] for k in adapter.trainable_keys()]
    optimizer = make_optimizer(params, cfg.train.optimizer, learning_rate(cfg, method),
                               cfg.train.weight_decay)
    rng = np.random.default_rng([cfg.federation.seed, server_round, partition_id])
    result = train_steps(
        adapter.model, data, steps=cfg.train.local_steps, batch_size=cfg.train.batch_size,
        optimizer=optimizer, rng=rng, device=device, extra_loss=method.extra_loss(adapter),
    )
    uplink = method.uplink(adapter, downlink, client_state)
    metrics = {
        "train_loss": result.loss,
        "train_s": result.seconds,
        "client_s": time.perf_counter() - start,
        "partition_id": float(partition_id),
        "rank": float(rank),
    }
    return ClientResult(uplink, len(data), metrics)
