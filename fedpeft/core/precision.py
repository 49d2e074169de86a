"""``train.precision``: which compute precision a device runs, decided without importing torch
for a CPU (the CLI resolves 'auto' before any process starts and records the outcome in
``config.toml``). Training and evaluation apply it as autocast (``fedpeft.core.training``)."""

from __future__ import annotations

import functools
from pathlib import Path

from fedpeft.core.config import ConfigError, FedConfig, with_values

PRECISIONS = ("auto", "bf16", "fp32")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """The native bfloat16 instruction sets the CPU reports (none on systems without
    ``/proc/cpuinfo`` or where it cannot be read)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return tuple(f for f in BF16_CPU_FLAGS if f in flags)


def native_bf16(device: object) -> bool:
    """Whether ``device`` ('cpu', 'cuda', 'cuda:N' or a torch.device) computes bfloat16
    natively: a CUDA GPU that says so, or a CPU with AVX512-BF16 or AMX-BF16. Elsewhere bf16 is
    emulated and slower than float32."""
    kind = str(device).split(":")[0]
    if kind == "cuda":
        import torch

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return kind == "cpu" and bool(cpu_bf16_flags())


def resolve_precision(setting: str, device: object) -> str:
    """``setting`` as it runs on ``device``: 'auto' is 'bf16' where the hardware has it
    natively, else 'fp32'; an explicit value is kept as it is."""
    if setting not in PRECISIONS:
        raise ValueError(f"precision {setting!r}: expected one of {', '.join(PRECISIONS)}")
    if setting == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return setting


def check_precision(setting: str, device: object) -> str:
    """:func:`resolve_precision`, refusing an explicit 'bf16' where it would be emulated
    (the CLI calls it before a run starts)."""
    if setting == "bf16" and not native_bf16(device):
        where = ("this GPU" if str(device).startswith("cuda") else
                 f"this CPU (no {' or '.join(BF16_CPU_FLAGS)} in /proc/cpuinfo)")
        raise ValueError(f"bf16 requested but {where} has no native bfloat16: it would run "
                         "emulated, slower than float32; use 'auto' or 'fp32'")
    return resolve_precision(setting, device)


def describe(precision: str, setting: str, dp: bool) -> str:
    """One line for the CLI: which precision runs and why."""
    why = {"auto": " (auto: " + ("native bfloat16 here" if precision == "bf16" else
                                  "no native bfloat16 here") + ")"}.get(setting, "")
    text = f"precision {precision}{why}"
    if precision == "bf16":
        text += "; LoRA factors, optimizer state and aggregation float32"
        if dp:
            text += "; DP-SGD training float32 (Opacus per-example gradients), evaluation bf16"
    return text


def pin_precision(cfg: FedConfig) -> tuple[FedConfig, str]:
    """``cfg`` with ``train.precision`` resolved for this host (so ``config.toml`` records what
    runs); an explicit 'bf16' without native support is a :class:`ConfigError`. Returns that
    config and the line the CLI prints."""
    setting = cfg.train.precision
    try:
        pinned = check_precision(setting, cfg.train.device)
    except ValueError as exc:
        raise ConfigError(f"train.precision = {setting!r}: {exc}") from exc
    cfg = with_values(cfg, {"train.precision": pinned}, "the pinned precision")
    return cfg, describe(pinned, setting, cfg.privacy.enabled)


def precisions(cfg: FedConfig) -> dict[str, str]:
    """What ran, for ``summary.json``: the evaluation's precision on this host and the
    clients' training precision (float32 under DP-SGD)."""
    ran = resolve_precision(cfg.train.precision, cfg.train.device)
    return {"precision": ran, "train_precision": "fp32" if cfg.privacy.enabled else ran}
