"""Local training: batches of encoded examples (a task tokenised them once and pads per batch),
optimizer steps on ``model(**batch).loss``, only the real work timed. Evaluation is the task's
(``fedpeft.core.tasks``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fedpeft.core.tasks import Batchable
from fedpeft.core.tasks.classification import Encoded, encode, evaluate

__all__ = ["Encoded", "TrainResult", "encode", "evaluate", "make_optimizer", "resolve_device",
           "sample_batches", "train_steps"]  # Encoded/encode/evaluate: the classification task's


def sample_batches(n: int, batch_size: int, steps: int,
                   rng: np.random.Generator) -> Iterator[np.ndarray]:
    """``steps`` batches from shuffled epochs over ``n`` examples."""
    order = rng.permutation(n)
    pos = 0
    for _ in range(steps):
        if pos >= n:
            order, pos = rng.permutation(n), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


@dataclass
class TrainResult:
    loss: float
    steps: int
    examples: int
    seconds: float  # forward + backward + optimizer only


def make_optimizer(params: list[torch.nn.Parameter], name: str, lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def train_steps(
    model: torch.nn.Module,
    data: Batchable,
    *,
    steps: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
    device: torch.device,
    extra_loss: Callable[[], torch.Tensor] | None = None,
) -> TrainResult:
    """Run ``steps`` optimizer steps; ``extra_loss`` lets a method add a regulariser."""
    model.train()
    losses, examples, busy = [], 0, 0.0
    for indices in sample_batches(len(data), batch_size, steps, rng):
        batch = {k: v.to(device) for k, v in data.batch(indices).items()}
        start = time.perf_counter()
        loss = model(**batch).loss
        if extra_loss is not None:
            loss = loss + extra_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        busy += time.perf_counter() - start
        losses.append(float(loss.detach()))
        examples += len(indices)
    return TrainResult(float(np.mean(losses)), len(losses), examples, busy)


def resolve_device(name: str) -> torch.device:
    """The requested device, or a clear error if CUDA is asked for and absent."""
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available on this host")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise RuntimeError(f"device {name!r} requested but only "
                               f"{torch.cuda.device_count()} CUDA device(s) exist")
    return torch.device(name)
