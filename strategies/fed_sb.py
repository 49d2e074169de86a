"""Fed-SB (Singhal, Ponkshe, et al.; arXiv 2502.15436) on LoRA-SB (arXiv 2411.19557): per wrapped
layer dW = s B R A with A (r x d_in) and B (d_out x r) frozen and the same on every client, and only
the r x r matrix R trained and exchanged. The average of R is exact:
B (sum_k p_k R_k) A = sum_k p_k B R_k A, and an upload is L r^2 floats (+ the head), whatever the
model's width.

Initialisation (LoRA-SB), the first aggregate. Its round is a gradient round: each sampled client
computes, on the frozen base with the LoRA update at zero, the gradient of its batch-mean loss with
respect to every wrapped weight W, summed over its ``train.local_steps`` batches, G_k, and uploads
it (dense d_out x d_in per layer, once; nothing trains in that round). The server forms
G = sum_k p_k G_k (the sign is taken after the sum, as in the centralised recipe, where the
gradient is summed over the pooled data), the approximate first step of full fine-tuning with Adam,
G_hat = -eta sign(G) (``method.init_lr`` = eta), and its truncated SVD G_hat ~ U_r S_r V_r^T:
B = U_r, A = V_r^T, R = S_r / s, so that s B R A is the best rank-r approximation of G_hat. A and B
have orthonormal columns / rows and never change again.

Training rounds. The downlink holds A, B, R and the head; a client loads A and B into peft's
lora_A / lora_B (frozen) and trains R, a small r x r linear map applied after lora_A (a forward
hook on lora_A: lora_B(R lora_A(x)) = B R A x), and the head. It uploads R and the head. The server
averages them by examples. Server evaluation and the export fold R into B (lora_B = B R), so the
exported adapter is plain peft and exact.

Refused: DP-SGD (R is not a peft adapter tensor, so the per-sample gradient hooks over the adapter
do not cover it, and the gradient round would release raw gradients), robust aggregators and
client-level DP (the gradient round's aggregate is not a mean of the downlink's tensors).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from fedpeft.core.adapters import AdapterModel
from fedpeft.core.config import option

from .aggregators import robust_mean
from .base import (
    Aggregate,
    ClientProfile,
    ClientState,
    Export,
    Method,
    MethodContext,
    Payload,
    Tensors,
    TrainSpec,
    Upload,
    UploadSpec,
    register,
)
from .lowrank import adapter_layers, head_of, scale, weights_by_examples
from .rolora import factor_keys

STAGE = "fed_sb.stage"  # state and downlink scalar: 0 = gradient round pending, 1 = training
CORE = "fed_sb.R::"  # + layer name: the trained r x r matrix
GRAD = "fed_sb.grad::"  # + layer name: a client's summed gradient w.r.t. W (gradient round)
_CHILD = "fed_sb_core"  # the r x r linear map's name under lora_A.<adapter>


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
    default_lr = 0.01
    dp_refusal = ("Fed-SB trains an r x r matrix R per layer that is not a peft adapter tensor, "
                  "so DP-SGD's per-sample gradient hooks do not cover it, and its LoRA-SB "
                  "initialisation uploads each client's raw loss gradient")
    mean_aggregate = False  # the gradient round uploads gradients, not the downlink's tensors

    def __init__(self, options: FedSBOptions, ctx: MethodContext) -> None:
        super().__init__(options, ctx)
        # Per model object, what ``load`` attached for this round (the stage, R's modules and
        # hook handles): detached again by ``uplink`` (or by the next ``load``).
        self._attached: weakref.WeakKeyDictionary[AdapterModel, dict[str, Any]] = (
            weakref.WeakKeyDictionary())

    # ---- server half -------------------------------------------------------------------
    def init(self, template: Tensors) -> Payload:
        factor_keys(list(template), "A", "fed-sb")  # refuses an adapter without LoRA layers
        return Payload({k: v.clone() for k, v in template.items()}, {STAGE: 0})

    def downlink(self, state: Payload, profile: ClientProfile) -> Payload:
        if int(state.scalars[STAGE]) == 0:
            return Payload({}, {STAGE: 0})
        return Payload(dict(state.tensors), {STAGE: 1})

    def expected_upload(self, state: Payload, profile: ClientProfile) -> UploadSpec:
        layers = adapter_layers(state.tensors)
        if int(state.scalars[STAGE]) == 0:
            return UploadSpec({GRAD + layer.name: (layer.d_out, layer.d_in) for layer in layers})
        shapes = {CORE + layer.name: tuple(state.tensors[CORE + layer.name].shape)
                  for layer in layers}
        shapes.update({k: tuple(v.shape) for k, v in head_of(state.tensors).items()})
        return UploadSpec(shapes)

    def aggregate(self, state: Payload, uploads: list[Upload]) -> Aggregate:
        if int(state.scalars[STAGE]) == 0:
            return Aggregate(self._initialise(state, uploads))
        keys = [k for k in self.expected_upload(state, ClientProfile(0, self.ctx.rank)).tensors]
        robust = robust_mean(self.ctx.aggregator, uploads, keys, state.tensors)
        return Aggregate(Payload({**state.tensors, **robust.tensors}, dict(state.scalars)),
                         robust.metrics)

    def _initialise(self, state: Payload, uploads: list[Upload]) -> Payload:
        """The LoRA-SB factors from the clients' gradients (see the module docstring)."""
        weights = weights_by_examples([u.num_examples for u in uploads])
        s = scale(self.ctx.alpha, self.ctx.rank)
        tensors = dict(state.tensors)
        for layer in adapter_layers(state.tensors):
            grad = sum(p * u.payload.tensors[GRAD + layer.name].double()
                       for p, u in zip(weights, uploads, strict=True))
            b, r, a = lora_sb_init(grad, self.ctx.rank, self.options.init_lr, s)  # type: ignore[arg-type]
            dtype = state.tensors[layer.a_key].dtype
            tensors[layer.b_key], tensors[layer.a_key] = b.to(dtype), a.to(dtype)
            tensors[CORE + layer.name] = r.to(dtype)
        return Payload(tensors, {**state.scalars, STAGE: 1})

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
            model.load({k: v for k, v in payload.tensors.items() if not k.startswith(CORE)})
            self._attach_cores(model, payload.tensors)
        else:
            raise ValueError(f"fed-sb downlink without a valid stage ({STAGE!r})")

    def _capture_gradients(self, model: AdapterModel, client_state: ClientState) -> None:
        """Gradient round: zero LoRA update, each wrapped W made trainable with a hook that adds
        its gradient to an accumulator and hands the optimizer zeros (W does not move)."""
        model.load({k: torch.zeros_like(p, device="cpu") for k, p in model.params.items()
                    if ".lora_B." in k}, strict=False)
        handles = []
        for layer in model.pairs:
            name = base_param(model, layer)[0]
            param = model.model.get_parameter(name)
            model.set_param_delta(name, torch.zeros_like(param), trainable=True)
            acc = torch.zeros_like(param, dtype=torch.float32)
            client_state.tensors[GRAD + layer] = acc  # popped by uplink

            def hook(grad: torch.Tensor, acc: torch.Tensor = acc) -> torch.Tensor:
                acc.add_(grad.detach().float())
                return torch.zeros_like(grad)

            handles.append(param.register_hook(hook))
        self._attached[model] = {"stage": 0, "handles": handles}

    def _attach_cores(self, model: AdapterModel, tensors: Tensors) -> None:
        """Training round: R as a trainable r x r linear map after each lora_A."""
        handles, modules = [], []
        for layer in model.pairs:
            core = tensors[CORE + layer]
            module = lora_a_module(model, layer)
            weight = module.weight
            linear = torch.nn.Linear(core.shape[1], core.shape[0], bias=False,
                                     device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(core)
            module.add_module(_CHILD, linear)
            handles.append(module.register_forward_hook(
                lambda mod, inputs, out: getattr(mod, _CHILD)(out)))
            modules.append((layer, module))
        self._attached[model] = {"stage": 1, "handles": handles, "modules": modules}

    def _detach(self, model: AdapterModel) -> dict[str, Any]:
        """Remove what ``load`` attached to ``model``; returns R per layer (training round)."""
        attached = self._attached.pop(model, None) or {}
        for handle in attached.get("handles", []):
            handle.remove()
        cores = {}
        for layer, module in attached.get("modules", []):
            cores[layer] = getattr(module, _CHILD).weight.detach().to("cpu").clone()
            delattr(module, _CHILD)
        return {"stage": attached.get("stage"), "cores": cores}

    def train_spec(self, model: AdapterModel) -> TrainSpec:
        """Gradient round: no adapter tensor trains; training round: the head (and R)."""
        if self._attached[model]["stage"] == 0:
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
        return Payload(out)

