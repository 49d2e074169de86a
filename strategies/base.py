"""The method interface: pure tensor math with a server half and a client half; no Flower, no
config (a method sees a small :class:`MethodContext`). Hooks (``aggregate`` is abstract; every
other hook has a FedIT default):
Server half
    ``init(template) -> state``                      the global state from a fresh adapter
    ``downlink(state, profile) -> payload``          what one client is sent
    ``expected_upload(state, profile) -> UploadSpec``  the keys and shapes of a valid upload and
                                                     the bounds of each scalar it may carry
    ``aggregate(state, uploads) -> Aggregate``       the next global state and its metrics row
    ``load_global(model, state)``                    the global model, for server evaluation
    ``export(state) -> Export``                      the adapter written to ``adapter/``
Client half
    ``load(model, payload, client_state)``           put the downlink into the local model
    ``train_spec(model) -> TrainSpec``               which tensors train, an extra loss term
    ``uplink(model, payload, client_state)``         what the client sends back
    ``client_metrics(client_state) -> metrics``      per-round extras, e.g. timings
    ``personal_keys(keys) -> keys``                  what stays on the client (personalised)

Class attributes: ``Options`` (a dataclass), ``default_lr``, ``mixed_ranks`` (clients may hold
different LoRA ranks), ``mean_aggregate`` (the aggregate reads the uploads only through a weighted
mean of the uploaded tensors: a robust aggregator replaces it, SecAgg computes it, client-level
DP noises it), ``*_refusal`` (why DP-SGD, lossy filters, SecAgg, client-level DP or a robust
aggregator would be unsound; empty: fine) and ``timings`` (per-client seconds the loop sums), so
that nothing outside ``strategies/`` names a method. What a method may rely on, and where
per-client data lives: :class:`Method`.
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
from fedpeft.core.keys import RANK
from fedpeft.core.payload import ClientState, Payload, Scalar, Tensors

from .aggregators import Aggregator

__all__ = ["ClientState", "Payload", "Scalar", "Tensors"]  # re-exported for the methods

# ClientState.values key: the LoRA rank a client holds from now on, when a method changes it
# (HetLoRA's rank pruning). The trainer reports it as the ``next_rank`` metric and the server
# sends that rank next time; a node's ``--node-config rank=N`` caps it (client/app.py).
RANK_KEY = RANK  # the downlink scalar's name, kept in the client's state

# Why a personalised method refuses DP-SGD: only its clients can score it, and client-side
# figures are refused under privacy.enabled.
PERSONAL_DP_REFUSAL = (
    "a personalised method is scored only by its clients on their own held-out examples, and "
    "those figures would reach the server outside DP-SGD's guarantee (eval.where = 'clients' is "
    "refused under privacy.enabled; docs/privacy.md)")

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


@dataclass(frozen=True)
class Bound:
    """The values one upload scalar may take: a finite number in [low, high], a whole number
    when ``integer``; ``required``: an upload without it is rejected."""

    low: float
    high: float
    integer: bool = True
    required: bool = False


@dataclass
class UploadSpec:
    """What a valid upload from one client holds: exactly these tensor keys and shapes, and no
    scalars but these (each within its bound)."""

    tensors: dict[str, tuple[int, ...]]
    scalars: dict[str, Bound] = field(default_factory=dict)


@dataclass
class Aggregate:
    """``aggregate``'s answer: the next global state and numbers about how it was reached
    (e.g. uploads a robust aggregator dropped), added to the round's metrics row."""

    state: Payload
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
    """Base class of the federated methods; the module docstring lists the hooks.

    What a method may rely on (the server checks it before ``aggregate`` sees an upload): every
    upload has exactly the tensors of ``expected_upload``, finite, floating point, in the dtype it
    was sent; its scalars are the declared ones only, each a finite number within its
    :class:`Bound` (whole numbers as ``int``); its example count is a positive integer. Anything
    else is rejected for that client alone.

    Per-client data. One method instance serves the server half and every client of its process
    (the virtual clients of a simulation run back to back on one object), so a method keeps no
    per-client data on ``self``. What a client must remember between ``load`` and ``uplink`` of a
    round, or across rounds, goes into the ``ClientState`` both receive (a value only needed
    within the round is popped again by ``uplink``, so it is never persisted); what the server
    must remember of a client goes into the global state's scalars or tensors, written by
    ``aggregate`` only. ``self`` may hold caches that are correct for any client (keyed by what
    they depend on, e.g. a global state by run and round) and bounded in size.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    default_lr: ClassVar[float] = FALLBACK_LR  # used when train.lr = 0
    mixed_ranks: ClassVar[bool] = False  # may clients hold different LoRA ranks?
    # Sample-level DP-SGD ([privacy] enabled) is sound for a client that trains its adapter with
    # gradients (everything it uploads is post-processing of DP-SGD's output); a method for which
    # it is not says why here.
    dp_refusal: ClassVar[str] = ""
    # The aggregate reads the uploads only through the weighted mean of the uploaded tensors,
    # which the method takes with ``robust_mean(self.ctx.aggregator, ...)``; what it does with
    # that mean afterwards (FedSVD's re-factorisation, RoLoRA's frozen factor) reads no upload.
    # Then a robust aggregator (federation.aggregator) replaces the mean, secure aggregation
    # (one upload holding the mean) computes it, and client-level DP (one upload holding the
    # clipped, noised mean) noises it, each unless the method's refusal below says why not.
    mean_aggregate: ClassVar[bool] = False
    # A method that is not ``mean_aggregate`` but applies federation.aggregator in its own way
    # (FedEx-LoRA: the rule over the clients' products); else why it refuses robust aggregators
    # (empty: a generic reason from its docstring).
    robust_aggregate: ClassVar[bool] = False
    robust_refusal: ClassVar[str] = ""
    # Client-level DP ([privacy] client_level) clips each upload's update against what the
    # client was sent, which for every uploaded key must be the same for all clients, and hands
    # ``aggregate`` one upload: the noised mean (no upload scalars). Sound for a
    # ``mean_aggregate`` method; why not for this one (``client_dp_problem``; empty: a generic
    # reason for a method that is not ``mean_aggregate``).
    client_dp_refusal: ClassVar[str] = ""
    # Lossy wire filters ([compression]) change the uploaded numbers; a method whose maths they
    # would break says why here.
    compression_refusal: ClassVar[str] = ""
    # Per-client seconds this method reports through ``client_metrics``; the round loop sums
    # them per round and the progress line and results table show them.
    timings: ClassVar[tuple[str, ...]] = ()
    # Personalised: part of each client's model (``personal_keys``) stays in its ClientState,
    # never sent, so there is no single global model: the model is scored on the clients only,
    # each with its own parts (eval.where = 'clients'), and ``export`` is the shared part with
    # a note. ``load`` joins the personal parts, ``uplink`` keeps them back.
    personalized: ClassVar[bool] = False
    # Secure aggregation ([secagg]) gives ``aggregate`` one upload: the example-weighted mean of
    # the clipped uploads (``num_examples`` = the summed weights; no upload scalars), each
    # client's update taken against its own downlink. Sound for a ``mean_aggregate`` method;
    # one that is not, or cannot take it, may say why here (``secagg_problem``).
    secagg_refusal: ClassVar[str] = ""

    def __init__(self, options: Any, ctx: MethodContext) -> None:
        self.options = options
        self.ctx = ctx

    def personal_keys(self, keys: Iterable[str]) -> set[str]:
        """Those of the adapter's tensor ``keys`` that are personal (never in a message)."""
        return set()

    @classmethod
    def compressible(cls) -> bool:
        return not cls.compression_refusal

    # ---- server half -------------------------------------------------------------------
    def init(self, template: Tensors) -> Payload:
        return Payload({k: v.clone() for k, v in template.items()})

    def downlink(self, state: Payload, profile: ClientProfile) -> Payload:
        return Payload(state.tensors)

    def expected_upload(self, state: Payload, profile: ClientProfile) -> UploadSpec:
        """What a valid upload from ``profile`` holds (the server validates against it)."""
        return UploadSpec({k: tuple(v.shape)
                           for k, v in self.downlink(state, profile).tensors.items()})

    @abc.abstractmethod
    def aggregate(self, state: Payload, uploads: list[Upload]) -> Aggregate:
        """The next global state from the round's validated uploads (at least one), with its
        metrics. Must not change ``state`` or the uploads in place."""

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
        allowed = ", ".join(sorted(METHODS))
        raise ConfigError(f"method.name = {name!r} is not allowed: one of {allowed}")
    cls = METHODS[name]
    options = parse_dataclass(cls.Options, cfg.method.options, "method")
    check_ranks(cls, cfg)
    check_privacy(cls, cfg)
    check_compression(cls, cfg)
    check_aggregator(cls, cfg)
    check_evaluation(cls, cfg)
    if cfg.secagg.enabled and secagg_problem(cls):
        raise ConfigError(f"secagg.enabled = true is not supported with method.name = "
                          f"{cls.name!r}: {secagg_problem(cls)}")
    return cls(options, MethodContext.from_config(cfg, num_labels))


def check_evaluation(cls: type[Method], cfg: FedConfig) -> None:
    """A personalised method has no global model for the server to score: its clients do."""
    if cls.personalized and cfg.eval.where != "clients":
        raise ConfigError(
            f"method.name = {cls.name!r} keeps part of every client's model on the client, so "
            f"there is no global model to score on the server (eval.where = "
            f"{cfg.eval.where!r}): set eval.where = 'clients' (each client scores its own model "
            "on its held-out examples; docs/evaluation.md)")


def secagg_problem(cls: type[Method]) -> str:
    """Why [secagg] cannot run with this method (empty: it can)."""
    if cls.mean_aggregate and not cls.secagg_refusal:
        return ""
    return cls.secagg_refusal or (
        "its aggregate is not declared to depend on the uploads only through their "
        "example-weighted mean, which is all that secure aggregation reveals")


def client_dp_problem(cls: type[Method]) -> str:
    """Why client-level DP cannot run with this method (empty: it can)."""
    if cls.client_dp_refusal or cls.mean_aggregate:
        return cls.client_dp_refusal
    return ("its aggregate is not declared to read the uploads only through their mean, so a "
            "clipped-and-noised mean would not bound one client's influence on it")


def robust_problem(cls: type[Method]) -> str:
    """Why a robust federation.aggregator cannot run with this method (empty: it can)."""
    if cls.mean_aggregate or cls.robust_aggregate:
        return ""
    doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
    return cls.robust_refusal or (f"it aggregates otherwise ({doc}), so a median, trimmed or "
                                  "clipped mean of its uploads is not its aggregate")


def check_privacy(cls: type[Method], cfg: FedConfig) -> None:
    """Refuse [privacy] settings a method cannot honour soundly, with the reason."""
    priv = cfg.privacy
    if priv.enabled and cls.dp_refusal:
        raise ConfigError(f"privacy.enabled = true is not supported with method.name = "
                          f"{cls.name!r}: {cls.dp_refusal}")
    problem = client_dp_problem(cls)
    if priv.client_level != "off" and problem:
        able = ", ".join(n for n, c in METHODS.items() if not client_dp_problem(c))
        raise ConfigError(
            f"privacy.client_level = {priv.client_level!r} needs a method whose aggregate is a "
            f"mean of the uploads, each an update of what every client was sent "
            f"({able or 'none registered'}); method.name = {cls.name!r}: {problem}"
        )


def check_aggregator(cls: type[Method], cfg: FedConfig) -> None:
    """Refuse a robust aggregator for a method whose aggregate is not a mean of the uploads."""
    rule = cfg.federation.aggregator
    if rule == "mean" or not robust_problem(cls):
        return
    able = ", ".join(n for n, c in METHODS.items() if not robust_problem(c))
    raise ConfigError(
        f"federation.aggregator = {rule!r} needs a method whose aggregate is a mean of the "
        f"uploads or that applies the rule itself ({able or 'none registered'}); method.name = "
        f"{cls.name!r}: {robust_problem(cls)}: use federation.aggregator = 'mean'"
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
    for name, cls in sorted(METHODS.items()):
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())  # 1st paragraph
        lines.append(f"{name}: {doc}")
        lines.append(f"    default lr {cls.default_lr:g} (when train.lr = 0)")
        for what, problem in (("robust aggregators", robust_problem(cls)),
                              ("secure aggregation", secagg_problem(cls)),
                              ("client-level DP", client_dp_problem(cls))):
            lines.append(f"    {what}: {'no: ' + problem if problem else 'yes'}")
        if cls.personalized:
            lines.append("    personalised: part of each client's model never leaves it; scored "
                         "on the clients only (eval.where = 'clients', docs/evaluation.md)")
        for f in dataclasses.fields(cls.Options):
            default = (f.default_factory() if f.default is dataclasses.MISSING  # type: ignore[misc]
                       else f.default)
            lines.append(f"    method.{f.name} = {default!r}  {f.metadata.get('help', '')}")
    return "\n".join(lines)
