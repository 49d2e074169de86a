"""Differential privacy on the clients: DP-SGD with Opacus on the trainable adapter tensors.
What it covers and what it does not: docs/privacy.md.

Sample-level DP (``[privacy] enabled``), per client k with n_k examples and batch size B:
Poisson sampling at rate q_k = min(1, B / n_k) per local step; one noise multiplier sigma_k for
the whole planned run (``rounds x local_steps`` steps at q_k, from public numbers only); the
accountant history lives in the client's ``ClientState``, so epsilon composes over every round
it took part in, and a round that would exceed the budget is not trained ("budget spent"). A
device (``fedpeft client --epsilon E``) keeps a lifetime budget in its own ledger instead
(``fedpeft.core.ledger``).

What a DP-SGD client reports (:func:`dp_reply`): nothing derived from its records beyond the
trained tensors: no training loss, sample rate or noise multiplier (functions of n). In a
simulation n is public (the run's config and seed make the partitions), so the reply keeps the
example count and the exact epsilon; a device weights its reply by ``batch_size x local_steps``
and reports its budget as ``epsilon`` (the spent epsilon would reveal n through q).

Opacus runs in hooks mode without wrapping (``GradSampleHooks``): hooks only on the modules
that own trainable tensors, removed again when the round ends, also on errors, because one model
object serves many virtual clients. Guards: every trainable tensor is an adapter tensor, gets a
per-sample gradient and changes after the first step (the Opacus + peft failure where the
adapter never updates while epsilon accrues). Sampling and noise come from the OS entropy pool,
never the run's public seed (the server could subtract the noise), so DP runs are not
bit-reproducible. A data-independent regulariser (``Method.extra_loss``) is added after clipping
and noising: post-processing.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from fedpeft.core.adapters import AdapterModel
from fedpeft.core.config import ConfigError, FedConfig, PrivacyConfig
from fedpeft.core.keys import (
    BUDGET_SPENT,
    CLIENT_RANK,
    CLIENT_S,
    EPSILON,
    NEXT_RANK,
    PARTITION_ID,
    TRAIN_S,
)
from fedpeft.core.payload import ClientState, Payload
from fedpeft.core.training import Encoded, TrainResult, client_optimizer, micro_batches

ACCOUNTANT_KEY = "fedpeft.privacy.accountant"  # ClientState.values: JSON of the accountant
History = list[tuple[float, float, int]]  # Opacus accountant history: (sigma, q, steps)
_EPS_SLACK = 1e-9  # relative slack when comparing a composed epsilon with the target


class PrivacyError(RuntimeError):
    """DP-SGD cannot run soundly on this model (the message says why)."""


@dataclass(frozen=True)
class Spend:
    """An accountant's answer for one round: train with ``sigma`` (``granted``), after which the
    composed epsilon is ``epsilon``; or do not train (the budget is spent: ``epsilon`` is what
    was spent before)."""

    sigma: float
    epsilon: float
    granted: bool


class Accountant(Protocol):
    """Where a client's privacy history lives: the run's client state (:class:`RunAccountant`)
    or a device's lifetime ledger (``fedpeft.core.ledger.PrivacyLedger``). ``spend`` records
    the round before it is trained (a crash after it counts as spent: safe)."""

    def spend(self, q: float, steps: int, planned_steps: int) -> Spend: ...


# ---- accounting ------------------------------------------------------------------------
def planned_rounds(cfg: FedConfig) -> int:
    return cfg.privacy.rounds or cfg.federation.rounds


def sample_rate(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate q = B / n (1 when a client holds fewer than B examples)."""
    if num_examples < 1:
        raise PrivacyError("DP-SGD needs at least one training example")
    return min(1.0, batch_size / num_examples)


def _accountant(mechanism: str, history: History | None = None) -> Any:
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=mechanism)
    acc.history = [tuple(h) for h in history or []]
    return acc


def epsilon_of(history: History, delta: float, mechanism: str) -> float:
    """Epsilon of a composed history (0 before any step), with Opacus's default RDP orders (its
    "optimal order is the largest alpha" warning means the bound is loose, never too small)."""
    if not history:
        return 0.0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(_accountant(mechanism, history).get_epsilon(delta=delta))


def compose(history: History, sigma: float, q: float, steps: int) -> History:
    """``history`` plus ``steps`` more steps at (sigma, q), merged as Opacus's ``step`` does."""
    out = [tuple(h) for h in history]
    if out and out[-1][0] == sigma and out[-1][1] == q:
        out[-1] = (sigma, q, int(out[-1][2]) + steps)
    elif steps:
        out.append((sigma, q, steps))
    return out  # type: ignore[return-value]


_SIGMAS: dict[tuple[float, float, float, int, str], float] = {}


def noise_multiplier(priv: PrivacyConfig, q: float, steps: int) -> float:
    """sigma reaching (epsilon, delta) after ``steps`` steps at rate ``q`` (cached per process)."""
    key = (priv.epsilon, priv.delta, q, steps, priv.accountant)
    if key not in _SIGMAS:
        from opacus.accountants.utils import get_noise_multiplier

        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
                _SIGMAS[key] = float(get_noise_multiplier(
                    target_epsilon=priv.epsilon, target_delta=priv.delta, sample_rate=q,
                    steps=steps, accountant=priv.accountant))
        except ValueError as exc:
            raise ConfigError(f"privacy.epsilon = {priv.epsilon} cannot be reached with delta = "
                              f"{priv.delta} over {steps} steps at sampling rate {q:.4g}: "
                              f"{exc}") from exc
    return _SIGMAS[key]


def load_history(state: ClientState, mechanism: str) -> History:
    raw = state.values.get(ACCOUNTANT_KEY)
    if raw is None:
        return []
    saved = json.loads(str(raw))
    if saved["mechanism"] != mechanism:
        raise PrivacyError(f"this client's privacy history was kept by a {saved['mechanism']!r} "
                           f"accountant, but privacy.accountant = {mechanism!r}")
    return [(float(s), float(q), int(n)) for s, q, n in saved["history"]]


def save_history(state: ClientState, history: History, mechanism: str) -> None:
    state.values[ACCOUNTANT_KEY] = json.dumps({"mechanism": mechanism, "history": history})


class RunAccountant:
    """A budget per run (simulation, or a device without its own ``--epsilon``): the history
    in the client's ``ClientState``, sigma from the run's (epsilon, delta) over its planned
    steps."""

    def __init__(self, state: ClientState, priv: PrivacyConfig) -> None:
        self.state, self.priv = state, priv

    def spend(self, q: float, steps: int, planned_steps: int) -> Spend:
        priv = self.priv
        sigma = noise_multiplier(priv, q, planned_steps)
        history = load_history(self.state, priv.accountant)
        after = compose(history, sigma, q, steps)
        epsilon = epsilon_of(after, priv.delta, priv.accountant)
        if epsilon > priv.epsilon * (1 + _EPS_SLACK):
            return Spend(sigma, epsilon_of(history, priv.delta, priv.accountant), False)
        save_history(self.state, after, priv.accountant)
        return Spend(sigma, epsilon, True)


REPLY_KEYS = (EPSILON, BUDGET_SPENT, PARTITION_ID, CLIENT_RANK, NEXT_RANK)
SIZE_KEYS = (TRAIN_S, CLIENT_S)  # timings: they follow the number of sampled examples


def dp_reply(metrics: Mapping[str, float], *, private_size: bool, budget: float,
             batch_size: int, local_steps: int) -> tuple[dict[str, float], int | None]:
    """The metrics a client under sample-level DP-SGD may send, and the example count that
    weights its upload (None: the client's own count is public). See the module docstring:
    never the loss, q or sigma; on a device whose n is private (``private_size``) also no
    timings, its ``budget`` as epsilon and ``batch_size * local_steps`` as the count."""
    keys = REPLY_KEYS if private_size else (*REPLY_KEYS, *SIZE_KEYS)
    out = {k: float(v) for k, v in metrics.items() if k in keys}
    if not private_size:
        return out, None
    if EPSILON in out:
        out[EPSILON] = float(budget)
    return out, max(1, int(batch_size) * int(local_steps))


def client_level_epsilon(noise: float, releases: int, delta: float) -> float:
    """Client-level epsilon of ``releases`` Gaussian releases of a mean of clipped updates with
    noise multiplier ``noise`` (RDP, no amplification by client sampling: conservative)."""
    return epsilon_of([(noise, 1.0, releases)] if releases else [], delta, "rdp")


# ---- the model ----------------------------------------------------------------------------
def trainable_tensors(adapter: AdapterModel) -> dict[str, torch.nn.Parameter]:
    """The adapter tensors DP-SGD privatises; refuses models it cannot privatise soundly."""
    chosen = {k: p for k, p in adapter.params.items() if p.requires_grad}
    if not chosen:
        raise PrivacyError("privacy.enabled = true, but the model has no trainable tensors: "
                           "DP-SGD needs the method to train at least one adapter tensor")
    ours = {id(p) for p in chosen.values()}
    stray = [n for n, p in adapter.model.named_parameters()
             if p.requires_grad and id(p) not in ours]
    if stray:
        raise PrivacyError(f"privacy.enabled = true, but {stray[0]} (not an adapter tensor) is "
                           "trainable: only adapter tensors may train under DP-SGD")
    return chosen


@contextlib.contextmanager
def per_sample_hooks(model: torch.nn.Module) -> Iterator[None]:
    """Opacus hooks on ``model`` (no wrapping) for the block; afterwards the shared model is as
    before: no hooks, no per-sample attributes on parameters or modules."""
    from opacus.grad_sample import GradSampleHooks

    hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean", strict=True)
    try:
        yield
    finally:
        hooks.cleanup()
        for module in model.modules():
            for attr in ("activations", "max_batch_len"):
                module.__dict__.pop(attr, None)  # not hasattr: peft wrappers forward getattr
        for param in model.parameters():
            param.grad = None
            if hasattr(param, "summed_grad"):
                del param.summed_grad


# ---- training ------------------------------------------------------------------------------
def dp_train(
    adapter: AdapterModel,
    data: Encoded,
    *,
    cfg: FedConfig,
    lr: float,
    device: torch.device,
    client_state: ClientState,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    ledger: Accountant | None = None,
) -> tuple[TrainResult | None, dict[str, float]]:
    """``train.local_steps`` DP-SGD steps with ``train.optimizer`` at learning rate ``lr`` (the
    head at ``train.head_lr`` when set; the counterpart of
    ``fedpeft.core.training.train_steps``). Each step is one Poisson batch of expected size
    ``train.batch_size``, run as ``train.accumulate`` micro-batches and noised once. Returns
    (None, metrics) without training when this round would exceed the client's budget: the
    run's (history in ``client_state``), or a device's lifetime budget when ``ledger`` is
    given."""
    priv, steps = cfg.privacy, cfg.train.local_steps
    params = trainable_tensors(adapter)
    optimizer = client_optimizer(adapter, cfg.train, lr)
    n = len(data)
    if priv.delta >= 1.0 / n:
        warnings.warn(f"privacy.delta = {priv.delta:g} >= 1/n = {1 / n:.3g} for a client with "
                      f"{n} examples: such a delta allows leaking a whole record", stacklevel=2)
    q = sample_rate(n, cfg.train.batch_size)
    accountant = ledger if ledger is not None else RunAccountant(client_state, priv)
    spend = accountant.spend(q, steps, planned_rounds(cfg) * steps)  # recorded before training
    metrics = {"noise_multiplier": spend.sigma, "sample_rate": q, EPSILON: spend.epsilon}
    if not spend.granted:
        return None, {**metrics, BUDGET_SPENT: 1.0}
    result = _dp_steps(adapter.model, data, params, optimizer=optimizer, sigma=spend.sigma, q=q,
                       clip=priv.max_grad_norm, steps=steps, device=device, extra_loss=extra_loss,
                       accumulate=cfg.train.accumulate,
                       groups=ClipGroups.of(adapter, params, priv))
    return result, metrics


@dataclass(frozen=True)
class ClipGroups:
    """Group-wise clipping (``privacy.lora_max_grad_norm``; He et al. 2022, "Exploring the
    limits of differentially private deep learning with group-wise clipping").

    With one clipping norm for every tensor, the head's per-example gradients (norm ~1 on a
    fresh classifier) set the clipping and the noise, and LoRA's (~0.05) get noise twenty times
    their size per coordinate. Here each group g (the LoRA factors, the head) is clipped per
    example to its own norm C_g and then divided by s_g = C_g sqrt(G) / C, so the whole rescaled
    gradient has norm <= C and Opacus's flat clipping to C leaves it as it is; after Opacus adds
    noise sigma C, the group is multiplied by s_g again: its noise is sigma C_g sqrt(G). That is
    the Gaussian mechanism of sensitivity C on the rescaled gradient plus post-processing, so
    sigma and the accounting are those of flat clipping."""

    members: tuple[tuple[str, ...], ...]
    bounds: tuple[float, ...]  # C_g
    scales: tuple[float, ...]  # s_g

    @classmethod
    def of(cls, adapter: AdapterModel, params: Mapping[str, torch.nn.Parameter],
           priv: PrivacyConfig) -> ClipGroups | None:
        if not priv.lora_max_grad_norm:
            return None
        head = set(adapter.head_keys)
        split = [(tuple(k for k in params if k not in head), priv.lora_max_grad_norm),
                 (tuple(k for k in params if k in head), priv.max_grad_norm)]
        split = [(keys, bound) for keys, bound in split if keys]
        root = len(split) ** 0.5
        return cls(tuple(k for k, _ in split), tuple(b for _, b in split),
                   tuple(b * root / priv.max_grad_norm for _, b in split))

    def clip(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        """Clip each group's per-example gradients to its norm and divide by its scale."""
        for keys, bound, scale in zip(self.members, self.bounds, self.scales, strict=True):
            norms = torch.stack([params[k].grad_sample.flatten(1).pow(2).sum(1)
                                 for k in keys]).sum(0).sqrt()
            factor = (bound / (norms + 1e-6)).clamp(max=1.0) / scale
            for k in keys:
                sample = params[k].grad_sample
                params[k].grad_sample = sample * factor.view(-1, *[1] * (sample.dim() - 1))

    def unscale(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        """After the noise: each group back to its own units."""
        for keys, scale in zip(self.members, self.scales, strict=True):
            for k in keys:
                params[k].grad = params[k].grad * scale


def _dp_steps(model: torch.nn.Module, data: Encoded, params: dict[str, torch.nn.Parameter], *,
              optimizer: torch.optim.Optimizer, sigma: float, q: float, clip: float, steps: int,
              device: torch.device, extra_loss: Callable[[], torch.Tensor] | None,
              accumulate: int = 1, groups: ClipGroups | None = None) -> TrainResult:
    from opacus.optimizers import DPOptimizer

    n = len(data)
    noise = torch.Generator(device=device)
    noise.manual_seed(secrets.randbits(63))  # OS entropy: the run's seed is public
    dp_opt = DPOptimizer(optimizer, noise_multiplier=sigma, max_grad_norm=clip,
                         expected_batch_size=max(1, round(q * n)), loss_reduction="mean",
                         generator=noise)
    rng = np.random.default_rng()  # OS entropy too, for the Poisson batches
    model.train()
    losses, examples, busy = [], 0, 0.0
    with per_sample_hooks(model), warnings.catch_warnings():
        # torch notes that the first hooked layer's inputs need no grad: expected, harmless
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for step in range(steps):
            indices = np.flatnonzero(rng.random(n) < q)
            before = {k: p.detach().clone() for k, p in params.items()} if step == 0 else None
            start = time.perf_counter()
            loss = dp_step(model, data, indices, params, dp_opt, device, extra_loss, accumulate,
                           groups)
            busy += time.perf_counter() - start
            if before is not None:
                check_changed(before, params)
            if loss is not None:
                losses.append(loss)
            examples += len(indices)
    mean_loss = float(np.mean(losses)) if losses else float("nan")
    return TrainResult(mean_loss, steps, examples, busy)


def dp_step(model: torch.nn.Module, data: Encoded, indices: np.ndarray,
            params: dict[str, torch.nn.Parameter], dp_opt: Any, device: torch.device,
            extra_loss: Callable[[], torch.Tensor] | None = None, accumulate: int = 1,
            groups: ClipGroups | None = None) -> float | None:
    """One DP-SGD step on the Poisson batch ``indices`` (may be empty: then noise only, as the
    accounting assumes), run as ``accumulate`` micro-batches of similar length: each is clipped
    per example and summed into ``summed_grad`` (its per-example gradients then freed), the
    noise is added once and the sum divided by the expected batch size, exactly as for one
    physical batch. With ``groups``, each group is clipped to its own norm (:class:`ClipGroups`).
    Returns the batch's mean loss, or None for an empty batch."""
    dp_opt.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for chunk in micro_batches(data, indices, accumulate):
        if len(chunk):
            loss_sum += _micro_batch(model, data, chunk, params, device) * len(chunk)
            if groups is not None:
                groups.clip(params)
            dp_opt.clip_and_accumulate()
            for p in params.values():
                p.grad_sample = None  # clipped and summed: free the per-example gradients
    if not len(indices):
        for p in params.values():
            p.grad_sample = p.new_zeros((0, *p.shape))
        dp_opt.clip_and_accumulate()
        for p in params.values():
            p.grad_sample = None
    loss_value = loss_sum / len(indices) if len(indices) else None
    reg_grads = None
    if extra_loss is not None:
        reg = extra_loss()
        reg_grads = torch.autograd.grad(reg, list(params.values()), allow_unused=True)
        loss_value = None if loss_value is None else loss_value + float(reg.detach())
    dp_opt.add_noise()  # p.grad = summed clipped gradients + N(0, (sigma C)^2)
    if groups is not None:
        groups.unscale(params)
    for p, g in zip(params.values(), reg_grads or [None] * len(params), strict=True):
        p.grad = p.grad / dp_opt.expected_batch_size  # the logical batch, however it was split
        if g is not None:
            p.grad = p.grad + g
    dp_opt.original_optimizer.step()
    return loss_value


def _micro_batch(model: torch.nn.Module, data: Encoded, indices: np.ndarray,
                 params: dict[str, torch.nn.Parameter], device: torch.device) -> float:
    """Forward and backward of one micro-batch: per-example gradients in ``p.grad_sample``."""
    batch = {k: v.to(device) for k, v in data.batch(indices).items()}
    loss = model(**batch).loss
    loss.backward()
    missing = [k for k, p in params.items() if getattr(p, "grad_sample", None) is None]
    if missing:
        raise PrivacyError(f"no per-sample gradient for {missing[0]}: it is trainable but "
                           "unused in the forward pass, or owned by a module Opacus cannot "
                           "hook (e.g. embedding LoRA)")
    return float(loss.detach())


def check_changed(before: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter]) -> None:
    """Fail loudly when a DP step left trainable tensors untouched (Opacus #820 / peft #3409)."""
    frozen = [k for k, p in params.items() if torch.equal(before[k], p.detach())]
    if frozen:
        raise PrivacyError(
            f"DP-SGD's first step left {len(frozen)} of {len(params)} trainable tensors unchanged "
            f"(e.g. {frozen[0]}): the known Opacus + peft failure where the adapter never updates "
            "while epsilon accrues (Opacus #820; move the model to its device before peft wraps "
            "it, or pin peft 0.13.2)"
        )


# ---- client-level DP, client side -------------------------------------------------------------
def _flower_dp() -> Any:
    try:
        from flwr.supercore import differential_privacy
    except ImportError:  # older layout
        from flwr.common import differential_privacy  # type: ignore[no-redef]
    return differential_privacy


def clip_update(uplink: Payload, downlink: Payload, clip: float) -> Payload:
    """The upload with its update (upload - downlink, over all uploaded tensors) clipped to L2
    norm ``clip`` by Flower's ``compute_clip_model_update`` (``client_level = client-fixed``)."""
    keys = list(uplink.tensors)
    missing = [k for k in keys if k not in downlink.tensors]
    if missing:
        raise PrivacyError(f"client-level clipping needs the downlink value of {missing[0]}")
    up = [uplink.tensors[k].detach().cpu().numpy().copy() for k in keys]
    down = [downlink.tensors[k].detach().cpu().numpy() for k in keys]
    _flower_dp().compute_clip_model_update(up, down, clip)
    tensors = {k: torch.from_numpy(np.asarray(v)).to(uplink.tensors[k].dtype)
               for k, v in zip(keys, up, strict=True)}
    return Payload(tensors, dict(uplink.scalars))

