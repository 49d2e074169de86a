"""Upload validation: nothing malformed or non-finite reaches a method's aggregate."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from fedpeft.strategies.base import Bound

from fedpeft.core.keys import NUM_EXAMPLES
from fedpeft.core.payload import Payload, Tensors, update_norm


def check_upload(payload: Payload, expected: dict[str, tuple[int, ...]],
                 max_norm: float = 0.0, reference: Tensors | None = None) -> str | None:
    """The reason an upload must be rejected, or None if it is well formed.

    ``reference``: what the client was sent. A tensor it was sent must come back in the same
    dtype, and with ``max_norm`` > 0 the bound applies to the update (upload minus reference on
    the keys it was sent, the upload itself on the others); without a reference, to the upload.
    """
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
        sent = reference.get(key) if reference is not None else None
        if sent is not None and tensor.dtype != sent.dtype:
            return f"{key}: dtype {tensor.dtype}, expected {sent.dtype}"
        if not bool(torch.isfinite(tensor).all()):
            return f"{key}: contains NaN or Inf"
    if max_norm > 0:
        norm = update_norm(payload.tensors, reference or {})
        if not norm <= max_norm:
            return f"update norm {norm:.3g} exceeds the bound {max_norm:.3g}"
    return None


# The largest magnitude a reply's metric may have: far above any real count, seconds or loss,
# far below what overflows a float sum of a few thousand of them.
MAX_METRIC = 1e15
MAX_METRICS = 256  # keys in one reply's metrics record


def check_metrics(metrics: Mapping[str, object] | None) -> tuple[dict[str, float], str | None]:
    """A reply's metrics as plain floats, or the reason the reply must be rejected: every value
    must be a finite number of bounded size (Flower's MetricRecord also allows lists: a client
    of ours never sends one). Nothing in a reply is trusted."""
    if metrics is None:
        return {}, "no metrics record"
    if len(metrics) > MAX_METRICS:
        return {}, f"{len(metrics)} metrics (at most {MAX_METRICS})"
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            return {}, f"metric key {key!r} is not a string"
        if not isinstance(value, int | float):  # bool is an int: a flag
            return {}, f"metric {key[:40]!r} is a {type(value).__name__}, not a number"
        if not math.isfinite(value) or abs(value) > MAX_METRIC:
            return {}, f"metric {key[:40]!r} = {value!r} is not a finite number of sane size"
        clean[key] = float(value)
    return clean, None


def check_examples(metrics: Mapping[str, object] | None) -> str | None:
    """The reason a reply's example count is unusable (it weights the reply), or None."""
    if metrics is None:
        return "no metrics record"
    value = metrics.get(NUM_EXAMPLES)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{NUM_EXAMPLES} missing or not a number ({value!r})"
    if not math.isfinite(value) or value != int(value) or value < 1:
        return f"{NUM_EXAMPLES} = {value!r}: expected a positive integer"
    return None


def check_scalars(scalars: Mapping[str, object], bounds: Mapping[str, Bound]
                  ) -> tuple[dict[str, int | float], str | None]:
    """An upload's scalars, each a plain number within the bound its method declares (whole
    numbers as ``int``), or the reason the upload must be rejected: an undeclared or missing
    scalar, a value that is not a finite number (a list, a string, inf), or one out of range.
    The method sees only what passes."""
    extra = sorted(k for k in scalars if k not in bounds)
    if extra:
        return {}, f"unexpected scalars {[str(k)[:40] for k in extra[:3]]}"
    clean: dict[str, int | float] = {}
    for key, bound in bounds.items():
        if key not in scalars:
            if bound.required:
                return {}, f"scalar {key!r} missing"
            continue
        value = scalars[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
                value):
            return {}, f"scalar {key!r} = {str(value)[:40]!r} is not a finite number"
        if bound.integer and value != int(value):
            return {}, f"scalar {key!r} = {value!r} is not a whole number"
        if not bound.low <= value <= bound.high:
            return {}, f"scalar {key!r} = {value!r} outside [{bound.low:g}, {bound.high:g}]"
        clean[key] = int(value) if bound.integer else float(value)
    return clean, None


MAX_FINGERPRINT = 64  # characters of a client's base fingerprint (ours: 16 hex digits)


def check_fingerprint(sent: object, own: str, model: str) -> str | None:
    """The reason a reply's base-model fingerprint (``fedpeft.core.fingerprint``) refuses it,
    or None when it equals the server's ``own``. ``sent`` is whatever the reply carried; None
    (no fingerprint: a client older than the check) is the caller's to allow."""
    if sent is None:
        return None
    if (not isinstance(sent, str) or not 0 < len(sent) <= MAX_FINGERPRINT
            or not all(c in "0123456789abcdef" for c in sent)):
        return (f"malformed base model fingerprint {str(sent)[:MAX_FINGERPRINT]!r} "
                f"({type(sent).__name__}; expected up to {MAX_FINGERPRINT} hex digits)")
    if sent != own:
        return (f"base model fingerprint {sent} differs from the server's {own} "
                f"(model.name = {model!r}): every party must hold the same frozen base "
                "(the same weight files, the same model.dtype)")
    return None


def all_finite(tensors: Tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())
