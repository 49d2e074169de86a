"""FedEx-LoRA (Singhal, Ponkshe, Vepakomma; ACL 2025, arXiv 2410.09432): FedIT plus the residual
that makes the aggregate exact, folded into the frozen base weights.

Per wrapped layer and aggregate (p_k by examples, s = alpha / r):
    A_bar = sum_k p_k A_k,   B_bar = sum_k p_k B_k
    dW_res = s sum_{k<K} p_k (B_k - B_bar)(A_k - A_K)   (= s (sum_k p_k B_k A_k - B_bar A_bar):
                                                        rank <= (K - 1) r for K clients)
    W0 <- W0 + dW_res
so that W0_new + s B_bar A_bar = W0_old + s sum_k p_k B_k A_k: the global model is the exact
weighted mean of the clients' models. Clients take (A_bar, B_bar) and train both from there.

State and downlink. The server keeps the sum of every round's residual per layer
(``fedex.res::<layer>``, d_out x d_in, in the layer's native layout: the reference code's
``residue.T`` only works for square layers) and sends it with A_bar, B_bar and the head; a client
sets its base to W0 + that sum (rebuilt on every ``load``, never accumulated in place, since one
model object serves many virtual clients) and keeps no state of its own. The residual travels
dense, L d_out d_in floats per client and round; factored, a client would need (K - 1) r
(d_in + d_out) per layer for each round it missed: more in total on the default experiment
(simulations/fedex_downlink.py; the figures in docs/results.md).

Uplink: A, B and the head (FedIT's). The aggregate reads the products, not only a mean: SecAgg and
client-level DP are refused (``*_refusal``); a robust rule acts on the models, W0 + s rule(B_k A_k).
The export is the rank-r truncated SVD of the whole update (residual sum + s B_bar A_bar), which an
adapter cannot hold exactly; server evaluation and ``fedpeft export --merged`` use the exact model.
"""

from __future__ import annotations

import torch

from fedpeft.core.adapters import AdapterModel

from .aggregators import robust_mean
from .base import (
    Aggregate,
    ClientProfile,
    ClientState,
    Export,
    Method,
    Payload,
    Tensors,
    Upload,
    UploadSpec,
    register,
)
from .lowrank import Layer, adapter_layers, scale, truncated_svd, weights_by_examples
from .rolora import factor_keys

RES = "fedex.res::"  # + layer name: the sum of every round's residual (d_out x d_in)
PRODUCT = "fedex.product::"  # + layer name: s B A of one client (robust rules only)


def residuals(tensors: Tensors) -> dict[str, torch.Tensor]:
    """Layer name -> the residual sum in a state or downlink."""
    return {k[len(RES):]: v for k, v in tensors.items() if k.startswith(RES)}


def adapter_part(tensors: Tensors) -> Tensors:
    """The LoRA factors and the head (everything but the residuals)."""
    return {k: v for k, v in tensors.items() if not k.startswith(RES)}


def residual(layer: Layer, uploads: list[Upload], weights: list[float],
             s: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A_bar, B_bar, s (sum p_k B_k A_k - B_bar A_bar)) of one layer, in float64."""
    a_bar = sum(p * u.payload.tensors[layer.a_key].double() for p, u in zip(weights, uploads,
                                                                           strict=True))
    b_bar = sum(p * u.payload.tensors[layer.b_key].double() for p, u in zip(weights, uploads,
                                                                           strict=True))
    products = sum(p * (u.payload.tensors[layer.b_key].double()
                        @ u.payload.tensors[layer.a_key].double())
                   for p, u in zip(weights, uploads, strict=True))
    return a_bar, b_bar, s * (products - b_bar @ a_bar)  # type: ignore[operator]


@register("fedex-lora")
class FedExLoRA(Method):
    """FedEx-LoRA (Singhal et al., ACL 2025): FedIT's means plus the residual (mean of products -
    product of means) folded into the frozen weights: the exact aggregate; the dense residual
    travels down."""

    default_lr = 0.002  # FedIT's: clients train A and B as in FedIT
    secagg_refusal = ("its residual needs the mean of the clients' products B_k A_k, which the "
                      "sum of their factors does not give (each client would have to upload its "
                      "dense d_out x d_in products as well)")
    # A robust rule applies to the clients' models (their dense products s B_k A_k and heads),
    # not to A_k and B_k separately, which would be no rule over the products (``_robust``).
    robust_aggregate = True
    client_dp_refusal = ("its residual needs each client's product B_k A_k, which one noised "
                         "mean of the clipped factor updates does not give, and the product of "
                         "two clipped factors is not bounded by the clip norm")

    # ---- server half -------------------------------------------------------------------
    def init(self, template: Tensors) -> Payload:
        factor_keys(list(template), "A", "fedex-lora")  # refuses an adapter without LoRA layers
        tensors = {k: v.clone() for k, v in template.items()}
        for layer in adapter_layers(template):
            tensors[RES + layer.name] = torch.zeros(layer.d_out, layer.d_in,
                                                    dtype=template[layer.a_key].dtype)
        return Payload(tensors)

    def downlink(self, state: Payload, profile: ClientProfile) -> Payload:
        return Payload(dict(state.tensors))

    def expected_upload(self, state: Payload, profile: ClientProfile) -> UploadSpec:
        return UploadSpec({k: tuple(v.shape) for k, v in adapter_part(state.tensors).items()})

    def aggregate(self, state: Payload, uploads: list[Upload]) -> Aggregate:
        if self.ctx.aggregator.rule != "mean":
            return self._robust(state, uploads)
        weights = weights_by_examples([u.num_examples for u in uploads])
        adapter = adapter_part(state.tensors)
        tensors = dict(state.tensors)
        s = scale(self.ctx.alpha, self.ctx.rank)
        layers = adapter_layers(adapter)
        lora = {k for layer in layers for k in (layer.a_key, layer.b_key)}
        norm_res, norm_update = 0.0, 0.0
        for layer in layers:
            a_bar, b_bar, res = residual(layer, uploads, weights, s)
            old = state.tensors[RES + layer.name]
            tensors[RES + layer.name] = (old.double() + res).to(old.dtype)
            tensors[layer.a_key] = a_bar.to(adapter[layer.a_key].dtype)
            tensors[layer.b_key] = b_bar.to(adapter[layer.b_key].dtype)
            norm_res += float(res.pow(2).sum())
            norm_update += float((res + s * b_bar @ a_bar).pow(2).sum())
        for key in (k for k in adapter if k not in lora):  # the head: weighted mean
            mean = sum(p * u.payload.tensors[key].double()
                       for p, u in zip(weights, uploads, strict=True))
            tensors[key] = mean.to(adapter[key].dtype)  # type: ignore[union-attr]
        rel = (norm_res / norm_update) ** 0.5 if norm_update > 0 else 0.0
        return Aggregate(Payload(tensors, dict(state.scalars)), {"fedex_residual_rel": rel})

    def _robust(self, state: Payload, uploads: list[Upload]) -> Aggregate:
        """federation.aggregator over the clients' models: the rule's s B_k A_k per layer (dense,
        float64) and head give the new model; the rule's A_k and B_k are its factors, and the
        residual s (rule(B_k A_k)) - s B_bar A_bar keeps the model exact for any such factors."""
        s = scale(self.ctx.alpha, self.ctx.rank)
        adapter = adapter_part(state.tensors)
        layers = adapter_layers(adapter)
        lora = sorted(k for layer in layers for k in (layer.a_key, layer.b_key))
        heads = [k for k in adapter if k not in set(lora)]

        def model_of(tensors: Tensors) -> Tensors:
            out = {PRODUCT + layer.name: s * tensors[layer.b_key].double()
                   @ tensors[layer.a_key].double() for layer in layers}
            return {**out, **{k: tensors[k] for k in heads}}

        models = [Upload(u.profile, Payload(model_of(u.payload.tensors)), u.num_examples)
                  for u in uploads]
        sent = model_of(adapter)
        model = robust_mean(self.ctx.aggregator, models, list(sent), sent)
        factors = robust_mean(self.ctx.aggregator, uploads, lora, adapter)
        tensors = {**state.tensors, **factors.tensors, **{k: model.tensors[k] for k in heads}}
        norm_res, norm_update = 0.0, 0.0
        for layer in layers:
            a, b = factors.tensors[layer.a_key].double(), factors.tensors[layer.b_key].double()
            res = model.tensors[PRODUCT + layer.name] - s * b @ a
            old = state.tensors[RES + layer.name]
            tensors[RES + layer.name] = (old.double() + res).to(old.dtype)
            norm_res += float(res.pow(2).sum())
            norm_update += float(model.tensors[PRODUCT + layer.name].pow(2).sum())
        rel = (norm_res / norm_update) ** 0.5 if norm_update > 0 else 0.0
        return Aggregate(Payload(tensors, dict(state.scalars)),
                         {**model.metrics, "fedex_residual_rel": rel})

    def load_global(self, model: AdapterModel, state: Payload) -> None:
        for layer, delta in residuals(state.tensors).items():
            model.set_base_delta(layer, delta)
        model.load(adapter_part(state.tensors))

    def export(self, state: Payload) -> Export:
        """The rank-``model.rank`` truncated SVD of the whole update (residual sum + s B A)."""
        s = scale(self.ctx.alpha, self.ctx.rank)
        adapter = adapter_part(state.tensors)
        out = dict(adapter)
        for layer in adapter_layers(adapter):
            a, b = adapter[layer.a_key], adapter[layer.b_key]
            whole = state.tensors[RES + layer.name].double() + s * b.double() @ a.double()
            us, vh = truncated_svd(whole, self.ctx.rank)
            new_b, new_a = torch.zeros_like(b, dtype=torch.float64), torch.zeros_like(
                a, dtype=torch.float64)
            new_b[:, : us.shape[1]], new_a[: vh.shape[0]] = us / s, vh
            out[layer.b_key], out[layer.a_key] = new_b.to(b.dtype), new_a.to(a.dtype)
        return Export(out, note=f"adapter/ holds the rank-{self.ctx.rank} truncated SVD of "
                      "FedEx-LoRA's update (the residuals folded into the base + s B A), which "
                      "is not low-rank")

    # ---- client half -------------------------------------------------------------------
    def load(self, model: AdapterModel, payload: Payload, client_state: ClientState) -> None:
        """Base = W0 + the residual sum; adapter = (A_bar, B_bar, head)."""
        found = residuals(payload.tensors)
        if set(found) != set(model.pairs):
            raise ValueError(f"fedex-lora downlink: residuals for {sorted(found)[:2]}..., "
                             f"expected one per wrapped layer ({len(model.pairs)})")
        for layer, delta in found.items():
            model.set_base_delta(layer, delta)
        model.load(adapter_part(payload.tensors))

    def uplink(self, model: AdapterModel, payload: Payload, client_state: ClientState) -> Payload:
        return Payload(model.state())
