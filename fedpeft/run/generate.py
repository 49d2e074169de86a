"""``fedpeft generate RUN_DIR/adapter "PROMPT"``: the global model's greedy completion of one
prompt, for a causal-LM run.

The run's base (``RUN_DIR/config.toml``) is loaded with the adapter by plain peft, as
``fedpeft evaluate`` does; where ``summary.json`` says the adapter is not the whole global model
(``adapter_exact = false``) the run's ``checkpoint/`` gives the exact one instead, as for
``fedpeft export``. The prompt is rendered as the run renders the held-out prompts of
``samples.md`` (:meth:`CausalLM.prompt_text`: a user turn through the chat template, or the
plain template; a label task's ``data.prompt``), so a held-out prompt completes here exactly as
it did in ``samples.md`` at the last round.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

from fedpeft.core.adapters import base_model
from fedpeft.core.config import ConfigError, FedConfig, load_config
from fedpeft.core.data import TextData
from fedpeft.core.models import CAUSAL_LM, infer_task
from fedpeft.core.runfiles import CONFIG_FILE, SUMMARY_FILE
from fedpeft.core.tasks.causal_lm import SAMPLE_TOKENS, CausalLM
from fedpeft.core.training import resolve_device
from fedpeft.core.workspace import Workspace, default_threads, get_workspace, set_torch_threads
from fedpeft.run.export import ADAPTER_DIR, merged_from_checkpoint

ADAPTER_CONFIG = "adapter_config.json"


def locate(path: Path) -> tuple[Path, Path]:
    """(adapter folder, run folder) for ``RUN_DIR/adapter`` (or ``RUN_DIR`` itself)."""
    if (path / ADAPTER_CONFIG).is_file():
        return path, path.parent
    if (path / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
        return path / ADAPTER_DIR, path
    if not path.exists():
        raise ConfigError(f"{path}: no such adapter folder (give a run's adapter/, e.g. "
                          "runs/latest/adapter)")
    raise ConfigError(f"{path} is not a peft adapter folder (no {ADAPTER_CONFIG}): a run writes "
                      f"RUN_DIR/{ADAPTER_DIR}/ when its last round is done")


def run_config(run_dir: Path) -> FedConfig:
    """The run's own config; a clear error where it is missing."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing: generate needs the run's config next to its "
                          f"{ADAPTER_DIR}/ (it names the base model and how prompts are rendered)")
    return load_config(path)


def adapter_is_exact(run_dir: Path) -> bool:
    """False only where the run's summary says its adapter is not the whole global model; an
    adapter without its run's summary is taken as it is (as ``fedpeft evaluate`` does)."""
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        return True
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} could not be read: {exc}") from exc
    return not (isinstance(summary, dict) and summary.get("adapter_exact") is False)


def global_model(cfg: FedConfig, workspace: Workspace, adapter: Path,
                 run_dir: Path) -> torch.nn.Module:
    """The base with the adapter (plain peft), or the exact global model from the checkpoint
    where the adapter is lossy."""
    from peft import PeftModel

    if not adapter_is_exact(run_dir):
        print(f"fedpeft: {adapter} is not the whole global model (adapter_exact = false); "
              f"using {run_dir}'s checkpoint/", file=sys.stderr)
        return merged_from_checkpoint(cfg, workspace, run_dir)
    base = copy.deepcopy(base_model(cfg.model, workspace.num_labels))  # the adapter goes in it
    try:
        return PeftModel.from_pretrained(base, str(adapter))
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise ConfigError(f"{adapter} does not fit {cfg.model.name}: {exc}") from exc


def prompt_ids(task: CausalLM, text: str, chat: bool) -> list[int]:
    """The prompt's token ids: rendered as the run's held-out prompts are (``chat``), or ``text``
    as it is after the tokenizer's own start tokens; as in ``samples.md``, its last
    ``model.max_length`` tokens (the run's context), with a note where that cuts it."""
    if chat:
        if task.label_names:  # a label task: its data.prompt around the text
            data = TextData((text,), np.zeros(1, dtype=np.int64), task.label_names)
        else:
            data = TextData((), np.zeros(1, dtype=np.int64), (),
                            chats=((("user", text), ("assistant", "")),))
        text, start = task.prompt_text(data, 0), task.start(data)
    else:
        start = list(task.prefix)
    ids = start + list(task.tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ConfigError("the prompt is empty (and --no-chat adds nothing to it)")
    limit = task.model_cfg.max_length
    if len(ids) > limit:
        print(f"fedpeft: the prompt is {len(ids)} tokens; keeping its last {limit} "
              "(model.max_length)", file=sys.stderr)
    return ids[-limit:]


def generate(adapter_path: Path, prompt: str, max_new_tokens: int = SAMPLE_TOKENS,
             chat: bool = True) -> str:
    """The global model's greedy completion of ``prompt`` (special tokens dropped)."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    adapter, run_dir = locate(adapter_path)
    cfg = run_config(run_dir)
    if infer_task(cfg.model) != CAUSAL_LM:
        raise ConfigError(f"{run_dir} is a {infer_task(cfg.model)} run ({cfg.model.name}): "
                          "generate is for causal-lm runs; score a classifier with "
                          f"fedpeft evaluate {adapter}")
    set_torch_threads(default_threads())
    workspace = get_workspace(cfg)
    task = workspace.task
    assert isinstance(task, CausalLM)
    ids = prompt_ids(task, prompt, chat)
    try:
        device = resolve_device(cfg.train.device)
    except RuntimeError as exc:
        raise ConfigError(f"train.device of the run: {exc}") from exc
    model = global_model(cfg, workspace, adapter, run_dir)
    model.to(device).eval()
    inputs = torch.tensor([ids], device=device)
    with torch.no_grad():
        out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=task.pad_id)
    return task.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
