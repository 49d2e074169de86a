"""Local training and evaluation: tokenise once, pad per batch, time only the real work."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fedpeft.core.data import TextData


@dataclass(frozen=True)
class Encoded:
    """Token ids per example (unpadded) and labels: padding happens per batch."""

    ids: tuple[tuple[int, ...], ...]
    labels: np.ndarray
    pad_id: int

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        rows = [self.ids[i] for i in indices]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, row in enumerate(rows):
            input_ids[j, : len(row)] = torch.tensor(row)
            mask[j, : len(row)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": torch.as_tensor(self.labels[indices]),
        }


def encode(tokenizer: object, data: TextData, max_length: int) -> Encoded:
    out = tokenizer(list(data.texts), truncation=True, max_length=max_length)  # type: ignore[operator]
    return Encoded(tuple(tuple(x) for x in out["input_ids"]), data.labels,
                   tokenizer.pad_token_id)  # type: ignore[attr-defined]


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
    data: Encoded,
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


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Encoded, batch_size: int,
             device: torch.device) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over ``data``; batches sorted by length to pad less."""
    model.eval()
    order = np.argsort([len(x) for x in data.ids], kind="stable")
    correct, loss_sum = 0, 0.0
    for start in range(0, len(order), batch_size):
        batch = {k: v.to(device) for k, v in data.batch(order[start : start + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum += float(torch.nn.functional.cross_entropy(logits, batch["labels"],
                                                            reduction="sum"))
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return correct / len(data), loss_sum / len(data)


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
