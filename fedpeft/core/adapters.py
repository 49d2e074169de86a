"""LoRA adapters via peft, seen through one small handle: adapter-only state keyed by peft's
state-dict names (what ``get_peft_model_state_dict`` returns and ``save_pretrained`` writes), A/B
pairing per wrapped layer, and in-place loading so virtual clients swap adapters, not models.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fedpeft.core.config import ModelConfig
from fedpeft.core.models import BASE_SEED, default_target_modules
from fedpeft.core.tasks import task_class

Tensors = dict[str, torch.Tensor]
_LORA_KEY = re.compile(r"^(?P<layer>.+)\.lora_(?P<factor>[AB])\.weight$")


@dataclass(frozen=True)
class LoraPair:
    """The two factors of one wrapped layer: delta W = scale * B @ A."""

    layer: str
    a_key: str
    b_key: str
    scale: float


class AdapterModel:
    """A peft model plus the mapping from peft state-dict keys to its live parameters."""

    def __init__(self, model: torch.nn.Module, rank: int, alpha: float) -> None:
        from peft import get_peft_model_state_dict

        self.model = model
        self.rank = rank
        self.alpha = alpha
        by_ptr = {p.data_ptr(): p for p in model.parameters()}
        self.params: dict[str, torch.nn.Parameter] = {
            key: by_ptr[t.data_ptr()] for key, t in get_peft_model_state_dict(model).items()
        }
        self.pairs: dict[str, LoraPair] = lora_pairs(self.params, alpha / rank)
        lora_keys = {k for p in self.pairs.values() for k in (p.a_key, p.b_key)}
        self.head_keys: list[str] = [k for k in self.params if k not in lora_keys]
        self._w0: dict[str, torch.Tensor] = {}  # pristine base weights of layers given a delta
        self._p0: dict[str, torch.Tensor] = {}  # pristine base parameters set by set_param_delta

    def state(self) -> Tensors:
        """Detached copies of every adapter (and head) tensor."""
        return {k: p.detach().clone() for k, p in self.params.items()}

    def load(self, tensors: Tensors, strict: bool = True) -> None:
        """Copy tensors into the live parameters in place (shape- and key-checked)."""
        if strict:
            missing = set(self.params) - set(tensors)
            if missing:
                raise KeyError(f"adapter state is missing {sorted(missing)[:3]}")
        with torch.no_grad():
            for key, value in tensors.items():
                if key not in self.params:
                    raise KeyError(f"unknown adapter key {key!r}")
                param = self.params[key]
                if param.shape != value.shape:
                    raise ValueError(f"{key}: shape {tuple(value.shape)} != {tuple(param.shape)}")
                param.copy_(value)

    def _stored_weight(self, layer: str) -> torch.nn.Parameter:
        return self.model.get_submodule(layer).base_layer.weight

    def _transposed(self, layer: str) -> bool:
        """GPT-2's Conv1D stores its weight d_in x d_out (peft: ``fan_in_fan_out``)."""
        return bool(getattr(self.model.get_submodule(layer), "fan_in_fan_out", False))

    def base_weight(self, layer: str) -> torch.Tensor:
        """The frozen base weight W (d_out x d_in) of wrapped layer ``layer`` (a pair's name);
        a view of the stored parameter (transposed for a Conv1D layer)."""
        weight = self._stored_weight(layer)
        return weight.T if self._transposed(layer) else weight

    def set_base_delta(self, layer: str, delta: torch.Tensor) -> None:
        """Set the frozen base of ``layer`` to W0 + ``delta`` (d_out x d_in; W0 kept aside,
        never accumulated: one model object serves many virtual clients, each with its own
        merged updates)."""
        weight = self.base_weight(layer)
        if tuple(delta.shape) != tuple(weight.shape):
            raise ValueError(f"{layer}: base delta {tuple(delta.shape)} != {tuple(weight.shape)}")
        if layer not in self._w0:
            self._w0[layer] = weight.detach().clone()
        with torch.no_grad():
            w0 = self._w0[layer]
            weight.copy_(w0 + delta.to(device=w0.device, dtype=w0.dtype))

    def reset_base(self) -> None:
        """Undo every ``set_base_delta``: the base is W0 again (a no-op when none was set)."""
        with torch.no_grad():
            for layer, w0 in self._w0.items():
                self.base_weight(layer).copy_(w0)
            for name, p0 in self._p0.items():
                param = self.model.get_parameter(name)
                param.copy_(p0)
                param.requires_grad_(False)
        self._w0.clear()
        self._p0.clear()

    def set_param_delta(self, name: str, delta: torch.Tensor, trainable: bool = False) -> None:
        """Set base parameter ``name`` (a ``named_parameters`` name, any module) to P0 + ``delta``,
        optionally unfrozen; ``reset_base`` restores P0 and freezes it again (Ferret trains base
        weights of a model object that other virtual clients and methods share)."""
        param = self.model.get_parameter(name)
        if tuple(delta.shape) != tuple(param.shape):
            raise ValueError(f"{name}: delta {tuple(delta.shape)} != {tuple(param.shape)}")
        if name not in self._p0:
            self._p0[name] = param.detach().clone()
        with torch.no_grad():
            p0 = self._p0[name]
            param.copy_(p0 + delta.to(device=p0.device, dtype=p0.dtype))
        param.requires_grad_(trainable)

    def trainable_params(self) -> list[torch.nn.Parameter]:
        """Every parameter that trains: the adapter tensors ``set_trainable`` chose plus any base
        parameter ``set_param_delta`` unfroze."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def set_trainable(self, keys: set[str] | None = None) -> None:
        """Train exactly ``keys`` (all adapter tensors when None); everything else stays frozen."""
        chosen = set(self.params) if keys is None else keys
        for key, param in self.params.items():
            param.requires_grad_(key in chosen)

    def trainable_keys(self) -> list[str]:
        return [k for k, p in self.params.items() if p.requires_grad]

    def num_floats(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def save_pretrained(self, directory: Path, tensors: Tensors | None = None) -> None:
        """Write the adapter in peft's own format (``PeftModel.from_pretrained`` loads it)."""
        if tensors is not None:
            self.load(tensors)
        self.model.save_pretrained(str(directory))


def lora_pairs(keys: dict[str, object] | list[str], scale: float) -> dict[str, LoraPair]:
    """Pair ``...lora_A.weight`` with ``...lora_B.weight`` per wrapped layer."""
    found: dict[str, dict[str, str]] = {}
    for key in keys:
        match = _LORA_KEY.match(key)
        if match:
            found.setdefault(match["layer"], {})[match["factor"]] = key
    return {
        layer: LoraPair(layer, f["A"], f["B"], scale)
        for layer, f in found.items()
        if "A" in f and "B" in f
    }


@functools.lru_cache(maxsize=2)
def _base_model(model_json: str, num_labels: int) -> torch.nn.Module:
    cfg = ModelConfig(**json.loads(model_json))
    return task_class(cfg).build_model(cfg, num_labels)


def base_model(cfg: ModelConfig, num_labels: int) -> torch.nn.Module:
    """The process's frozen base for this model section (built once; do not modify it)."""
    base = {k: v for k, v in dataclasses.asdict(cfg).items()
            if k in ("name", "task", "dtype", "gradient_checkpointing", "pooling")}
    return _base_model(json.dumps(base, sort_keys=True), num_labels)


def target_modules(cfg: ModelConfig, model: torch.nn.Module) -> list[str]:
    """``model.target_modules``, with ``auto`` replaced by peft's defaults for the model."""
    modules: list[str] = []
    for name in cfg.target_modules:
        modules += default_target_modules(model) if name == "auto" else [name]
    return list(dict.fromkeys(modules))


def build_adapter_model(cfg: ModelConfig, num_labels: int, rank: int | None = None) -> AdapterModel:
    """Frozen base (built once per process and copied) + a fresh LoRA adapter of ``rank``; the
    task (``model.task``) decides the base's head and peft's task type."""
    from peft import LoraConfig, get_peft_model

    rank = rank or cfg.rank
    base = copy.deepcopy(base_model(cfg, num_labels))
    targets = target_modules(cfg, base)
    lora = LoraConfig(
        task_type=task_class(cfg).peft_task_type, r=rank, lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout, target_modules=targets, bias="none",
        fan_in_fan_out=uses_conv1d(base, targets),
    )
    with torch.random.fork_rng():
        torch.manual_seed(BASE_SEED + rank)
        try:
            model = get_peft_model(base, lora)
        except ValueError as exc:
            raise ValueError(
                f"model.target_modules = {list(cfg.target_modules)} matched no layer of "
                f"{cfg.name}: {exc}"
            ) from exc
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return AdapterModel(model, rank, cfg.alpha)


def uses_conv1d(model: torch.nn.Module, targets: list[str]) -> bool:
    """Whether the targets are GPT-2-style Conv1D layers (weights stored input x output)."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) and name.split(".")[-1] in targets
               for name, m in model.named_modules())
