"""Real deployment: ``fedpeft server`` on the coordinator host, ``fedpeft keygen`` once and then
``fedpeft client`` on each device.

Coordinator (``run_server``): a ``flower-superlink`` with TLS and SuperNode authentication on a
private loopback port, a fleet gateway (``fedpeft.deploy.gateway``) on the public
``--host:--port`` that forwards only the SuperNodes' API, the SuperNode public keys registered
with ``flwr supernode register``, and the fedpeft run submitted with ``flwr run``; progress is
streamed and the usual outputs land in ``--out``. Everything it started is stopped on exit,
Ctrl-C or SIGTERM.

Device (``run_client``): a ``flower-supernode`` with ``--isolation process`` whose node config
carries the device's data file, LoRA rank, torch device and threads, and, in this process, the
long-running ClientApp executor of ``fedpeft.deploy.clientexec`` (no process start, imports or
model load per round). The SuperNode dies with this process, also when it is killed
(PR_SET_PDEATHSIG), and a watchdog (``fedpeft.run.launcher.Watchdog``) stops whatever it started;
likewise every process of the coordinator, whose run folder stays locked until they are gone.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import queue
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from fedpeft.core.config import (
    SECTIONS,
    ConfigError,
    FedConfig,
    PrivacyConfig,
    apply_overrides,
    load_config,
)
from fedpeft.core.keys import RUN_CONFIG_KEY
from fedpeft.core.ledger import (
    DEVICE_DELTA,
    check_device_delta,
    default_ledger_path,
    device_privacy,
)
from fedpeft.core.runfiles import METRICS_FILE
from fedpeft.deploy.certs import (
    MAX_DAYS,
    CertPaths,
    CertsError,
    certificate_sans,
    check_private_key_file,
    check_public_key_file,
)
from fedpeft.run import launcher
from fedpeft.run.session import Progress, flower_line_filter, prepare_out, run_error

CONNECTION = "fedpeft-deploy"
DEFAULT_PORT = 9092
SERVERAPP = "fedpeft.server.app:app"
CLIENTAPP = "fedpeft.client.app:app"
EXIT_USAGE = 2
DEPLOY_ROUND_TIMEOUT_S = 600.0  # a silent device costs a round this long, never the whole run
MiB = 2**20
SIMULATION_ONLY = ("faults", "attacks")  # sections a deployment refuses: clients misbehave
Emit = Callable[[str], None]


class DeployError(RuntimeError):
    """A problem the user can fix (missing file, port in use, key refused); no traceback."""


# --------------------------------------------------------------------------------- processes


def _private_home(prefix: str) -> Path:
    """A 0700 temp dir for FLWR_HOME and secrets (short path under /tmp)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp" if Path("/tmp").is_dir() else None))


def flower_env(home: Path) -> dict[str, str]:
    """Environment for Flower's CLIs: offline switches, private FLWR_HOME, this venv first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_INTERNAL_")}
    env.update(launcher.ENV, FLWR_HOME=str(home),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def spawn(cmd: list[str], env: dict[str, str], output: Path | None,
          die_with_parent: bool = False,
          watchdog: launcher.Watchdog | None = None) -> launcher.Tracker:
    """Start ``cmd`` in its own session (Ctrl-C reaches only us; we stop it), tracked with its
    whole process tree; output to the file ``output``, or to a pipe when None.

    ``die_with_parent`` (only before this process starts threads of its own: preexec_fn) makes
    the child get SIGTERM even when we are SIGKILLed; ``watchdog`` then stops its whole tree."""
    sink = open(output, "ab") if output is not None else subprocess.PIPE  # noqa: SIM115
    try:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=launcher.die_with_parent if die_with_parent else None)
    finally:
        if output is not None:
            sink.close()  # type: ignore[union-attr]
    if watchdog is not None:
        watchdog.adopt(proc.pid)
    return launcher.Tracker(proc)


def stop_all(trackers: list[launcher.Tracker], emit: Emit) -> None:
    """Stop every tracked process tree, newest first; Ctrl-C/SIGTERM are ignored meanwhile so a
    second interrupt cannot leave processes behind."""
    main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)} \
        if main else {}
    try:
        for tracker in reversed(trackers):  # every tree starts shutting down at once: the
            tracker.terminate()              # grace periods overlap instead of adding up
        for tracker in reversed(trackers):
            survivors = tracker.stop_all(grace_s=10.0)
            if survivors:
                emit(f"fedpeft: processes survived SIGKILL: {survivors}")
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _tls_context(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def _wait_healthy(url: str, ctx: ssl.SSLContext | None, proc: subprocess.Popen,
                  timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=0.5, context=ctx):
            return True
        time.sleep(0.1)
    return False


# ------------------------------------------------------------------------------ coordinator


@dataclass
class ServerOptions:
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    certs: Path | None = None
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    node_keys: list[Path] = field(default_factory=list)
    clients: int | None = None
    out: Path = Path("runs/deploy")
    insecure: bool = False
    verbose: bool = False
    timeout_s: float | None = None
    resume: Path | None = None  # a run folder to continue after its last finished round
    max_body_bytes: int | None = None  # the gateway's cap on a request body (None: its default)


def deployment_config(opts: ServerOptions, num_keys: int) -> FedConfig:
    """The run's config: the TOML plus ``--set``; ``federation.clients`` = the devices to wait
    for (``--clients``, else one per registered key); ``data.labels`` filled from the
    coordinator's task data so every device maps labels to the same indices;
    ``federation.round_timeout_s`` = ``DEPLOY_ROUND_TIMEOUT_S`` unless the user set it."""
    from fedpeft.core.data import load_task_data
    from fedpeft.core.models import get_model_spec
    from fedpeft.strategies import build_method

    clients = opts.clients or num_keys
    if clients < 1:
        raise ConfigError("no SuperNode keys to register: pass --node-keys, or --clients N "
                          "with --insecure")
    user = load_config(opts.config, opts.overrides)  # as the user wrote it
    refuse_simulation_only(user)
    base = user.federation
    per_round = min(base.clients_per_round, clients)
    fed = [f"federation.clients={clients}", f"federation.clients_per_round={per_round}",
           f"federation.min_replies={min(base.min_replies, per_round)}"]
    if not _user_sets(opts, "federation", "round_timeout_s"):
        fed.append(f"federation.round_timeout_s={DEPLOY_ROUND_TIMEOUT_S}")
    cfg = load_config(opts.config, [*opts.overrides, *fed])
    build_method(cfg)
    get_model_spec(cfg.model.name).tokenizer()
    train, _ = load_task_data(cfg.data)  # the coordinator's held-out split for evaluation
    labels = json.dumps(list(train.label_names))
    return load_config(opts.config, [*opts.overrides, *fed, f"data.labels={labels}"])


def _user_sets(opts: ServerOptions, section: str, key: str) -> bool:
    """Whether the config file or a ``--set`` names ``section.key`` (also at its default)."""
    raw = tomllib.loads(Path(opts.config).read_text()) if opts.config else {}
    return key in apply_overrides(raw, opts.overrides).get(section, {})


def simulation_only_keys(cfg: FedConfig) -> list[str]:
    """The keys of ``SIMULATION_ONLY`` sections set away from their defaults."""
    found = []
    for name in SIMULATION_ONLY:
        current = dataclasses.asdict(getattr(cfg, name))
        default = dataclasses.asdict(SECTIONS[name]())
        found += [f"{name}.{k}" for k, v in current.items() if v != default[k]]
    return found


def refuse_simulation_only(cfg: FedConfig) -> None:
    """Fault injection makes clients misbehave on purpose: a simulation's tool, never sent to
    real devices."""
    keys = simulation_only_keys(cfg)
    if keys:
        raise ConfigError(f"{', '.join(keys)}: fault and attack injection are for `fedpeft "
                          "simulate` only; `fedpeft server` does not tell real devices to "
                          "misbehave. Remove "
                          f"{'it' if len(keys) == 1 else 'them'} from the config")


def resume_config(opts: ServerOptions, num_keys: int) -> tuple[FedConfig, Path, int]:
    """(config, run folder, last finished round) for ``fedpeft server --resume DIR``: the run's
    own config (DIR/config.toml, which already holds the device count and the label order);
    options that change it, or a different number of devices, are refused."""
    from fedpeft.server.checkpoint import prepare_resume, saved_config

    out = opts.resume.resolve()
    saved = saved_config(out)
    if opts.config:
        raise ConfigError(f"--resume {out} takes its config from {saved}; drop {opts.config}")
    cfg = load_config(str(saved), opts.overrides)
    refuse_simulation_only(cfg)
    devices = opts.clients or num_keys
    if devices != cfg.federation.clients:
        raise ConfigError(f"--resume {out}: the run was started with {cfg.federation.clients} "
                          f"devices, this coordinator would wait for {devices}; register the "
                          "same devices (--node-keys) or pass --clients")
    return cfg, out, prepare_resume(out, cfg)


def _server_tls(opts: ServerOptions) -> CertPaths | None:
    if opts.insecure:
        return None
    if opts.certs is None:
        raise DeployError("--certs DIR is required (make one with `fedpeft certs DIR --san "
                          "HOST`), or pass --insecure for an unencrypted test setup")
    paths = CertPaths(opts.certs)
    for path in (paths.ca_cert, paths.server_cert, paths.server_key):
        if not path.is_file():
            raise DeployError(f"{path} is missing (made by `fedpeft certs`)")
    if not {"127.0.0.1", "localhost"} & set(certificate_sans(paths.server_cert)):
        raise DeployError(f"{paths.server_cert} must list 127.0.0.1 or localhost: the "
                          "coordinator's own tools reach the SuperLink over loopback")
    return paths


def _node_keys(opts: ServerOptions) -> list[Path]:
    if opts.insecure:
        return []
    keys = list(opts.node_keys) or (CertPaths(opts.certs).node_pubs() if opts.certs else [])
    for key in keys:
        check_public_key_file(key)
    return keys


class Coordinator:
    """The coordinator's processes: SuperLink (loopback), fleet gateway (public), ``flwr run``."""

    def __init__(self, opts: ServerOptions, tls: CertPaths | None, emit: Emit) -> None:
        self.opts, self.tls, self.emit = opts, tls, emit
        self.home = _private_home("fedpeft-deploy-")
        self.env = flower_env(self.home)
        self.trackers: list[launcher.Tracker] = []
        self.gateway = None
        self.port = 0
        # if we are killed: stops what we started, holds the run folder's lock until then
        self.watchdog = launcher.Watchdog(launcher.held_fds(opts.resume or opts.out))
        self.watchdog.remove_on_death(self.home)

    def start_superlink(self, log_path: Path) -> None:
        ctx = _tls_context(self.tls.ca_cert) if self.tls else None
        for _ in range(3):  # a free port can be taken before the SuperLink binds it
            self.port = free_port()
            cmd = ["flower-superlink", "--isolation", "subprocess",
                   "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                   "--port", str(self.port)]
            if self.tls:
                cmd += ["--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile",
                        str(self.tls.server_cert), "--ssl-keyfile", str(self.tls.server_key),
                        "--enable-supernode-auth"]
            else:
                cmd += ["--insecure"]
            self.trackers.append(spawn(cmd, self.env, log_path, die_with_parent=True,
                                       watchdog=self.watchdog))
            scheme = "https" if self.tls else "http"
            if _wait_healthy(f"{scheme}://127.0.0.1:{self.port}/health", ctx,
                             self.trackers[-1].proc, 60.0):
                self._write_connection()
                return
            self.trackers.pop().stop_all(grace_s=3.0)
        tail = log_path.read_text(errors="replace")[-2000:]
        raise DeployError(f"flower-superlink did not start; log tail:\n{tail}")

    def _write_connection(self) -> None:
        conn: dict[str, object] = {"address": f"127.0.0.1:{self.port}"}
        if self.tls:
            conn["root-certificates"] = str(self.tls.ca_cert.resolve())
        else:
            conn["insecure"] = True
        doc = {"superlink": {"default": CONNECTION, CONNECTION: conn}}
        (self.home / "config.toml").write_text(tomli_w.dumps(doc))

    def start_gateway(self) -> None:
        from fedpeft.deploy.gateway import MAX_BODY_BYTES, FleetGateway

        tls = self.tls
        upstream = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.gateway = FleetGateway(
            upstream, _tls_context(tls.ca_cert) if tls else False, self.opts.host,
            self.opts.port, str(tls.server_cert) if tls else None,
            str(tls.server_key) if tls else None,
            max_body_bytes=self.opts.max_body_bytes or MAX_BODY_BYTES)
        try:
            self.gateway.start()
        except RuntimeError as exc:
            self.gateway = None
            raise DeployError(f"cannot listen on {self.opts.host}:{self.opts.port}: {exc}") \
                from exc

    def register(self, key: Path) -> str:
        """Register a SuperNode public key; return the node id the SuperLink gave it."""
        out = subprocess.run(["flwr", "supernode", "register", str(key.resolve()), CONNECTION,
                              "--format", "json"], env=self.env, capture_output=True,
                             text=True, timeout=60, check=False)
        try:
            return str(json.loads(out.stdout)["node-id"])
        except (ValueError, KeyError):
            raise DeployError(f"registering {key} failed: {out.stdout.strip()[-500:]} "
                              f"{out.stderr.strip()[-500:]}") from None

    def submit(self, app_dir: Path, run_config: Path, logs: Path, stream: Emit) -> int:
        """``flwr run --stream`` until the run ends; 0 only when it finished ``completed``."""
        cmd = ["flwr", "run", str(app_dir), CONNECTION, "--stream", "--run-config",
               str(run_config)]
        tracker = spawn(cmd, self.env, None, watchdog=self.watchdog)
        self.trackers.append(tracker)
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=launcher.pump, args=(tracker.proc.stdout, lines),
                         daemon=True).start()
        deadline = None if self.opts.timeout_s is None else time.monotonic() + self.opts.timeout_s
        run_id = None
        try:
            with open(logs / "run.log", "a", encoding="utf-8") as run_log:
                while (raw := launcher.next_line(lines, deadline)) is not None:
                    line = launcher.ANSI.sub("", raw.decode(errors="replace")
                                              if isinstance(raw, bytes) else raw).rstrip("\n")
                    run_log.write(line + "\n")
                    run_id = run_id or (m.group(1) if (m := launcher.RUN_ID.search(line))
                                        else None)
                    stream(line)
        except launcher.RunTimeout:
            self.emit(f"fedpeft: the run outlived --timeout {self.opts.timeout_s} s")
            return launcher.EXIT_TIMEOUT
        code = tracker.proc.wait()
        if code != 0 or run_id is None:
            return code or launcher.EXIT_FAILED
        status = launcher.run_status(self.env, run_id, CONNECTION)
        if not status.startswith("finished:completed"):
            self.emit(f"fedpeft: run {run_id} ended with status {status}")
            return launcher.EXIT_FAILED
        return 0

    def close(self) -> None:
        stop_all(self.trackers, self.emit)
        if self.gateway is not None:
            self.gateway.stop()
        shutil.rmtree(self.home, ignore_errors=True)
        self.watchdog.close()


def _insecure_warning(emit: Emit) -> None:
    emit("fedpeft: WARNING: --insecure: no TLS and no SuperNode authentication. Model updates "
         "travel in clear text and any host that reaches this port can join the federation. "
         "Use it only on a trusted network for testing.")


def say(line: str) -> None:
    """Print now, also into a pipe (``fedpeft server | tee log``)."""
    print(line, flush=True)


def run_server(opts: ServerOptions, emit: Emit = say) -> int:
    """The whole coordinator side; returns the exit status."""
    from fedpeft.server.reporting import MetricsLog, human_bytes, results_table

    launcher.hold_folder(opts.resume or opts.out)  # one run writes into a folder at a time
    tls = _server_tls(opts)
    keys = _node_keys(opts)
    if opts.insecure:
        _insecure_warning(emit)
    done = -1
    if opts.resume:
        cfg, out, done = resume_config(opts, len(keys))
    else:
        cfg, out = deployment_config(opts, len(keys)), opts.out.resolve()
    fed = cfg.federation
    if fed.round_timeout_s == 0:
        emit("fedpeft: WARNING: federation.round_timeout_s = 0: a round waits for every sampled "
             "device, so one silent device stalls the run forever")
    if done >= fed.rounds:
        emit(f"fedpeft: {out} finished all {fed.rounds} rounds; nothing to resume")
        return 0
    config_file = prepare_out(out, cfg, bool(opts.resume))
    coord = Coordinator(opts, tls, emit)
    guard = (launcher.sigterm_as_keyboard_interrupt()
             if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else contextlib.nullcontext())
    try:
        with guard:
            coord.start_superlink(out / "superlink.log")
            for key in keys:  # before devices can reach the SuperLink: none is refused early
                emit(f"fedpeft: registered {key.name} as SuperNode {coord.register(key)}")
            coord.start_gateway()
            scheme = "TLS, SuperNode authentication on" if tls else "INSECURE"
            emit(f"fedpeft: {cfg.method.name} on {cfg.model.name}, {fed.rounds} rounds; "
                 f"listening on {opts.host}:{opts.port} ({scheme}); waiting for {fed.clients} "
                 f"devices ({fed.clients_per_round} per round); writing to {out}"
                 + (f"; resuming after round {done}" if opts.resume else ""))
            app_dir = launcher.write_app_dir(coord.home / "app", SERVERAPP, CLIENTAPP,
                                             {"config-file": "", "out-dir": "", "resume": "",
                                              RUN_CONFIG_KEY: ""})
            run_config = coord.home / "run_config.toml"
            run_config.write_text(tomli_w.dumps({"config-file": str(config_file),
                                                 "out-dir": str(out),
                                                 RUN_CONFIG_KEY: cfg.to_json(),
                                                 "resume": "1" if opts.resume else ""}))
            progress = Progress(out / METRICS_FILE, fed.rounds, emit)
            progress.seen = done + 1  # the first run showed the rounds before the resume
            with progress:
                rc = coord.submit(app_dir, run_config, out, flower_line_filter(opts.verbose))
            traffic = coord.gateway.stats.snapshot() if coord.gateway else {}
    finally:
        coord.close()
    summary_path = out / "summary.json"
    if rc != 0 or not summary_path.exists():
        if (error := run_error(out)) is not None:
            emit(f"fedpeft: error: {error['message']}")
        emit(f"fedpeft: the run failed (exit {rc}); logs: {out}/superlink.log, run.log")
        return rc or launcher.EXIT_FAILED
    summary = json.loads(summary_path.read_text())
    summary.update({f"fleet_http_{k}": v for k, v in traffic.items()})
    summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True))
    emit("\n" + results_table(MetricsLog.read(out / "metrics.jsonl")))
    emit(f"\nfinal accuracy {summary['final_accuracy']:.3f}; fleet traffic through the gateway "
         f"(HTTP bodies): up {human_bytes(traffic.get('bytes_up', 0))}, down "
         f"{human_bytes(traffic.get('bytes_down', 0))} in {traffic.get('requests', 0)} requests")
    emit(f"outputs: {out}/metrics.jsonl summary.json report.png adapter/")
    return 0


# ----------------------------------------------------------------------------------- device


@dataclass
class ClientOptions:
    superlink: str
    data: Path
    ca: Path | None = None
    key: Path | None = None
    rank: int | None = None
    device: str = "cpu"
    threads: int = 0
    insecure: bool = False
    verbose: bool = False
    max_wait_s: float | None = None
    isolation: str = "process"  # "subprocess": Flower's default, a new process per message
    allow_remote_code: bool = False  # needed for isolation "subprocess" (runs the run's app)
    text_column: str = "text"  # this device's own column names (they win over the run's)
    label_column: str = "label"
    batch_size: int | None = None  # this device's own training profile (None: the run's)
    local_steps: int | None = None
    epsilon: float | None = None  # this device's own lifetime DP-SGD budget (the ledger's)
    delta: float = DEVICE_DELTA  # this device's delta: a coordinator cannot make it larger
    ledger: Path | None = None  # the privacy ledger (default: fedpeft.core.ledger's)


_FATAL_HINTS = [  # (text in the SuperNode's log, what it means), least specific first
    ("Connection refused", "nothing listens at --superlink (coordinator not started, or another "
                           "port)"),
    ("Giving up reconnection", "lost the coordinator (it stopped, or the network is down)"),
    ("CERTIFICATE_VERIFY_FAILED", "the SuperLink's certificate is not signed by --ca (wrong CA "
                                  "file, or the coordinator made new certificates)"),
    ("Failed to activate SuperNode", "the coordinator refused this device's key: its .pub is "
                                     "not registered there (`fedpeft server --node-keys`)"),
]
_QUIET = ("EXPERIMENTAL: SuperExec authentication",)  # known, expected warnings
_HUNG_AFTER_GIVING_UP_S = 10.0  # a SuperNode that gave up mid-run may not exit by itself


def check_isolation(opts: ClientOptions, emit: Emit) -> None:
    """``--isolation subprocess`` hands the device to the coordinator: Flower's SuperNode then
    installs and runs the app the run ships (any Python the coordinator puts in it), where
    ``process`` runs only fedpeft's own ClientApp (``clientexec.check_fab``). Refuse it unless
    the device's owner says so."""
    if opts.isolation != "subprocess":
        return
    if not opts.allow_remote_code:
        raise DeployError("--isolation subprocess lets the coordinator run code of its choosing "
                          "on this device (Flower runs the app that comes with the run); add "
                          "--allow-remote-code only if you trust the coordinator with this "
                          "machine, or drop --isolation")
    emit("fedpeft: WARNING: --isolation subprocess --allow-remote-code: this device runs "
         "whatever app the coordinator sends, with this user's rights (files, network, keys). "
         "Use it only with a coordinator you trust with this machine.")


def check_device(name: str) -> None:
    """Fail early, with the reason, when the requested torch device does not exist here."""
    if name == "cpu":
        return  # no torch import here: the ClientApp imports it in the background
    if not name.startswith("cuda"):
        raise DeployError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    from fedpeft.core.training import resolve_device

    try:
        resolve_device(name)
    except (RuntimeError, ValueError) as exc:
        raise DeployError(f"{exc}; run with --device cpu, or install a CUDA build of torch "
                          "and check `nvidia-smi`") from None


def _check_client_files(opts: ClientOptions) -> None:
    data = opts.data
    if not data.is_file():
        raise DeployError(f"--data {data}: no such file")
    if data.suffix.lower() not in (".csv", ".jsonl", ".json"):
        raise DeployError(f"--data {data}: expected a .csv or .jsonl file")
    rows = _check_data_columns(data, opts.text_column, opts.label_column)
    try:
        device_privacy(PrivacyConfig(), opts.epsilon, opts.delta)  # the delta's range
        check_device_delta(opts.delta, rows)
    except ConfigError as exc:
        raise DeployError(f"--delta: {exc}") from None
    if opts.insecure:
        return
    if opts.ca is None or opts.key is None:
        raise DeployError("--ca CA.crt and --key NODE.key are required (from `fedpeft certs` on "
                          "the coordinator), or pass --insecure for an unencrypted test setup")
    if not opts.ca.is_file():
        raise DeployError(f"--ca {opts.ca}: no such file")
    try:
        check_private_key_file(opts.key)
    except CertsError as exc:
        raise DeployError(str(exc)) from None


def _check_data_columns(data: Path, text: str, label: str) -> int:
    """Before the device connects: its file parses, has rows and has its text and label columns
    (the labels are checked against the run's classes, which the coordinator sends, with the
    first task). Returns the number of rows."""
    from fedpeft.core.data import read_user_file

    try:
        frame = read_user_file(data)
    except ConfigError as exc:
        raise DeployError(f"--data {data}: {exc}") from None
    if frame.empty:
        raise DeployError(f"--data {data}: no rows")
    missing = [c for c in (text, label) if c not in frame.columns]
    if missing:
        raise DeployError(f"--data {data}: no {' or '.join(map(repr, missing))} column (columns "
                          f"found: {', '.join(map(str, frame.columns))}); name the file's columns "
                          "with --text-column / --label-column")
    return len(frame)


def supernode_command(opts: ClientOptions, home: Path, runtime_port: int) -> list[str]:
    """``flower-supernode`` in process isolation, its Runtime API on loopback and guarded by a
    fresh shared secret; the node config (a TOML file: no quoting issues) carries the device's
    data file, rank, torch device and threads."""
    node: dict[str, object] = {"data-path": str(opts.data.resolve()), "device": opts.device,
                               "threads": int(opts.threads), "text-column": opts.text_column,
                               "label-column": opts.label_column}
    if opts.rank is not None:
        node["rank"] = int(opts.rank)
    if opts.batch_size is not None:
        node["batch-size"] = int(opts.batch_size)
    if opts.local_steps is not None:
        node["local-steps"] = int(opts.local_steps)
    if opts.epsilon is not None:
        node["epsilon"] = float(opts.epsilon)
        node["ledger"] = str((opts.ledger or default_ledger_path()).resolve())
    node["delta"] = float(opts.delta)
    (home / "node.toml").write_text(tomli_w.dumps(node))
    cmd = ["flower-supernode", "--superlink", opts.superlink, "--isolation", opts.isolation,
           "--host", "127.0.0.1", "--port", str(runtime_port), "--node-config",
           str(home / "node.toml")]
    if opts.isolation == "process":
        secret = home / "superexec.secret"
        secret.write_bytes(secrets.token_bytes(32))
        secret.chmod(0o600)
        cmd += ["--superexec-auth-secret-file", str(secret)]
    if opts.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(opts.ca.resolve()),  # type: ignore[union-attr]
                "--auth-supernode-private-key", str(opts.key.resolve())]  # type: ignore[union-attr]
    if opts.max_wait_s:
        cmd += ["--max-wait-time", str(opts.max_wait_s)]
    return cmd


class _NodeLog:
    """Relays the SuperNode's output (all of it with --verbose, else warnings and errors) and
    keeps the most specific hint about why it stopped or could not connect."""

    def __init__(self, proc: subprocess.Popen, emit: Emit, verbose: bool,
                 log_path: Path | None) -> None:
        self.emit, self.verbose, self.hint, self._rank = emit, verbose, "", -1
        self.gave_up: float | None = None
        self.replies = 0  # messages this SuperNode sent back to the SuperLink
        self._retrying = False  # show the first of a series of reconnection attempts only
        self.log = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115
        self.thread = threading.Thread(target=self._run, args=(proc,), daemon=True)
        self.thread.start()

    def _run(self, proc: subprocess.Popen) -> None:
        for raw in proc.stdout:  # type: ignore[union-attr]
            line = launcher.ANSI.sub("", raw.decode(errors="replace")).rstrip()
            if self.log:
                self.log.write(line + "\n")
                self.log.flush()
            for rank, (needle, hint) in enumerate(_FATAL_HINTS):
                if needle.lower() in line.lower() and rank >= self._rank:
                    self.hint, self._rank = hint, rank
            if "Giving up reconnection" in line:
                self.gave_up = time.monotonic()
            if "Sending: " in line:
                self.replies += 1
            retry = "Connection attempt failed" in line
            repeat, self._retrying = retry and self._retrying, retry
            if self.verbose or (("WARN" in line or "ERROR" in line) and not repeat
                                and not any(q in line for q in _QUIET)):
                more = " (repeats until connected)" if retry and not self.verbose else ""
                self.emit(f"  [supernode] {line}{more}")

    def node_alive(self, proc: subprocess.Popen) -> bool:
        """False once the SuperNode exited, or gave up reconnecting and did not exit."""
        hung = self.gave_up is not None and time.monotonic() - self.gave_up > \
            _HUNG_AFTER_GIVING_UP_S
        return proc.poll() is None and not hung

    def close(self) -> None:
        self.thread.join(timeout=2)
        if self.log:
            self.log.close()


def run_client(opts: ClientOptions, emit: Emit = say, log_path: Path | None = None) -> int:
    """The whole device side: SuperNode plus the in-process ClientApp executor, until the
    SuperNode ends or we are interrupted; returns the exit status."""
    _check_client_files(opts)
    check_isolation(opts, emit)
    check_device(opts.device)
    if opts.insecure:
        _insecure_warning(emit)
    from fedpeft.deploy.clientexec import serve

    home = _private_home("fedpeft-node-")
    trackers: list[launcher.Tracker] = []
    watchdog = launcher.Watchdog()  # if we are killed: stops the SuperNode's whole tree
    watchdog.remove_on_death(home)
    node_log: _NodeLog | None = None
    tasks = {"ok": 0, "failed": 0}

    def on_task(ok: bool, seconds: float) -> None:
        tasks["ok" if ok else "failed"] += 1
        emit(f"fedpeft: round task {'done' if ok else 'FAILED'} in {seconds:.1f} s "
             f"({tasks['ok']} done, {tasks['failed']} failed)")

    guard = (launcher.sigterm_as_keyboard_interrupt()
             if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else contextlib.nullcontext())
    try:
        with guard:
            port = free_port()
            trackers.append(spawn(supernode_command(opts, home, port), flower_env(home), None,
                                  die_with_parent=True, watchdog=watchdog))
            proc = trackers[0].proc
            node_log = _NodeLog(proc, emit, opts.verbose, log_path)
            emit(f"fedpeft: device node for {opts.superlink} (data {opts.data}, device "
                 f"{opts.device}{f', rank {opts.rank}' if opts.rank else ''}); Ctrl-C stops it")
            alive = node_log.node_alive
            if opts.isolation == "process":
                secret = (home / "superexec.secret").read_bytes()
                serve(f"127.0.0.1:{port}", secret, CLIENTAPP, on_task=on_task,
                      keep_going=lambda: alive(proc))
            while alive(proc):  # subprocess isolation: the SuperNode runs the ClientApps
                time.sleep(0.5)
            code = proc.poll()
            code = launcher.EXIT_FAILED if code is None else code
    except KeyboardInterrupt:
        emit("fedpeft: stopping the device node")
        return 130
    finally:
        stop_all(trackers, emit)
        if node_log is not None:
            node_log.close()
        shutil.rmtree(home, ignore_errors=True)
        watchdog.close()
    assert node_log is not None
    if node_log.gave_up is not None and node_log.replies:
        emit(f"fedpeft: the coordinator is gone after {node_log.replies} replies from this "
             "device; done")
        return 0
    hint = f": {node_log.hint}" if node_log.hint else ""
    emit(f"fedpeft: the SuperNode exited with code {code}{hint}")
    return 0 if code == 0 else int(code) or launcher.EXIT_FAILED


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
        epsilon=args.epsilon, delta=args.delta, ledger=Path(args.ledger) if args.ledger else None)
    if opts.epsilon is not None and not 0 < opts.epsilon < math.inf:
        print(f"fedpeft: error: --epsilon {opts.epsilon}: expected a positive number",
              file=sys.stderr)
        return EXIT_USAGE
    for flag, value in (("--batch-size", opts.batch_size), ("--local-steps", opts.local_steps)):
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
                    "round, never the run; set it to 0 to wait forever). [faults] (fault "
                    "injection) is refused: it is for `fedpeft simulate` only.")
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
    cli.add_argument("--rank", type=int, help="this device's LoRA rank (mixed-rank methods)")
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
