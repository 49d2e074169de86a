"""Low-rank helpers shared by the mixed-rank methods (HetLoRA, FlexLoRA, FLoRA): the layer layout
of an adapter state, zero padding / truncation of factors to a rank, a seeded LoRA-A initialisation,
truncated SVD, and loading a dense update into a model for evaluation.

Conventions: a wrapped layer computes W0 x + s B A x with B (d_out x r), A (r x d_in) and peft's
scale s = alpha / r, so two clients with different ranks have different scales.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from fedpeft.core.adapters import AdapterModel, lora_pairs
from fedpeft.core.payload import Tensors


@dataclass(frozen=True)
class Layer:
    """One LoRA-wrapped layer: its name (peft module path), factor keys and dimensions."""

    name: str
    index: int  # position in sorted order: a stable per-layer seed
    d_in: int
    d_out: int

    @property
    def a_key(self) -> str:
        return f"{self.name}.lora_A.weight"

    @property
    def b_key(self) -> str:
        return f"{self.name}.lora_B.weight"


def adapter_layers(tensors: Tensors) -> list[Layer]:
    """The wrapped layers of a peft-keyed adapter state (sorted by name)."""
    pairs = lora_pairs(list(tensors), 1.0)
    return [
        Layer(name, i, tensors[pairs[name].a_key].shape[1], tensors[pairs[name].b_key].shape[0])
        for i, name in enumerate(sorted(pairs))
    ]


def head_of(tensors: Tensors) -> Tensors:
    """The non-LoRA adapter tensors (the task head), which every method averages by examples."""
    lora = {k for p in lora_pairs(list(tensors), 1.0).values() for k in (p.a_key, p.b_key)}
    return {k: v for k, v in tensors.items() if k not in lora and "::" not in k}


def scale(alpha: float, rank: int) -> float:
    """peft's LoRA scale for ``rank`` (what ``AdapterModel.pairs`` uses)."""
    return alpha / rank


def seed_of(*parts: int) -> int:
    """A 63-bit seed derived from integers (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def init_a(rows: int, d_in: int, seed: int) -> torch.Tensor:
    """peft's LoRA-A initialisation (kaiming-uniform with a = sqrt(5): U(-1/sqrt(d_in), ..)),
    drawn from ``seed``; row i does not depend on ``rows`` (a rank-2 draw is the first two rows
    of a rank-16 draw), so growing a rank keeps the rows already handed out."""
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / d_in**0.5
    return (torch.rand(rows, d_in, generator=gen, dtype=torch.float64) * 2 - 1) * bound


def fit_rank(b: torch.Tensor, a: torch.Tensor, rank: int,
             fill_a: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncate factors to ``rank`` or zero-pad them up to it. Padded rows of A come from
    ``fill_a`` (rank x d_in; its rows beyond the current rank) when given, else zeros: a row of
    A and a column of B that are both zero get no gradient and would stay dead."""
    current = a.shape[0]
    if rank <= current:
        return b[:, :rank].clone(), a[:rank].clone()
    extra = rank - current
    b_pad = torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1)
    if fill_a is not None:
        rows = fill_a[current:rank].to(a.dtype)
    else:
        rows = a.new_zeros(extra, a.shape[1])
    return b_pad, torch.cat([a, rows], dim=0)


def truncated_svd(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r Sigma_r, V_r^T): the best rank-``rank`` approximation of ``w`` (Eckart-Young) as two
    factors, computed in float64. ``rank`` is capped at min(w.shape)."""
    u, s, vh = torch.linalg.svd(w.to(torch.float64), full_matrices=False)
    r = min(rank, s.shape[0])
    return u[:, :r] * s[:r], vh[:r]


def factor_shapes(layers: Iterable[Layer], rank: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of a rank-``rank`` adapter's factors."""
    out: dict[str, tuple[int, ...]] = {}
    for layer in layers:
        out[layer.a_key] = (rank, layer.d_in)
        out[layer.b_key] = (layer.d_out, rank)
    return out


def weights_by_examples(counts: list[int]) -> list[float]:
    total = float(sum(counts))
    return [c / total for c in counts] if total > 0 else [1.0 / len(counts)] * len(counts)


def average_head(heads: list[Tensors], weights: list[float]) -> Tensors:
    """Weighted mean of the head tensors (float64 accumulation, original dtype)."""
    out = {}
    for key, first in heads[0].items():
        total = sum(w * h[key].to(torch.float64) for w, h in zip(weights, heads, strict=True))
        out[key] = torch.as_tensor(total).to(first.dtype)
    return out


def load_dense(model: AdapterModel, deltas: dict[str, torch.Tensor], head: Tensors) -> None:
    """Put W0 + delta into each wrapped layer's frozen base, zero the LoRA factors and load the
    head: the model then computes exactly the dense global update, at any adapter rank."""
    for layer, delta in deltas.items():
        model.set_base_delta(layer, delta)
    zeros = {k: torch.zeros_like(p) for k, p in model.params.items() if k not in model.head_keys}
    model.load({**zeros, **head})
