"""Packing: named tensors <-> one flat byte buffer plus a manifest that describes it.

The manifest (zlib-compressed JSON) holds the filter chain and, per tensor, its key, original
dtype and shape and how it was sent:

- ``raw``: its bytes as they are (any dtype; integer tensors and non-finite values always);
- ``abs``: its float values through the chain's value encoding (``Chain.absolute``);
- ``delta``: the update against a *reference* (what the receiver already holds, e.g. the
  downlink the client was sent), through the whole chain; the decoder adds the reference back.

Parts of a tensor follow each other in the buffer in manifest order; their sizes are not
declared but computed from shape, dtype and chain (``filters.layout``), and the buffer must be
exactly as long as the manifest says, before anything is decoded. A delta tensor's shape must be
the reference's, so nothing is ever allocated from a size that was not checked against bytes
already received or against the receiver's own tensors.

With ``deflate`` last in the chain the whole buffer is zlib-compressed; the receiver inflates
at most the size the manifest describes and rejects anything longer or shorter.

The receiver says what it expects (:class:`fedpeft.core.payload.Expected`: the exact keys,
shapes and dtypes, or at least a byte budget); a manifest that differs, or describes more bytes
than the budget, is refused before anything is inflated or copied.

Error feedback (top-k chains): what the chain did not send of a delta tensor is returned as its
*residual*, and the next ``pack`` adds the residual to that tensor's update before selecting.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedpeft.core.filters import Chain, decode, encode, layout, nbytes, parse_chain
from fedpeft.core.payload import Expected, Tensors

VERSION = 1
RAW, ABS, DELTA = "raw", "abs", "delta"
MAX_MANIFEST_BYTES = 4 << 20  # decompressed JSON; an entry is ~100 bytes (40k tensors)
MAX_NDIM = 16
INFLATE_CHUNK = 16 << 10  # compressed bytes fed to zlib at a time
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}


class PackError(ValueError):
    """A packed payload that does not describe itself consistently (rejected, never decoded)."""


@dataclass
class Packed:
    buffer: bytes  # every tensor's parts back to back
    manifest: bytes
    residuals: Tensors = field(default_factory=dict)  # error feedback (top-k chains), by key


def pack(tensors: Tensors, chain: Chain | None = None, *, reference: Tensors | None = None,
         residuals: Tensors | None = None) -> Packed:
    """Pack ``tensors`` through ``chain``. Tensors with a same-shaped ``reference`` entry are sent
    as updates (``delta``), with last round's ``residuals`` added first when the chain has top-k."""
    chain = chain or Chain()
    reference, residuals = reference or {}, residuals or {}
    if chain.needs_reference and not reference and tensors:
        raise ValueError(f"filters {chain.specs} act on updates: pack needs a reference")
    whole, chain = chain, chain.per_tensor()
    entries: list[list[Any]] = []
    chunks: list[bytes] = []
    kept: Tensors = {}
    for key, value in tensors.items():
        value = value.detach().cpu()
        entry: list[Any] = [key, str(value.dtype).removeprefix("torch."), list(value.shape), RAW]
        if str(entry[1]) not in DTYPES:
            raise ValueError(f"tensor {key!r}: dtype {value.dtype} cannot be packed")
        mode, used, values = _plan(key, value, chain, reference, residuals)
        if mode == RAW:
            chunks.append(value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            entries.append(entry)
            continue
        encoded = encode(values.numpy().reshape(-1), used)
        entry[3] = mode
        if used.topk is not None:
            entry += [encoded.nnz, encoded.index]
            sent = decode(encoded.parts, used, values.numel(), encoded.nnz, encoded.index)
            kept[key] = values - torch.from_numpy(sent).reshape(values.shape)
        chunks += [p.tobytes() for p in encoded.parts]
        entries.append(entry)
    doc = {"v": VERSION, "chain": whole.specs, "t": entries}
    manifest = zlib.compress(json.dumps(doc, separators=(",", ":")).encode(), 9)
    buffer = b"".join(chunks)
    return Packed(zlib.compress(buffer, 9) if whole.deflate else buffer, manifest, kept)


def _plan(key: str, value: torch.Tensor, chain: Chain, reference: Tensors,
          residuals: Tensors) -> tuple[str, Chain, torch.Tensor]:
    """How one tensor travels: (mode, the chain it goes through, the float32 values encoded)."""
    if not chain.lossy or not value.is_floating_point():
        return RAW, Chain(), value
    ref = reference.get(key)
    if ref is not None and tuple(ref.shape) == tuple(value.shape):
        values = value.float() - ref.detach().cpu().float()
        mode, used = DELTA, chain
        old = residuals.get(key)
        if chain.topk is not None and old is not None and old.shape == values.shape:
            values = values + old.float()
    else:
        values, mode, used = value.float(), ABS, chain.absolute()
    if not used.lossy or not bool(torch.isfinite(values).all()):
        return RAW, Chain(), value  # nothing to compress, or let the receiver see the NaN
    return mode, used, values


# --- unpacking ---


@dataclass
class _Item:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    mode: str
    chain: Chain
    n: int
    nnz: int | None
    index: str | None
    parts: list[tuple[np.dtype, int]]


def unpack(buffer: bytes, manifest: bytes, *, reference: Tensors | None = None,
           expected: Expected | None = None) -> Tensors:
    """The tensors a packed payload holds, in their original dtypes and shapes. Raises
    :class:`PackError` on anything inconsistent or not ``expected`` (keys, shapes, dtypes,
    decoded size), before inflating or allocating anything."""
    expected = expected or Expected()
    chain, entries = read_manifest(manifest, expected.manifest_limit)
    items = [_item(entry, chain.per_tensor(), reference or {}, expected) for entry in entries]
    keys = {item.key for item in items}
    if len(keys) != len(items):
        raise PackError("packed payload: a tensor key appears twice")
    missing = expected.missing(keys)
    if missing:
        raise PackError(f"packed payload: missing tensors {missing[:3]}")
    total = sum(nbytes(item.parts) for item in items)
    if total > expected.limit:
        raise PackError(f"packed payload: the manifest describes {total} bytes, more than the "
                        f"{expected.limit} expected")
    if chain.deflate:
        buffer = _inflate(buffer, total)
    if total != len(buffer):
        raise PackError(f"packed payload: the manifest describes {total} bytes, the buffer has "
                        f"{len(buffer)}")
    out: Tensors = {}
    offset = 0
    for item in items:
        parts = []
        for dtype, count in item.parts:
            parts.append(np.frombuffer(buffer, dtype, count, offset) if count
                         else np.zeros(0, dtype))
            offset += dtype.itemsize * count
        out[item.key] = _decode_item(item, parts, reference or {})
    return out


def _inflate(blob: bytes, expected: int) -> bytes:
    """Inflate a deflated buffer, never past one byte more than the (checked) manifest
    describes. The input is fed in views of ``INFLATE_CHUNK`` bytes, so neither the output nor
    zlib's unconsumed input ever holds more than the expected size plus one chunk."""
    inflate = zlib.decompressobj()
    view, out, fed = memoryview(blob), bytearray(), 0
    try:
        while fed < len(view) and not inflate.eof:
            chunk = view[fed:fed + INFLATE_CHUNK]
            fed += len(chunk)
            out += inflate.decompress(chunk, expected + 1 - len(out))
            if len(out) > expected or inflate.unconsumed_tail:
                raise PackError(f"packed payload: the deflated buffer holds more than the "
                                f"{expected} bytes the manifest describes")
    except zlib.error as exc:
        raise PackError(f"packed payload: the deflated buffer is unreadable ({exc})") from None
    if not inflate.eof or inflate.unused_data or fed < len(view):
        raise PackError("packed payload: the deflated buffer is truncated or has trailing bytes")
    return bytes(out)


def _decode_item(item: _Item, parts: list[np.ndarray], reference: Tensors) -> torch.Tensor:
    if item.n == 0:
        return torch.empty(item.shape, dtype=item.dtype)
    if item.mode == RAW:
        raw = torch.from_numpy(parts[0].copy())
        return raw.view(item.dtype).reshape(item.shape)
    try:
        flat = decode(parts, item.chain, item.n, item.nnz, item.index)
    except ValueError as exc:
        raise PackError(f"packed payload, tensor {item.key!r}: {exc}") from None
    values = torch.from_numpy(flat).reshape(item.shape)
    if item.mode == DELTA:
        values = reference[item.key].detach().cpu().float() + values
    return values.to(item.dtype)


def read_manifest(blob: object, limit: int = MAX_MANIFEST_BYTES) -> tuple[Chain, list[Any]]:
    """The chain and the per-tensor entries of a manifest (shape and types checked); its JSON
    is inflated to ``limit`` bytes at most."""
    if not isinstance(blob, bytes):
        raise PackError("packed payload: the manifest is not bytes")
    inflate = zlib.decompressobj()
    limit = min(limit, MAX_MANIFEST_BYTES)
    try:
        text = inflate.decompress(blob, limit)
        if inflate.unconsumed_tail or not inflate.eof:
            raise PackError(f"packed payload: the manifest is truncated or exceeds {limit} "
                            "bytes")
        doc = json.loads(text)
    except PackError:
        raise
    except (zlib.error, ValueError, RecursionError) as exc:
        raise PackError(f"packed payload: unreadable manifest ({exc})") from None
    if not isinstance(doc, dict) or doc.get("v") != VERSION:
        raise PackError(f"packed payload: not a version-{VERSION} manifest")
    if not isinstance(doc.get("t"), list) or not isinstance(doc.get("chain"), list):
        raise PackError("packed payload: the manifest lacks its tensor list or filter chain")
    try:
        chain = parse_chain(doc["chain"])
    except ValueError as exc:
        raise PackError(f"packed payload: {exc}") from None
    return chain, doc["t"]


def _item(entry: object, chain: Chain, reference: Tensors, expected: Expected) -> _Item:
    if not isinstance(entry, list) or len(entry) not in (4, 6) or not isinstance(entry[0], str):
        raise PackError(f"packed payload: malformed manifest entry {str(entry)[:80]}")
    key, dtype_name, shape, mode, *sparse = entry
    where = f"packed payload, tensor {key!r}"
    dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise PackError(f"{where}: dtype {dtype_name!r} is not one of {', '.join(DTYPES)}")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(type(s) is int and s >= 0 for s in shape)):
        raise PackError(f"{where}: shape {str(shape)[:80]} is not a list of at most {MAX_NDIM} "
                        "non-negative integers")
    refusal = expected.refusal(key, dtype, tuple(shape))
    if refusal is not None:
        raise PackError(f"packed payload: {refusal}")
    n = math.prod(shape)
    if mode == RAW:
        if sparse:
            raise PackError(f"{where}: a raw tensor has no top-k fields")
        return _Item(key, dtype, tuple(shape), mode, Chain(), n, None, None,
                     [(np.dtype(np.uint8), n * dtype.itemsize)])
    if mode not in (ABS, DELTA) or not dtype.is_floating_point:
        raise PackError(f"{where}: mode {mode!r} for dtype {dtype_name} (raw, abs or delta; "
                        "filters act on floating tensors)")
    used = chain if mode == DELTA else chain.absolute()
    if not used.lossy:
        raise PackError(f"{where}: mode {mode!r} but the chain {chain.specs} does nothing to it")
    if mode == DELTA:
        ref = reference.get(key)
        if ref is None or tuple(ref.shape) != tuple(shape):
            held = "no such tensor" if ref is None else f"shape {tuple(ref.shape)}"
            raise PackError(f"{where}: sent as an update of shape {tuple(shape)}, but the "
                            f"receiver's reference has {held}")
    nnz, index = [*sparse, None, None][:2]
    if used.topk is not None and (type(nnz) is not int or not isinstance(index, str)):
        raise PackError(f"{where}: top-k needs a count and an index kind")
    if used.topk is None and sparse:
        raise PackError(f"{where}: top-k fields without top-k in the chain")
    try:
        parts = layout(used, n, nnz, index)
    except ValueError as exc:
        raise PackError(f"{where}: {exc}") from None
    return _Item(key, dtype, tuple(shape), mode, used, n, nnz, index, parts)
