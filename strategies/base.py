"""The method interface: a federated method is pure tensor math with a server half and a client
half. No Flower here: ``fedpeft.wire`` maps payloads to records, ``server``/``client`` drive rounds.

Server half:  init(template) -> state;  downlink(state, profile) -> payload;
              aggregate(state, uploads) -> state;  global_adapter(state) -> tensors (eval/export).
Client half:  load(model, payload, client_state);  trainable(model) -> keys;
              uplink(model, payload, client_state) -> payload.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fedpeft.adapters import AdapterModel
from fedpeft.config import ConfigError, FedConfig, parse_dataclass
from fedpeft.payload import ClientState, Payload, Scalar, Tensors

__all__ = ["ClientState", "Payload", "Scalar", "Tensors"]


@dataclass(frozen=True)
class ClientProfile:
    """What the server knows about a client: its partition and its device's capabilities."""

    partition_id: int
    rank: int
    node_id: int = 0


@dataclass
class Upload:
    profile: ClientProfile
    payload: Payload
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class NoOptions:
    """A method without options of its own."""


class Method:
    """Base class; subclasses override the hooks they need. Defaults implement FedIT's plumbing:
    every adapter tensor travels both ways and all of them train."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    default_lr: ClassVar[float | None] = None  # used when train.lr = 0
    mixed_ranks: ClassVar[bool] = False  # may clients hold different LoRA ranks?

    def __init__(self, options: Any, cfg: FedConfig) -> None:
        self.options = options
        self.cfg = cfg

    # ---- server half -------------------------------------------------------------------
    def init(self, template: Tensors) -> Payload:
        return Payload({k: v.clone() for k, v in template.items()})

    def downlink(self, state: Payload, profile: ClientProfile) -> Payload:
        return Payload(state.tensors)

    def aggregate(self, state: Payload, uploads: list[Upload]) -> Payload:
        raise NotImplementedError

    def global_adapter(self, state: Payload) -> Tensors:
        """The global adapter at the configured rank (``model.rank``), for export."""
        return state.tensors

    def load_global(self, model: AdapterModel, state: Payload) -> None:
        """Put the global model into ``model`` for server-side evaluation. Methods whose global
        model is more than an adapter (FLoRA's merged base, Ferret's full weights) override it."""
        model.load(self.global_adapter(state))

    def expected_upload(self, state: Payload, profile: ClientProfile) -> dict[str, tuple[int, ...]]:
        """Keys and shapes a well-formed upload from ``profile`` must have (for validation)."""
        return {k: tuple(v.shape) for k, v in self.downlink(state, profile).tensors.items()}

    # ---- client half -------------------------------------------------------------------
    def load(self, model: AdapterModel, payload: Payload, client_state: ClientState) -> None:
        model.load(payload.tensors)

    def trainable(self, model: AdapterModel) -> set[str] | None:
        """Keys to train (None = all adapter tensors)."""
        return None

    def extra_loss(self, model: AdapterModel) -> Callable[[], torch.Tensor] | None:
        """An optional regulariser added to the task loss during local training."""
        return None

    def uplink(self, model: AdapterModel, payload: Payload, client_state: ClientState) -> Payload:
        return Payload(model.state())


def weighted_mean(uploads: Iterable[Upload], keys: Iterable[str],
                  weights: list[float] | None = None) -> Tensors:
    """Per-key weighted average (weights default to example counts), computed in float64."""
    uploads = list(uploads)
    w = torch.tensor(weights if weights is not None else [u.num_examples for u in uploads],
                     dtype=torch.float64)
    w = w / w.sum()
    out = {}
    for key in keys:
        stacked = torch.stack([u.payload.tensors[key].to(torch.float64) for u in uploads])
        mean = torch.tensordot(w, stacked, dims=1)
        out[key] = mean.to(uploads[0].payload.tensors[key].dtype)
    return out


METHODS: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    def wrap(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def build_method(cfg: FedConfig) -> Method:
    """Look up ``method.name`` and validate its options (unknown keys and bad values refused)."""
    name = cfg.method.name
    if name not in METHODS:
        raise ConfigError(f"method.name = {name!r} is not allowed: one of {', '.join(METHODS)}")
    cls = METHODS[name]
    options = parse_dataclass(cls.Options, cfg.method.options, "method")
    return cls(options, cfg)


def method_help() -> str:
    lines = []
    for name, cls in METHODS.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        lines.append(f"{name}: {doc}")
        for f in dataclasses.fields(cls.Options):
            lines.append(f"    method.{f.name} = {f.default!r}  {f.metadata.get('help', '')}")
    return "\n".join(lines)
