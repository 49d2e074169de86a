"""A client's evaluation round, free of Flower: put the global model (joined with the client's
personal parts, for a personalised method) into the local model, optionally fine-tune it for
``eval.personalize_steps`` steps, score it on the client's own held-out examples and return
figures only (``docs/evaluation.md``).

Nothing the client keeps changes: the method loads into a copy of the client state, and the
fine-tuning steps train a throwaway copy of the adapter values (the shared model object is
reloaded by the next round anyway).
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from fedpeft.strategies import Method

from fedpeft.core.adapters import AdapterModel
from fedpeft.core.config import FedConfig
from fedpeft.core.keys import (
    EVAL_ACCURACY,
    EVAL_LOSS,
    EVAL_PERPLEXITY,
    EVAL_SECONDS,
    NUM_EXAMPLES,
)
from fedpeft.core.payload import ClientState, Payload
from fedpeft.core.training import client_optimizer, resolve_device, train_steps
from fedpeft.core.workspace import Workspace

from .trainer import round_rates, torch_seeded

# numpy SeedSequence stream of the personalisation steps' batches (apart from training's)
PERSONALIZE_STREAM = 11


def client_evaluate(cfg: FedConfig, method: Method, workspace: Workspace, downlink: Payload, *,
                    partition_id: int, rank: int, server_round: int,
                    client_state: ClientState) -> dict[str, float]:
    """The figures of one client on its holdout: ``num-examples`` and ``eval_loss`` always,
    ``eval_accuracy`` for a label task, ``eval_perplexity`` for a causal LM, ``eval_s``. A client
    whose holdout is empty (fewer than two examples) reports ``num-examples`` = 0."""
    start = time.perf_counter()
    clients = cfg.federation.clients
    holdout = workspace.holdout(partition_id, clients, cfg.eval.client_holdout)
    if len(holdout) == 0:
        return {NUM_EXAMPLES: 0.0, EVAL_SECONDS: time.perf_counter() - start}
    device = resolve_device(cfg.train.device)
    adapter = workspace.adapter_model(rank)
    adapter.model.to(device)
    adapter.reset_base()
    method.load(adapter, downlink, copy.deepcopy(client_state))
    if cfg.eval.personalize_steps:
        personalize(cfg, method, workspace, adapter, partition_id, server_round, device)
    ev = workspace.task.evaluate(adapter.model, holdout, cfg.eval.batch_size, device)
    figures = {NUM_EXAMPLES: float(ev.examples), EVAL_LOSS: float(ev.loss)}
    if ev.accuracy is not None:
        figures[EVAL_ACCURACY] = float(ev.accuracy)
    if "perplexity" in ev.extra:
        figures[EVAL_PERPLEXITY] = float(ev.extra["perplexity"])
    figures[EVAL_SECONDS] = time.perf_counter() - start
    return figures


def personalize(cfg: FedConfig, method: Method, workspace: Workspace, adapter: AdapterModel,
                partition_id: int, server_round: int, device: torch.device) -> None:
    """``eval.personalize_steps`` local steps on the client's training examples (the method's
    trainable tensors, the run's optimizer and the round's learning rate), seeded apart from
    training."""
    data = workspace.partition(partition_id, cfg.federation.clients, cfg.eval.client_holdout)
    spec = method.train_spec(adapter)
    adapter.set_trainable(spec.keys)
    round_cfg, lr = round_rates(cfg, method, server_round)
    optimizer = client_optimizer(adapter, round_cfg.train, lr)
    parts = [cfg.federation.seed, server_round, partition_id, PERSONALIZE_STREAM]
    with torch_seeded(parts, device):
        train_steps(adapter.model, data, steps=cfg.eval.personalize_steps,
                    batch_size=cfg.train.batch_size, optimizer=optimizer,
                    rng=np.random.default_rng(parts), device=device,
                    extra_loss=spec.extra_loss, accumulate=cfg.train.accumulate,
                    precision=cfg.train.precision)
