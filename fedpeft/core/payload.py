"""The unit that crosses the wire: named tensors plus a few scalars (peft state-dict key names)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

Tensors = dict[str, torch.Tensor]
Scalar = int | float | str | bool


@dataclass
class Payload:
    """What crosses the wire (or a method's server state): tensors plus a few scalars."""

    tensors: Tensors = field(default_factory=dict)
    scalars: dict[str, Scalar] = field(default_factory=dict)


@dataclass
class ClientState:
    """Per-client state that outlives a round (backed by Flower's ``Context.state``)."""

    tensors: Tensors = field(default_factory=dict)
    values: dict[str, Scalar] = field(default_factory=dict)


def update_norm(tensors: Tensors, reference: Tensors) -> float:
    """L2 norm of ``tensors`` minus ``reference`` (where a same-shaped reference exists)."""
    total = 0.0
    for key, tensor in tensors.items():
        value = tensor.double()
        sent = reference.get(key)
        if sent is not None and sent.shape == tensor.shape:
            value = value - sent.double()
        total += float((value ** 2).sum())
    return math.sqrt(total)
