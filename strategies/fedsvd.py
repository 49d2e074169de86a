"""FedSVD (Lee, Park, Lee, Wagner, Seong, Bocklet, Lee, Hwang; NeurIPS 2025, arXiv 2505.12805):
clients train B only, with A frozen at the global value; the server averages B and re-factorises
the aggregate product by SVD, so that every round starts from a fresh A with orthonormal rows.

Per wrapped layer and aggregate (p_k by examples):
    B_bar = sum_k p_k B_k                       (exact: B_bar A = sum_k p_k B_k A)
    P = B_bar A = U S V^T  (thin SVD, unscaled: s = alpha / r stays in the forward pass)
    A <- V_r^T,  B <- U_r S_r                   (rank(P) <= r, so B A = P exactly)
The model function does not change, only its parametrisation. The task head trains and is
averaged as in FedIT (the reference code freezes it; here every method trains the head).

SVD. ``method.svd = "qr"`` (default) takes QR factorisations B_bar = Q_B R_B and A^T = Q_A R_A and
the SVD of the r x r core R_B R_A^T = U' S V'^T: U = Q_B U', V = Q_A V', in O((d_out + d_in) r^2)
instead of the reference code's full SVD of the d_out x d_in product (``"full"``, also offered).
Both give the same product and singular values; where rank(P) < r the trailing singular
directions are arbitrary (with S = 0 there). ``method.period`` re-factorises every N aggregates.

Uplink: B and the head (FFA-LoRA's bytes); downlink: A, B and the head (FedIT's bytes), since A
changes every round. The aggregate reads the uploads only through the mean of B and the head
(``mean_aggregate``): a robust aggregator replaces it (the SVD then re-factorises median_k(B_k) A,
say), secure aggregation computes it, and client-level DP noises it before the SVD. Under DP-SGD
only B (and the head) is noised, and the update s dB A with A's orthonormal rows has ||dB A||_F =
||dB||_F (the paper's argument); the SVD is post-processing. Default lr 0.01: FFA-LoRA's 0.02 is for
a kaiming A with rows of norm ~0.58; FedSVD's orthonormal rows have norm 1, so 0.01 moves W about as
fast as FFA-LoRA at 0.017.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedpeft.core.adapters import AdapterModel
from fedpeft.core.config import option

from .aggregators import robust_mean
from .base import (
    Aggregate,
    ClientProfile,
    ClientState,
    Method,
    Payload,
    Tensors,
    TrainSpec,
    Upload,
    UploadSpec,
    register,
)
from .lowrank import adapter_layers
from .rolora import factor_keys

ROUNDS = "fedsvd.rounds"  # state scalar: aggregates made so far


@dataclass
class FedSVDOptions:
    svd: str = option("qr", "qr = exact SVD through the r x r core of two QR factorisations; "
                      "full = SVD of the d_out x d_in product (the reference code)",
                      choices=("qr", "full"))
    period: int = option(1, "re-factorise every N aggregates (the code's recalculate_svd_period)",
                         min=1)


def refactor_qr(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r S_r, V_r^T) of the product b a (b: d_out x r, a: r x d_in) via QR and an r x r SVD,
    in float64."""
    q_b, r_b = torch.linalg.qr(b.double())
    q_a, r_a = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    return (q_b @ u) * s, vh @ q_a.T


def refactor_full(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r S_r, V_r^T) of b a by a thin SVD of the d_out x d_in product, in float64."""
    r = a.shape[0]
    u, s, vh = torch.linalg.svd(b.double() @ a.double(), full_matrices=False)
    return u[:, :r] * s[:r], vh[:r]


@register("fedsvd")
class FedSVD(Method):
    """FedSVD (Lee et al., NeurIPS 2025): clients train and send B only; the server averages B
    and re-factorises B_bar A by SVD into a fresh orthonormal A (sent every round) and B."""

    Options = FedSVDOptions
    default_lr = 0.01
    # The aggregate is a mean of B (and the head) followed by a change of basis that reads no
    # upload: a robust rule, secure aggregation and client-level DP replace, compute or noise
    # the mean, and the SVD is post-processing of it.
    mean_aggregate = True

    # ---- server half -------------------------------------------------------------------
    def init(self, template: Tensors) -> Payload:
        factor_keys(list(template), "A", "fedsvd")  # refuses an adapter without LoRA layers
        return Payload({k: v.clone() for k, v in template.items()}, {ROUNDS: 0})

    def downlink(self, state: Payload, profile: ClientProfile) -> Payload:
        return Payload(dict(state.tensors))

    def expected_upload(self, state: Payload, profile: ClientProfile) -> UploadSpec:
        return UploadSpec({k: tuple(state.tensors[k].shape) for k in sent_keys(state.tensors)})

    def aggregate(self, state: Payload, uploads: list[Upload]) -> Aggregate:
        robust = robust_mean(self.ctx.aggregator, uploads, sent_keys(state.tensors),
                             state.tensors)
        tensors = {**state.tensors, **robust.tensors}
        done = int(state.scalars[ROUNDS]) + 1
        if done % self.options.period == 0:
            refactor = refactor_qr if self.options.svd == "qr" else refactor_full
            for layer in adapter_layers(tensors):
                b, a = tensors[layer.b_key], tensors[layer.a_key]
                new_b, new_a = refactor(b, a)
                tensors[layer.b_key], tensors[layer.a_key] = new_b.to(b.dtype), new_a.to(a.dtype)
        return Aggregate(Payload(tensors, {**state.scalars, ROUNDS: done}), robust.metrics)

    # ---- client half -------------------------------------------------------------------
    def train_spec(self, model: AdapterModel) -> TrainSpec:
        return TrainSpec(keys=set(sent_keys(model.params)))

    def uplink(self, model: AdapterModel, payload: Payload, client_state: ClientState) -> Payload:
        state = model.state()
        return Payload({k: state[k] for k in sent_keys(state)})


def sent_keys(tensors: dict[str, object]) -> list[str]:
    """B and the head: every adapter tensor but the A factors."""
    frozen = set(factor_keys(list(tensors), "A", "fedsvd"))
    return [k for k in tensors if k not in frozen]
