"""The method interface: a federated method is pure tensor math with a server half and a client
half. No Flower here: ``fedpeft.core.wire`` maps payloads to records, ``server``/``client``
drive rounds.

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

from fedpeft.core.adapters import AdapterModel
from fedpeft.core.config import ConfigError, FedConfig, federation_ranks, parse_dataclass
from fedpeft.core.payload import ClientState, Payload, Scalar, Tensors

__all__ = ["ClientState", "Payload", "Scalar", "Tensors"]

# ClientState.values key: the LoRA rank a client holds from now on, when a method changes it
# (HetLoRA's rank pruning). The trainer reports it as the ``next_rank`` metric and the server
# sends that rank next time; a node's ``--node-config rank=N`` caps it (client/app.py).
RANK_KEY = "fedpeft.rank"

# Per-client seconds a method may report through ``Method.client_metrics`` (Ferret's random
# projection and reconstruction); the server and the plain loop sum them per round like train_s.
CLIENT_TIMINGS = ("project_s", "reconstruct_s")


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
    # Sample-level DP-SGD ([privacy] enabled): sound for a client that trains its adapter with
    # gradients (everything it uploads is post-processing of DP-SGD's output). A method that
    # is not (or not yet checked) sets False and says why in ``dp_refusal``.
    dp_compatible: ClassVar[bool] = True
    dp_refusal: ClassVar[str] = ""
    # Client-level DP ([privacy] client_level): Flower's fixed-clipping wrappers clip each
    # client's update and noise the mean, which is sound only when the aggregate is a mean of
    # the uploads and every client gets the same downlink (the state's tensors of those keys).
    client_dp: ClassVar[bool] = False

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

    def export_loss(self, state: Payload) -> str | None:
        """Why ``global_adapter`` is not the whole global model (None: it is). The server then
        scores the export too and says so, since ``fedpeft evaluate`` sees only the export."""
        return None

    def load_global(self, model: AdapterModel, state: Payload) -> None:
        """Put the global model into ``model`` for server-side evaluation. Methods whose global
        model is more than an adapter (FLoRA's merged base, Ferret's full weights) override it."""
        model.load(self.global_adapter(state))

    def check_upload(self, state: Payload, profile: ClientProfile,
                     payload: Payload) -> str | None:
        """A method-specific reason to reject a well-formed upload (None: fine); the generic
        checks (keys, shapes, dtypes, finite values, norm bound) have passed already."""
        return None

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

    def client_metrics(self, client_state: ClientState) -> dict[str, float]:
        """Extra per-round client metrics (e.g. Ferret's ``project_s``), reported next to
        ``train_s``; called once after ``uplink``."""
        return {}


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
    check_ranks(cls, cfg)
    check_privacy(cls, cfg)
    return cls(options, cfg)


def check_privacy(cls: type[Method], cfg: FedConfig) -> None:
    """Refuse [privacy] settings a method cannot honour soundly, with the reason."""
    priv = cfg.privacy
    if priv.enabled and not cls.dp_compatible:
        reason = cls.dp_refusal or "its client does not train the adapter with gradients"
        raise ConfigError(f"privacy.enabled = true is not supported with method.name = "
                          f"{cls.name!r}: {reason}")
    if priv.client_level != "off" and not cls.client_dp:
        able = ", ".join(n for n, c in METHODS.items() if c.client_dp) or "none registered"
        raise ConfigError(
            f"privacy.client_level = {priv.client_level!r} needs a method whose aggregate is a "
            f"mean of the uploads with one downlink for all ({able}); method.name = "
            f"{cls.name!r} aggregates otherwise, so clipped-and-noised means would not bound "
            "one client's influence"
        )


def check_ranks(cls: type[Method], cfg: FedConfig) -> None:
    """A method with one shared rank refuses a mixed-rank federation (instead of failing later
    on tensor shapes)."""
    ranks = federation_ranks(cfg)
    if cls.mixed_ranks or ranks == [cfg.model.rank]:
        return
    mixed = ", ".join(n for n, c in METHODS.items() if c.mixed_ranks) or "none registered"
    raise ConfigError(
        f"method.name = {cls.name!r} needs every client at one LoRA rank (model.rank = "
        f"{cfg.model.rank}), but federation.rank_mix = {cfg.federation.rank_mix!r} gives clients "
        f"ranks {ranks}: use a mixed-rank method ({mixed}) or set federation.rank_mix = ''"
    )


def method_help() -> str:
    lines = []
    for name, cls in METHODS.items():
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())  # 1st paragraph
        lines.append(f"{name}: {doc}")
        for f in dataclasses.fields(cls.Options):
            default = (f.default_factory() if f.default is dataclasses.MISSING  # type: ignore[misc]
                       else f.default)
            lines.append(f"    method.{f.name} = {default!r}  {f.metadata.get('help', '')}")
    return "\n".join(lines)
