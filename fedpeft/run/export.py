"""``fedpeft export RUN_DIR --merged OUT_DIR``: a finished run's global model as one plain Hugging
Face folder (config.json, safetensors weights, the tokenizer) that ``transformers`` loads with
no fedpeft and no peft code: ``AutoModelForCausalLM`` for a causal LM,
``AutoModelForSequenceClassification`` (the trained head included) for a classifier.

Where ``adapter/`` is the whole global model (``adapter_exact`` in summary.json), it is loaded
with plain peft onto the frozen base and merged (``merge_and_unload``). Where it is not (FlexLoRA
and FLoRA dense updates, HetLoRA below the largest client rank, Ferret's full weights: the
``Export.note`` of the method), the merged folder is built from ``checkpoint/`` instead: the
method puts its exact global model into the model, as for the server's own evaluation, and that
is merged. Either way the folder scores what the server's last evaluation scored, in the run's
``model.dtype``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedpeft.core.adapters import base_model, build_adapter_model
from fedpeft.core.config import ConfigError, FedConfig, from_dict, load_config
from fedpeft.core.models import CLASSIFICATION, infer_task
from fedpeft.core.runfiles import CONFIG_FILE, SUMMARY_FILE
from fedpeft.core.workspace import Workspace, default_threads, get_workspace, set_torch_threads
from fedpeft.server.checkpoint import config_differences, load_checkpoint
from fedpeft.strategies import build_method

ADAPTER_DIR = "adapter"


@dataclass(frozen=True)
class RunExport:
    """What the run folder says about its adapter: exact or not, and why not."""

    cfg: FedConfig
    adapter: Path
    exact: bool
    note: str | None


def read_run(run_dir: Path) -> RunExport:
    """The run's config, its adapter folder and whether that adapter is the whole global model;
    a clear ConfigError for a folder that is not a finished fedpeft run."""
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run folder")
    config = run_dir / CONFIG_FILE
    if not config.is_file():
        raise ConfigError(f"{run_dir} has no {CONFIG_FILE}: not a fedpeft run folder")
    cfg = load_config(config)
    adapter = run_dir / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter} is missing or not a peft adapter folder (no "
                          "adapter_config.json): a run writes it when its last round is done; "
                          f"finish the run first (fedpeft simulate --resume {run_dir})")
    summary = _summary(run_dir / SUMMARY_FILE)
    exact = summary.get("adapter_exact")
    if not isinstance(exact, bool):
        raise ConfigError(f"{run_dir / SUMMARY_FILE} has no adapter_exact (true/false): cannot "
                          f"tell whether {adapter} is the whole global model")
    note = summary.get("adapter_note")
    return RunExport(cfg, adapter, exact, note if isinstance(note, str) else None)


def _summary(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path} is missing: the run did not finish (it is written with "
                          "adapter/)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} could not be read: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return data


def export_merged(run_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write the run's merged global model to ``out_dir`` (refused when it holds anything);
    returns what was written, for the CLI to print."""
    run = read_run(run_dir)
    _check_target(out_dir)
    cfg = run.cfg
    if cfg.model.pooling != "auto":
        raise ConfigError(f"{run_dir}: model.pooling = {cfg.model.pooling!r} is not part of a "
                          "plain Hugging Face model, which would reload with its own pooler: "
                          "use the run's adapter/ with fedpeft (e.g. fedpeft generate)")
    set_torch_threads(default_threads())
    workspace = get_workspace(cfg)
    if run.exact:
        model = merged_from_adapter(cfg, workspace, run.adapter)
    else:
        model = merged_from_checkpoint(cfg, workspace, run_dir)
    task = infer_task(cfg.model)
    if task == CLASSIFICATION:
        names = workspace.train.label_names
        model.config.id2label = dict(enumerate(names))
        model.config.label2id = {name: i for i, name in enumerate(names)}
    _save(model, workspace.tokenizer, out_dir)
    return {"merged": str(out_dir), "model": cfg.model.name, "task": task,
            "dtype": cfg.model.dtype, "method": cfg.method.name,
            "from": f"{ADAPTER_DIR}/" if run.exact else "checkpoint/",
            **({"adapter_note": run.note} if run.note else {})}


def _check_target(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir} exists and is not an empty folder: choose a new one")


def _model_cfg(cfg: FedConfig) -> Any:
    """The run's model section for an export: no gradient checkpointing (a training switch)."""
    return dataclasses.replace(cfg.model, gradient_checkpointing=False)


def merged_from_adapter(cfg: FedConfig, workspace: Workspace, adapter: Path) -> torch.nn.Module:
    """The frozen base with ``adapter`` loaded by plain peft and merged into it."""
    from peft import PeftModel

    base = copy.deepcopy(base_model(_model_cfg(cfg), workspace.num_labels))  # merged in place
    try:
        model = PeftModel.from_pretrained(base, str(adapter))
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise ConfigError(f"{adapter} does not fit {cfg.model.name}: {exc}") from exc
    return _merge(model)


def merged_from_checkpoint(cfg: FedConfig, workspace: Workspace,
                           run_dir: Path) -> torch.nn.Module:
    """The exact global model from the run's checkpoint (the method's own ``load_global``, as
    the server evaluates it), merged."""
    ckpt = load_checkpoint(run_dir)
    if ckpt.round != cfg.federation.rounds:
        raise ConfigError(f"{run_dir}'s checkpoint is of round {ckpt.round}, not the last round "
                          f"{cfg.federation.rounds}: finish the run first (fedpeft simulate "
                          f"--resume {run_dir})")
    bad = [k for k, v in ckpt.config.items() if not isinstance(v, dict)]
    if bad:
        raise ConfigError(f"{run_dir}'s checkpoint is damaged: its config has [{bad[0]}] as a "
                          f"{type(ckpt.config[bad[0]]).__name__}, not a table")
    saved = from_dict({k: dict(v) for k, v in ckpt.config.items()}).to_dict()
    diffs = config_differences(saved, cfg.to_dict())
    if diffs:
        raise ConfigError(f"{run_dir}'s checkpoint was written under another config than its "
                          f"{CONFIG_FILE} ({'; '.join(diffs[:3])})")
    method = build_method(cfg, num_labels=workspace.num_labels)
    adapter = build_adapter_model(_model_cfg(cfg), workspace.num_labels, cfg.model.rank)
    try:
        method.load_global(adapter, ckpt.state)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{run_dir}'s checkpoint does not hold a {cfg.method.name} global "
                          f"model for {cfg.model.name}: {exc}") from exc
    return _merge(adapter.model)


def _merge(model: Any) -> torch.nn.Module:
    """``merge_and_unload`` with peft's NaN check: a broken global model is refused, not saved."""
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except ValueError as exc:
        raise ConfigError(f"the merged model is not finite: {exc}") from exc
    if not all(torch.isfinite(p).all() for p in merged.parameters()):
        raise ConfigError("the merged model is not finite (its head or base holds NaN or inf)")
    return merged


def _save(model: torch.nn.Module, tokenizer: Any, out_dir: Path) -> None:
    """Model and tokenizer into a temporary sibling folder, renamed into place when complete:
    ``out_dir`` never holds half an export."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # a killed export's leftovers
    tmp.mkdir()
    try:
        model.save_pretrained(str(tmp))  # safetensors, in the model's own dtype
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
