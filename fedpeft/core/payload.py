"""The unit that crosses the wire: named tensors plus a few scalars (peft state-dict key names)."""

from __future__ import annotations

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
