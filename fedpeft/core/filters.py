"""Compression filters: what one float vector becomes on the wire, and back.

A chain is written as a list of strings, e.g. ``["topk:0.1", "int8"]``, and has at most three
stages, in this order:

1. an optional *sparsifier*, ``topk:FRACTION``: keep the ``ceil(FRACTION * n)`` entries of largest
   magnitude (exact zeros dropped), sent as a bitmap or as sorted indices, whichever is smaller;
2. an optional *value encoding* of the (kept) values:
   ``fp16`` / ``bf16`` casts; blockwise ``int8[:BLOCK]`` (levels -127..127) and ``int4[:BLOCK]``
   (levels -7..7, two per byte), each block with its float32 absmax scale; or ``sign``
   (ComPEFT-style, needs ``topk`` before it): one sign bit per kept value plus one scale per
   tensor, the mean magnitude (the least-squares scale for a sign vector);
3. an optional lossless ``deflate`` of the whole packed buffer (zlib): quantised levels of an
   update are far from uniform (most sit near zero), so entropy coding shrinks them further.
   It is applied by the packing layer to the buffer, not per tensor.

Sparsification and ``sign`` only make sense on an *update* (upload minus what the client was
sent): the packing layer (``fedpeft.core.packing``) applies them to deltas and keeps the client's
error feedback. This module is numpy only (no torch), so the config can parse chains cheaply.

Decoding never trusts sizes it has not computed itself: :func:`layout` gives the exact parts a
vector of ``n`` values encodes to, and :func:`decode` checks the parts against it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class FilterError(ValueError):
    """A chain that cannot be parsed, or encoded bytes that do not match their description."""


CASTS = ("fp16", "bf16")
QUANT = {"int8": 127, "int4": 7}  # name -> largest level
DEFAULT_BLOCK = {"int8": 256, "int4": 64}
MAX_BLOCK = 1 << 20
ACCEPTED = ("fp16, bf16, int8[:BLOCK] (block 8..1048576, default 256), int4[:BLOCK] (default 64), "
            "topk:FRACTION (0 < FRACTION <= 1), sign (after topk), deflate (last, lossless)")
BITMAP, INDEX = "bitmap", "index"


@dataclass(frozen=True)
class Chain:
    """A parsed filter chain; ``specs`` is its normal form (what travels in the manifest)."""

    topk: float | None = None
    codec: str | None = None  # fp16 | bf16 | int8 | int4 | sign | None (float32 values)
    block: int = 0
    deflate: bool = False  # the packed buffer is zlib-compressed (lossless, whole buffer)

    @property
    def specs(self) -> list[str]:
        out = [f"topk:{self.topk!r}"] if self.topk is not None else []
        if self.codec in QUANT:
            out.append(f"{self.codec}:{self.block}")
        elif self.codec:
            out.append(self.codec)
        return out + ["deflate"] * self.deflate

    @property
    def lossy(self) -> bool:
        return self.topk is not None or self.codec is not None

    def per_tensor(self) -> Chain:
        """What acts on each tensor (the chain without the buffer-wide ``deflate``)."""
        return Chain(self.topk, self.codec, self.block)

    @property
    def needs_reference(self) -> bool:
        """Sparsification acts on updates: the encoder needs what the receiver already holds."""
        return self.topk is not None

    def absolute(self) -> Chain:
        """The chain for a tensor with no reference: its value encoding alone, unless that
        encoding only makes sense after top-k (``sign``), then nothing (sent as is)."""
        if self.codec in (None, "sign"):
            return Chain()
        return Chain(codec=self.codec, block=self.block)


def _parse_one(text: str) -> tuple[str, float | int | None]:
    name, sep, param = (s.strip() for s in text.partition(":"))
    if name in (*CASTS, "sign", "deflate"):
        if sep:
            raise FilterError(f"filter {text!r} takes no parameter")
        return name, None
    if name in QUANT:
        if not sep:
            return name, DEFAULT_BLOCK[name]
        if not param.isdigit() or not 8 <= int(param) <= MAX_BLOCK:
            raise FilterError(f"filter {text!r}: the block size must be an integer in "
                              f"8..{MAX_BLOCK}")
        return name, int(param)
    if name == "topk":
        try:
            fraction = float(param)
        except ValueError:
            fraction = math.nan
        if not 0 < fraction <= 1:
            raise FilterError(f"filter {text!r}: expected topk:FRACTION with 0 < FRACTION <= 1")
        return name, fraction
    raise FilterError(f"unknown filter {text!r}")


def parse_chain(specs: Sequence[str]) -> Chain:
    """Parse and check a chain; :class:`FilterError` names the problem and the accepted filters."""
    if isinstance(specs, str) or not all(isinstance(s, str) for s in specs):
        raise FilterError(f"{specs!r}: expected a list of filter names; accepted: {ACCEPTED}")
    topk: float | None = None
    codec: str | None = None
    block = 0
    deflate = False
    for text in specs:
        try:
            name, param = _parse_one(text)
        except FilterError as exc:
            raise FilterError(f"{exc}; accepted: {ACCEPTED}") from None
        if deflate:
            raise FilterError("'deflate' compresses the finished buffer: it comes last, once")
        if name == "deflate":
            deflate = True
            continue
        if name == "topk":
            if topk is not None or codec is not None:
                raise FilterError("topk must come first and only once")
            topk = float(param)  # type: ignore[arg-type]
            continue
        if codec is not None:
            raise FilterError(f"one value encoding at most ({codec!r} and {name!r}); e.g. "
                              "['topk:0.1', 'int8']")
        if name == "sign" and topk is None:
            raise FilterError("'sign' keeps one scale per tensor and needs 'topk:FRACTION' "
                              "before it (ComPEFT), e.g. ['topk:0.1', 'sign']")
        codec, block = name, int(param or 0)
    return Chain(topk, codec, block, deflate)


# --- layout: the parts a vector encodes to (the decoder's size check) ---

Layout = list[tuple[np.dtype, int]]


def index_layout(n: int, nnz: int) -> tuple[str, Layout]:
    """The cheaper way to say which ``nnz`` of ``n`` entries were kept."""
    bitmap = -(-n // 8)
    width = np.dtype(np.uint16 if n <= 1 << 16 else np.uint32)
    if nnz * width.itemsize < bitmap:
        return INDEX, [(width, nnz)]
    return BITMAP, [(np.dtype(np.uint8), bitmap)]


def value_layout(codec: str | None, block: int, m: int) -> Layout:
    if codec is None:
        return [(np.dtype(np.float32), m)]
    if codec == "fp16":
        return [(np.dtype(np.float16), m)]
    if codec == "bf16":
        return [(np.dtype(np.uint16), m)]
    if codec == "sign":
        return [(np.dtype(np.uint8), -(-m // 8)), (np.dtype(np.float32), 1 if m else 0)]
    data = m if codec == "int8" else -(-m // 2)
    dtype = np.int8 if codec == "int8" else np.uint8
    return [(np.dtype(dtype), data), (np.dtype(np.float32), -(-m // block))]


def layout(chain: Chain, n: int, nnz: int | None = None, index: str | None = None) -> Layout:
    """Exact parts for ``n`` values (``nnz`` kept, by ``index``, when the chain has top-k)."""
    if chain.topk is None:
        return value_layout(chain.codec, chain.block, n)
    if nnz is None or not 0 <= nnz <= n:
        raise FilterError(f"{nnz!r} kept values of {n}")
    kind, parts = index_layout(n, nnz)
    if index != kind:
        raise FilterError(f"{nnz} of {n} kept values are sent as a {kind}, not {index!r}")
    return parts + value_layout(chain.codec, chain.block, nnz)


def nbytes(parts: Layout) -> int:
    return sum(dtype.itemsize * count for dtype, count in parts)


# --- encoding ---


@dataclass
class Encoded:
    parts: list[np.ndarray]
    nnz: int | None = None
    index: str | None = None


def encode(values: np.ndarray, chain: Chain) -> Encoded:
    """Encode a 1-D float32 vector (finite values: the caller sends non-finite ones as is)."""
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if chain.topk is None:
        return Encoded(encode_values(values, chain.codec, chain.block))
    n = values.size
    k = min(n, math.ceil(chain.topk * n))
    keep = np.argpartition(-np.abs(values), k - 1)[:k] if k else np.zeros(0, np.int64)
    keep = np.sort(keep[values[keep] != 0])
    index, parts = index_layout(n, keep.size)
    if index == BITMAP:
        mask = np.zeros(n, dtype=bool)
        mask[keep] = True
        where = np.packbits(mask, bitorder="little")
    else:
        where = keep.astype(parts[0][0])
    return Encoded([where, *encode_values(values[keep], chain.codec, chain.block)],
                   int(keep.size), index)


def encode_values(values: np.ndarray, codec: str | None, block: int) -> list[np.ndarray]:
    if codec is None:
        return [values]
    if codec == "fp16":
        return [values.astype(np.float16)]
    if codec == "bf16":
        return [to_bf16(values)]
    if codec == "sign":
        scale = np.abs(values).mean(dtype=np.float64) if values.size else 0.0
        signs = np.packbits(values > 0, bitorder="little")
        return [signs, np.full(1 if values.size else 0, scale, dtype=np.float32)]
    return quantise(values, QUANT[codec], block)


def quantise(values: np.ndarray, top: int, block: int) -> list[np.ndarray]:
    """Blockwise absmax quantisation to the integer levels -top..top."""
    m = values.size
    padded = np.zeros(-(-m // block) * block, dtype=np.float32)
    padded[:m] = values
    blocks = padded.reshape(-1, block)
    scale = (np.abs(blocks).max(axis=1) / top).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)[:, None]
    levels = np.clip(np.rint(blocks / safe), -top, top).astype(np.int8).reshape(-1)[:m]
    if top == QUANT["int8"]:
        return [levels, scale]
    nibbles = np.zeros(m + m % 2, dtype=np.uint8)
    nibbles[:m] = (levels + 8).astype(np.uint8)
    return [(nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8), scale]


def to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even; NaN stays NaN)."""
    bits = values.astype(np.float32).view(np.uint32)
    rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
    return np.where(np.isnan(values), 0x7FC0, rounded).astype(np.uint16)


def from_bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


# --- decoding ---


def decode(parts: list[np.ndarray], chain: Chain, n: int, nnz: int | None = None,
           index: str | None = None) -> np.ndarray:
    """The float32 vector of ``n`` values that ``parts`` encode. The parts must match
    :func:`layout` (the caller slices them from the buffer by it); indices are checked."""
    expected = layout(chain, n, nnz, index)
    if [(p.dtype, p.size) for p in parts] != expected:
        raise FilterError("encoded parts do not match the declared layout")
    if chain.topk is None:
        return decode_values(parts, chain, n)
    assert nnz is not None
    where, rest = parts[0], parts[1:]
    if index == BITMAP:
        keep = np.flatnonzero(np.unpackbits(where, count=n, bitorder="little"))
        if keep.size != nnz:
            raise FilterError(f"the bitmap marks {keep.size} values, not the declared {nnz}")
    else:
        keep = where.astype(np.int64)
        if nnz and (keep[-1] >= n or (nnz > 1 and not np.all(np.diff(keep) > 0))):
            raise FilterError("top-k indices are not increasing within the tensor")
    out = np.zeros(n, dtype=np.float32)
    out[keep] = decode_values(rest, chain, nnz)
    return out


def decode_values(parts: list[np.ndarray], chain: Chain, m: int) -> np.ndarray:
    codec = chain.codec
    if codec in (None, "fp16"):
        return parts[0].astype(np.float32)
    if codec == "bf16":
        return from_bf16(parts[0])
    if codec == "sign":
        signs = np.unpackbits(parts[0], count=m, bitorder="little").astype(np.float32)
        return (2 * signs - 1) * (parts[1][0] if m else np.float32(0))
    levels, scale = parts
    if codec == "int4":
        pairs = np.stack([levels & 0x0F, levels >> 4], axis=1).reshape(-1)[:m]
        levels = pairs.astype(np.int8) - 8
    return levels.astype(np.float32) * np.repeat(scale, chain.block)[:m]


def compression_refusal(method_cls: type, up: Sequence[str], down: Sequence[str]) -> str | None:
    """Why ``method_cls`` cannot run with these chains (None: it can). A method gives a
    ``compression_refusal`` reason (or ``compressible`` False) when lossy filters would break
    its maths; lossless chains (packing alone, ``deflate``) are always allowed."""
    reason = str(getattr(method_cls, "compression_refusal", "") or "")
    able = getattr(method_cls, "compressible", True)  # a flag or a classmethod
    lossy = parse_chain(up).lossy or parse_chain(down).lossy
    if not lossy or ((able() if callable(able) else able) and not reason):
        return None
    name = getattr(method_cls, "name", "") or method_cls.__name__
    reason = reason or "its maths need the exact tensors"
    return (f"[compression] up = {list(up)}, down = {list(down)} is not supported with "
            f"method.name = {name!r}: {reason}; use lossless chains only (none, or ['deflate'])")
