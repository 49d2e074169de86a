"""A device, ``fedpeft client``: a ``flower-supernode`` with ``--isolation process`` whose node
config carries the device's data file, LoRA rank, torch device, threads and privacy budget,
and, in this process, the long-running ClientApp executor of ``fedpeft.deploy.clientexec`` (no
process start, imports or model load per round). The SuperNode dies with this process, also
when it is killed (PR_SET_PDEATHSIG), and a watchdog stops whatever it started."""


from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from fedpeft.core.config import (
    ConfigError,
    PrivacyConfig,
)
from fedpeft.core.keys import NODE_EPSILON, NODE_RANK
from fedpeft.core.ledger import (
    DEVICE_DELTA,
    check_device_delta,
    default_ledger_path,
    device_privacy,
)
from fedpeft.deploy.certs import (
    CertsError,
    check_private_key_file,
)
from fedpeft.deploy.processes import (
    CLIENTAPP,
    DEVICE_CLIENTAPP,
    DeployError,
    Emit,
    flower_env,
    free_port,
    insecure_warning,
    private_home,
    say,
    spawn,
    stop_all,
)
from fedpeft.run import launcher

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
    model: str | None = None  # the only model.name this device accepts (None: any)
    save_adapter: Path | None = None  # write the device's own adapter here after each round


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
    """Before the device connects: its file parses, has rows and has its text and label columns,
    or else matches an instruction/chat schema (``fedpeft.core.data.CHAT_SCHEMAS``: a causal-LM
    run) whose rows are well formed. The labels are checked against the run's classes, which
    the coordinator sends, with the first task. Returns the number of rows."""
    from fedpeft.core.data import CHAT_SCHEMAS, chats_of, check_scalar_labels, read_user_file

    try:
        frame = read_user_file(data)
    except ConfigError as exc:
        raise DeployError(f"--data {data}: {exc}") from None
    if frame.empty:
        raise DeployError(f"--data {data}: no rows")
    missing = [c for c in (text, label) if c not in frame.columns]
    if not missing:
        try:
            check_scalar_labels(frame, label, data.name)
        except ConfigError as exc:
            raise DeployError(f"--data {data}: {exc}") from None
        return len(frame)
    try:
        chats = chats_of(frame, data.name)
    except ConfigError as exc:
        raise DeployError(f"--data {data}: {exc}") from None
    if chats is None:
        raise DeployError(f"--data {data}: no {' or '.join(map(repr, missing))} column (columns "
                          f"found: {', '.join(map(str, frame.columns))}); name the file's columns "
                          "with --text-column / --label-column, or use a chat/instruction schema "
                          f"({'; '.join(CHAT_SCHEMAS[1:])})")
    return len(chats)


def supernode_command(opts: ClientOptions, home: Path, runtime_port: int) -> list[str]:
    """``flower-supernode`` in process isolation, its Runtime API on loopback and guarded by a
    fresh shared secret; the node config (a TOML file: no quoting issues) carries the device's
    data file, rank, torch device and threads."""
    node: dict[str, object] = {"data-path": str(opts.data.resolve()), "device": opts.device,
                               "threads": int(opts.threads), "text-column": opts.text_column,
                               "label-column": opts.label_column}
    if opts.rank is not None:
        node[NODE_RANK] = int(opts.rank)
    if opts.batch_size is not None:
        node["batch-size"] = int(opts.batch_size)
    if opts.local_steps is not None:
        node["local-steps"] = int(opts.local_steps)
    if opts.epsilon is not None:
        node[NODE_EPSILON] = float(opts.epsilon)
        node["ledger"] = str((opts.ledger or default_ledger_path()).resolve())
    node["delta"] = float(opts.delta)
    if opts.model:
        node["model"] = opts.model
    if opts.save_adapter is not None:
        node["save-adapter"] = str(opts.save_adapter.resolve())
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
        insecure_warning(emit)
    from fedpeft.deploy.clientexec import serve

    home = private_home("fedpeft-node-")
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
                      keep_going=lambda: alive(proc), run_ref=DEVICE_CLIENTAPP)
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
