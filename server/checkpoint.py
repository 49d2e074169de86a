"""The server's state after a finished round, on disk, so a run that dies can be resumed.

One file, ``OUT/checkpoint/state.safetensors``, written to a temporary name, flushed and renamed
over the previous one (atomic on POSIX): a reader sees the last finished round or the one before,
never half a file. It holds the method's state tensors, and in its JSON metadata the state's
scalars, the round, the metrics rows so far, the run's config and the strategy's own bookkeeping
(ranks clients reported, the largest client epsilon, client-level DP releases).

No RNG state is stored because the server has none to keep: client sampling, method
initialisation and fault injection are pure functions of (seed, round); the only unseeded
randomness is DP noise, which must not be predictable from anything written to disk.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedpeft.core.config import ConfigError, FedConfig, from_dict
from fedpeft.core.payload import Payload
from fedpeft.core.runfiles import CHECKPOINT_DIR, STATE_FILE

FORMAT = 1
_META_KEY = "fedpeft"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed (missing, unreadable or from another config)."""


@dataclass
class Checkpoint:
    round: int
    state: Payload
    metrics: list[dict]
    config: dict[str, Any]
    strategy: dict[str, Any] = field(default_factory=dict)


def checkpoint_path(out: Path) -> Path:
    return Path(out) / CHECKPOINT_DIR / STATE_FILE


def save_checkpoint(out: Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically (write, fsync, rename, fsync the folder); return its path."""
    path = checkpoint_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "round": ckpt.round, "scalars": ckpt.state.scalars,
            "metrics": ckpt.metrics, "config": ckpt.config, "strategy": ckpt.strategy,
            "keys": list(ckpt.state.tensors)}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in ckpt.state.tensors.items()}
    tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def _metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if _META_KEY not in meta:
        raise CheckpointError(f"{path} is not a fedpeft checkpoint (no '{_META_KEY}' metadata)")
    data = json.loads(meta[_META_KEY])
    if data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {data.get('format')!r}, this fedpeft "
                              f"reads format {FORMAT}")
    return data


def checkpoint_round(out: Path) -> int | None:
    """The last finished round saved in ``out``, or None when there is no checkpoint yet."""
    path = checkpoint_path(out)
    if not path.is_file():
        return None
    try:
        return int(_metadata(path)["round"])
    except (OSError, ValueError, KeyError, CheckpointError):
        return None


def load_checkpoint(out: Path) -> Checkpoint:
    path = checkpoint_path(out)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint in {Path(out)}: expected {path} (written after "
                              "every finished round; the run did not finish round 0)")
    try:
        meta = _metadata(path)
        tensors = load_file(str(path))
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own, unexported error type
        raise CheckpointError(f"{path} could not be read: {exc}") from exc
    keys = _entry(meta, "keys", list, path)
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise CheckpointError(f"{path} is damaged: its metadata lists tensor {missing[0]!r}, "
                              "which the file does not hold")
    state = Payload({k: tensors[k] for k in keys}, _entry(meta, "scalars", dict, path))
    return Checkpoint(_entry(meta, "round", int, path), state,
                      _entry(meta, "metrics", list, path), _entry(meta, "config", dict, path),
                      dict(meta.get("strategy") or {}))


def _entry(meta: dict[str, Any], key: str, kind: type, path: Path) -> Any:
    """``meta[key]`` when it has type ``kind``; else a CheckpointError naming file and key."""
    if key not in meta:
        raise CheckpointError(f"{path} is damaged: its metadata has no {key!r} entry")
    value = meta[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CheckpointError(f"{path} is damaged: its metadata entry {key!r} is "
                              f"{type(value).__name__}, expected {kind.__name__}")
    return value


def config_differences(saved: dict[str, Any], current: dict[str, Any],
                       prefix: str = "") -> list[str]:
    """``key = current (run: saved)`` for every key whose value differs between two configs."""
    out = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += config_differences(old, new, name + ".")
        elif old != new:
            out.append(f"{name} = {json.dumps(new)} (run: {json.dumps(old)})")
    return out


def check_resumable(ckpt: Checkpoint, cfg: FedConfig, where: Path) -> None:
    """Refuse to resume ``ckpt`` under another config than the one it was written with."""
    diffs = config_differences(from_dict(_sections(ckpt.config)).to_dict(), cfg.to_dict())
    if diffs:
        raise CheckpointError(
            f"cannot resume {where}: the config differs from the one the run was started with "
            f"({len(diffs)} key{'s' if len(diffs) > 1 else ''}): {'; '.join(diffs[:5])}. "
            "A resumed run takes its config from the run folder; drop the changed options"
        )
    if cfg.privacy.enabled:
        raise CheckpointError(
            f"cannot resume {where}: privacy.enabled = true keeps every client's DP-SGD "
            "accountant in its Flower Context.state, which does not outlive the run; resuming "
            "would restart each client's privacy budget. Start a new run instead"
        )


def saved_config(out: Path) -> Path:
    """A run folder's ``config.toml``: the config a resumed run takes (``--resume DIR``)."""
    saved = out / "config.toml"
    if not saved.is_file():
        raise ConfigError(f"--resume {out}: no config.toml there (not a fedpeft run folder?)")
    return saved


def prepare_resume(out: Path, cfg: FedConfig) -> int:
    """Check that the run in ``out`` can continue under ``cfg``, drop the metrics rows of a round
    that did not finish, and return the last finished round (``simulate``/``server --resume``)."""
    from fedpeft.server.reporting import MetricsLog

    ckpt = load_checkpoint(out)
    check_resumable(ckpt, cfg, out)
    MetricsLog(out / "metrics.jsonl", ckpt.metrics)
    return ckpt.round


def _sections(config: dict[str, Any]) -> dict[str, Any]:
    """A saved ``to_dict()`` back into the nested form ``from_dict`` reads."""
    bad = [k for k, v in config.items() if not isinstance(v, dict)]
    if bad:
        raise CheckpointError(f"the checkpoint's saved config has [{bad[0]}] as a "
                              f"{type(config[bad[0]]).__name__}, not a table")
    return {k: dict(v) for k, v in config.items()}


def check_state(saved: Payload, fresh: Payload, method: Any, rank: int, where: Path,
                model: Any = None) -> None:
    """Refuse a checkpoint's global state that the method could not have written: every tensor
    of its initial state (``fresh``) present with the same dtype and number of dimensions (a
    method's state may grow, e.g. FlexLoRA's rank), every tensor finite, and the method able to
    build a downlink and the expected upload from it and, given ``model`` (the server's
    evaluation model), to load it as the global model. A tampered or foreign checkpoint is one
    clear error before the first round, not a crash mid-run or a run that rejects every client."""
    path = checkpoint_path(where)
    for key, tensor in fresh.tensors.items():
        got = saved.tensors.get(key)
        if got is None or got.ndim != tensor.ndim or got.dtype != tensor.dtype:
            held = "no such tensor" if got is None else f"{tuple(got.shape)} {got.dtype}"
            raise CheckpointError(f"{path} does not fit method {method.name!r} on this model: "
                                  f"{key!r} is {held}, expected {tensor.ndim} dimensions "
                                  f"{tensor.dtype}")
    for key, tensor in saved.tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path} is damaged: {key!r} holds NaN or Inf")
    from fedpeft.strategies import ClientProfile  # the method's own view of the state

    try:
        profile = ClientProfile(0, rank)
        method.downlink(saved, profile)
        method.expected_upload(saved, profile)
        if model is not None:
            method.load_global(model, saved)
    except Exception as exc:  # whatever the tampering broke: one line, before any round
        raise CheckpointError(f"{path} does not fit method {method.name!r}: "
                              f"{type(exc).__name__}: {str(exc)[:200]}") from None
