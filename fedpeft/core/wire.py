"""Payloads <-> Flower records, and the bytes they really take when serialised.

Byte counts come from Flower's own serialisation (``deflate`` of every object in the message
tree: the record dict, each record, each array and its chunks), so they are what the SuperLink
stores and forwards, not an estimate from tensor sizes.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedpeft.core.config import FedConfig
from fedpeft.core.payload import ClientState, Payload

TENSORS, SCALARS = "tensors", "scalars"
CONFIG_RECORD = "fedpeft.config"  # the run's config as JSON, sent with every train message
METRICS_RECORD = "metrics"


def config_record(cfg: FedConfig) -> ConfigRecord:
    return ConfigRecord({"json": cfg.to_json()})


def to_array_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    record = ArrayRecord()
    for key, value in tensors.items():
        record[key] = Array(np.ascontiguousarray(value.detach().cpu().numpy()))
    return record


def from_array_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.array(arr.numpy())) for key, arr in record.items()}


def payload_to_records(payload: Payload, extra: dict[str, Any] | None = None) -> RecordDict:
    """A payload as a RecordDict; ``extra`` scalars (round config) join the scalars record."""
    scalars = {**payload.scalars, **(extra or {})}
    return RecordDict({TENSORS: to_array_record(payload.tensors), SCALARS: ConfigRecord(scalars)})


def records_to_payload(content: RecordDict) -> Payload:
    tensors = from_array_record(content[TENSORS]) if TENSORS in content else {}
    scalars = dict(content[SCALARS]) if SCALARS in content else {}
    return Payload(tensors, scalars)


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
