"""The method interface: a federated method is pure tensor math with a server half and a client
half. No Flower and no config here: ``server``/``client`` drive rounds, ``fedpeft.core.wire``
carries payloads, and a method sees only a small :class:`MethodContext`.

Hooks (``aggregate`` is abstract; every other hook has a FedIT default):

Server half
    ``init(template) -> state``                      the global state from a fresh adapter
    ``downlink(state, profile) -> payload``          what one client is sent
    ``aggregate(state, uploads) -> state``           the next global state
    ``round_metrics(state) -> metrics``              what the last aggregate did (for the log)
    ``expected_upload(state, profile) -> shapes``    keys and shapes a valid upload has
    ``check_upload(state, profile, payload)``        a method-specific reason to reject one
    ``load_global(model, state)``                    the global model, for server evaluation
    ``export(state) -> Export``                      the adapter written to ``adapter/``
Client half
    ``load(model, payload, client_state)``           put the downlink into the local model
    ``train_spec(model) -> TrainSpec``               which tensors train, an extra loss term
    ``uplink(model, payload, client_state)``         what the client sends back
    ``client_metrics(client_state) -> metrics``      per-round extras, e.g. timings

Class attributes say what a method can do (``mixed_ranks``, ``client_dp``, ``dp_refusal``,
``compression_refusal``), its default learning rate, its options dataclass and the names of
the per-client timings it reports (``timings``), so that nothing outside ``strategies/`` needs
to name a method.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fedpeft.core.adapters import AdapterModel
from fedpeft.core.config import (
    ConfigError,
    FedConfig,
    ModelConfig,
    federation_ranks,
    parse_dataclass,
)
from fedpeft.core.filters import compression_refusal
from fedpeft.core.payload import ClientState, Payload, Scalar, Tensors

from .aggregators import Aggregator

__all__ = ["ClientState", "Payload", "Scalar", "Tensors"]

# ClientState.values key: the LoRA rank a client holds from now on, when a method changes it
# (HetLoRA's rank pruning). The trainer reports it as the ``next_rank`` metric and the server
# sends that rank next time; a node's ``--node-config rank=N`` caps it (client/app.py).
RANK_KEY = "fedpeft.rank"

# The learning rate of a method that names none (train.lr = 0 and no ``default_lr``).
FALLBACK_LR = 0.002


@dataclass(frozen=True)
class MethodContext:
    """What a method may know of the run: seeds, LoRA shape, client ranks, the task's labels.
    ``num_labels`` is None where the caller has not loaded the task (config checks)."""

    seed: int
    rank: int
    alpha: float
    client_ranks: tuple[int, ...]
    model: ModelConfig
    num_labels: int | None = None
    aggregator: Aggregator = field(default_factory=Aggregator)  # federation.aggregator

    @classmethod
    def from_config(cls, cfg: FedConfig, num_labels: int | None = None) -> MethodContext:
        return cls(seed=cfg.federation.seed, rank=cfg.model.rank, alpha=cfg.model.alpha,
                   client_ranks=tuple(federation_ranks(cfg)), model=cfg.model,
                   num_labels=num_labels, aggregator=Aggregator.from_config(cfg))


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
class Export:
    """The adapter written to ``adapter/``; ``note`` says why it is not the whole global model
    (None: it is), and the server then scores the export too."""

    tensors: Tensors
    note: str | None = None


@dataclass
class TrainSpec:
    """Local training: the adapter keys that train (None = all) and an optional regulariser
    added to the task loss."""

    keys: set[str] | None = None
    extra_loss: Callable[[], torch.Tensor] | None = None


@dataclass
class NoOptions:
    """A method without options of its own."""


class Method(abc.ABC):
    """Base class of the federated methods; the module docstring lists the hooks."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    default_lr: ClassVar[float] = FALLBACK_LR  # used when train.lr = 0
    mixed_ranks: ClassVar[bool] = False  # may clients hold different LoRA ranks?
    # Sample-level DP-SGD ([privacy] enabled) is sound for a client that trains its adapter with
    # gradients (everything it uploads is post-processing of DP-SGD's output); a method for which
    # it is not says why here.
    dp_refusal: ClassVar[str] = ""
    # Client-level DP ([privacy] client_level): Flower's fixed-clipping wrappers clip each
    # client's update and noise the mean, which is sound only when the aggregate is a mean of
    # the uploads and every client gets the same downlink (the state's tensors of those keys).
    client_dp: ClassVar[bool] = False
    # federation.aggregator other than 'mean' (strategies/aggregators.py): only where the
    # aggregate is a mean of the uploads, which the method then takes with ``robust_mean``.
    robust_aggregation: ClassVar[bool] = False
    # Lossy wire filters ([compression]) change the uploaded numbers; a method whose maths they
    # would break says why here.
    compression_refusal: ClassVar[str] = ""
    # Per-client seconds this method reports through ``client_metrics``; the round loop sums
    # them per round and the progress line and results table show them.
    timings: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Any, ctx: MethodContext) -> None:
        self.options = options
        self.ctx = ctx
        self.dropped_uploads = 0  # by the last robust aggregate (federation.aggregator)

    @classmethod
    def dp_compatible(cls) -> bool:
        return not cls.dp_refusal

    @classmethod
    def compressible(cls) -> bool:
        return not cls.compression_refusal

    # ---- server half -------------------------------------------------------------------
    def init(self, template: Tensors) -> Payload:
        return Payload({k: v.clone() for k, v in template.items()})

    def downlink(self, state: Payload, profile: ClientProfile) -> Payload:
        return Payload(state.tensors)

    @abc.abstractmethod
    def aggregate(self, state: Payload, uploads: list[Upload]) -> Payload:
        """The next global state from the round's validated uploads (at least one)."""

    def round_metrics(self, state: Payload) -> dict[str, float]:
        """Numbers about the aggregate that produced ``state`` (e.g. LoRA-FAIR's correction),
        added to the round's metrics row. A robust method filtering outliers reports how many
        uploads it dropped."""
        if self.ctx.aggregator.rule == "filtered-median":
            return {"uploads_dropped": float(self.dropped_uploads)}
        return {}

    def expected_upload(self, state: Payload, profile: ClientProfile) -> dict[str, tuple[int, ...]]:
        """Keys and shapes a well-formed upload from ``profile`` must have (for validation)."""
        return {k: tuple(v.shape) for k, v in self.downlink(state, profile).tensors.items()}

    def check_upload(self, state: Payload, profile: ClientProfile,
                     payload: Payload) -> str | None:
        """A method-specific reason to reject a well-formed upload (None: fine); the generic
        checks (keys, shapes, dtypes, finite values, norm bound) have passed already."""
        return None

    def load_global(self, model: AdapterModel, state: Payload) -> None:
        """Put the global model into ``model`` for server-side evaluation. Methods whose global
        model is more than an adapter (FLoRA's merged base, Ferret's full weights) override it."""
        model.load(self.export(state).tensors)

    def export(self, state: Payload) -> Export:
        """The global adapter at the configured rank (``model.rank``), for ``adapter/``."""
        return Export(state.tensors)

    # ---- client half -------------------------------------------------------------------
    def load(self, model: AdapterModel, payload: Payload, client_state: ClientState) -> None:
        model.load(payload.tensors)

    def train_spec(self, model: AdapterModel) -> TrainSpec:
        return TrainSpec()

    def uplink(self, model: AdapterModel, payload: Payload, client_state: ClientState) -> Payload:
        return Payload(model.state())

    def client_metrics(self, client_state: ClientState) -> dict[str, float]:
        """Extra per-round client metrics (the names in ``timings``, for instance), called once
        after ``uplink``."""
        return {}


def learning_rate(train_lr: float, method: Method | type[Method]) -> float:
    """The client learning rate: ``train.lr``, or the method's default when it is 0."""
    return train_lr or method.default_lr


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


def build_method(cfg: FedConfig, num_labels: int | None = None) -> Method:
    """Look up ``method.name`` and validate its options (unknown keys and bad values refused)."""
    name = cfg.method.name
    if name not in METHODS:
        raise ConfigError(f"method.name = {name!r} is not allowed: one of {', '.join(METHODS)}")
    cls = METHODS[name]
    options = parse_dataclass(cls.Options, cfg.method.options, "method")
    check_ranks(cls, cfg)
    check_privacy(cls, cfg)
    check_compression(cls, cfg)
    check_aggregator(cls, cfg)
    return cls(options, MethodContext.from_config(cfg, num_labels))


def check_privacy(cls: type[Method], cfg: FedConfig) -> None:
    """Refuse [privacy] settings a method cannot honour soundly, with the reason."""
    priv = cfg.privacy
    if priv.enabled and cls.dp_refusal:
        raise ConfigError(f"privacy.enabled = true is not supported with method.name = "
                          f"{cls.name!r}: {cls.dp_refusal}")
    if priv.client_level != "off" and not cls.client_dp:
        able = ", ".join(n for n, c in METHODS.items() if c.client_dp) or "none registered"
        raise ConfigError(
            f"privacy.client_level = {priv.client_level!r} needs a method whose aggregate is a "
            f"mean of the uploads with one downlink for all ({able}); method.name = "
            f"{cls.name!r} aggregates otherwise, so clipped-and-noised means would not bound "
            "one client's influence"
        )


def check_aggregator(cls: type[Method], cfg: FedConfig) -> None:
    """Refuse a robust aggregator for a method whose aggregate is not a mean of the uploads."""
    rule = cfg.federation.aggregator
    if rule == "mean" or cls.robust_aggregation:
        return
    able = ", ".join(n for n, c in METHODS.items() if c.robust_aggregation) or "none registered"
    doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
    raise ConfigError(
        f"federation.aggregator = {rule!r} needs a method whose aggregate is a mean of the "
        f"uploads ({able}); method.name = {cls.name!r} aggregates otherwise ({doc}), so a "
        "median, trimmed or clipped mean of its uploads is not its aggregate: use "
        "federation.aggregator = 'mean'"
    )


def check_compression(cls: type[Method], cfg: FedConfig) -> None:
    """Refuse lossy wire filters a method's maths cannot take, with the method's reason."""
    problem = compression_refusal(cls, cfg.compression.up, cfg.compression.down)
    if problem:
        raise ConfigError(problem)


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
        lines.append(f"    default lr {cls.default_lr:g} (when train.lr = 0)")
        for f in dataclasses.fields(cls.Options):
            default = (f.default_factory() if f.default is dataclasses.MISSING  # type: ignore[misc]
                       else f.default)
            lines.append(f"    method.{f.name} = {default!r}  {f.metadata.get('help', '')}")
    return "\n".join(lines)
