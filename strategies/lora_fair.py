"""LoRA-FAIR (Bian, Wang, Zhang, Xu; ICCV 2025): FedIT's averages plus a server-side correction of
B, so that the product the clients start from points the way of the ideal update.

Per wrapped layer, with p_k the example weights of the round's clients:
    A_bar = sum p_k A_k,   B_bar = sum p_k B_k,   dW = sum p_k B_k A_k   (the ideal update)
    dB*   = argmin_dB  sum_j [1 - cos(dW[:, j], ((B_bar + dB) A_bar)[:, j])] / d_in
                       + lam * ||dB||_F^2
solved iteratively with autograd (Adam by default, early stopping), and the server sends A_bar and
B_bar + dB*; clients train both factors from there. The head is averaged as in FedIT.

``solver = "lstsq"`` replaces the cosine objective by the Frobenius one, whose closed form is
dB = (dW - B_bar A_bar) A_bar^T (A_bar A_bar^T + lam I)^-1. It is NOT the paper's method.

Implementation notes (where the reference code is followed or not):
- lambda defaults to the paper's 0.01; the reference code's ``lambda_reg`` = 1.0 is an option.
- The regulariser is the squared Frobenius norm, as in the reference code.
- dB starts at 0 (the reference code draws it Xavier-uniform): 0 minimises the regulariser and,
  when the clients agree (dW = B_bar A_bar), is already optimal, so agreement changes nothing.
- As in the reference code the loss is summed over layers (same-shaped layers are solved in one
  batch) and the early stop watches the summed loss (|change| < tol for ``patience`` steps).
- The iterations run on dB / sigma with sigma = RMS of the layer's B_bar (the same minimiser; the
  cosine term is invariant to the scale of B, so without this the step size would depend on how
  far training has gone). ``lr`` is the optimiser's step size in those units.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedpeft.adapters import LoraPair, lora_pairs
from fedpeft.config import ConfigError, FedConfig, option

from .base import Method, Payload, Upload, register, weighted_mean


@dataclass
class FairOptions:
    lam: float = option(0.01, "regulariser weight lambda (paper 0.01; reference code 1.0)", min=0)
    solver: str = option("cosine", "cosine = the paper's iterative objective; lstsq = closed-form "
                         "Frobenius variant (NOT the paper's method)", choices=("cosine", "lstsq"))
    iterations: int = option(1000, "most optimiser steps per layer (cosine solver)", min=1)
    lr: float = option(0.01, "optimiser step size, in units of B_bar's RMS (cosine)", gt=0)
    optimizer: str = option("adam", "optimiser of the cosine objective", choices=("adam", "sgd"))
    tol: float = option(1e-6, "early stop when |loss change| < tol ...", min=0)
    patience: int = option(5, "... for this many consecutive steps", min=1)


def column_cosine_loss(ideal: torch.Tensor, product: torch.Tensor) -> torch.Tensor:
    """1 - the mean over columns j of cos(ideal[:, j], product[:, j]) (one layer, for reference
    and tests; the solver uses the equivalent ``_stacked_loss``)."""
    cos = torch.nn.functional.cosine_similarity(ideal, product, dim=0, eps=1e-12)
    return 1.0 - cos.mean()


def lstsq_correction(ideal: torch.Tensor, b_bar: torch.Tensor, a_bar: torch.Tensor,
                     lam: float) -> torch.Tensor:
    """Closed form of argmin ||ideal - (B_bar + dB) A_bar||_F^2 + lam ||dB||_F^2 (batched over
    leading dimensions)."""
    residual = ideal - b_bar @ a_bar
    eye = torch.eye(a_bar.shape[-2], dtype=a_bar.dtype)
    gram = a_bar @ a_bar.transpose(-1, -2) + lam * eye
    # dB gram = residual A_bar^T  <=>  gram dB^T = A_bar residual^T (gram is symmetric)
    return torch.linalg.solve(gram, a_bar @ residual.transpose(-1, -2)).transpose(-1, -2)


def _stacked_loss(ideal_t: torch.Tensor, ideal_norm: torch.Tensor, b: torch.Tensor,
                  a_t: torch.Tensor) -> torch.Tensor:
    """sum over layers of 1 - mean_j cos(ideal[:, j], (b a)[:, j]), without forming b a:
    <ideal_j, b a_j> = (ideal^T b)_j . a_j and ||b a_j||^2 = a_j^T (b^T b) a_j. Shapes: ideal_t
    (L, d_in, d_out), ideal_norm (L, d_in), b (L, d_out, r), a_t (L, d_in, r)."""
    dots = (torch.bmm(ideal_t, b) * a_t).sum(-1)
    norms_sq = (torch.bmm(a_t, torch.bmm(b.transpose(1, 2), b)) * a_t).sum(-1)
    cos = dots / (ideal_norm * norms_sq.clamp_min(1e-300).sqrt()).clamp_min(1e-300)
    return (1.0 - cos.mean(-1)).sum()


def cosine_correction(ideal: torch.Tensor, b_bar: torch.Tensor, a_bar: torch.Tensor,
                      opts: FairOptions) -> tuple[torch.Tensor, int]:
    """Iterative solution of the paper's objective for a stack of same-shaped layers (ideal
    (L, d_out, d_in), b_bar (L, d_out, r), a_bar (L, r, d_in)); returns dB and the steps taken.
    Layers with B_bar = 0 or an ideal update of 0 get no correction."""
    sigma = b_bar.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
    active = (sigma.flatten() > 0) & (ideal.flatten(1).abs().amax(1) > 0)
    correction = torch.zeros_like(b_bar)
    if not bool(active.any()):
        return correction, 0
    ideal, b_bar, a_bar, sigma = ideal[active], b_bar[active], a_bar[active], sigma[active]
    ideal_t, a_t = ideal.transpose(1, 2), a_bar.transpose(1, 2)
    ideal_norm = ideal.norm(dim=1)
    delta = torch.zeros_like(b_bar, requires_grad=True)  # dB / sigma, per layer
    make = torch.optim.Adam if opts.optimizer == "adam" else torch.optim.SGD
    optimizer = make([delta], lr=opts.lr)
    previous, calm, steps = float("inf"), 0, 0
    while steps < opts.iterations and calm < opts.patience:
        optimizer.zero_grad()
        step_db = sigma * delta
        loss = (_stacked_loss(ideal_t, ideal_norm, b_bar + step_db, a_t)
                + opts.lam * step_db.pow(2).sum())
        loss.backward()
        optimizer.step()
        steps += 1
        value = float(loss.detach())
        calm = calm + 1 if abs(previous - value) < opts.tol else 0
        previous = value
    correction[active] = (sigma * delta).detach()
    return correction, steps


def ideal_update(uploads: list[Upload], a_key: str, b_key: str,
                 weights: torch.Tensor) -> torch.Tensor:
    """sum_k p_k B_k A_k in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for p, up in zip(weights, uploads, strict=True):
        b, a = up.payload.tensors[b_key].double(), up.payload.tensors[a_key].double()
        total = total + p * (b @ a)
    return total


@register("lora-fair")
class LoRAFAIR(Method):
    """FedIT's means plus a server-side correction of B towards the mean of the products."""

    Options = FairOptions
    default_lr = 0.002  # the same client training as FedIT; only the server step differs

    def __init__(self, options: FairOptions, cfg: FedConfig) -> None:
        super().__init__(options, cfg)
        if options.solver == "lstsq" and options.lam == 0:
            # A_bar A_bar^T can be singular (e.g. rank-deficient A_bar): keep the solve defined.
            raise ConfigError("method.lam = 0 with method.solver = 'lstsq': the closed form "
                              "needs lam > 0")

    def aggregate(self, state: Payload, uploads: list[Upload]) -> Payload:
        means = weighted_mean(uploads, state.tensors)
        weights = torch.tensor([u.num_examples for u in uploads], dtype=torch.float64)
        weights = weights / weights.sum()
        groups: dict[tuple[int, ...], list[LoraPair]] = {}
        for pair in lora_pairs(list(state.tensors), 1.0).values():
            shape = (*means[pair.b_key].shape, means[pair.a_key].shape[-1])
            groups.setdefault(shape, []).append(pair)
        for pairs in groups.values():  # same-shaped layers are solved together
            a_bar = torch.stack([means[p.a_key].double() for p in pairs])
            b_bar = torch.stack([means[p.b_key].double() for p in pairs])
            ideal = torch.stack([ideal_update(uploads, p.a_key, p.b_key, weights) for p in pairs])
            corrected = b_bar + self.correction(ideal, b_bar, a_bar)
            for pair, b_new in zip(pairs, corrected, strict=True):
                means[pair.b_key] = b_new.to(means[pair.b_key].dtype)
        return Payload(means, dict(state.scalars))

    def correction(self, ideal: torch.Tensor, b_bar: torch.Tensor,
                   a_bar: torch.Tensor) -> torch.Tensor:
        """dB for a stack of same-shaped layers."""
        if self.options.solver == "lstsq":
            return lstsq_correction(ideal, b_bar, a_bar, self.options.lam)
        return cosine_correction(ideal, b_bar, a_bar, self.options)[0]
