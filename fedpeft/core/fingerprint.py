"""The fingerprint of a run's frozen base: a short digest every party computes from its own
copy of the base weights, so the server can refuse a client that holds another base.

What counts as "the base": every parameter and persistent buffer of the model as the task
builds it (``fedpeft.core.adapters.base_model``: the run's ``model.dtype``, before peft wraps
it), except the tensors that travel. The LoRA factors and the task head are adapter tensors
(``AdapterModel.params``): the server sends them in every downlink and the methods average
them, so their starting values need not agree (the head is drawn from a seed, so it would agree
today, but no party depends on that). Everything else never travels and must be identical: the
pretrained weights, and any other module built from a seed that stays frozen (e.g. a new
pre-classifier layer that peft does not save).

Not covered: settings of ``config.json`` that change no weight (``rope_theta``, layer-norm
epsilon) and the tokenizer. The fingerprint catches honest mistakes (another checkpoint, a
corrupt file, another quantisation); it is not an attestation: a hostile client can send the
digest of weights it does not use.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Iterable, Mapping

import torch

from fedpeft.core.adapters import base_model
from fedpeft.core.config import ModelConfig

DIGEST_HEX = 16  # 64 bits: ample to tell bases apart by accident (this is no MAC)
PEFT_PREFIX = "base_model.model."  # peft's state-dict keys = this + the base's own names


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors sorted by name: each name, shape, dtype and raw bytes (length-
    prefixed, so no two different inputs give the same byte stream); the first ``DIGEST_HEX``
    hex digits."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        header = json.dumps([name, list(tensor.shape), str(tensor.dtype)]).encode()
        data = tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        for part in (header, data):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return digest.hexdigest()[:DIGEST_HEX]


def frozen_tensors(model: torch.nn.Module,
                   travelling: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Every parameter (tied ones once) and persistent buffer of ``model`` by name, less the
    names in ``travelling``."""
    skip = set(travelling)
    persistent = set(model.state_dict(keep_vars=True))
    tensors = {name: p for name, p in model.named_parameters() if name not in skip}
    tensors.update({name: b for name, b in model.named_buffers()
                    if name in persistent and name not in skip})
    return tensors


def travelling_names(adapter_keys: Iterable[str]) -> frozenset[str]:
    """The base's own names of the adapter tensors that also exist in the unwrapped base (the
    task head; the LoRA factors exist only in the wrapped model)."""
    return frozenset(k[len(PEFT_PREFIX):] for k in adapter_keys if k.startswith(PEFT_PREFIX))


def base_fingerprint(cfg: ModelConfig, num_labels: int, adapter_keys: Iterable[str]) -> str:
    """The fingerprint of the frozen base of ``cfg`` (``adapter_keys``: an ``AdapterModel``'s
    ``params``, the tensors that travel). Computed once per process per model section."""
    model_json = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    return _base_fingerprint(model_json, num_labels, travelling_names(adapter_keys))


@functools.lru_cache(maxsize=4)
def _base_fingerprint(model_json: str, num_labels: int, travelling: frozenset[str]) -> str:
    cfg = ModelConfig(**json.loads(model_json))
    return tensors_digest(frozen_tensors(base_model(cfg, num_labels), travelling))
