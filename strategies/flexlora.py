"""FlexLoRA (Bai et al., NeurIPS 2024): aggregate the full low-rank products, hand each client the
best approximation of its own rank.

Server, per wrapped layer: W_g = sum_k p_k s_k B_k A_k (p_k by examples, s_k = alpha / r_k), a
d_out x d_in matrix; SVD W_g = U Sigma V^T. A client of rank r receives B = U_r Sigma_r / s_r and
A = V_r^T, so s_r B A is the best rank-r approximation of W_g (Eckart-Young); every client
receives factors of its own rank only. Clients train on from those factors; W0 never changes.

The state keeps the SVD once per round, truncated to K = min(sum_k r_k, d), which is exact because
rank(W_g) <= sum_k r_k: ``flexlora.US::<layer>`` = U_K Sigma_K and ``flexlora.Vh::<layer>`` = V_K^T.
Before the first aggregation (K = 0) a client gets B = 0 and a seeded LoRA-A initialisation, as a
fresh LoRA would; the same rows fill A when a client's rank exceeds K. The task head is averaged by
examples, as in FedIT. Server evaluation uses the full W_g merged into the base.
"""

from __future__ import annotations

import torch

from fedpeft.core.adapters import AdapterModel

from .base import Aggregate, ClientProfile, Export, Method, Payload, Upload, UploadSpec, register
from .lowrank import (
    Layer,
    adapter_layers,
    average_head,
    factor_shapes,
    fit_rank,
    head_of,
    init_a,
    load_dense,
    scale,
    seed_of,
    truncated_svd,
    weights_by_examples,
)

US, VH = "flexlora.US::", "flexlora.Vh::"


@register("flexlora")
class FlexLoRA(Method):
    """Weighted sum of full products B_k A_k, per-client truncated SVD to the client's rank."""

    mixed_ranks = True
    secagg_refusal = ("it sums the products B_k A_k of each client's factors, which the sum "
                      "of the factors does not give (dense product uploads are not implemented)")

    def layers(self, state: Payload) -> list[Layer]:
        names = sorted(k[len(US):] for k in state.tensors if k.startswith(US))
        return [Layer(name, i, state.tensors[VH + name].shape[1], state.tensors[US + name].shape[0])
                for i, name in enumerate(names)]

    def _fill(self, layer: Layer, rank: int) -> torch.Tensor:
        return init_a(rank, layer.d_in, seed_of(self.ctx.seed, layer.index, 43))

    # ---- server half ---------------------------------------------------------------------
    def init(self, template: dict[str, torch.Tensor]) -> Payload:
        tensors = dict(head_of(template))
        for layer in adapter_layers(template):
            dtype = template[layer.a_key].dtype
            tensors[US + layer.name] = torch.zeros(layer.d_out, 0, dtype=dtype)
            tensors[VH + layer.name] = torch.zeros(0, layer.d_in, dtype=dtype)
        return Payload(tensors)

    def factors_for(self, state: Payload, rank: int) -> dict[str, torch.Tensor]:
        """B = U_r Sigma_r / s_r and A = V_r^T per layer (seeded A rows past K, with B = 0)."""
        s = scale(self.ctx.alpha, rank)
        out = {}
        for layer in self.layers(state):
            us, vh = state.tensors[US + layer.name], state.tensors[VH + layer.name]
            b, a = fit_rank(us.double() / s, vh.double(), rank, self._fill(layer, rank))
            out[layer.b_key], out[layer.a_key] = b.to(us.dtype), a.to(vh.dtype)
        return out

    def downlink(self, state: Payload, profile: ClientProfile) -> Payload:
        return Payload({**head_of(state.tensors), **self.factors_for(state, profile.rank)})

    def expected_upload(self, state: Payload, profile: ClientProfile) -> UploadSpec:
        shapes = {k: tuple(v.shape) for k, v in head_of(state.tensors).items()}
        return UploadSpec({**shapes, **factor_shapes(self.layers(state), profile.rank)})

    def aggregate(self, state: Payload, uploads: list[Upload]) -> Aggregate:
        weights = weights_by_examples([u.num_examples for u in uploads])
        tensors = average_head([head_of(u.payload.tensors) for u in uploads], weights)
        for layer in self.layers(state):
            w_g = aggregate_product(layer, uploads, weights, self.ctx.alpha)
            total_rank = sum(int(u.payload.tensors[layer.a_key].shape[0]) for u in uploads)
            us, vh = truncated_svd(w_g, total_rank)
            dtype = state.tensors[US + layer.name].dtype
            tensors[US + layer.name], tensors[VH + layer.name] = us.to(dtype), vh.to(dtype)
        return Aggregate(Payload(tensors, dict(state.scalars)))

    def export(self, state: Payload) -> Export:
        """The rank-``model.rank`` truncation of W_g (the full W_g has a higher rank)."""
        return Export({**head_of(state.tensors), **self.factors_for(state, self.ctx.rank)},
                      note=f"adapter/ holds the rank-{self.ctx.rank} truncated SVD of FlexLoRA's "
                      "aggregate update, whose rank is higher")

    def load_global(self, model: AdapterModel, state: Payload) -> None:
        deltas = {layer.name: state.tensors[US + layer.name].double()
                  @ state.tensors[VH + layer.name].double() for layer in self.layers(state)}
        load_dense(model, deltas, head_of(state.tensors))


def aggregate_product(layer: Layer, uploads: list[Upload], weights: list[float],
                      alpha: float) -> torch.Tensor:
    """W_g = sum_k p_k s_k B_k A_k for one layer, in float64."""
    w_g = torch.zeros(layer.d_out, layer.d_in, dtype=torch.float64)
    for p, upload in zip(weights, uploads, strict=True):
        a = upload.payload.tensors[layer.a_key].double()
        b = upload.payload.tensors[layer.b_key].double()
        w_g += p * scale(alpha, a.shape[0]) * (b @ a)
    return w_g
