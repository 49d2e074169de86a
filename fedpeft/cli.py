"""The ``fedpeft`` command line.

    fedpeft simulate [CONFIG] [--method M] [--clients N] [--rounds R] [--out DIR] [--set k=v ...]
    fedpeft simulate --resume DIR     continue a run that stopped (after its last finished round)
    fedpeft evaluate DIR/adapter
    fedpeft export DIR --merged OUT   the global model merged into its base: a plain HF folder
    fedpeft generate DIR/adapter "PROMPT" [--max-new-tokens N] [--no-chat]   greedy completion
    fedpeft sweep SWEEP.toml [--out DIR] [--dry-run]   a grid of simulations x seeds, resumable
    fedpeft config            every config key with its default and allowed values
    fedpeft methods           the registered methods and their options
    fedpeft certs DIR --san HOST       CA, SuperLink certificate, device keys (deployment)
    fedpeft server [CONFIG] --certs DIR     coordinator of a real deployment
    fedpeft client --superlink H:P --ca CA --key KEY --data FILE     a device
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from fedpeft.core.config import ConfigError, FedConfig, config_help, load_config
from fedpeft.core.keys import RUN_CONFIG_KEY, SIMULATION_KEY
from fedpeft.core.precision import pin_precision
from fedpeft.core.runfiles import METRICS_FILE
from fedpeft.run.session import (
    Progress,
    finish_simulation,
    flower_line_filter,
    preflight,
    preflight_isolated,
    prepare_out,
)

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


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedpeft.run.launcher import hold_folder, run_simulation_app, write_app_dir

    if args.resume:  # locked before the resume reads it; a new run's folder in prepare_out
        hold_folder(Path(args.resume))
    done = -1
    if args.resume:
        cfg, out, done = _resume_target(args)
    else:
        cfg, out = _load(args), Path(args.out or "runs/latest").resolve()
    # in-process engine: this process loads torch and the model anyway, so no forked check
    (preflight if cfg.simulation.engine == "inprocess" else preflight_isolated)(cfg)
    cfg, precision = pin_precision(cfg)  # 'auto' resolved here: config.toml records what runs
    fed = cfg.federation
    if done >= fed.rounds:
        print(f"fedpeft: {out} finished all {fed.rounds} rounds; nothing to resume")
        return 0
    config_file = prepare_out(out, cfg, bool(args.resume))
    print(f"fedpeft: {cfg.method.name} on {cfg.model.name}, {fed.clients} clients "
          f"({fed.clients_per_round} per round), {fed.rounds} rounds, split "
          f"{cfg.data.partitioner}; writing to {out}"
          + (f"; resuming after round {done}" if args.resume else ""), flush=True)
    print(f"fedpeft: {precision}", flush=True)
    started = time.perf_counter()
    progress = Progress(out / METRICS_FILE, fed.rounds, lambda s: print(s, flush=True))
    progress.seen = done + 1  # a resumed run's earlier rounds were shown by the first run
    if cfg.simulation.engine == "inprocess":  # the same loop in this process: no SuperLink/Ray
        from fedpeft.run.inprocess import run_in_process

        with progress:
            rc = run_in_process(cfg, out, resume=bool(args.resume), verbose=args.verbose)
        return finish_simulation(out, rc, started)
    run_config = {"config-file": str(config_file), "out-dir": str(out),
                  RUN_CONFIG_KEY: cfg.to_json(), SIMULATION_KEY: "1",
                  "resume": "1" if args.resume else ""}
    with tempfile.TemporaryDirectory(prefix="fedpeft-app-") as tmp, progress:
        app_dir = write_app_dir(Path(tmp) / "app", SERVERAPP, CLIENTAPP,
                                {"config-file": "", "out-dir": str(out), "resume": "",
                                 RUN_CONFIG_KEY: "", SIMULATION_KEY: ""})
        rc = run_simulation_app(
            app_dir, run_config,
            num_supernodes=fed.clients, num_cpus_per_client=cfg.simulation.cpus_per_client,
            log_dir=out, stream=flower_line_filter(args.verbose),
            num_gpus_per_client=cfg.simulation.gpus_per_client,
            ray_address=cfg.simulation.ray_address,
        )
    return finish_simulation(out, rc, started)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fedpeft.core.evaluation import evaluate_adapter_dir

    result = evaluate_adapter_dir(Path(args.adapter), args.config)
    print(json.dumps(result, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fedpeft.run.export import export_merged

    result = export_merged(Path(args.run), Path(args.merged))
    print(json.dumps(result, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from fedpeft.run.generate import generate

    print(generate(Path(args.adapter), args.prompt, args.max_new_tokens, args.chat))
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

    exp = sub.add_parser(
        "export", help="a finished run's global model merged into its base, as a plain "
        "Hugging Face folder",
        description="Merge the run's global model into its frozen base and write config.json, "
                    "safetensors weights (in model.dtype) and the tokenizer: "
                    "transformers' AutoModelForCausalLM / AutoModelForSequenceClassification "
                    "load it without fedpeft or peft. An exact adapter/ is merged with peft's "
                    "merge_and_unload; where adapter/ cannot hold the global model "
                    "(adapter_exact = false in summary.json) the run's checkpoint/ is used.")
    exp.add_argument("run", help="a finished run's folder (config.toml, adapter/, summary.json)")
    exp.add_argument("--merged", required=True, metavar="OUT_DIR",
                     help="output folder (new or empty)")
    exp.set_defaults(func=cmd_export)

    gen = sub.add_parser(
        "generate", help="the global model's greedy completion of a prompt (causal-lm runs)",
        description="Load the run's base (DIR/config.toml) with its adapter (plain peft; the "
                    "run's checkpoint/ where summary.json has adapter_exact = false) and print "
                    "the greedy completion of PROMPT. The prompt is rendered as the run renders "
                    "the held-out prompts of samples.md: a user turn through the tokenizer's "
                    "chat template or the plain template, or a label task's data.prompt; it "
                    "keeps its last model.max_length tokens.")
    gen.add_argument("adapter", help="the run's adapter folder, e.g. runs/latest/adapter")
    gen.add_argument("prompt", help="the prompt (a user turn; with --no-chat the text as is)")
    gen.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                     help="tokens to generate at most (default 32)")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                     help="render PROMPT as the run's held-out prompts are (default); "
                          "--no-chat: the text as is, after the tokenizer's own start tokens")
    gen.set_defaults(func=cmd_generate)

    sub.add_parser("config", help="list every config key").set_defaults(func=cmd_config)
    sub.add_parser("methods", help="list the methods").set_defaults(func=cmd_methods)

    from fedpeft.deploy.commands import add_commands as add_deploy_commands

    add_deploy_commands(sub)  # certs, server, client
    from fedpeft.run.sweep import add_command as add_sweep_command

    add_sweep_command(sub)  # sweep
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
        code = int(args.func(args))
        sys.stdout.flush()  # a reader that went away shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # the reader stopped (`fedpeft sweep F --dry-run | head`): end quietly, as Unix tools
        # do, with the shell's code for a SIGPIPE death; stdout goes nowhere from here on
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except ConfigError as exc:
        print(f"fedpeft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedpeft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
