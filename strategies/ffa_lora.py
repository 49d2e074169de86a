"""FFA-LoRA (Sun, Li, Li, Ding; ICLR 2024): freeze the non-zero LoRA factor A, identical on every
client, and train and exchange only the zero-initialised factor B (and the task head).

A is never sent. The server owns a seed and sends it as a scalar; server and clients both draw A
from it with peft's own initialisation (``kaiming_uniform_(a=sqrt(5))``, i.e. U(+-1/sqrt(d_in)))
through a private ``torch.Generator`` per layer, so the global RNG is never touched and every
process gets bit-identical factors. Because A is shared and fixed, averaging B is exact:
mean_k(B_k) A = mean_k(B_k A).

Learning rate: with A frozen the update of W is s * dB * A with A's entries ~1/sqrt(d_in), so B
needs larger steps than in LoRA; the paper tunes FFA-LoRA on a ~10x larger grid than LoRA. The
default here (``default_lr`` = 0.02, used when ``train.lr = 0``) is 10x FedIT's 0.002 with AdamW.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import torch

from fedpeft.core.adapters import AdapterModel, lora_pairs
from fedpeft.core.config import ConfigError, option

from .aggregators import robust_mean
from .base import (
    Aggregate,
    ClientProfile,
    ClientState,
    Method,
    MethodContext,
    Payload,
    Tensors,
    TrainSpec,
    Upload,
    UploadSpec,
    register,
)

SEED_KEY = "ffa_lora.seed"
_EMBEDDING_MARK = "lora_embedding_"


@dataclass
class FFAOptions:
    seed: int = option(-1, "seed of the frozen shared factor A (-1: federation.seed)", min=-1)


def layer_seed(seed: int, key: str) -> int:
    """A per-layer generator seed that depends only on the run's seed and the tensor's name (not
    on which other layers exist or their order)."""
    digest = hashlib.sha256(f"ffa-lora:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@functools.lru_cache(maxsize=512)
def _frozen_factor(seed: int, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(layer_seed(seed, key))
    tensor = torch.empty(shape, dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)
    return tensor


def frozen_factor(seed: int, key: str, shape: tuple[int, ...],
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The shared A of tensor ``key`` (cached per process; a fresh copy each call)."""
    return _frozen_factor(seed, key, tuple(shape)).to(dtype=dtype, copy=True)


def frozen_factors(seed: int, shapes: dict[str, tuple[int, ...]],
                   dtype: torch.dtype = torch.float32) -> Tensors:
    return {key: frozen_factor(seed, key, shape, dtype) for key, shape in shapes.items()}


def check_no_embedding_lora(keys: list[str]) -> None:
    """peft's embedding LoRA initialises A = 0 and B ~ N(0, 1): the non-zero factor is B, and its
    tensors are not paired as lora_A/lora_B. Freezing A there would freeze the zero factor."""
    bad = [k for k in keys if _EMBEDDING_MARK in k]
    if bad:
        raise ConfigError(
            f"method.name = 'ffa-lora' freezes the non-zero LoRA factor of linear layers; "
            f"embedding LoRA ({bad[0]}) has its non-zero factor on the other side and is not "
            f"supported: remove embedding modules from model.target_modules"
        )


def a_keys(keys: list[str]) -> list[str]:
    """The frozen factors' keys (lora_A of every wrapped linear layer)."""
    check_no_embedding_lora(keys)
    pairs = lora_pairs(keys, 1.0)
    if not pairs:
        raise ConfigError("method.name = 'ffa-lora' needs LoRA layers, but the adapter has none")
    return sorted(p.a_key for p in pairs.values())


@register("ffa-lora")
class FFALoRA(Method):
    """Frozen shared A (from a seed), train and send only B and the head (half of FedIT's bytes)."""

    Options = FFAOptions
    default_lr = 0.02
    mean_aggregate = True  # a weighted mean of the uploads (B, head), the same downlink for all

    def __init__(self, options: FFAOptions, ctx: MethodContext) -> None:
        super().__init__(options, ctx)
        self.seed = options.seed if options.seed >= 0 else ctx.seed

    # ---- server half -------------------------------------------------------------------
    def init(self, template: Tensors) -> Payload:
        """State = shared A (server-side only) + B + head, and the seed as a scalar."""
        frozen = a_keys(list(template))
        state = {k: v.clone() for k, v in template.items()}
        for key in frozen:
            state[key] = frozen_factor(self.seed, key, tuple(template[key].shape),
                                       template[key].dtype)
        return Payload(state, {SEED_KEY: self.seed})

    def _sent_keys(self, state: Payload) -> list[str]:
        frozen = set(a_keys(list(state.tensors)))
        return [k for k in state.tensors if k not in frozen]

    def downlink(self, state: Payload, profile: ClientProfile) -> Payload:
        tensors = {k: state.tensors[k] for k in self._sent_keys(state)}
        return Payload(tensors, {SEED_KEY: int(state.scalars[SEED_KEY])})

    def expected_upload(self, state: Payload, profile: ClientProfile) -> UploadSpec:
        return UploadSpec({k: tuple(state.tensors[k].shape) for k in self._sent_keys(state)})

    def aggregate(self, state: Payload, uploads: list[Upload]) -> Aggregate:
        tensors = dict(state.tensors)
        robust = robust_mean(self.ctx.aggregator, uploads, self._sent_keys(state), state.tensors)
        tensors.update(robust.tensors)
        return Aggregate(Payload(tensors, dict(state.scalars)), robust.metrics)

    # ---- client half -------------------------------------------------------------------
    def load(self, model: AdapterModel, payload: Payload, client_state: ClientState) -> None:
        if SEED_KEY not in payload.scalars:
            raise ValueError(f"ffa-lora downlink without the shared seed ({SEED_KEY!r})")
        frozen = a_keys(list(model.params))
        shapes = {k: tuple(model.params[k].shape) for k in frozen}
        shared = frozen_factors(int(payload.scalars[SEED_KEY]), shapes,
                                model.params[frozen[0]].dtype)
        model.load({**payload.tensors, **shared})

    def train_spec(self, model: AdapterModel) -> TrainSpec:
        return TrainSpec(keys=_trained_keys(model))

    def uplink(self, model: AdapterModel, payload: Payload, client_state: ClientState) -> Payload:
        keys = _trained_keys(model)
        return Payload({k: v for k, v in model.state().items() if k in keys})


def _trained_keys(model: AdapterModel) -> set[str]:
    """B and the head: every adapter tensor but the frozen A factors."""
    frozen = set(a_keys(list(model.params)))
    return {k for k in model.params if k not in frozen}
