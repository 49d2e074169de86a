"""The ``fedpeft`` command line.

    fedpeft simulate [CONFIG] [--method M] [--clients N] [--rounds R] [--out DIR] [--set k=v ...]
    fedpeft simulate --resume DIR     continue a run that stopped (after its last finished round)
    fedpeft evaluate DIR/adapter
    fedpeft config            every config key with its default and allowed values
    fedpeft methods           the registered methods and their options
    fedpeft certs DIR --san HOST       CA, SuperLink certificate, device keys (deployment)
    fedpeft server [CONFIG] --certs DIR     coordinator of a real deployment
    fedpeft client --superlink H:P --ca CA --key KEY --data FILE     a device
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from fedpeft.config import ConfigError, FedConfig, config_help, load_config, to_toml

SERVERAPP = "fedpeft.server.app:app"
ERROR_FILE = "error.json"  # = fedpeft.server.app.ERROR_FILE; not imported: it pulls in torch
CLIENTAPP = "fedpeft.client.app:app"


def _load(args: argparse.Namespace) -> FedConfig:
    overrides = list(args.overrides)
    for flag, key in (("method", "method.name"), ("clients", "federation.clients"),
                      ("rounds", "federation.rounds")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.insert(0, f"{key}={json.dumps(value)}")
    return load_config(args.config, overrides)


def preflight(cfg: FedConfig) -> None:
    """Everything that can fail on user input, checked before any process starts."""
    from fedpeft.data import partition_indices
    from fedpeft.models import get_model_spec
    from fedpeft.strategies import build_method

    build_method(cfg)
    get_model_spec(cfg.model.name).tokenizer()
    partition_indices(cfg.data, cfg.federation.clients)
    _check_model_and_device(cfg)


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


def _check_model_and_device(cfg: FedConfig) -> None:
    """LoRA target modules that exist in the model, a device that exists on this host."""
    from fedpeft.adapters import build_adapter_model
    from fedpeft.data import load_task_data
    from fedpeft.training import resolve_device

    try:
        resolve_device(cfg.train.device)
    except RuntimeError as exc:
        raise ConfigError(f"train.device = {cfg.train.device!r}: {exc}") from exc
    train, _ = load_task_data(cfg.data)
    try:
        build_adapter_model(cfg.model, len(train.label_names))
    except ValueError as exc:  # peft: the target modules match no layer
        raise ConfigError(str(exc)) from exc


def _resume_target(args: argparse.Namespace) -> tuple[FedConfig, Path, int]:
    """(config, run folder, last finished round) for ``--resume DIR``; the config is the run's
    own (DIR/config.toml), and options that change it are refused."""
    from fedpeft.server.checkpoint import prepare_resume, saved_config

    out = Path(args.resume).resolve()
    if args.out and Path(args.out).resolve() != out:
        raise ConfigError(f"--resume {out} continues in that folder; drop --out {args.out}")
    saved = saved_config(out)
    cfg = _load(argparse.Namespace(**{**vars(args), "config": args.config or str(saved)}))
    return cfg, out, prepare_resume(out, cfg)


class _Progress:
    """Prints each new line of ``metrics.jsonl`` as a progress line while the run goes on."""

    def __init__(self, path: Path, rounds: int, echo: Callable[[str], None]) -> None:
        self.path, self.rounds, self.echo = path, rounds, echo
        self.seen = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _poll(self) -> None:
        from fedpeft.reporting import MetricsLog, round_line

        rows = MetricsLog.read(self.path)
        for row in rows[self.seen:]:
            self.echo(round_line(row, self.rounds))
        self.seen = max(self.seen, len(rows))

    def _loop(self) -> None:
        while not self.stop.wait(1.0):
            with contextlib.suppress(OSError, ValueError):  # a half-written line: next time
                self._poll()

    def __enter__(self) -> _Progress:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self._poll()


# Flower warnings that do not apply to a fedpeft run (it always sets num-supernodes).
_NOISE = ("default simulated SuperNodes changed",)


def _flower_line_filter(verbose: bool) -> Callable[[str], None]:
    def stream(line: str) -> None:
        if any(n in line for n in _NOISE) and not verbose:
            return
        if verbose or "WARNING" in line or "ERROR" in line or "Traceback" in line:
            print(f"  [flower] {line.rstrip()}", file=sys.stderr, flush=True)

    return stream


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedpeft.launcher import run_simulation_app, write_app_dir

    done = -1
    if args.resume:
        cfg, out, done = _resume_target(args)
    else:
        cfg, out = _load(args), Path(args.out or "runs/latest").resolve()
    preflight_isolated(cfg)
    fed = cfg.federation
    if done >= fed.rounds:
        print(f"fedpeft: {out} finished all {fed.rounds} rounds; nothing to resume")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", ERROR_FILE, *(() if args.resume else ("metrics.jsonl",))):
        (out / name).unlink(missing_ok=True)
    config_file = out / "config.toml"
    if not args.resume:
        config_file.write_text(to_toml(cfg))
    print(f"fedpeft: {cfg.method.name} on {cfg.model.name}, {fed.clients} clients "
          f"({fed.clients_per_round} per round), {fed.rounds} rounds, split "
          f"{cfg.data.partitioner}; writing to {out}"
          + (f"; resuming after round {done}" if args.resume else ""), flush=True)
    started = time.perf_counter()
    progress = _Progress(out / "metrics.jsonl", fed.rounds, lambda s: print(s, flush=True))
    progress.seen = done + 1  # a resumed run's earlier rounds were shown by the first run
    run_config = {"config-file": str(config_file), "out-dir": str(out),
                  "resume": "1" if args.resume else ""}
    with tempfile.TemporaryDirectory(prefix="fedpeft-app-") as tmp, progress:
        app_dir = write_app_dir(Path(tmp) / "app", SERVERAPP, CLIENTAPP,
                                {"config-file": "", "out-dir": str(out), "resume": ""})
        rc = run_simulation_app(
            app_dir, run_config,
            num_supernodes=fed.clients, num_cpus_per_client=cfg.simulation.cpus_per_client,
            log_dir=out, stream=_flower_line_filter(args.verbose),
        )
    return _finish(out, rc, started)


def _finish(out: Path, rc: int, started: float) -> int:
    """Report the run's outcome: the ServerApp's own error message if it left one, else the
    results."""
    from fedpeft.reporting import MetricsLog, human_bytes, results_table

    error_path = out / ERROR_FILE
    if error_path.is_file():
        error = json.loads(error_path.read_text())
        print(f"fedpeft: error: {error['message']}", file=sys.stderr)
        if error.get("kind") != "config":
            print(f"fedpeft: the server stopped with {error.get('type')}; Flower's log: "
                  f"{out}/run.log", file=sys.stderr)
        return 2 if error.get("kind") == "config" else rc or 1
    summary_path = out / "summary.json"
    if rc != 0 or not summary_path.exists():
        print(f"fedpeft: the simulation failed (exit {rc}); Flower's log: {out}", file=sys.stderr)
        return rc or 1
    summary = json.loads(summary_path.read_text())
    summary["cli_wall_s"] = time.perf_counter() - started
    summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True))
    print("\n" + results_table(MetricsLog.read(out / "metrics.jsonl")))
    print(f"\nfinal accuracy {summary['final_accuracy']:.3f} (round 0: "
          f"{summary['initial_accuracy']:.3f}), uplink {human_bytes(summary['total_bytes_up'])}, "
          f"downlink {human_bytes(summary['total_bytes_down'])}, {summary['cli_wall_s']:.0f} s")
    print(f"outputs: {out}/metrics.jsonl summary.json report.png adapter/ checkpoint/")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fedpeft.evaluation import evaluate_adapter_dir

    result = evaluate_adapter_dir(Path(args.adapter), args.config)
    print(json.dumps(result, indent=2))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(config_help())
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from fedpeft.strategies import method_help

    print(method_help())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpeft", description="Federated PEFT on Flower.")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a federation of virtual clients on this machine")
    sim.add_argument("config", nargs="?", help="TOML config (default: the built-in experiment)")
    sim.add_argument("--method", help="federated method (see `fedpeft methods`)")
    sim.add_argument("--clients", type=int, help="number of virtual clients")
    sim.add_argument("--rounds", type=int, help="federated rounds")
    sim.add_argument("--out", help="output folder (default runs/latest)")
    sim.add_argument("--resume", metavar="DIR", help="continue the run in DIR after its last "
                     "finished round (its own config, DIR/config.toml)")
    sim.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="SECTION.KEY=VALUE", help="override a config key (repeatable)")
    sim.add_argument("--verbose", action="store_true", help="show all of Flower's log lines")
    sim.set_defaults(func=cmd_simulate)

    ev = sub.add_parser("evaluate", help="accuracy of a saved adapter on the held-out split")
    ev.add_argument("adapter", help="adapter folder (peft format), e.g. runs/latest/adapter")
    ev.add_argument("--config", help="the run's config (default: ADAPTER/../config.toml)")
    ev.set_defaults(func=cmd_evaluate)

    sub.add_parser("config", help="list every config key").set_defaults(func=cmd_config)
    sub.add_parser("methods", help="list the methods").set_defaults(func=cmd_methods)

    from fedpeft.deploy import add_commands as add_deploy_commands

    add_deploy_commands(sub)  # certs, server, client
    return parser


def _sigint_stops_us() -> None:
    """A process started with SIGINT ignored (e.g. a background job of a non-interactive shell)
    would never see Ctrl-C / SIGINT; the documented contract is that it stops the run and
    everything the run started, so take the default handler back."""
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.SIG_IGN):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _sigint_stops_us()
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"fedpeft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedpeft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
