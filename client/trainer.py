"""One client's round, free of Flower: load the downlink, train locally, build the uplink.

``client/step.py`` wraps it into a reply, for the ClientApp and the in-process transport alike,
so both do exactly the same work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from fedpeft.strategies import RANK_KEY, Method
from fedpeft.strategies.base import learning_rate

from fedpeft.core.config import FedConfig, client_holdout
from fedpeft.core.keys import (
    CLIENT_RANK,
    CLIENT_S,
    NEXT_RANK,
    PARTITION_ID,
    TRAIN_LOSS,
    TRAIN_S,
    TRAIN_TOKENS,
)
from fedpeft.core.payload import ClientState, Payload
from fedpeft.core.privacy import Accountant, clip_update, dp_train
from fedpeft.core.training import client_optimizer, lr_factor, resolve_device, train_steps
from fedpeft.core.workspace import Workspace

from .attacks import attacked_data


@dataclass
class ClientResult:
    payload: Payload
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    fingerprint: str = ""  # the frozen base's digest (fedpeft.core.fingerprint), for the reply


@contextlib.contextmanager
def torch_seeded(parts: list[int], device: torch.device) -> Iterator[None]:
    """Seed torch's global RNG (dropout) from ``parts`` inside the block, restoring it after:
    a client round is then a pure function of its inputs, whichever actor runs it (reproducible
    runs, bit-identical resume). Never around DP-SGD: its noise must not follow a public seed."""
    seed = int(np.random.SeedSequence([*parts, 5]).generate_state(1, np.uint64)[0] >> 1)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def client_lr(cfg: FedConfig, method: Method) -> float:
    """``train.lr``, or the method's own default when it is 0."""
    return learning_rate(cfg.train.lr, method)


def round_rates(cfg: FedConfig, method: Method, server_round: int) -> tuple[FedConfig, float]:
    """The client rate of ``server_round`` under ``train.lr_schedule``, and ``cfg`` with the
    head's own rate (``train.head_lr``, when set) scaled by the same factor."""
    factor = lr_factor(cfg.train.lr_schedule, server_round, cfg.federation.rounds)
    if factor != 1.0 and cfg.train.head_lr:
        train = dataclasses.replace(cfg.train, head_lr=cfg.train.head_lr * factor)
        cfg = dataclasses.replace(cfg, train=train)
    return cfg, client_lr(cfg, method) * factor


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
    ledger: Accountant | None = None,
) -> ClientResult:
    """One round of one client. Under DP-SGD its budget is the run's (kept in ``client_state``),
    or a device's lifetime budget when ``ledger`` (``fedpeft.core.ledger``) is given."""
    start = time.perf_counter()
    device = resolve_device(cfg.train.device)
    data = workspace.partition(partition_id, cfg.federation.clients, client_holdout(cfg))
    data = attacked_data(cfg, data, partition_id, workspace.task)  # [attacks] label-flip
    adapter = workspace.adapter_model(rank)
    adapter.model.to(device)
    adapter.reset_base()  # a shared model object: undo any base merge of another client/method
    method.load(adapter, downlink, client_state)
    spec = method.train_spec(adapter)
    adapter.set_trainable(spec.keys)
    dp_metrics: dict[str, float] = {}
    cfg, lr = round_rates(cfg, method, server_round)
    if cfg.privacy.enabled:  # DP-SGD (fedpeft.core.privacy): checks the model, own sampling + noise
        dp_result, dp_metrics = dp_train(adapter, data, cfg=cfg, lr=lr,
                                         device=device, client_state=client_state, ledger=ledger,
                                         extra_loss=spec.extra_loss)
        if dp_result is None:  # this client's privacy budget is spent: no training, no upload
            return ClientResult(Payload(), 0, {**dp_metrics, TRAIN_S: 0.0, CLIENT_RANK: float(rank),
                                               CLIENT_S: time.perf_counter() - start,
                                               PARTITION_ID: float(partition_id)},
                                workspace.base_fingerprint())
        result = dp_result
    else:
        # adapter tensors + base weights a method unfroze (the head at train.head_lr if set)
        optimizer = client_optimizer(adapter, cfg.train, lr)
        rng = np.random.default_rng([cfg.federation.seed, server_round, partition_id])
        with torch_seeded([cfg.federation.seed, server_round, partition_id], device):
            result = train_steps(
                adapter.model, data, steps=cfg.train.local_steps,
                batch_size=cfg.train.batch_size, optimizer=optimizer, rng=rng, device=device,
                extra_loss=spec.extra_loss, accumulate=cfg.train.accumulate,
                precision=cfg.train.precision,
            )
    uplink = method.uplink(adapter, downlink, client_state)
    if cfg.privacy.client_level == "client-fixed":  # Flower's client-side fixed clipping
        uplink = clip_update(uplink, downlink, cfg.privacy.client_clip)
    metrics = {
        TRAIN_LOSS: result.loss,
        TRAIN_S: result.seconds,
        TRAIN_TOKENS: float(result.tokens),
        CLIENT_S: time.perf_counter() - start,
        PARTITION_ID: float(partition_id),
        CLIENT_RANK: float(rank),
        NEXT_RANK: float(client_state.values.get(RANK_KEY, rank)),
        **dp_metrics,
        **method.client_metrics(client_state),
    }
    return ClientResult(uplink, len(data), metrics, workspace.base_fingerprint())
