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


VALUE_BYTES = 8  # the widest dtype a tensor may travel in (float64, int64)
DEFAULT_MAX_BYTES = 1 << 30  # decoded bytes when the receiver states nothing better


@dataclass(frozen=True)
class Expected:
    """What a receiver accepts, checked against a packed manifest before anything is inflated,
    copied or allocated: a sender's own declarations never size an allocation.

    ``shapes``: the exact keys and shapes (the server: the method's ``expected_upload``); None:
    any keys, only the byte budget holds (a device: it cannot know every method's downlink).
    ``dtypes``: the dtype of a key where the receiver knows it (what it sent); other keys may
    be any floating dtype. ``max_bytes``: the decoded bytes at most; by default
    ``VALUE_BYTES`` per expected value (``shapes``) or ``DEFAULT_MAX_BYTES``."""

    shapes: dict[str, tuple[int, ...]] | None = None
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    max_bytes: int | None = None

    @classmethod
    def like(cls, tensors: Tensors) -> Expected:
        """Exactly these keys, shapes and dtypes."""
        return cls({k: tuple(v.shape) for k, v in tensors.items()},
                   {k: v.dtype for k, v in tensors.items()})

    @property
    def limit(self) -> int:
        """Decoded bytes at most."""
        if self.max_bytes is not None:
            return self.max_bytes
        if self.shapes is None:
            return DEFAULT_MAX_BYTES
        return VALUE_BYTES * sum(math.prod(s) for s in self.shapes.values())

    @property
    def manifest_limit(self) -> int:
        """Bytes of a manifest's JSON at most: an entry is its key plus under 128 bytes."""
        if self.shapes is None:
            return min(4 << 20, max(64 << 10, self.limit // 16))
        return 1024 + sum(6 * len(k) + 128 for k in self.shapes)

    def refusal(self, key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> str | None:
        """Why a declared tensor is not what was expected (None: it is)."""
        if self.shapes is None:
            return None
        if key not in self.shapes:
            return f"unexpected tensor {key[:80]!r}"
        if tuple(self.shapes[key]) != tuple(shape):
            return f"{key}: shape {tuple(shape)[:8]}, expected {tuple(self.shapes[key])}"
        want = self.dtypes.get(key)
        if want is not None and dtype != want:
            return f"{key}: dtype {dtype}, expected {want}"
        if not dtype.is_floating_point:
            return f"{key}: dtype {dtype} is not floating point"
        return None

    def missing(self, keys: set[str]) -> list[str]:
        return sorted(set(self.shapes or ()) - keys)
