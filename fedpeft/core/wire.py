"""Payloads <-> Flower records, and the bytes they really take when serialised.

A payload's tensors travel packed (``fedpeft.core.packing``): one flat uint8 ``Array`` in the
``PACKED`` ArrayRecord plus a ``MANIFEST`` ConfigRecord, through the direction's compression
filters (``fedpeft.core.filters``; ``[compression] up``/``down``). Decoding needs no config: the
manifest names the chain. Uploads compressed as updates decode against the downlink the client
received (``reference=``). Per-key ``TENSORS`` records (one Array per tensor, what Flower's DP
wrappers operate on) are still read, and :func:`unpack_in_place` turns a packed message into one.

Byte counts come from Flower's own serialisation (``deflate`` of every object in the message
tree: the record dict, each record, each array and its chunks), so they are what the SuperLink
stores and forwards, not an estimate from tensor sizes.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedpeft.core.config import FedConfig
from fedpeft.core.filters import parse_chain
from fedpeft.core.keys import RUN_CONFIG_KEY
from fedpeft.core.packing import DTYPES, MAX_NDIM, Packed, PackError, pack, unpack
from fedpeft.core.payload import ClientState, Expected, Payload, Tensors

TENSORS, SCALARS = "tensors", "scalars"  # TENSORS: per-key tensors (one Array each)
PACKED, MANIFEST = "fedpeft.packed", "fedpeft.manifest"  # all tensors in one Array + its manifest
RESIDUAL_PREFIX = "fedpeft.residual."  # ClientState.tensors keys of top-k error feedback
NUMPY_STYPE = "numpy.ndarray"  # Flower's Array of an npy file
BYTES_STYPE = "fedpeft.bytes"  # the packed Array's data is the bare buffer (no npy header)
CONFIG_RECORD = "fedpeft.config"  # the config as JSON in a message (runs without RUN_CONFIG_KEY)
METRICS_RECORD = "metrics"


def config_record(cfg: FedConfig) -> ConfigRecord:
    return ConfigRecord({"json": cfg.to_json()})


def run_config_json(run_config: Any, content: RecordDict) -> str | None:
    """The run's config as JSON: from Flower's run config (``RUN_CONFIG_KEY``, set once per
    run by ``fedpeft simulate`` / ``fedpeft server``), else from the message (a run started
    with plain ``flwr run .`` sends it with every train message); None when neither has it."""
    text = str(run_config.get(RUN_CONFIG_KEY, "") or "") if run_config else ""
    if text:
        return text
    return str(content[CONFIG_RECORD]["json"]) if CONFIG_RECORD in content else None


def to_array_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    record = ArrayRecord()
    for key, value in tensors.items():
        record[key] = Array(np.ascontiguousarray(value.detach().cpu().numpy()))
    return record


def from_array_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.array(arr.numpy())) for key, arr in record.items()}


def payload_to_records(payload: Payload, extra: dict[str, Any] | None = None, *,
                       filters: Sequence[str] = (), reference: Tensors | None = None,
                       state: ClientState | None = None) -> RecordDict:
    """A payload as a RecordDict: its tensors packed through ``filters``, its scalars plus the
    ``extra`` ones (round config) in the scalars record.

    ``reference``: what the receiver already holds (an upload's downlink); tensors matching it
    in key and shape are sent as updates. ``state``: the client's state, whose top-k error
    feedback (``RESIDUAL_PREFIX`` keys) is added before selection and replaced by what this
    message did not send."""
    chain = parse_chain(filters)
    residuals = residuals_of(state) if state is not None else {}
    packed = pack(payload.tensors, chain, reference=reference, residuals=residuals)
    if state is not None:
        for key in [k for k in state.tensors if k.startswith(RESIDUAL_PREFIX)]:
            del state.tensors[key]
        state.tensors.update({RESIDUAL_PREFIX + k: v for k, v in packed.residuals.items()})
    scalars = {**payload.scalars, **(extra or {})}
    return RecordDict({**_records(packed), SCALARS: ConfigRecord(scalars)})


def _records(packed: Packed) -> dict[str, ArrayRecord | ConfigRecord]:
    data = Array(dtype="uint8", shape=(len(packed.buffer),), stype=BYTES_STYPE,
                 data=packed.buffer)
    return {PACKED: ArrayRecord({"data": data}), MANIFEST: ConfigRecord({"m": packed.manifest})}


def residuals_of(state: ClientState) -> Tensors:
    """The top-k error feedback a client holds, by tensor key."""
    cut = len(RESIDUAL_PREFIX)
    return {k[cut:]: v for k, v in state.tensors.items() if k.startswith(RESIDUAL_PREFIX)}


def records_to_payload(content: RecordDict, *, reference: Tensors | None = None,
                       expected: Expected | None = None) -> Payload:
    """The payload a message carries (see :func:`unpack_record`; ValueError when malformed)."""
    return Payload(unpack_record(content, reference=reference, expected=expected),
                   message_scalars(content))


def message_scalars(content: RecordDict) -> dict[str, Any]:
    """A message's scalars alone (nothing decoded)."""
    return dict(content[SCALARS]) if SCALARS in content else {}


def has_tensors(content: RecordDict) -> bool:
    return PACKED in content or TENSORS in content


def unpack_record(content: RecordDict, *, reference: Tensors | None = None,
                  expected: Expected | None = None) -> Tensors:
    """The tensors of a message, packed or per key, decoded: original dtypes and shapes.
    ``reference``: the downlink the sender received (needed when it sent updates);
    ``expected``: what the receiver accepts (checked before anything is inflated or copied).
    Raises ValueError (:class:`PackError`) with a message the server can log as a rejection."""
    expected = expected or Expected()
    if PACKED not in content:
        return checked_array_record(content[TENSORS], expected) if TENSORS in content else {}
    if TENSORS in content:
        raise PackError("a message with both packed and per-key tensors")
    record, manifest = content[PACKED], content.get(MANIFEST)
    if (not isinstance(record, ArrayRecord) or list(record.keys()) != ["data"]
            or not isinstance(manifest, ConfigRecord) or "m" not in manifest):
        raise PackError("packed payload: expected one Array 'data' and a manifest record")
    array = record["data"]
    if (array.stype != BYTES_STYPE or array.dtype != "uint8" or not isinstance(array.data, bytes)
            or tuple(array.shape) != (len(array.data),)):
        raise PackError(f"packed payload: a {array.dtype} array of shape {array.shape} and "
                        f"type {array.stype!r}, expected the flat {BYTES_STYPE} buffer")
    return unpack(array.data, manifest["m"], reference=reference, expected=expected)


def checked_array_record(record: object, expected: Expected) -> Tensors:
    """A per-key ``TENSORS`` record's tensors, each Array's npy header checked against
    ``expected`` and against its own length before anything is allocated (``Array.numpy``
    would allocate whatever the header declares)."""
    if not isinstance(record, ArrayRecord):
        raise PackError("per-key tensors: not an ArrayRecord")
    out: Tensors = {}
    total = 0
    for key, array in record.items():
        values = _npy_values(key, array, expected)
        total += values.nbytes
        if total > expected.limit:
            raise PackError(f"per-key tensors: more than the {expected.limit} bytes expected")
        out[key] = torch.from_numpy(values.copy())
    missing = expected.missing(set(out))
    if missing:
        raise PackError(f"per-key tensors: missing tensors {missing[:3]}")
    return out


def _npy_values(key: str, array: Array, expected: Expected) -> np.ndarray:
    """One Array's values (a view of its bytes), refused unless its npy header describes exactly
    its bytes, a plain numeric dtype and what ``expected`` allows."""
    if not isinstance(array, Array) or array.stype != NUMPY_STYPE or not isinstance(
            array.data, bytes):
        raise PackError(f"per-key tensor {key[:80]!r}: not a numpy Array")
    stream = io.BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(stream)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(stream)
    except (ValueError, TypeError, SyntaxError, OverflowError) as exc:
        raise PackError(f"per-key tensor {key[:80]!r}: unreadable npy header ({exc})") from None
    name = str(dtype).removeprefix("<")
    torch_dtype = DTYPES.get(name) if dtype.kind in "fiub" and not dtype.hasobject else None
    if torch_dtype is None or dtype.byteorder == ">" or fortran or len(shape) > MAX_NDIM:
        raise PackError(f"per-key tensor {key[:80]!r}: dtype {dtype}, shape {shape[:8]}: "
                        "expected a little-endian C-order numeric array")
    refusal = expected.refusal(key, torch_dtype, tuple(shape))
    if refusal is not None:
        raise PackError(f"per-key tensors: {refusal}")
    count = math.prod(shape)
    offset = stream.tell()
    if count * dtype.itemsize != len(array.data) - offset or count * dtype.itemsize > \
            expected.limit:
        raise PackError(f"per-key tensor {key[:80]!r}: its header describes "
                        f"{count * dtype.itemsize} bytes, it holds {len(array.data) - offset}")
    return np.frombuffer(array.data, dtype, count, offset).reshape(shape)


def unpack_in_place(content: RecordDict, *, reference: Tensors | None = None,
                    expected: Expected | None = None) -> Tensors:
    """Replace a packed message's tensors by a per-key ``TENSORS`` ArrayRecord (for Flower's DP
    wrappers, which clip and average ArrayRecords); returns the decoded tensors."""
    tensors = unpack_record(content, reference=reference, expected=expected)
    for name in (PACKED, MANIFEST):
        if name in content:
            del content[name]
    content[TENSORS] = to_array_record(tensors)
    return tensors


def replace_tensors(content: RecordDict, tensors: Tensors) -> None:
    """Put ``tensors`` into a message instead of the ones it carries (packed, no filters)."""
    for name in (TENSORS, PACKED, MANIFEST):
        if name in content:
            del content[name]
    for name, record in _records(pack(tensors)).items():
        content[name] = record


def transmit(payload: Payload, *, filters: Sequence[str] = (), reference: Tensors | None = None,
             state: ClientState | None = None,
             expected: Expected | None = None) -> tuple[Payload, int]:
    """Send ``payload`` without Flower: what the receiver decodes and the message's bytes (for
    the plain loop; same arguments as :func:`payload_to_records`, the same ``reference`` on both
    sides)."""
    content = payload_to_records(payload, filters=filters, reference=reference, state=state)
    received = records_to_payload(content, reference=reference, expected=expected)
    return received, serialized_nbytes(content)


def serialized_nbytes(obj: Any) -> int:
    """Bytes of Flower's serialisation of a record tree (the object and all its children)."""
    children = obj.children or {}
    return len(obj.deflate()) + sum(serialized_nbytes(c) for c in children.values())


def tensor_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


_STATE_TENSORS, _STATE_VALUES = "fedpeft.state.tensors", "fedpeft.state.values"


def save_client_state(store: RecordDict, state: ClientState) -> None:
    """Persist a method's client state into Flower's per-node ``Context.state``."""
    store[_STATE_TENSORS] = to_array_record(state.tensors)
    store[_STATE_VALUES] = ConfigRecord({"json": json.dumps(state.values)})


def load_client_state(store: RecordDict) -> ClientState:
    if _STATE_VALUES not in store:
        return ClientState()
    return ClientState(from_array_record(store[_STATE_TENSORS]),
                       json.loads(str(store[_STATE_VALUES]["json"])))
