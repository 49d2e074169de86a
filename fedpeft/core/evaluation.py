"""Evaluate a saved adapter with plain peft: proof that the export is a standard peft adapter."""

from __future__ import annotations

import copy
from pathlib import Path

from fedpeft.core.adapters import base_model
from fedpeft.core.config import ConfigError, load_config
from fedpeft.core.training import autocast, resolve_device
from fedpeft.core.workspace import default_threads, get_workspace, set_torch_threads


def evaluate_adapter_dir(adapter_dir: Path, config: str | None = None) -> dict:
    """Load base model + ``PeftModel.from_pretrained(adapter_dir)`` and score the test split."""
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter_dir} is not a peft adapter folder (no adapter_config.json)")
    config_path = Path(config) if config else adapter_dir.parent / "config.toml"
    cfg = load_config(config_path if config_path.is_file() else None)
    set_torch_threads(default_threads())
    workspace = get_workspace(cfg)
    base = copy.deepcopy(base_model(cfg.model, workspace.num_labels))
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    device = resolve_device(cfg.train.device)
    model.to(device)
    with autocast(cfg.train.precision, device, model):  # as the server evaluated it
        ev = workspace.task.evaluate(model, workspace.test_set(0), cfg.eval.batch_size, device)
    return {"adapter": str(adapter_dir), "model": cfg.model.name, "accuracy": ev.accuracy,
            "loss": ev.loss, **ev.extra, "examples": len(workspace.test)}
