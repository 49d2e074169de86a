"""The coordinator, ``fedpeft server``: a ``flower-superlink`` with TLS and SuperNode
authentication on a private loopback port, a fleet gateway (``fedpeft.deploy.gateway``) on the
public ``--host:--port`` that forwards only the SuperNodes' API, the SuperNode public keys
registered with ``flwr supernode register``, and the fedpeft run submitted with ``flwr run``;
progress is streamed and the usual outputs land in ``--out``. Everything it started is stopped
on exit, Ctrl-C or SIGTERM, and a watchdog (``fedpeft.run.launcher.Watchdog``) stops it also
when this process is killed; the run folder stays locked until they are gone."""


from __future__ import annotations

import contextlib
import dataclasses
import json
import queue
import shutil
import signal
import subprocess
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from fedpeft.core.config import (
    SECTIONS,
    ConfigError,
    FedConfig,
    apply_overrides,
    load_config,
)
from fedpeft.core.keys import RUN_CONFIG_KEY
from fedpeft.core.runfiles import METRICS_FILE
from fedpeft.deploy.certs import (
    CertPaths,
    certificate_sans,
    check_public_key_file,
)
from fedpeft.deploy.processes import (
    CLIENTAPP,
    CONNECTION,
    DEFAULT_PORT,
    DEPLOY_MAX_UPDATE_NORM,
    DEPLOY_ROUND_TIMEOUT_S,
    SERVERAPP,
    SIMULATION_ONLY,
    DeployError,
    Emit,
    flower_env,
    free_port,
    insecure_warning,
    private_home,
    say,
    spawn,
    stop_all,
    tls_context,
    wait_healthy,
)
from fedpeft.run import launcher
from fedpeft.run.session import (
    Progress,
    final_score,
    flower_line_filter,
    prepare_out,
    run_error,
)

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
    from fedpeft.core.workspace import data_free_workspace
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
    fed += hostile_defaults(opts, user)
    cfg = load_config(opts.config, [*opts.overrides, *fed])
    build_method(cfg)
    get_model_spec(cfg.model.name).tokenizer()
    if cfg.eval.where == "clients":  # the devices evaluate: the coordinator reads no data
        data_free_workspace(cfg)  # refuses a classification run without data.labels
        return cfg
    train, _ = load_task_data(cfg.data)  # the coordinator's held-out split for evaluation
    labels = json.dumps(list(train.label_names))
    return load_config(opts.config, [*opts.overrides, *fed, f"data.labels={labels}"])


def hostile_defaults(opts: ServerOptions, user: FedConfig) -> list[str]:
    """What a deployment sets unless the user set it (to anything, its default included): a
    device's claimed example count is capped at what one round of local training consumes
    (``train.local_steps * train.batch_size``), so a liar weighs no more than an honest device
    of that size; and every upload's update norm is bounded (``DEPLOY_MAX_UPDATE_NORM``), for
    every method, so no scaled upload reaches the aggregate or another client's downlink."""
    out = []
    fed = user.federation
    if not (_user_sets(opts, "federation", "weighting")
            or _user_sets(opts, "federation", "max_examples_per_client")):
        cap = max(1, user.train.local_steps * user.train.batch_size)
        out.append(f"federation.max_examples_per_client={cap}")
    if not _user_sets(opts, "federation", "max_update_norm") and fed.max_update_norm == 0:
        out.append(f"federation.max_update_norm={DEPLOY_MAX_UPDATE_NORM}")
    return out


def hostility_line(cfg: FedConfig) -> str:
    """The start-up line that says how this deployment treats devices' claims."""
    fed = cfg.federation
    weights = ("uniform weights" if fed.weighting == "uniform" else
               f"example counts capped at {fed.max_examples_per_client}"
               if fed.max_examples_per_client > 0 else "UNCAPPED example counts")
    norm = (f"update norm bound {fed.max_update_norm:g}" if fed.max_update_norm > 0
            else "NO update-norm bound")
    return (f"fedpeft: devices are not trusted: {weights}, {norm}, aggregator "
            f"{fed.aggregator}; set federation.weighting / max_examples_per_client / "
            "max_update_norm to change (0 turns a bound off)")


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
        kinds = " and ".join(dict.fromkeys(
            "fault injection" if k.startswith("faults.") else "attack injection" for k in keys))
        raise ConfigError(f"{', '.join(keys)}: {kinds} is for `fedpeft simulate` only; "
                          "`fedpeft server` does not tell real devices to misbehave. Remove "
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
        self.home = private_home("fedpeft-deploy-")
        self.env = flower_env(self.home)
        self.trackers: list[launcher.Tracker] = []
        self.gateway = None
        self.port = 0
        # if we are killed: stops what we started, holds the run folder's lock until then
        self.watchdog = launcher.Watchdog(launcher.held_fds(opts.resume or opts.out))
        self.watchdog.remove_on_death(self.home)

    def start_superlink(self, log_path: Path) -> None:
        ctx = tls_context(self.tls.ca_cert) if self.tls else None
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
            if wait_healthy(f"{scheme}://127.0.0.1:{self.port}/health", ctx,
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
            upstream, tls_context(tls.ca_cert) if tls else False, self.opts.host,
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


def run_server(opts: ServerOptions, emit: Emit = say) -> int:
    """The whole coordinator side; returns the exit status."""
    from fedpeft.server.reporting import MetricsLog, human_bytes, results_table

    if opts.resume:  # one run writes into a folder at a time: locked before the resume reads it
        launcher.hold_folder(opts.resume)
    tls = _server_tls(opts)
    keys = _node_keys(opts)
    if opts.insecure:
        insecure_warning(emit)
    done = -1
    if opts.resume:
        cfg, out, done = resume_config(opts, len(keys))
    else:
        cfg, out = deployment_config(opts, len(keys)), opts.out.resolve()
    fed = cfg.federation
    emit(hostility_line(cfg))
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
    rows = MetricsLog.read(out / "metrics.jsonl")
    emit("\n" + results_table(rows))
    emit(f"\n{final_score(summary, rows)}; fleet traffic through the gateway "
         f"(HTTP bodies): up {human_bytes(traffic.get('bytes_up', 0))}, down "
         f"{human_bytes(traffic.get('bytes_down', 0))} in {traffic.get('requests', 0)} requests")
    emit(f"outputs: {out}/metrics.jsonl summary.json report.png adapter/")
    return 0
