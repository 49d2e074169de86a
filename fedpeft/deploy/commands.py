"""The deployment commands' command line: ``fedpeft certs`` and ``fedpeft keygen`` (keys and
certificates), ``fedpeft server`` (``coordinator.py``) and ``fedpeft client`` (``device.py``)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from fedpeft.core.config import (
    ConfigError,
)
from fedpeft.core.ledger import (
    DEVICE_DELTA,
)
from fedpeft.deploy.certs import (
    MAX_DAYS,
    CertsError,
    certificate_sans,
)
from fedpeft.deploy.coordinator import ServerOptions, run_server
from fedpeft.deploy.device import ClientOptions, run_client
from fedpeft.deploy.processes import (
    DEFAULT_PORT,
    DEPLOY_MAX_UPDATE_NORM,
    DEPLOY_ROUND_TIMEOUT_S,
    EXIT_USAGE,
    DeployError,
    MiB,
)

# -------------------------------------------------------------------------------------- CLI


def cmd_certs(args: argparse.Namespace) -> int:
    from fedpeft.deploy.certs import make_certs

    try:
        paths = make_certs(Path(args.dir), args.san, args.nodes, days=args.days, force=args.force)
    except CertsError as exc:
        print(f"fedpeft: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    sans = ", ".join(certificate_sans(paths.server_cert))
    print(f"fedpeft: wrote {paths.root}/: ca.crt, ca.key, server.crt, server.key (SANs: {sans})"
          + (f", node-1..{args.nodes}.key/.pub" if args.nodes else ""))
    print("  coordinator needs: ca.crt server.crt server.key and the devices' .pub files "
          "(keep ca.key offline)")
    print("  every device needs: ca.crt, and its own key pair: `fedpeft keygen DIR` on the device")
    if args.nodes:
        print(f"fedpeft: WARNING: node-1..{args.nodes}.key are device PRIVATE keys made on this "
              "machine: whoever can read them can act as those devices. Move each to its device "
              "and delete it here, or use `fedpeft certs --nodes 0` and let every device run "
              "`fedpeft keygen`", file=sys.stderr)
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from fedpeft.deploy.certs import make_device_key

    if Path(args.dir).exists() and not Path(args.dir).is_dir():
        print(f"fedpeft: error: {args.dir} is a file; keygen writes NAME.key and NAME.pub into "
              "a folder", file=sys.stderr)
        return EXIT_USAGE
    try:
        key, pub = make_device_key(Path(args.dir), args.name, force=args.force)
    except CertsError as exc:
        print(f"fedpeft: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"fedpeft: wrote {key} (private: stays on this device, mode 0600) and {pub}")
    print(f"  give {pub.name} to the coordinator: fedpeft server ... --node-keys {pub.name}")
    print(f"  then run:  fedpeft client --key {key} --ca ca.crt --superlink HOST:PORT --data ...")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    for flag, value in (("--timeout", args.timeout), ("--max-body-mb", args.max_body_mb)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag} {value}: expected a positive number")
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: expected a TCP port, 1 to 65535")
    if args.clients is not None and args.clients < 1:
        raise ConfigError(f"--clients {args.clients}: expected a positive integer")
    opts = ServerOptions(
        config=args.config, overrides=list(args.overrides),
        certs=Path(args.certs) if args.certs else None, host=args.host, port=args.port,
        node_keys=[Path(k) for k in args.node_keys], clients=args.clients,
        out=Path(args.out or "runs/deploy"),
        insecure=args.insecure, verbose=args.verbose, timeout_s=args.timeout,
        resume=Path(args.resume) if args.resume else None,
        max_body_bytes=None if args.max_body_mb is None else max(1, int(args.max_body_mb * MiB)))
    try:
        if opts.resume and args.out and opts.out.resolve() != opts.resume.resolve():
            raise ConfigError(f"--resume {opts.resume} continues in that folder; drop --out "
                              f"{args.out}")
        return run_server(opts)
    except (DeployError, CertsError) as exc:
        print(f"fedpeft: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def cmd_client(args: argparse.Namespace) -> int:
    opts = ClientOptions(
        superlink=args.superlink, data=Path(args.data), ca=Path(args.ca) if args.ca else None,
        key=Path(args.key) if args.key else None, rank=args.rank, device=args.device,
        threads=args.threads, insecure=args.insecure, verbose=args.verbose,
        max_wait_s=args.max_wait, isolation=args.isolation,
        allow_remote_code=args.allow_remote_code, text_column=args.text_column,
        label_column=args.label_column, batch_size=args.batch_size, local_steps=args.local_steps,
        epsilon=args.epsilon, delta=args.delta, ledger=Path(args.ledger) if args.ledger else None,
        save_adapter=Path(args.save_adapter) if args.save_adapter else None,
        model=args.model)
    if opts.epsilon is not None and not 0 < opts.epsilon < math.inf:
        print(f"fedpeft: error: --epsilon {opts.epsilon}: expected a positive number",
              file=sys.stderr)
        return EXIT_USAGE
    if opts.threads < 0:
        print(f"fedpeft: error: --threads {opts.threads}: expected 0 (all cores) or a positive "
              "integer", file=sys.stderr)
        return EXIT_USAGE
    for flag, value in (("--batch-size", opts.batch_size), ("--local-steps", opts.local_steps),
                        ("--rank", opts.rank)):
        if value is not None and value < 1:
            print(f"fedpeft: error: {flag} {value}: expected a positive integer", file=sys.stderr)
            return EXIT_USAGE
    try:
        return run_client(opts, log_path=Path(args.log) if args.log else None)
    except (DeployError, CertsError) as exc:
        print(f"fedpeft: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def add_commands(sub: argparse._SubParsersAction) -> None:
    """``fedpeft certs``, ``fedpeft keygen``, ``fedpeft server`` and ``fedpeft client``."""
    certs = sub.add_parser("certs", help="make a CA and the SuperLink certificate (and, as a "
                           "convenience, device keys)")
    certs.add_argument("dir", help="output folder (created 0700)")
    certs.add_argument("--san", action="append", default=[], metavar="HOST_OR_IP",
                       help="a name devices use to reach the coordinator: IP address or DNS "
                            "name (repeatable; 127.0.0.1 and localhost are always added)")
    certs.add_argument("--nodes", type=int, default=2,
                       help="device key pairs made here (default 2); their private keys then "
                            "live on the coordinator: prefer --nodes 0 and `fedpeft keygen` on "
                            "each device")
    certs.add_argument("--days", type=int, default=365,
                       help=f"server certificate validity, 1 to {MAX_DAYS} (default 365; the CA "
                            "lives 5 times as long)")
    certs.add_argument("--force", action="store_true", help="replace existing files")
    certs.set_defaults(func=cmd_certs)

    keygen = sub.add_parser(
        "keygen", help="device: make this device's SuperNode key pair (only the .pub goes to "
        "the coordinator)",
        description="Run on the device. Writes DIR/NAME.key (the private key: it never leaves "
                    "this device; `fedpeft client --key`) and DIR/NAME.pub (copy it to the "
                    "coordinator, which admits it with `fedpeft server --node-keys`).")
    keygen.add_argument("dir", help="folder for NAME.key (0600) and NAME.pub (created 0700 "
                        "when new)")
    keygen.add_argument("--name", default="device", help="file name stem (default device)")
    keygen.add_argument("--force", action="store_true", help="replace an existing key pair")
    keygen.set_defaults(func=cmd_keygen)

    srv = sub.add_parser(
        "server", help="coordinator: SuperLink (TLS + SuperNode auth) and run",
        description="Coordinator of a real deployment. Unless the config sets "
                    "federation.round_timeout_s, a round waits at most "
                    f"{DEPLOY_ROUND_TIMEOUT_S:g} s for its devices (a silent device costs one "
                    "round, never the run; set it to 0 to wait forever). Devices are not "
                    "trusted: unless the config sets them, federation.max_examples_per_client = "
                    "train.local_steps x train.batch_size and federation.max_update_norm = "
                    f"{DEPLOY_MAX_UPDATE_NORM:g} (0 turns a bound off). [faults] and [attacks] "
                    "are refused: they are for `fedpeft simulate` only.")
    srv.add_argument("config", nargs="?", help="TOML config (default: the built-in experiment)")
    srv.add_argument("--certs", help="folder from `fedpeft certs` (ca.crt, server.crt/.key)")
    srv.add_argument("--host", default="0.0.0.0", help="address devices connect to "
                     "(default 0.0.0.0: all interfaces)")
    srv.add_argument("--port", type=int, default=DEFAULT_PORT,
                     help=f"port devices connect to (default {DEFAULT_PORT})")
    srv.add_argument("--node-keys", nargs="+", default=[], metavar="KEY.pub",
                     help="SuperNode public keys to admit: each device's .pub from `fedpeft "
                          "keygen` (default: CERTS/node-*.pub)")
    srv.add_argument("--clients", type=int, help="devices to wait for (default: one per key)")
    srv.add_argument("--out", help="output folder (default runs/deploy)")
    srv.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="SECTION.KEY=VALUE", help="override a config key (repeatable)")
    srv.add_argument("--timeout", type=float, help="give up after this many seconds")
    srv.add_argument("--max-body-mb", type=float, metavar="MB",
                     help="largest request body the public port accepts, in MiB (default 64; "
                          "a SmolLM2 LoRA upload is about 2 MB); larger ones get 413 unread")
    srv.add_argument("--resume", metavar="DIR",
                     help="continue the run in DIR (a previous --out) after its last finished "
                          "round, with the config it was started with")
    srv.add_argument("--insecure", action="store_true",
                     help="no TLS, no SuperNode authentication (trusted test networks only)")
    srv.add_argument("--verbose", action="store_true", help="show all of Flower's log lines")
    srv.set_defaults(func=cmd_server)

    cli = sub.add_parser("client", help="device: a SuperNode that trains on a local data file")
    cli.add_argument("--superlink", required=True, metavar="HOST:PORT",
                     help="the coordinator's address (a --san of its certificate)")
    cli.add_argument("--ca", help="the coordinator's ca.crt")
    cli.add_argument("--key", help="this device's private key: device.key from `fedpeft keygen` "
                     "(or a node-N.key from `fedpeft certs`), mode 0600")
    cli.add_argument("--data", required=True, help="this device's CSV or JSONL training data")
    cli.add_argument("--text-column", default="text",
                     help="the text column of --data (default text)")
    cli.add_argument("--label-column", default="label",
                     help="the label column of --data (default label)")
    cli.add_argument("--batch-size", type=int,
                     help="this device's examples per step (default: the run's train.batch_size)")
    cli.add_argument("--local-steps", type=int,
                     help="this device's optimizer steps per round (default: the run's "
                          "train.local_steps)")
    cli.add_argument("--epsilon", type=float,
                     help="train under DP-SGD with this device's own lifetime budget, also when "
                          "the run does not ask for DP; every run's spend is kept in --ledger "
                          "and rounds beyond the budget are refused")
    cli.add_argument("--delta", type=float, default=DEVICE_DELTA,
                     help=f"this device's DP delta (default {DEVICE_DELTA:g}; must be below 1/n "
                          "for its n examples); a run asking for a larger one gets this one")
    cli.add_argument("--ledger", metavar="PATH",
                     help="this device's privacy ledger, a JSON file it owns (default "
                          "$FLWR_HOME/fedpeft/privacy-ledger.json, ~/.flwr without FLWR_HOME); "
                          "one per dataset with its own budget")
    cli.add_argument("--save-adapter", metavar="DIR",
                     help="after every round it trains, write this device's own adapter (peft "
                          "format; with a personalised method such as fedsa-lora, the shared "
                          "part joined with its personal part) to DIR")
    cli.add_argument("--rank", type=int, help="this device's LoRA rank (mixed-rank methods)")
    cli.add_argument("--model", metavar="NAME",
                     help="the only model.name this device accepts (a packaged name or a "
                          "folder); a run asking for another is refused before anything loads")
    cli.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    cli.add_argument("--threads", type=int, default=0,
                     help="torch CPU threads (default: all cores of this machine)")
    cli.add_argument("--max-wait", type=float, metavar="SECONDS",
                     help="exit when the coordinator is unreachable this long, at the start "
                          "or after a run (default: keep retrying)")
    cli.add_argument("--log", help="also write the SuperNode's log to this file")
    cli.add_argument("--isolation", choices=("process", "subprocess"), default="process",
                     help="process (default): one long-running ClientApp in this process, "
                          "fedpeft's own only; subprocess: Flower's default, a new ClientApp "
                          "process for every message, running the app the coordinator sends "
                          "(needs --allow-remote-code)")
    cli.add_argument("--allow-remote-code", action="store_true",
                     help="allow --isolation subprocess: the coordinator can then run any code "
                          "on this device")
    cli.add_argument("--insecure", action="store_true",
                     help="no TLS, no key (only with `fedpeft server --insecure`)")
    cli.add_argument("--verbose", action="store_true", help="show all of the SuperNode's lines")
    cli.set_defaults(func=cmd_client)
