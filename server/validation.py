"""Upload validation: nothing malformed or non-finite reaches a method's aggregate."""

from __future__ import annotations

import torch

from fedpeft.payload import Payload


def check_upload(payload: Payload, expected: dict[str, tuple[int, ...]],
                 max_norm: float = 0.0) -> str | None:
    """The reason an upload must be rejected, or None if it is well formed."""
    missing = sorted(set(expected) - set(payload.tensors))
    if missing:
        return f"missing tensors {missing[:3]}"
    extra = sorted(set(payload.tensors) - set(expected))
    if extra:
        return f"unexpected tensors {extra[:3]}"
    for key, shape in expected.items():
        tensor = payload.tensors[key]
        if tuple(tensor.shape) != tuple(shape):
            return f"{key}: shape {tuple(tensor.shape)}, expected {tuple(shape)}"
        if not tensor.is_floating_point():
            return f"{key}: dtype {tensor.dtype} is not floating point"
        if not bool(torch.isfinite(tensor).all()):
            return f"{key}: contains NaN or Inf"
    if max_norm > 0:
        norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in payload.tensors.values())))
        if norm > max_norm:
            return f"update norm {norm:.3g} exceeds the bound {max_norm:.3g}"
    return None
