"""What a device accepts from the coordinator: a downlink no larger than any method could send
to this model, checked against the packed manifest before anything is inflated or copied (a
hostile coordinator's 250 KB message must not decode to hundreds of MB on the device).

A device cannot know every method's exact downlink (FLoRA's stacked history, Ferret's rounds of
coefficients), so it bounds its size: by default the adapter itself plus the dense weight of
every wrapped layer (the largest thing a LoRA method sends: FLoRA's dense sum; its history is
never larger), each value at most 8 bytes. A method whose downlink can be larger still (Ferret
on full weights) says so with an optional ``downlink_floats(model)`` hook.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedpeft.core.adapters import AdapterModel, lora_pairs
from fedpeft.core.config import ConfigError
from fedpeft.core.payload import VALUE_BYTES, Expected

SLACK_BYTES = 64 << 10  # scalars' room and a few small tensors (seeds, ids) on top


def downlink_floats(model: AdapterModel) -> int:
    """The adapter's numbers plus the dense weight of every layer it wraps."""
    params = model.params
    dense = sum(int(params[p.b_key].shape[0]) * int(params[p.a_key].shape[1])
                for p in lora_pairs(list(params), 1.0).values())
    return model.num_floats() + dense


def downlink_expected(method: object, model: AdapterModel) -> Expected:
    """The byte budget of a downlink to a client holding ``model`` under ``method``."""
    hook = getattr(method, "downlink_floats", None)
    floats = hook(model) if callable(hook) else downlink_floats(model)
    return Expected(max_bytes=VALUE_BYTES * int(floats) + SLACK_BYTES)


def check_pinned_model(model_name: str, node_config: Mapping[str, object]) -> None:
    """Refuse a run whose model is not the one this device pinned (``fedpeft client --model``):
    a coordinator cannot make it load, or probe for, anything else."""
    pinned = str(node_config.get("model", "") or "")
    if pinned and model_name != pinned:
        raise ConfigError(f"the run asks for model {model_name!r}; this device accepts "
                          f"{pinned!r} only (fedpeft client --model)")
