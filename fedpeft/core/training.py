"""Local training: batches of encoded examples (a task tokenised them once and pads per batch),
optimizer steps on ``model(**batch).loss``, only the real work timed. Evaluation is the task's
(``fedpeft.core.tasks``)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedpeft.core.precision import resolve_precision
from fedpeft.core.tasks import Batchable
from fedpeft.core.tasks.classification import Encoded, encode, evaluate

if TYPE_CHECKING:
    from fedpeft.core.adapters import AdapterModel
    from fedpeft.core.config import TrainConfig

# Encoded/encode/evaluate: the classification task's
__all__ = ["Encoded", "TrainResult", "autocast", "bf16_frozen_weights", "client_optimizer",
           "encode", "evaluate", "lr_factor", "make_optimizer", "micro_batches",
           "resolve_device", "sample_batches", "train_steps"]


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
    tokens: int = 0  # input tokens the steps ran on (padding excluded)


def lr_factor(schedule: str, server_round: int, rounds: int) -> float:
    """The multiplier ``train.lr_schedule`` gives the client rates in round ``server_round``
    (1-based) of ``rounds``: 1 for 'constant'; for 'cosine', (1 + cos(pi (t - 1) / rounds)) / 2,
    1 in round 1 and above 0 in the last. A round outside 1..rounds (a run extended on resume)
    takes the rate of the nearest planned round."""
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown train.lr_schedule {schedule!r}")
    t = min(max(server_round, 1), max(rounds, 1))
    return 0.5 * (1.0 + math.cos(math.pi * (t - 1) / max(rounds, 1)))


def make_optimizer(params: list[torch.nn.Parameter] | list[dict[str, Any]], name: str, lr: float,
                   weight_decay: float, momentum: float = 0.0) -> torch.optim.Optimizer:
    """``params``: tensors, or torch parameter groups (each may carry its own ``lr``)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def client_optimizer(adapter: AdapterModel, train: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """``train.optimizer`` over every trainable tensor of ``adapter`` at ``lr``, except the task
    head (adapter tensors that are not LoRA factors) at ``train.head_lr`` when it is set: a fresh
    head is a few hundred coordinates with a strong gradient each, LoRA B tens of thousands of
    weak ones, so one rate rarely suits both (and under DP-SGD each coordinate gets the same
    noise)."""
    head_ids = {id(adapter.params[k]) for k in adapter.head_keys}
    params = adapter.trainable_params()
    head = [p for p in params if id(p) in head_ids]
    rest = [p for p in params if id(p) not in head_ids]
    groups = [g for g in ({"params": rest, "lr": lr},
                          {"params": head, "lr": train.head_lr or lr}) if g["params"]]
    return make_optimizer(groups, train.optimizer, lr, train.weight_decay, train.momentum)


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
    accumulate: int = 1,
    precision: str = "auto",
) -> TrainResult:
    """Run ``steps`` optimizer steps; ``extra_loss`` lets a method add a regulariser. Each batch
    runs as ``accumulate`` micro-batches (``train.accumulate``: memory only), their losses
    weighted by their share of the batch's examples, one optimizer step per batch. Forward
    passes run under ``precision`` (:func:`autocast`); the backward
    pass follows the forward's dtypes; a regulariser and the optimizer step are float32."""
    model.train()
    bf16 = resolve_precision(precision, device) == "bf16"
    with bf16_frozen_weights(model) if bf16 else contextlib.nullcontext():
        return _train_loop(model, data, steps=steps, batch_size=batch_size, optimizer=optimizer,
                           rng=rng, device=device, extra_loss=extra_loss, accumulate=accumulate,
                           precision=precision)


def _train_loop(model: torch.nn.Module, data: Batchable, *, steps: int, batch_size: int,
                optimizer: torch.optim.Optimizer, rng: np.random.Generator, device: torch.device,
                extra_loss: Callable[[], torch.Tensor] | None, accumulate: int,
                precision: str) -> TrainResult:
    losses, examples, tokens, busy = [], 0, 0, 0.0
    for indices in sample_batches(len(data), batch_size, steps, rng):
        optimizer.zero_grad(set_to_none=True)
        chunks = micro_batches(data, indices, accumulate)
        step_loss = 0.0
        for i, chunk in enumerate(chunks):
            batch = {k: v.to(device) for k, v in data.batch(chunk).items()}
            tokens += count_tokens(batch)
            start = time.perf_counter()
            with autocast(precision, device):
                loss = model(**batch).loss * (len(chunk) / len(indices))
            if extra_loss is not None and i == len(chunks) - 1:
                loss = loss + extra_loss()
            loss.backward()
            busy += time.perf_counter() - start
            step_loss += float(loss.detach())
        start = time.perf_counter()
        optimizer.step()
        busy += time.perf_counter() - start
        losses.append(step_loss)
        examples += len(indices)
    return TrainResult(float(np.mean(losses)), len(losses), examples, busy, tokens)


def micro_batches(data: Batchable, indices: np.ndarray, parts: int) -> list[np.ndarray]:
    """``indices`` as ``parts`` micro-batches (``train.accumulate``) of examples of similar
    length: each micro-batch pads to its own longest example, so grouping by length first cuts
    the padded tokens the frozen base runs on, while the step still sums the same examples."""
    parts = max(1, min(parts, len(indices)))
    if parts > 1:
        indices = indices[np.argsort(data.lengths(indices), kind="stable")]
    return np.array_split(indices, parts)


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Input tokens of a collated batch, padding excluded."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def autocast(precision: str, device: torch.device,
             model: torch.nn.Module | None = None) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision`` 'bf16' (or 'auto' resolved to it,
    ``fedpeft.core.precision``): the matmuls of the frozen base and of the LoRA layers run in
    bfloat16 and so do the activations between them (CPU autocast leaves layer norm, softmax
    and GELU on their bfloat16 inputs; their kernels accumulate in float32), while the
    parameters (LoRA factors, head), their gradients, the optimizer state and the loss stay
    float32 (cross-entropy runs in float32). With ``model``, its frozen weights are also held
    in bfloat16 for the block (:func:`bf16_frozen_weights`). 'fp32': nothing."""
    if resolve_precision(precision, device) != "bf16":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    if model is not None:
        stack.enter_context(bf16_frozen_weights(model))
    stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    return stack


BF16_COPY = "_fedpeft_bf16_weight"  # a module attribute: (source version, source ptr, copy)


@contextlib.contextmanager
def bf16_frozen_weights(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block, every frozen float32 ``nn.Linear`` of ``model`` computes with a
    bfloat16 copy of its weight: autocast would round the weight to bfloat16 on every call
    anyway (it caches casts only of tensors that require grad), so the results are the same
    bit for bit while the per-call cast of the whole base is saved (SmolLM2: its output layer
    alone is 49,152 x 576). Each layer gets the copy as its own parameter for the block, so a
    weight tied to an embedding (a causal LM's output layer) leaves the embedding float32. The
    copies are kept on the modules and remade when the float32 weight was written in place
    (``copy_`` in a method's base merge or ``reset_base``: its version changes) or replaced;
    they cost half the float32 size of the Linear layers."""
    swapped: list[tuple[torch.nn.Module, torch.nn.Parameter]] = []
    try:
        for module in model.modules():
            weight = module.weight if isinstance(module, torch.nn.Linear) else None
            if (not isinstance(weight, torch.nn.Parameter) or weight.requires_grad
                    or weight.dtype != torch.float32):
                continue
            key = (weight._version, weight.data_ptr())  # in-place writes bump the version
            cached = module.__dict__.get(BF16_COPY)
            if cached is None or cached[:2] != key:
                copy = torch.nn.Parameter(weight.detach().to(torch.bfloat16),
                                          requires_grad=False)
                cached = (*key, copy)
                module.__dict__[BF16_COPY] = cached
            module.weight = cached[2]
            swapped.append((module, weight))
        yield
    finally:
        for module, weight in swapped:
            module.weight = weight


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
