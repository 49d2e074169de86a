"""HetLoRA (Cho et al., EMNLP 2024): clients of different LoRA ranks share one global adapter of
the largest rank R.

Server: zero-pad every client's (B_k, A_k) to R; per layer, weight each client by the Frobenius
norm of its update, w_k = ||S_k|| / sum_j ||S_j|| with S_k = s_k B_k A_k; B_g = sum w_k pad(B_k),
A_g = sum w_k pad(A_k); a client of rank r receives the truncation B_g[:, :r], A_g[:r].
Client (optional, on by default): rank self-pruning. The loss gets
lambda * sum_layers ||B[:, m:r]|| * ||A[m:r, :]|| with m = floor(gamma r); if after local training
that tail product is below its value at the start, the client drops to rank m for good: it zeroes
the tail in this round's upload, keeps m in its ClientState (``RANK_KEY``) and reports it, so the
server sends rank m from then on.

Choices the paper leaves open (written here so results can be read correctly):
- ``rescale`` (default on): peft's scale alpha / r differs between ranks, so the global factors are
  kept in effective units (sqrt(s_k) B_k, sqrt(s_k) A_k, whose product is the client's real update)
  and each client's share is divided by sqrt(s_k) again on the downlink. Off = the raw factors.
- A row of the global factors that no client of the round covers (no client of that rank sampled)
  keeps its previous value instead of becoming zero, which would make it dead for good.
- The task head is averaged by examples, as in FedIT.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedpeft.core.adapters import AdapterModel
from fedpeft.core.config import option

from .base import (
    RANK_KEY,
    Aggregate,
    ClientProfile,
    ClientState,
    Export,
    Method,
    Payload,
    TrainSpec,
    Upload,
    register,
)
from .lowrank import (
    Layer,
    adapter_layers,
    average_head,
    fit_rank,
    head_of,
    init_a,
    load_dense,
    scale,
    seed_of,
    weights_by_examples,
)


@dataclass
class HetLoRAOptions:
    prune: bool = option(True, "clients self-prune their rank (the paper's default)")
    prune_gamma: float = option(0.99, "rank decay on pruning: r <- floor(gamma * r)", gt=0, max=1)
    prune_lambda: float = option(0.01, "weight of the rank-tail norm regulariser", min=0)
    rescale: bool = option(True, "aggregate in effective units sqrt(alpha/r) B, sqrt(alpha/r) A "
                                 "(False: the raw factors)")


@register("hetlora")
class HetLoRA(Method):
    """Zero-padding to the largest rank, update-norm weighted aggregation, truncation per client,
    rank self-pruning."""

    Options = HetLoRAOptions
    mixed_ranks = True
    secagg_refusal = ("it weights each upload by that client's own update norm and prunes "
                      "ranks per client, which needs each client's factors, not their sum")
    options: HetLoRAOptions

    # ---- units ---------------------------------------------------------------------------
    def unit(self, rank: int) -> float:
        """Factor to go from a rank-``rank`` client's factors to the stored global units."""
        return math.sqrt(scale(self.ctx.alpha, rank)) if self.options.rescale else 1.0

    def _fill(self, layer: Layer, rank: int) -> torch.Tensor:
        """Initial A rows for a layer (rows past the global rank when it has to grow)."""
        return init_a(rank, layer.d_in, seed_of(self.ctx.seed, layer.index, 41))

    def global_rank(self, state: Payload) -> int:
        layer = adapter_layers(state.tensors)[0]
        return int(state.tensors[layer.a_key].shape[0])

    # ---- server half ---------------------------------------------------------------------
    def init(self, template: dict[str, torch.Tensor]) -> Payload:
        rank = max([*self.ctx.client_ranks, self.ctx.rank])
        tensors = dict(head_of(template))
        for layer in adapter_layers(template):
            a = self._fill(layer, rank) * self.unit(rank)
            tensors[layer.a_key] = a.to(template[layer.a_key].dtype)
            tensors[layer.b_key] = template[layer.b_key].new_zeros(layer.d_out, rank)
        return Payload(tensors)

    def factors_for(self, state: Payload, rank: int) -> dict[str, torch.Tensor]:
        """Global factors truncated (or padded) to ``rank``, in that rank's own units."""
        out = {}
        unit = self.unit(rank)
        for layer in adapter_layers(state.tensors):
            b, a = fit_rank(state.tensors[layer.b_key], state.tensors[layer.a_key], rank,
                            self._fill(layer, rank) * self.unit(self.global_rank(state)))
            out[layer.b_key], out[layer.a_key] = b / unit, a / unit
        return out

    def downlink(self, state: Payload, profile: ClientProfile) -> Payload:
        return Payload({**head_of(state.tensors), **self.factors_for(state, profile.rank)})

    def aggregate(self, state: Payload, uploads: list[Upload]) -> Aggregate:
        layers = adapter_layers(state.tensors)
        ranks = [int(u.payload.tensors[layers[0].a_key].shape[0]) for u in uploads]
        size = max([self.global_rank(state), *ranks])
        by_examples = weights_by_examples([u.num_examples for u in uploads])
        tensors = average_head([head_of(u.payload.tensors) for u in uploads], by_examples)
        for layer in layers:
            old_b, old_a = fit_rank(state.tensors[layer.b_key].double(),
                                    state.tensors[layer.a_key].double(), size,
                                    self._fill(layer, size) * self.unit(self.global_rank(state)))
            bs, as_ = [], []
            for upload, rank in zip(uploads, ranks, strict=True):
                c = self.unit(rank)
                b = upload.payload.tensors[layer.b_key].double() * c
                a = upload.payload.tensors[layer.a_key].double() * c
                bs.append(b)
                as_.append(a)
            weights = norm_weights(bs, as_, by_examples)
            new_b, new_a = torch.zeros_like(old_b), torch.zeros_like(old_a)
            covered = torch.zeros(size, dtype=torch.bool)
            for w, b, a in zip(weights, bs, as_, strict=True):
                b_pad, a_pad = fit_rank(b, a, size)
                new_b += w * b_pad
                new_a += w * a_pad
                covered[: a.shape[0]] = True
            new_b[:, ~covered], new_a[~covered] = old_b[:, ~covered], old_a[~covered]
            tensors[layer.b_key] = new_b.to(state.tensors[layer.b_key].dtype)
            tensors[layer.a_key] = new_a.to(state.tensors[layer.a_key].dtype)
        return Aggregate(Payload(tensors, dict(state.scalars)))

    def export(self, state: Payload) -> Export:
        """The global factors truncated to model.rank (lossless when model.rank >= R)."""
        tensors = {**head_of(state.tensors), **self.factors_for(state, self.ctx.rank)}
        if self.ctx.rank >= self.global_rank(state):
            return Export(tensors)
        return Export(tensors, note=f"adapter/ holds the global factors truncated to "
                      f"model.rank = {self.ctx.rank}; the global adapter has rank "
                      f"{self.global_rank(state)} (set model.rank to the largest client rank "
                      "for an exact export)")

    def load_global(self, model: AdapterModel, state: Payload) -> None:
        """Evaluate the full rank-R global update (merged into the base: any model rank works)."""
        glob = self.global_rank(state)
        s = 1.0 if self.options.rescale else scale(self.ctx.alpha, glob)
        t = state.tensors
        deltas = {layer.name: s * t[layer.b_key].double() @ t[layer.a_key].double()
                  for layer in adapter_layers(t)}
        load_dense(model, deltas, head_of(state.tensors))

    # ---- client half ---------------------------------------------------------------------
    def _tail_start(self, rank: int) -> int | None:
        """First pruned index m = floor(gamma r), or None when pruning is off or impossible."""
        if not self.options.prune:
            return None
        m = math.floor(self.options.prune_gamma * rank + 1e-9)
        return m if 1 <= m < rank else None

    def train_spec(self, model: AdapterModel) -> TrainSpec:
        return TrainSpec(extra_loss=self._tail_penalty(model))

    def _tail_penalty(self, model: AdapterModel) -> Callable[[], torch.Tensor] | None:
        """lambda * sum over layers of |B[:, m:]| |A[m:]|: pushes the rank tail towards zero."""
        m = self._tail_start(model.rank)
        if m is None or self.options.prune_lambda == 0:
            return None
        lam = self.options.prune_lambda
        pairs = [(model.params[p.b_key], model.params[p.a_key]) for p in model.pairs.values()]

        def tail_penalty() -> torch.Tensor:
            return lam * sum(torch.linalg.norm(b[:, m:]) * torch.linalg.norm(a[m:])
                             for b, a in pairs)

        return tail_penalty

    def uplink(self, model: AdapterModel, payload: Payload, client_state: ClientState) -> Payload:
        tensors = model.state()
        m = self._tail_start(model.rank)
        if m is not None and tail_norm(tensors, m) < tail_norm(payload.tensors, m):
            for layer in adapter_layers(tensors):
                tensors[layer.b_key][:, m:] = 0
                tensors[layer.a_key][m:] = 0
            client_state.values[RANK_KEY] = m
        return Payload(tensors)


def norm_weights(bs: list[torch.Tensor], as_: list[torch.Tensor],
                 fallback: list[float]) -> list[float]:
    """w_k = ||B_k A_k||_F / sum_j ||B_j A_j||_F (``fallback`` when every update is zero)."""
    norms = [float(torch.linalg.norm(b @ a)) for b, a in zip(bs, as_, strict=True)]
    total = sum(norms)
    return [n / total for n in norms] if total > 0 else fallback


def tail_norm(tensors: dict[str, torch.Tensor], m: int) -> float:
    """sum over layers of ||B[:, m:]||_F * ||A[m:, :]||_F."""
    return float(sum(torch.linalg.norm(tensors[layer.b_key][:, m:].double())
                     * torch.linalg.norm(tensors[layer.a_key][m:].double())
                     for layer in adapter_layers(tensors)))
