"""The vector a client masks: its upload's tensors as updates against the downlink, flattened in
one agreed order, and the inverse on the server. Updates, not raw tensors: they are small, so a
small ``clip_range`` keeps the fixed-point step fine; the server adds the reference back."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch

Shapes = Mapping[str, tuple[int, ...]]


def layout_digest(shapes: Shapes) -> str:
    """A digest of the keys and shapes in order: both sides check they flatten alike."""
    text = ";".join(f"{k}:{'x'.join(map(str, shapes[k]))}" for k in sorted(shapes))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def layout_size(shapes: Shapes) -> int:
    return int(sum(int(np.prod(s)) for s in shapes.values()))


def flatten_update(tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                   shapes: Shapes) -> np.ndarray:
    """``tensors - reference`` over the layout's keys, as one float64 vector."""
    parts = []
    for k in sorted(shapes):
        t = tensors[k]
        if tuple(t.shape) != tuple(shapes[k]):
            raise ValueError(f"{k}: shape {tuple(t.shape)}, the layout says {tuple(shapes[k])}")
        parts.append((t.detach().double() - reference[k].detach().double()).reshape(-1).numpy())
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten_update(vector: np.ndarray, reference: Mapping[str, torch.Tensor],
                     shapes: Shapes) -> dict[str, torch.Tensor]:
    """``reference + vector`` per key, in the reference's dtype."""
    out, at = {}, 0
    for k in sorted(shapes):
        size = int(np.prod(shapes[k]))
        part = torch.from_numpy(vector[at:at + size].reshape(shapes[k]).copy())
        out[k] = (reference[k].double() + part).to(reference[k].dtype)
        at += size
    if at != vector.size:
        raise ValueError(f"the vector has {vector.size} values, the layout {at}")
    return out
