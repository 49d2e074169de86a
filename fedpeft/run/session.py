"""What every run command shares: checks before any process starts, the run folder's set-up,
the per-round progress line, Flower's log filter and the final report."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from fedpeft.core.config import ConfigError, FedConfig, to_toml
from fedpeft.core.runfiles import CONFIG_FILE, ERROR_FILE, METRICS_FILE, SUMMARY_FILE
from fedpeft.run.launcher import hold_folder


def prepare_out(out: Path, cfg: FedConfig, resume: bool) -> Path:
    """Lock the run folder for this process (refused while another run writes there), create
    it, drop the files a new attempt rewrites (a resumed run keeps its metrics), write the
    config once; returns the config file's path."""
    hold_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in (SUMMARY_FILE, ERROR_FILE, *(() if resume else (METRICS_FILE,))):
        (out / name).unlink(missing_ok=True)
    config_file = out / CONFIG_FILE
    if not resume:
        config_file.write_text(to_toml(cfg))
    return config_file


def run_error(out: Path) -> dict | None:
    """The ServerApp's own account of why it stopped (``error.json``), if it left one."""
    path = out / ERROR_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def preflight(cfg: FedConfig) -> None:
    """Everything that can fail on user input, checked before any process starts."""
    from fedpeft.core.data import partition_indices
    from fedpeft.core.models import get_model_spec
    from fedpeft.strategies import build_method

    build_method(cfg)
    get_model_spec(cfg.model.name).tokenizer()
    partition_indices(cfg.data, cfg.federation.clients)
    check_model_and_device(cfg)


def preflight_isolated(cfg: FedConfig) -> None:
    """:func:`preflight` in a forked child process. The checks import torch and transformers,
    load the data and build the model: done in this process, the CLI would hold that (~0.5 GB)
    for the whole run while it only waits for the simulation. In-process when this process
    already holds torch (tests, notebooks: nothing to save; and OpenMP is not fork-safe)."""
    if not hasattr(os, "fork") or "torch" in sys.modules:
        preflight(cfg)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a ConfigError's message goes back through the pipe
        os.close(read_fd)
        code = 0
        try:
            preflight(cfg)
        except ConfigError as exc:
            os.write(write_fd, str(exc).encode())
            code = 2
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        message = pipe.read().decode(errors="replace")
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code == 2:
        raise ConfigError(message)
    if code != 0:
        raise RuntimeError(f"the configuration check failed (exit {code}); traceback above")


def check_model_and_device(cfg: FedConfig) -> None:
    """LoRA target modules that exist in the model, a device that exists on this host."""
    from fedpeft.core.adapters import build_adapter_model
    from fedpeft.core.data import load_task_data
    from fedpeft.core.training import resolve_device

    try:
        resolve_device(cfg.train.device)
    except RuntimeError as exc:
        raise ConfigError(f"train.device = {cfg.train.device!r}: {exc}") from exc
    train, _ = load_task_data(cfg.data)
    if cfg.attacks.kind == "label-flip" and not train.label_names:
        raise ConfigError("attacks.kind = 'label-flip' needs labelled data: these are chat or "
                          "instruction examples without classes")
    try:
        build_adapter_model(cfg.model, len(train.label_names))
    except ValueError as exc:  # peft: the target modules match no layer
        raise ConfigError(str(exc)) from exc


class Progress:
    """Prints each new line of ``metrics.jsonl`` as a progress line while the run goes on."""

    def __init__(self, path: Path, rounds: int, echo: Callable[[str], None]) -> None:
        self.path, self.rounds, self.echo = path, rounds, echo
        self.seen = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _poll(self) -> None:
        from fedpeft.server.reporting import MetricsLog, round_line

        rows = MetricsLog.read(self.path)
        for row in rows[self.seen:]:
            self.echo(round_line(row, self.rounds))
        self.seen = max(self.seen, len(rows))

    def _loop(self) -> None:
        while not self.stop.wait(1.0):
            with contextlib.suppress(OSError, ValueError):  # a half-written line: next time
                self._poll()

    def __enter__(self) -> Progress:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self._poll()


# Flower warnings that do not apply to a fedpeft run (it always sets num-supernodes).
_NOISE = ("default simulated SuperNodes changed",)


def flower_line_filter(verbose: bool) -> Callable[[str], None]:
    def stream(line: str) -> None:
        if any(n in line for n in _NOISE) and not verbose:
            return
        if verbose or "WARNING" in line or "ERROR" in line or "Traceback" in line:
            print(f"  [flower] {line.rstrip()}", file=sys.stderr, flush=True)

    return stream


def finish_simulation(out: Path, rc: int, started: float) -> int:
    """Report the run's outcome: the ServerApp's own error message if it left one, else the
    results."""
    from fedpeft.server.reporting import MetricsLog, human_bytes, results_table

    error = run_error(out)
    if error is not None:
        print(f"fedpeft: error: {error['message']}", file=sys.stderr)
        if error.get("kind") != "config":
            print(f"fedpeft: the server stopped with {error.get('type')}; Flower's log: "
                  f"{out}/run.log", file=sys.stderr)
        return 2 if error.get("kind") == "config" else rc or 1
    summary_path = out / SUMMARY_FILE
    if rc != 0 or not summary_path.exists():
        print(f"fedpeft: the simulation failed (exit {rc}); Flower's log: {out}", file=sys.stderr)
        return rc or 1
    summary = json.loads(summary_path.read_text())
    summary["cli_wall_s"] = time.perf_counter() - started
    summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True))
    rows = MetricsLog.read(out / METRICS_FILE)
    print("\n" + results_table(rows))
    print(f"\n{final_score(summary, rows)}, uplink "
          f"{human_bytes(summary['total_bytes_up'])}, downlink "
          f"{human_bytes(summary['total_bytes_down'])}, {summary['cli_wall_s']:.0f} s")
    print(f"outputs: {out}/metrics.jsonl summary.json report.png adapter/ checkpoint/")
    return 0


def final_score(summary: dict, rows: list[dict]) -> str:
    """The final report's score: the accuracy where the task has classes, else (a causal LM on
    chat or instruction data: no accuracy) the held-out loss and perplexity."""
    if summary.get("final_accuracy") is not None:
        return (f"final accuracy {summary['final_accuracy']:.3f} (round 0: "
                f"{summary['initial_accuracy']:.3f})")
    scored = [r for r in rows if r.get("loss") is not None]
    if not scored:
        return "no held-out score"
    last = scored[-1]
    perplexity = (f", perplexity {last['perplexity']:.3f}"
                  if last.get("perplexity") is not None else "")
    return f"final loss {last['loss']:.4f} (round 0: {scored[0]['loss']:.4f}){perplexity}"
