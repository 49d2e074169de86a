"""Fed-SB (Singhal, Ponkshe, et al.; arXiv 2502.15436) on LoRA-SB (arXiv 2411.19557): per wrapped
layer dW = s B R A with A (r x d_in) and B (d_out x r) frozen and the same on every client, and only
the r x r matrix R trained and exchanged: B (sum_k p_k R_k) A = sum_k p_k B R_k A (exact), and an
upload is L r^2 floats (+ the head), whatever the model's width.

Initialisation (LoRA-SB): the first aggregate's round is a gradient round. Each sampled client sums
the gradient of its batch losses w.r.t. every wrapped W (frozen base, LoRA update zero, nothing
trains) over ``train.local_steps`` batches and uploads it (dense, once). The server takes
G = sum_k p_k G_k (sign after the sum, as in the centralised recipe), G_hat = -eta sign(G) (Adam's
first step, eta = ``method.init_lr``) and its truncated SVD U_r S_r V_r^T: B = U_r, A = V_r^T,
R = S_r / s, so s B R A is the best rank-r approximation of G_hat. A and B never change again.

Training rounds: a client trains R, an r x r linear map hooked after peft's lora_A (lora_B(R
lora_A(x)) = B R A x, detached after the round), and the head, and uploads both with the
fingerprint of the A and B it trained on. A and B are sent to a client once: it keeps them in its
ClientState, and the server sends them again only to a client whose last upload did not confirm
them (a lost state: that upload is left out of the mean). Evaluation and the export fold R into B
(lora_B = B R): a plain, exact peft adapter.

A robust aggregator replaces both means (the gradient round's G, e.g. by the coordinate-wise
median of the G_k; then R and the head). Refused: DP-SGD (R is not a peft adapter tensor, which
DP-SGD's per-sample hooks cover, and the gradient round would release raw gradients), client-level
DP (the gradient round's uploads are not updates of a downlink, and the server reads a per-upload
scalar) and secure aggregation (that scalar again).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from fedpeft.core.adapters import AdapterModel
from fedpeft.core.config import option

from .aggregators import robust_mean
from .base import (
    Aggregate,
    Bound,
    ClientProfile,
    ClientState,
    Export,
    Method,
    Payload,
    Tensors,
    TrainSpec,
    Upload,
    UploadSpec,
    register,
)
from .lowrank import adapter_layers, head_of, scale
from .rolora import factor_keys

STAGE = "fed_sb.stage"  # state and downlink scalar: 0 = gradient round pending, 1 = training
FACTORS = "fed_sb.factors"  # state and downlink scalar: a fingerprint of the frozen A and B
HOLDS = "fed_sb.holds"  # upload scalar: the fingerprint of the A and B the client trained on
HELD = "fed_sb.held::"  # + LoRA key: a client's copy of A and B (ClientState)
LOST = "fed_sb.lost"  # ClientState value: this round's client held no usable A and B
CORE = "fed_sb.R::"  # + layer name: the trained r x r matrix
GRAD = "fed_sb.grad::"  # + layer name: a client's summed gradient w.r.t. W (gradient round)
_CHILD = "fed_sb_core"  # the r x r linear map's name under lora_A.<adapter>
_HANDLE = "_fed_sb_hook"  # attribute of a hooked module or parameter: its hook handle


@dataclass
class FedSBOptions:
    init_lr: float = option(1e-3, "eta of the LoRA-SB initialisation: the initial update is the "
                            "best rank-r approximation of -eta sign(G), one Adam step of full "
                            "fine-tuning at rate eta", gt=0)


def lora_a_module(model: AdapterModel, layer: str) -> torch.nn.Module:
    wrapped = model.model.get_submodule(layer)
    return wrapped.lora_A[wrapped.active_adapters[0]]


def base_param(model: AdapterModel, layer: str) -> tuple[str, bool]:
    """The ``named_parameters`` name of a wrapped layer's frozen weight and whether it is stored
    d_in x d_out (GPT-2's Conv1D)."""
    wrapped = model.model.get_submodule(layer)
    return f"{layer}.base_layer.weight", bool(getattr(wrapped, "fan_in_fan_out", False))


def lora_sb_init(grad: torch.Tensor, rank: int, eta: float,
                 s: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, R, A) in float64 with s B R A the best rank-``rank`` approximation of
    -eta sign(grad) (d_out x d_in); B and A^T have orthonormal columns."""
    g_hat = -eta * torch.sign(grad.double())
    u, sv, vh = torch.linalg.svd(g_hat, full_matrices=False)
    return u[:, :rank], torch.diag(sv[:rank]) / s, vh[:rank]


@register("fed-sb")
class FedSB(Method):
    """Fed-SB (Singhal et al., 2025, on LoRA-SB): frozen A, B from the LoRA-SB initialisation
    (one gradient round); clients train and send only an r x r matrix R per layer (and the head):
    exact average, uplink independent of width."""

    Options = FedSBOptions
    # Only r^2 numbers per layer train, so an Adam step moves W by ~ s lr r per layer, several
    # times less than a B-only step; at 0.01 the default experiment (14 training rounds after the
    # gradient round) was still learning at its end. 0.02 is FFA-LoRA's rate, which its head and
    # factor take well (docs/results.md).
    default_lr = 0.02
    dp_refusal = ("Fed-SB trains an r x r matrix R per layer that is not a peft adapter tensor, "
                  "so DP-SGD's per-sample gradient hooks do not cover it, and its LoRA-SB "
                  "initialisation uploads each client's raw loss gradient")
    # Both rounds' aggregates read the uploads through their mean (the gradient round: sign and
    # SVD of the mean gradient; then the mean of R and the head), so a robust rule replaces it.
    mean_aggregate = True
    client_dp_refusal = ("its first round uploads raw loss gradients, not updates of what the "
                         "client was sent, and the server drops an upload whose client lost the "
                         "frozen A and B (a scalar of each upload, which the noised mean does "
                         "not carry)")
    secagg_refusal = ("the server keeps, per client, whether it holds the frozen A and B (sent "
                      "once), from a scalar in each upload that a secure sum would not reveal")

    # ---- server half -------------------------------------------------------------------
    def init(self, template: Tensors) -> Payload:
        factor_keys(list(template), "A", "fed-sb")  # refuses an adapter without LoRA layers
        return Payload({k: v.clone() for k, v in template.items()}, {STAGE: 0})

    def downlink(self, state: Payload, profile: ClientProfile) -> Payload:
        """Gradient round: nothing. Then R and the head, and A and B only to a client that did
        not confirm holding them (its last upload's ``fed_sb.holds``)."""
        if int(state.scalars[STAGE]) == 0:
            return Payload({}, {STAGE: 0})
        fingerprint = int(state.scalars[FACTORS])
        held = int(state.scalars.get(client_key(profile), 0)) == fingerprint
        lora = set(factor_keys(list(state.tensors), "A", "fed-sb")
                   + factor_keys(list(state.tensors), "B", "fed-sb"))
        tensors = {k: v for k, v in state.tensors.items() if not (held and k in lora)}
        return Payload(tensors, {STAGE: 1, FACTORS: fingerprint})

    def expected_upload(self, state: Payload, profile: ClientProfile) -> UploadSpec:
        layers = adapter_layers(state.tensors)
        if int(state.scalars[STAGE]) == 0:
            return UploadSpec({GRAD + layer.name: (layer.d_out, layer.d_in) for layer in layers})
        shapes = {CORE + layer.name: tuple(state.tensors[CORE + layer.name].shape)
                  for layer in layers}
        shapes.update({k: tuple(v.shape) for k, v in head_of(state.tensors).items()})
        return UploadSpec(shapes, {HOLDS: Bound(0, 2**48, required=True)})

    def aggregate(self, state: Payload, uploads: list[Upload]) -> Aggregate:
        if int(state.scalars[STAGE]) == 0:
            return Aggregate(self._initialise(state, uploads))
        fingerprint = int(state.scalars[FACTORS])
        scalars = dict(state.scalars)
        for upload in uploads:  # who holds A and B now (the downlink leaves them out then)
            scalars[client_key(upload.profile)] = int(upload.payload.scalars.get(HOLDS, 0))
        usable = [u for u in uploads if int(u.payload.scalars.get(HOLDS, 0)) == fingerprint]
        if not usable:
            raise ValueError("fed-sb: every upload of the round came from a client without the "
                             "frozen A and B (each is sent them next time)")
        keys = [k for k in self.expected_upload(state, ClientProfile(0, self.ctx.rank)).tensors]
        robust = robust_mean(self.ctx.aggregator, usable, keys, state.tensors)
        return Aggregate(Payload({**state.tensors, **robust.tensors}, scalars),
                         {**robust.metrics, "fed_sb_resent": float(len(uploads) - len(usable))})

    def _initialise(self, state: Payload, uploads: list[Upload]) -> Payload:
        """The LoRA-SB factors from the clients' gradients (see the module docstring)."""
        s = scale(self.ctx.alpha, self.ctx.rank)
        tensors = dict(state.tensors)
        layers = adapter_layers(state.tensors)
        keys = [GRAD + layer.name for layer in layers]
        zeros = {GRAD + layer.name: torch.zeros(layer.d_out, layer.d_in) for layer in layers}
        grads = robust_mean(self.ctx.aggregator, uploads, keys, zeros)  # the mean, or a robust rule
        for layer in layers:
            grad = grads.tensors[GRAD + layer.name]
            b, r, a = lora_sb_init(grad, self.ctx.rank, self.options.init_lr, s)  # type: ignore[arg-type]
            dtype = state.tensors[layer.a_key].dtype
            tensors[layer.b_key], tensors[layer.a_key] = b.to(dtype), a.to(dtype)
            tensors[CORE + layer.name] = r.to(dtype)
        return Payload(tensors, {**state.scalars, STAGE: 1, FACTORS: fingerprint_of(tensors)})

    def load_global(self, model: AdapterModel, state: Payload) -> None:
        model.load(self.export(state).tensors)

    def export(self, state: Payload) -> Export:
        """A plain peft adapter: lora_B = B R, lora_A = A (exact)."""
        out = {k: v for k, v in state.tensors.items() if not k.startswith(CORE)}
        for layer in adapter_layers(out):
            core = state.tensors.get(CORE + layer.name)
            if core is not None:
                b = out[layer.b_key]
                out[layer.b_key] = (b.double() @ core.double()).to(b.dtype)
        return Export(out)

    # ---- client half -------------------------------------------------------------------
    def load(self, model: AdapterModel, payload: Payload, client_state: ClientState) -> None:
        self._detach(model)
        stage = int(payload.scalars.get(STAGE, -1))
        if stage == 0:
            self._capture_gradients(model, client_state)
        elif stage == 1:
            factors = held_factors(model, payload, client_state)
            model.load({**{k: v for k, v in payload.tensors.items() if not k.startswith(CORE)},
                        **factors})
            self._attach_cores(model, payload.tensors)
        else:
            raise ValueError(f"fed-sb downlink without a valid stage ({STAGE!r})")

    def _capture_gradients(self, model: AdapterModel, client_state: ClientState) -> None:
        """Gradient round: zero LoRA update, each wrapped W made trainable with a hook that adds
        its gradient to an accumulator and hands the optimizer zeros (W does not move)."""
        model.load({k: torch.zeros_like(p, device="cpu") for k, p in model.params.items()
                    if ".lora_B." in k}, strict=False)
        for layer in model.pairs:
            name = base_param(model, layer)[0]
            param = model.model.get_parameter(name)
            model.set_param_delta(name, torch.zeros_like(param), trainable=True)
            acc = torch.zeros_like(param, dtype=torch.float32)
            client_state.tensors[GRAD + layer] = acc  # popped by uplink

            def hook(grad: torch.Tensor, acc: torch.Tensor = acc) -> torch.Tensor:
                acc.add_(grad.detach().float())
                return torch.zeros_like(grad)

            setattr(param, _HANDLE, param.register_hook(hook))

    def _attach_cores(self, model: AdapterModel, tensors: Tensors) -> None:
        """Training round: R as a trainable r x r linear map after each lora_A."""
        for layer in model.pairs:
            core = tensors[CORE + layer]
            module = lora_a_module(model, layer)
            weight = module.weight
            linear = torch.nn.Linear(core.shape[1], core.shape[0], bias=False,
                                     device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(core)
            module.add_module(_CHILD, linear)
            setattr(module, _HANDLE, module.register_forward_hook(
                lambda mod, inputs, out: getattr(mod, _CHILD)(out)))

    def _detach(self, model: AdapterModel) -> dict[str, Any]:
        """Remove what ``load`` attached to ``model`` (the hooks and R's maps, each kept on the
        object it hooks); returns the stage found (None: nothing) and R per layer."""
        stage, cores = None, {}
        for layer in model.pairs:
            param = model.model.get_parameter(base_param(model, layer)[0])
            if hasattr(param, _HANDLE):
                getattr(param, _HANDLE).remove()
                delattr(param, _HANDLE)
                stage = 0
            module = lora_a_module(model, layer)
            if hasattr(module, _HANDLE):
                getattr(module, _HANDLE).remove()
                delattr(module, _HANDLE)
            if hasattr(module, _CHILD):
                cores[layer] = getattr(module, _CHILD).weight.detach().to("cpu").clone()
                delattr(module, _CHILD)
                stage = 1
        return {"stage": stage, "cores": cores}

    def train_spec(self, model: AdapterModel) -> TrainSpec:
        """Gradient round: no adapter tensor trains; training round: the head (and R)."""
        if not hasattr(lora_a_module(model, next(iter(model.pairs))), _CHILD):
            return TrainSpec(keys=set())
        return TrainSpec(keys=set(model.head_keys))

    def uplink(self, model: AdapterModel, payload: Payload, client_state: ClientState) -> Payload:
        detached = self._detach(model)
        if detached["stage"] == 0:
            grads = {}
            for layer in model.pairs:
                acc = client_state.tensors.pop(GRAD + layer).cpu()
                grads[GRAD + layer] = acc.T.contiguous() if base_param(model, layer)[1] else acc
            return Payload(grads)
        state = model.state()
        out = {CORE + layer: core for layer, core in detached["cores"].items()}
        out.update({k: state[k] for k in model.head_keys})
        lost = client_state.values.pop(LOST, 0)
        return Payload(out, {HOLDS: 0 if lost else int(client_state.values.get(FACTORS, 0))})


def client_key(profile: ClientProfile) -> str:
    """State scalar: the fingerprint of the A and B this client last said it holds."""
    return f"fed_sb.client.{profile.node_id}:{profile.partition_id}"


def fingerprint_of(tensors: Tensors) -> int:
    """48 bits of a SHA-256 over the frozen A and B (in key order)."""
    digest = hashlib.sha256()
    for key in sorted(factor_keys(list(tensors), "A", "fed-sb")
                      + factor_keys(list(tensors), "B", "fed-sb")):
        digest.update(key.encode())
        digest.update(tensors[key].detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest()[:6], "little")


def held_factors(model: AdapterModel, payload: Payload, client_state: ClientState) -> Tensors:
    """A and B for this round: from the downlink (kept in the client state for later rounds)
    or the client's copy. A client without a copy of the downlink's A and B (its state was lost)
    trains on zero factors and says so (``fed_sb.holds`` = 0); the server leaves that upload
    out and sends it A and B next time."""
    lora = [k for k in model.params if k not in model.head_keys]
    fingerprint = int(payload.scalars[FACTORS])
    if all(k in payload.tensors for k in lora):
        for key in [k for k in client_state.tensors if k.startswith(HELD)]:
            del client_state.tensors[key]
        client_state.tensors.update({HELD + k: payload.tensors[k].clone() for k in lora})
        client_state.values[FACTORS] = fingerprint
        return {}
    if int(client_state.values.get(FACTORS, -1)) == fingerprint and all(
            HELD + k in client_state.tensors for k in lora):
        return {k: client_state.tensors[HELD + k] for k in lora}
    client_state.values[LOST] = 1
    return {k: torch.zeros_like(model.params[k], device="cpu") for k in lora}
