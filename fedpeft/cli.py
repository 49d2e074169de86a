"""The ``fedpeft`` command line.

    fedpeft simulate [CONFIG] [--method M] [--clients N] [--rounds R] [--out DIR] [--set k=v ...]
    fedpeft evaluate DIR/adapter
    fedpeft config            every config key with its default and allowed values
    fedpeft methods           the registered methods and their options
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fedpeft.config import ConfigError, FedConfig, config_help, load_config, to_toml

SERVERAPP = "fedpeft.server.app:app"
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
            try:
                self._poll()
            except (OSError, ValueError):
                pass

    def __enter__(self) -> _Progress:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self._poll()


def _flower_line_filter(verbose: bool) -> Callable[[str], None]:
    def stream(line: str) -> None:
        if verbose or "WARNING" in line or "ERROR" in line or "Traceback" in line:
            print(f"  [flower] {line.rstrip()}", file=sys.stderr, flush=True)

    return stream


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedpeft.launcher import run_simulation_app, write_app_dir
    from fedpeft.reporting import MetricsLog, human_bytes, results_table

    cfg = _load(args)
    preflight(cfg)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    config_file = out / "config.toml"
    config_file.write_text(to_toml(cfg))
    fed = cfg.federation
    print(f"fedpeft: {cfg.method.name} on {cfg.model.name}, {fed.clients} clients "
          f"({fed.clients_per_round} per round), {fed.rounds} rounds, split "
          f"{cfg.data.partitioner}; writing to {out}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedpeft-app-") as tmp, \
            _Progress(out / "metrics.jsonl", fed.rounds, lambda s: print(s, flush=True)):
        app_dir = write_app_dir(Path(tmp) / "app", SERVERAPP, CLIENTAPP,
                                {"config-file": "", "out-dir": str(out)})
        rc = run_simulation_app(
            app_dir, {"config-file": str(config_file), "out-dir": str(out)},
            num_supernodes=fed.clients, num_cpus_per_client=cfg.simulation.cpus_per_client,
            log_dir=out, stream=_flower_line_filter(args.verbose),
        )
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
    print(f"outputs: {out}/metrics.jsonl summary.json report.png adapter/")
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
    sim.add_argument("--out", default="runs/latest", help="output folder (default runs/latest)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
