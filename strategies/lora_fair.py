"""LoRA-FAIR (Bian, Wang, Zhang, Xu; ICCV 2025): FedIT's averages plus a server-side correction of
B, so that the product the clients start from points the way of the ideal update. Options, the
regulariser's scale and the metrics: docs/methods.md (FFA-LoRA and LoRA-FAIR).

Per wrapped layer l, with p_k the example weights of the round's clients:
    A_bar = sum p_k A_k,   B_bar = sum p_k B_k,   dW = sum p_k B_k A_k   (the ideal update)
    dB*   = argmin_dB  sum_l { sum_j [1 - cos(dW[:, j], ((B_bar + dB) A_bar)[:, j])] / d_in
                               + lam * ||dB||_F^2 / ||B_bar||_F^2 }
and the server sends A_bar and B_bar + dB*; the head is averaged as in FedIT. ``regulariser =
"relative"`` (default) is the term above, so lam means the same at every scale of B;
``"absolute"`` is the paper's literal lam ||dB||_F^2. ``solver = "lstsq"`` is the closed-form
Frobenius variant dB = (dW - B_bar A_bar) A_bar^T (A_bar A_bar^T + lam' I)^-1: NOT the paper's.

Solver: a sum of independent per-layer problems, so each layer's term is divided by its value at
dB = 0 and the variables scaled so the gradient there has norm 1; every stopping rule then reads
relative to the start, whatever the scale of B and however close the clients are (in B's own
units, clients that roughly agree have a squared gradient below L-BFGS's absolute tolerance and
nothing moves). Layers already pointing the way of dW (1 - cos < 1e-10) or stationary at dB = 0
are left alone. L-BFGS with a strong-Wolfe line search by default (never ends above its start);
Adam and the reference code's SGD return their best iterate.

Where the reference code is not followed: lam defaults to the paper's 0.01 (its ``lambda_reg`` =
1.0 is an option); dB starts at 0, not Xavier-uniform (0 minimises the regulariser and is optimal
when the clients agree). As there, the loss is summed over layers (same-shaped layers solved in
one batch). A_bar, B_bar and dW are formed in float64, so agreeing clients give B_bar A_bar = dW.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedpeft.core.adapters import LoraPair, lora_pairs
from fedpeft.core.config import ConfigError, option

from .base import Aggregate, Method, MethodContext, Payload, Upload, register, weighted_mean

# 1 - cos (per layer, mean over columns) below which a layer's product already points the way of
# the ideal update: float64 rounding of the cosine is ~1e-16, so below this the objective's
# relative changes would be rounding.
_AGREED = 1e-10
# A layer whose relative gradient at dB = 0 (objective / its start, dB / ||B_bar||) is below
# this is at a stationary point: rounding, not a direction.
_STATIONARY = 1e-6
# Gradient entries of the normalised objective (start 1, gradient norm 1) that count as zero.
_GRAD_TOL = 1e-9

METRIC_NAMES = ("correction_rel", "cos_before", "cos_after", "objective_before",
                "objective_after", "iterations", "layers_corrected", "layers")


@dataclass
class FairOptions:
    lam: float = option(0.01, "regulariser weight lambda (paper 0.01; reference code 1.0); with "
                        "regulariser = 'relative' it weighs ||dB_l||^2 / ||B_bar_l||^2 per layer, "
                        "the same at any scale of B", min=0)
    regulariser: str = option("relative", "relative = lam ||dB_l||^2 / ||B_bar_l||^2 per layer "
                              "(scale-free); absolute = the paper's literal lam ||dB||^2, whose "
                              "effect depends on B's scale", choices=("relative", "absolute"))
    solver: str = option("cosine", "cosine = the paper's iterative objective; lstsq = closed-form "
                         "Frobenius variant (NOT the paper's method)", choices=("cosine", "lstsq"))
    iterations: int = option(1000, "most iterations per round (cosine solver)", min=1)
    optimizer: str = option("lbfgs", "solver of the cosine objective: lbfgs (line search, "
                            "monotone), or adam / sgd (reference code: sgd) with early stop",
                            choices=("lbfgs", "adam", "sgd"))
    lr: float = option(0.01, "adam / sgd step size on the normalised problem (objective 1 and "
                       "gradient norm 1 at dB = 0)", gt=0)
    tol: float = option(1e-9, "stop when the objective changes by < tol times its value at "
                        "dB = 0 (adam / sgd: for ``patience`` steps)", min=0)
    patience: int = option(5, "adam / sgd: consecutive calm steps before stopping", min=1)


def column_cosine_loss(ideal: torch.Tensor, product: torch.Tensor) -> torch.Tensor:
    """1 - the mean over columns j of cos(ideal[:, j], product[:, j]) (one layer, for reference
    and tests; the solver uses the equivalent ``CosineTerms``)."""
    cos = torch.nn.functional.cosine_similarity(ideal, product, dim=0, eps=1e-12)
    return 1.0 - cos.mean()


class CosineTerms:
    """Per-layer 1 - mean_j cos(ideal[:, j], (b a)[:, j]) for a stack of same-shaped layers
    (ideal (L, d_out, d_in), a (L, r, d_in)), without forming b a:
    <ideal_j, b a_j> = (ideal^T b)_j . a_j and ||b a_j||^2 = a_j^T (b^T b) a_j."""

    def __init__(self, ideal: torch.Tensor, a: torch.Tensor) -> None:
        self.ideal_t, self.a_t = ideal.transpose(1, 2), a.transpose(1, 2)
        self.ideal_norm = ideal.norm(dim=1)

    def __call__(self, b: torch.Tensor) -> torch.Tensor:
        dots = (torch.bmm(self.ideal_t, b) * self.a_t).sum(-1)
        norms_sq = (torch.bmm(self.a_t, torch.bmm(b.transpose(1, 2), b)) * self.a_t).sum(-1)
        cos = dots / (self.ideal_norm * norms_sq.clamp_min(1e-300).sqrt()).clamp_min(1e-300)
        return 1.0 - cos.mean(-1)


def reg_weights(b_bar: torch.Tensor, lam: float, regulariser: str) -> torch.Tensor:
    """Per-layer weight of ||dB_l||^2: lam (absolute) or lam / ||B_bar_l||^2 (relative; 0 where
    B_bar_l = 0, a layer that is never corrected)."""
    if regulariser == "absolute":
        return torch.full(b_bar.shape[:1], lam, dtype=b_bar.dtype)
    sq = b_bar.pow(2).sum(dim=(1, 2))
    return torch.where(sq > 0, lam / sq.clamp_min(1e-300), torch.zeros_like(sq))


def layer_objective(terms: CosineTerms, b_bar: torch.Tensor, weights: torch.Tensor,
                    db: torch.Tensor) -> torch.Tensor:
    """The paper's objective per layer: cosine term + weight * ||dB_l||^2."""
    return terms(b_bar + db) + weights * db.pow(2).sum(dim=(1, 2))


def lstsq_correction(ideal: torch.Tensor, b_bar: torch.Tensor, a_bar: torch.Tensor,
                     lam: float | torch.Tensor) -> torch.Tensor:
    """Closed form of argmin ||ideal - (B_bar + dB) A_bar||_F^2 + lam ||dB||_F^2 (batched over
    leading dimensions; ``lam`` a number or one per layer)."""
    residual = ideal - b_bar @ a_bar
    eye = torch.eye(a_bar.shape[-2], dtype=a_bar.dtype)
    lam = torch.as_tensor(lam, dtype=a_bar.dtype).reshape(-1, 1, 1) if a_bar.dim() == 3 else lam
    gram = a_bar @ a_bar.transpose(-1, -2) + lam * eye
    # dB gram = residual A_bar^T  <=>  gram dB^T = A_bar residual^T (gram is symmetric)
    return torch.linalg.solve(gram, a_bar @ residual.transpose(-1, -2)).transpose(-1, -2)


def relative_lstsq_lam(ideal: torch.Tensor, b_bar: torch.Tensor, lam: float) -> torch.Tensor:
    """lam' for ``lstsq`` with the relative regulariser: argmin ||R - dB A||^2 / ||dW||^2 +
    lam ||dB||^2 / ||B_bar||^2 is the closed form with lam' = lam ||dW||^2 / ||B_bar||^2."""
    return lam * ideal.pow(2).sum(dim=(1, 2)) / b_bar.pow(2).sum(dim=(1, 2)).clamp_min(1e-300)


def cosine_correction(ideal: torch.Tensor, b_bar: torch.Tensor, a_bar: torch.Tensor,
                      opts: FairOptions) -> tuple[torch.Tensor, int]:
    """Iterative solution of the paper's objective for a stack of same-shaped layers (ideal
    (L, d_out, d_in), b_bar (L, d_out, r), a_bar (L, r, d_in)) on the normalised problem (module
    docstring); returns dB and the iterations taken. Layers already aligned, stationary at
    dB = 0, or with B_bar = 0 or dW = 0 get no correction."""
    correction = torch.zeros_like(b_bar)
    norms = b_bar.flatten(1).norm(dim=1)
    active = (norms > 0) & (ideal.flatten(1).norm(dim=1) > 0)
    if not bool(active.any()):
        return correction, 0
    ideal, b_bar, a_bar = ideal[active], b_bar[active], a_bar[active]
    terms = CosineTerms(ideal, a_bar)
    weights = reg_weights(b_bar, opts.lam, opts.regulariser)
    zero = torch.zeros_like(b_bar, requires_grad=True)
    start = layer_objective(terms, b_bar, weights, zero)
    (grad,) = torch.autograd.grad(start.sum(), zero)
    start, grad = start.detach(), grad.flatten(1).norm(dim=1)
    moving = (start > _AGREED) & (norms[active] * grad > _STATIONARY * start)
    count = int(moving.sum())
    if count == 0:
        return correction, 0
    keep = moving.nonzero().flatten()
    terms = CosineTerms(ideal[keep], a_bar[keep])
    b_bar, weights, start = b_bar[keep], weights[keep], start[keep]
    # dB_l = scale_l x_l with the mean of objective_l / start_l minimised: it starts at 1 and
    # its gradient in x has norm 1 / sqrt(count) per layer, 1 in all.
    scale = (math.sqrt(count) * start / grad[keep]).reshape(-1, 1, 1)

    def objective(x: torch.Tensor) -> torch.Tensor:
        return (layer_objective(terms, b_bar, weights, scale * x) / start).mean()

    solve = _lbfgs if opts.optimizer == "lbfgs" else _first_order
    x, steps = solve(objective, torch.zeros_like(b_bar), opts)
    rows = active.nonzero().flatten()[keep]
    correction[rows] = scale * x
    return correction, steps


def _lbfgs(objective: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor,
           opts: FairOptions) -> tuple[torch.Tensor, int]:
    """L-BFGS with a strong-Wolfe line search: the objective never increases. Its tolerances
    are absolute, which is right here: the objective starts at 1 with a unit gradient."""
    x = start.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([x], lr=1.0, max_iter=opts.iterations, history_size=20,
                                  tolerance_grad=_GRAD_TOL, tolerance_change=opts.tol,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective(x)
        loss.backward()
        return loss

    optimizer.step(closure)
    return x.detach(), int(optimizer.state[x].get("n_iter", 0))


def _first_order(objective: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor,
                 opts: FairOptions) -> tuple[torch.Tensor, int]:
    """Adam or SGD (the reference code's) with its early stop (|objective change| < tol for
    ``patience`` steps). Returns the best iterate seen: Adam normalises the gradient's size, so
    near the optimum it keeps taking steps of about ``lr`` and can end above where it began."""
    x = start.clone().requires_grad_(True)
    make = torch.optim.Adam if opts.optimizer == "adam" else torch.optim.SGD
    optimizer = make([x], lr=opts.lr)
    best, best_value = start.clone(), float("inf")
    previous, calm, steps = float("inf"), 0, 0
    while steps < opts.iterations and calm < opts.patience:
        optimizer.zero_grad()
        loss = objective(x)
        value = float(loss.detach())
        if value < best_value:
            best, best_value = x.detach().clone(), value
        loss.backward()
        if float(x.grad.abs().max()) <= _GRAD_TOL:  # stationary: nothing to gain
            break
        optimizer.step()
        steps += 1
        calm = calm + 1 if abs(previous - value) < opts.tol else 0
        previous = value
    return best, steps


def ideal_update(uploads: list[Upload], a_key: str, b_key: str,
                 weights: torch.Tensor) -> torch.Tensor:
    """sum_k p_k B_k A_k in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for p, up in zip(weights, uploads, strict=True):
        b, a = up.payload.tensors[b_key].double(), up.payload.tensors[a_key].double()
        total = total + p * (b @ a)
    return total


def mean64(uploads: list[Upload], key: str, weights: torch.Tensor) -> torch.Tensor:
    """sum_k p_k X_k in float64. The solver must see A_bar and B_bar at the precision of the
    ideal update: with float32 means, B_bar A_bar differs from an agreeing clients' dW by
    rounding, which the normalised problem would take for a direction."""
    return torch.tensordot(weights, torch.stack([u.payload.tensors[key].double()
                                                 for u in uploads]), dims=1)


class Tally:
    """Sums over groups of same-shaped layers for the round's metrics."""

    def __init__(self) -> None:
        self.sums = dict.fromkeys(("db_sq", "b_sq", "cos_before", "cos_after", "objective_before",
                                   "objective_after", "iterations", "layers_corrected",
                                   "layers"), 0.0)

    def add(self, ideal: torch.Tensor, b_bar: torch.Tensor, a_bar: torch.Tensor,
            db: torch.Tensor, weights: torch.Tensor, iterations: int) -> None:
        terms = CosineTerms(ideal, a_bar)
        before, after = terms(b_bar), terms(b_bar + db)
        s = self.sums
        s["db_sq"] += float(db.pow(2).sum())
        s["b_sq"] += float(b_bar.pow(2).sum())
        s["cos_before"] += float((1 - before).sum())
        s["cos_after"] += float((1 - after).sum())
        s["objective_before"] += float(before.sum())
        s["objective_after"] += float((after + weights * db.pow(2).sum(dim=(1, 2))).sum())
        s["iterations"] += iterations
        s["layers_corrected"] += int((db.flatten(1).abs().amax(1) > 0).sum())
        s["layers"] += len(b_bar)

    def metrics(self) -> dict[str, float]:
        s, layers = self.sums, max(self.sums["layers"], 1)
        values = {"correction_rel": math.sqrt(s["db_sq"] / s["b_sq"]) if s["b_sq"] > 0 else 0.0,
                  "cos_before": s["cos_before"] / layers, "cos_after": s["cos_after"] / layers,
                  **{k: s[k] for k in ("objective_before", "objective_after", "iterations",
                                       "layers_corrected", "layers")}}
        return {name: float(values[name]) for name in METRIC_NAMES}


@register("lora-fair")
class LoRAFAIR(Method):
    """FedIT's means plus a server-side correction of B towards the mean of the products."""

    Options = FairOptions
    secagg_refusal = ("its correction needs the mean of the products B_k A_k, which the "
                      "means of the factors do not give")

    def __init__(self, options: FairOptions, ctx: MethodContext) -> None:
        super().__init__(options, ctx)
        if options.solver == "lstsq" and options.lam == 0:
            # A_bar A_bar^T can be singular (e.g. rank-deficient A_bar): keep the solve defined.
            raise ConfigError("method.lam = 0 with method.solver = 'lstsq': the closed form "
                              "needs lam > 0")

    def aggregate(self, state: Payload, uploads: list[Upload]) -> Aggregate:
        means = weighted_mean(uploads, state.tensors)
        weights = torch.tensor([u.num_examples for u in uploads], dtype=torch.float64)
        weights = weights / weights.sum()
        groups: dict[tuple[int, ...], list[LoraPair]] = {}
        for pair in lora_pairs(list(state.tensors), 1.0).values():
            shape = (*means[pair.b_key].shape, means[pair.a_key].shape[-1])
            groups.setdefault(shape, []).append(pair)
        tally = Tally()
        for pairs in groups.values():  # same-shaped layers are solved together
            a_bar = torch.stack([mean64(uploads, p.a_key, weights) for p in pairs])
            b_bar = torch.stack([mean64(uploads, p.b_key, weights) for p in pairs])
            ideal = torch.stack([ideal_update(uploads, p.a_key, p.b_key, weights) for p in pairs])
            db, iterations = self.correction(ideal, b_bar, a_bar)
            tally.add(ideal, b_bar, a_bar, db,
                      reg_weights(b_bar, self.options.lam, self.options.regulariser), iterations)
            for pair, b_new in zip(pairs, b_bar + db, strict=True):
                means[pair.b_key] = b_new.to(means[pair.b_key].dtype)
        metrics = {"fair_" + k: float(v) for k, v in tally.metrics().items()}
        return Aggregate(Payload(means, dict(state.scalars)), metrics)

    def correction(self, ideal: torch.Tensor, b_bar: torch.Tensor,
                   a_bar: torch.Tensor) -> tuple[torch.Tensor, int]:
        """dB for a stack of same-shaped layers, and the solver's iterations."""
        opts = self.options
        if opts.solver == "cosine":
            return cosine_correction(ideal, b_bar, a_bar, opts)
        if opts.regulariser == "absolute":
            return lstsq_correction(ideal, b_bar, a_bar, opts.lam), 0
        live = b_bar.flatten(1).norm(dim=1) > 0  # relative: B_bar = 0 is never corrected
        db = torch.zeros_like(b_bar)
        if bool(live.any()):
            lam = relative_lstsq_lam(ideal[live], b_bar[live], opts.lam)
            db[live] = lstsq_correction(ideal[live], b_bar[live], a_bar[live], lam)
        return db, 0
