"""LoRA-FAIR (Bian, Wang, Zhang, Xu; ICCV 2025): FedIT's averages plus a server-side correction of
B, so that the product the clients start from points the way of the ideal update.

Per wrapped layer, with p_k the example weights of the round's clients:
    A_bar = sum p_k A_k,   B_bar = sum p_k B_k,   dW = sum p_k B_k A_k   (the ideal update)
    dB*   = argmin_dB  sum_j [1 - cos(dW[:, j], ((B_bar + dB) A_bar)[:, j])] / d_in
                       + lam * ||dB||_F^2
solved iteratively with autograd (L-BFGS by default; Adam or the reference code's SGD as options),
and the server sends A_bar and B_bar + dB*; clients train both factors from there. The head is
averaged as in FedIT.

``solver = "lstsq"`` replaces the cosine objective by the Frobenius one, whose closed form is
dB = (dW - B_bar A_bar) A_bar^T (A_bar A_bar^T + lam I)^-1. It is NOT the paper's method.

Implementation notes (where the reference code is followed or not):
- lambda defaults to the paper's 0.01; the reference code's ``lambda_reg`` = 1.0 is an option.
- The regulariser is the squared Frobenius norm, as in the reference code.
- dB starts at 0 (the reference code draws it Xavier-uniform): 0 minimises the regulariser and,
  when the clients agree (dW = B_bar A_bar), is already optimal, so agreement changes nothing.
- As in the reference code the loss is summed over layers (same-shaped layers are solved in one
  batch) and the stop watches the summed loss (|change| < tol).
- The iterations run on dB / sigma with sigma = RMS of the layer's B_bar (the same minimiser; the
  cosine term is invariant to the scale of B, so without this the step size would depend on how
  far training has gone). ``lr`` (adam / sgd) is the step size in those units.
- Solver: the reference code runs SGD (lr 0.01, <= 1000 steps, early stop). L-BFGS with a
  strong-Wolfe line search minimises the same objective without a step size to tune, never ends
  above where it began and stops at once on a zero gradient. Adam (normalised steps of ~lr) took
  clients that nearly agree (0.1% spread) to a cosine loss of 3e-6 from < 1e-6 at dB = 0, and
  moved B of identical clients by 0.2% of its RMS from rounding-size gradients; adam / sgd now
  return their best iterate and stop on a zero gradient. Measured at MiniLM-L6's shapes (12
  layers, 384 x 384, r = 8, 5 disagreeing clients): L-BFGS 14 iterations, 0.1 s, objective
  0.72004 from 0.73684; Adam 67 steps, 0.72005.
- A_bar, B_bar and dW are formed in float64 from the uploads, so agreeing clients give
  B_bar A_bar = dW to float64 rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedpeft.core.adapters import LoraPair, lora_pairs
from fedpeft.core.config import ConfigError, option

from .base import Method, MethodContext, Payload, Upload, register, weighted_mean

# Gradient size (in units of B_bar's RMS) below which dB is at a stationary point: clients that
# agree give gradients of rounding size (~1e-17), which must not be mistaken for a direction.
_GRAD_TOL = 1e-9


@dataclass
class FairOptions:
    lam: float = option(0.01, "regulariser weight lambda (paper 0.01; reference code 1.0)", min=0)
    solver: str = option("cosine", "cosine = the paper's iterative objective; lstsq = closed-form "
                         "Frobenius variant (NOT the paper's method)", choices=("cosine", "lstsq"))
    iterations: int = option(1000, "most iterations per round (cosine solver)", min=1)
    optimizer: str = option("lbfgs", "solver of the cosine objective: lbfgs (line search, "
                            "monotone), or adam / sgd (reference code: sgd) with early stop",
                            choices=("lbfgs", "adam", "sgd"))
    lr: float = option(0.01, "adam / sgd step size, in units of B_bar's RMS", gt=0)
    tol: float = option(1e-6, "stop when |loss change| < tol (adam / sgd: for ``patience`` "
                        "steps)", min=0)
    patience: int = option(5, "adam / sgd: consecutive calm steps before stopping", min=1)


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
    (L, d_out, d_in), b_bar (L, d_out, r), a_bar (L, r, d_in)); returns dB and the iterations
    taken. Layers with B_bar = 0 or an ideal update of 0 get no correction."""
    sigma = b_bar.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
    active = (sigma.flatten() > 0) & (ideal.flatten(1).abs().amax(1) > 0)
    correction = torch.zeros_like(b_bar)
    if not bool(active.any()):
        return correction, 0
    ideal, b_bar, a_bar, sigma = ideal[active], b_bar[active], a_bar[active], sigma[active]
    ideal_t, a_t, ideal_norm = ideal.transpose(1, 2), a_bar.transpose(1, 2), ideal.norm(dim=1)

    def objective(delta: torch.Tensor) -> torch.Tensor:  # delta = dB / sigma, per layer
        step_db = sigma * delta
        return (_stacked_loss(ideal_t, ideal_norm, b_bar + step_db, a_t)
                + opts.lam * step_db.pow(2).sum())

    solve = _lbfgs if opts.optimizer == "lbfgs" else _first_order
    delta, steps = solve(objective, torch.zeros_like(b_bar), opts)
    correction[active] = sigma * delta
    return correction, steps


def _lbfgs(objective: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor,
           opts: FairOptions) -> tuple[torch.Tensor, int]:
    """L-BFGS with a strong-Wolfe line search: the objective never increases, and a start with
    a zero gradient (clients that agree) is returned untouched."""
    delta = start.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([delta], lr=1.0, max_iter=opts.iterations, history_size=20,
                                  tolerance_grad=_GRAD_TOL, tolerance_change=opts.tol,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective(delta)
        loss.backward()
        return loss

    optimizer.step(closure)
    return delta.detach(), int(optimizer.state[delta].get("n_iter", 0))


def _first_order(objective: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor,
                 opts: FairOptions) -> tuple[torch.Tensor, int]:
    """Adam or SGD (the reference code's) with its early stop (|loss change| < tol for
    ``patience`` steps). Returns the best iterate seen: Adam normalises the gradient's size, so
    near the optimum it keeps taking steps of about ``lr`` and can end above where it began."""
    delta = start.clone().requires_grad_(True)
    make = torch.optim.Adam if opts.optimizer == "adam" else torch.optim.SGD
    optimizer = make([delta], lr=opts.lr)
    best, best_value = start.clone(), float("inf")
    previous, calm, steps = float("inf"), 0, 0
    while steps < opts.iterations and calm < opts.patience:
        optimizer.zero_grad()
        loss = objective(delta)
        value = float(loss.detach())
        if value < best_value:
            best, best_value = delta.detach().clone(), value
        loss.backward()
        if float(delta.grad.abs().max()) <= _GRAD_TOL:  # stationary: nothing to gain
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
    rounding, and Adam (which normalises the gradient's size) turns that into real steps."""
    return torch.tensordot(weights, torch.stack([u.payload.tensors[key].double()
                                                 for u in uploads]), dims=1)


@register("lora-fair")
class LoRAFAIR(Method):
    """FedIT's means plus a server-side correction of B towards the mean of the products."""

    Options = FairOptions

    def __init__(self, options: FairOptions, ctx: MethodContext) -> None:
        super().__init__(options, ctx)
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
            a_bar = torch.stack([mean64(uploads, p.a_key, weights) for p in pairs])
            b_bar = torch.stack([mean64(uploads, p.b_key, weights) for p in pairs])
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
