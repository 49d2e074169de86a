"""Robust means of the clients' uploads (``federation.aggregator``), as pure tensor math. Why each
rule and what it tolerates: docs/robustness.md.

For the methods whose aggregate is a mean of uploads (``Method.mean_aggregate``):

- ``mean``: the weighted mean (weights: example counts or 1, ``federation.weighting``).
- ``median``: the coordinate-wise median; for an even count the mean of the two middle values
  (as ``numpy.median``).
- ``trimmed-mean``: per coordinate, drop the ``k = floor(trim_fraction * n)`` largest and the k
  smallest values and average the rest (as ``scipy.stats.trim_mean``).
- ``norm-clip``: scale each client's whole update (upload minus what it was sent, L2 over all
  tensors) down to at most a bound, then their plain mean (unweighted: a claimed example count
  cannot steer it). The bound is ``clip_norm`` or, at 0, the median of the round's update norms
  (among honest norms while fewer than half are hostile; it follows them as training changes).
- ``filtered-median``: drop each upload whose L2 distance (over all tensors) from the
  coordinate-wise median exceeds ``filter_factor`` times the round's median distance, then the
  coordinate-wise median of the rest. Hostile uploads all on one side shift the median one rank
  each at any magnitude; dropping those far out of the honest spread removes that shift. At
  least half of the uploads always remain, and no count of attackers has to be guessed.

The medians and the trimmed mean are unweighted (one client, one vote): a weighted median
would let a client's claimed example count buy influence back. They commute with a common
shift, so they are taken over the uploads directly; everything is computed in float64 and
returned in the uploads' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from fedpeft.core.config import AGGREGATORS, FedConfig, FederationConfig
from fedpeft.core.payload import Payload, Tensors

__all__ = ["AGGREGATORS", "Aggregator", "Robust", "robust_mean"]


@dataclass(frozen=True)
class Aggregator:
    """How a round's uploads are combined; see the module docstring."""

    rule: str = "mean"
    trim_fraction: float = 0.2
    clip_norm: float = 0.0  # 0: the median of the round's update norms
    filter_factor: float = 3.0

    @classmethod
    def from_config(cls, cfg: FedConfig | FederationConfig) -> Aggregator:
        fed = cfg.federation if isinstance(cfg, FedConfig) else cfg
        return cls(fed.aggregator, fed.trim_fraction, fed.clip_norm, fed.filter_factor)

    def __post_init__(self) -> None:
        if self.rule not in AGGREGATORS:
            raise ValueError(f"aggregator {self.rule!r}: one of {', '.join(AGGREGATORS)}")
        if not self.filter_factor >= 1 or math.isinf(self.filter_factor):
            raise ValueError(f"filter factor {self.filter_factor}: a finite number >= 1")


UPLOADS_DROPPED = "uploads_dropped"  # round metric of the filtering rules


class Robust(NamedTuple):
    """A robust aggregate and how many uploads it dropped as outliers (filtered-median)."""

    tensors: Tensors
    dropped: int = 0
    filtering: bool = False  # the rule drops outliers (then ``metrics`` reports how many)

    @property
    def metrics(self) -> dict[str, float]:
        """The aggregate's round metrics: ``uploads_dropped`` under a filtering rule."""
        return {UPLOADS_DROPPED: float(self.dropped)} if self.filtering else {}


class _Upload(Protocol):
    payload: Payload
    num_examples: int


def robust_mean(aggregator: Aggregator, uploads: Sequence[_Upload], keys: Iterable[str],
                reference: Mapping[str, torch.Tensor], weights: Sequence[float] | None = None
                ) -> Robust:
    """The aggregate of ``keys`` over ``uploads`` by ``aggregator``. ``reference``: what the
    clients were sent (the updates' origin, for norm-clip); ``weights`` default to the uploads'
    example counts (mean and norm-clip only)."""
    keys = list(keys)
    w = torch.tensor(weights if weights is not None else [u.num_examples for u in uploads],
                     dtype=torch.float64)
    stacks = {k: torch.stack([u.payload.tensors[k].to(torch.float64) for u in uploads])
              for k in keys}
    rule = aggregator.rule
    dropped = 0
    if rule == "filtered-median":
        far = far_from_median(stacks, aggregator.filter_factor)
        dropped = int(far.sum())
        out = {k: coordinate_median(s[~far]) for k, s in stacks.items()}
    elif rule == "median":
        out = {k: coordinate_median(s) for k, s in stacks.items()}
    elif rule == "trimmed-mean":
        out = {k: trimmed_mean(s, aggregator.trim_fraction) for k, s in stacks.items()}
    elif rule == "norm-clip":
        ref = {k: reference[k].to(torch.float64) for k in keys}
        updates = {k: s - ref[k] for k, s in stacks.items()}
        clipped = clip_updates(updates, aggregator.clip_norm)
        ones = torch.ones_like(w)  # one client, one vote: a claimed count must not steer it
        out = {k: ref[k] + weighted_average(u, ones) for k, u in clipped.items()}
    else:
        out = {k: weighted_average(s, w) for k, s in stacks.items()}
    return Robust({k: v.to(uploads[0].payload.tensors[k].dtype) for k, v in out.items()}, dropped,
                  rule == "filtered-median")


def weighted_average(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i x_i / sum_i w_i over the first dimension."""
    w = weights.to(stacked.dtype)
    return torch.tensordot(w / w.sum(), stacked, dims=1)


def coordinate_median(stacked: torch.Tensor) -> torch.Tensor:
    """The median over the first dimension; an even count gives the mean of the middle two
    (``torch.median`` would give the lower one)."""
    ordered = stacked.sort(dim=0).values
    n = ordered.shape[0]
    if n % 2:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trimmed_mean(stacked: torch.Tensor, fraction: float) -> torch.Tensor:
    """The mean over the first dimension after dropping the ``floor(fraction * n)`` largest and
    smallest values of every coordinate."""
    n = stacked.shape[0]
    k = math.floor(fraction * n)
    if not 0 <= 2 * k < n:
        raise ValueError(f"trim fraction {fraction} drops all {n} values")
    return stacked.sort(dim=0).values[k:n - k].mean(dim=0)


def far_from_median(stacked: Mapping[str, torch.Tensor], factor: float) -> torch.Tensor:
    """Which clients (key -> stacked clients) lie farther from the coordinate-wise median, L2
    over all tensors, than ``factor`` times the median of those distances."""
    distances = update_norms({k: s - coordinate_median(s) for k, s in stacked.items()})
    return distances > factor * coordinate_median(distances)


def update_norms(updates: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Each client's L2 norm over all tensors (``updates``: key -> stacked clients)."""
    return torch.sqrt(sum(u.flatten(1).pow(2).sum(dim=1) for u in updates.values()))


def clip_updates(updates: Mapping[str, torch.Tensor], bound: float = 0.0) -> Tensors:
    """Scale each client's whole update (key -> stacked clients) to L2 norm at most ``bound``
    (0: the median of the clients' norms)."""
    norms = update_norms(updates)
    limit = torch.tensor(bound, dtype=norms.dtype) if bound > 0 else coordinate_median(norms)
    factor = torch.where(norms > limit, limit / norms.clamp_min(1e-300), torch.ones_like(norms))
    return {k: u * factor.view(-1, *([1] * (u.dim() - 1))) for k, u in updates.items()}
