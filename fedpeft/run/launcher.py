"""Run a Flower app in the simulation runtime on a private, throw-away SuperLink.

Avoids the deprecated ``run_simulation``/``start_simulation`` and the detached SuperLink that
``flwr run`` starts for ``:local:`` connections (fixed port 39091, outlives the run). Each call gets
its own port, ``FLWR_HOME`` and Ray temp dir, so calls can run in parallel, and it stops every
process it started (SuperLink, SuperExec, flwr-simulation, Ray) before returning, also on errors,
KeyboardInterrupt and SIGTERM. Linux only: processes are tracked through ``/proc``.

When this process is killed outright (SIGKILL, the OOM killer) no ``finally`` runs. Then: the
processes it started directly get SIGTERM from the kernel (:func:`die_with_parent`), and a
:class:`Watchdog` process, which has tracked their whole trees, stops everything that is left and
removes the private home. A run folder is held with an exclusive lock (:func:`hold_folder`) that
the watchdog inherits, so it is free again only once no process of the run can write into it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import tomli_w  # a dependency of flwr

from fedpeft.core.config import ConfigError

RunValue = str | int | float | bool
CONNECTION = "fedpeft-sim"
EXIT_FAILED = 1
EXIT_TIMEOUT = 124
_LOG = logging.getLogger(__name__)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
RUN_ID = re.compile(r"Successfully started run (\d+)")
ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}  # where Ray runs: ray_env


LOCK_FILE = ".lock"  # in a run folder: held by the run that writes there
_PR_SET_PDEATHSIG = 1


class RunTimeout(Exception):
    pass


# ------------------------------------------------------------------------- dying with us
def _load_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not Linux
        return None


_PRCTL = _load_prctl()  # resolved here: the child after fork only calls it


def die_with_parent() -> None:
    """A ``preexec_fn``: the child gets SIGTERM when the thread that started it ends (also when
    this process is SIGKILLed). Only a pre-resolved libc call: safe after fork."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


# -------------------------------------------------------------------------- run folders
_HELD: dict[Path, int] = {}  # run folder -> the open lock file (held until this process ends)


def hold_folder(folder: Path) -> int:
    """Lock ``folder`` (``LOCK_FILE`` in it, ``flock``) for this process's lifetime, or raise
    ConfigError naming the process that holds it. Re-entrant in one process. The kernel drops the
    lock when the last process holding the file closes it (a :class:`Watchdog` started with it
    holds it too), so a crash cannot leave a folder locked. Returns the lock's file descriptor."""
    folder = Path(folder).resolve()
    if folder in _HELD:
        return _HELD[folder]
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(f"{folder} is in use: another fedpeft process (pid {owner}) is writing "
                          "into it; wait for it to end or stop it, or choose another folder")\
            from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[folder] = fd
    return fd


def held_fds(folder: Path | None) -> list[int]:
    """The lock of ``folder`` if this process holds it (for a watchdog to inherit)."""
    fd = _HELD.get(Path(folder).resolve()) if folder is not None else None
    return [] if fd is None else [fd]


# ------------------------------------------------------------------------------ watchdog
class Watchdog:
    """A process (``fedpeft.run.watchdog``) that outlives this one: it tracks the process trees
    it is told about (:meth:`adopt`) and, if this process dies without saying :meth:`close`,
    stops them all and removes the paths it was given (:meth:`remove_on_death`). ``keep_fds``
    (run folder locks) stay open in it until it has done so."""

    def __init__(self, keep_fds: Iterable[int] = ()) -> None:
        keep = list(keep_fds)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedpeft.run.watchdog", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, pass_fds=keep)
        self._lock = threading.Lock()

    def _send(self, line: str) -> None:
        with self._lock, contextlib.suppress(BrokenPipeError, ValueError, OSError):
            self.proc.stdin.write(f"{line}\n".encode())  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]

    def adopt(self, pid: int) -> None:
        """Track ``pid`` (a process we started, in a session of its own) and its descendants."""
        self._send(f"pid {pid} {start_time(pid)}")

    def remove_on_death(self, path: Path) -> None:
        self._send(f"rm {path}")

    def close(self) -> None:
        """We stopped everything ourselves: the watchdog leaves without touching anything."""
        self._send("done")
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def write_app_dir(target: Path, serverapp: str, clientapp: str,
                  run_config_defaults: Mapping[str, RunValue], *, name: str = "fedpeft-app",
                  publisher: str = "fedpeft", version: str = "0.1.0") -> Path:
    """Write a minimal Flower app directory (just ``pyproject.toml``) and return it.

    ``serverapp``/``clientapp`` are import strings (``"pkg.module:attr"``, ``attr`` assigned at
    module level); they are imported from the app dir first, then from ``sys.path``, so an
    installed package needs no sources here. Only keys in ``run_config_defaults`` can be set
    per run. ``name`` may hold letters, digits and hyphens.
    """
    target.mkdir(parents=True, exist_ok=True)
    app = {"publisher": publisher, "components": {"serverapp": serverapp, "clientapp": clientapp},
           "config": dict(run_config_defaults)}
    doc = {"project": {"name": name, "version": version, "description": f"{name} (generated)",
                       "license": "Apache-2.0", "dependencies": []},
           "tool": {"flwr": {"app": app}}}
    (target / "pyproject.toml").write_text(tomli_w.dumps(doc), encoding="utf-8")
    return target


@contextlib.contextmanager
def sigterm_as_keyboard_interrupt() -> Iterator[None]:
    """In the block, SIGTERM raises KeyboardInterrupt in the main thread, so ``finally`` runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def start_time(pid: int) -> int:
    """The start time of ``pid`` (clock ticks since boot; -1 when it is gone): with the pid it
    names one process, even after the pid is reused."""
    entry = proc_table().get(pid)
    return -1 if entry is None else entry[2]


def proc_table() -> dict[int, tuple[int, int, int]]:
    """Live processes as pid -> (ppid, session id, start time); zombies count as gone."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != b"Z":  # state, ppid, pgrp, session, ..., starttime (field 22)
                table[int(entry.name)] = (int(fields[1]), int(fields[3]), int(fields[19]))
    return table


class Tracker:
    """Every process descended from ``proc``, also once orphaned: remembered by (pid, start time)
    and by session (SuperExec starts a new session; flwr-simulation and Ray stay in it).

    ``proc`` None (the watchdog): no process of our own; roots come from :meth:`adopt`, and
    ``foreign_sessions`` (the caller's own) are never taken for a root's."""

    def __init__(self, proc: subprocess.Popen[bytes] | None,
                 foreign_sessions: Iterable[int] = ()) -> None:
        self.proc, self.sessions, self.known = proc, set(), {}
        self.foreign = set(foreign_sessions)
        self._terminated: set[tuple[int, int]] = set()  # (pid, start time) sent SIGTERM
        self._stop = threading.Event()
        if proc is not None:
            self.adopt(proc.pid)
            threading.Thread(target=self._poll, daemon=True).start()

    def adopt(self, pid: int, start: int = -1) -> None:
        """Track ``pid`` (started with ``start_new_session``: its session is its own)."""
        self.known[pid] = start
        if pid not in self.foreign:
            self.sessions.add(pid)

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            self.scan()

    def scan(self) -> dict[int, int]:
        table = proc_table()
        alive = {p: t for p, t in self.known.items() if p in table and t in (-1, table[p][2])}
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        todo = list(alive)
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in alive:
                    alive[child] = table[child][2]
                    todo.append(child)
        self.sessions |= {table[p][1] for p in alive} - self.foreign
        alive.update({p: t[2] for p, t in table.items() if t[1] in self.sessions})
        alive.pop(os.getpid(), None)
        self.known.update(alive)
        return alive

    def terminate(self) -> None:
        """SIGTERM the whole tree now, once per process; ``stop_all`` then waits for it. Lets a
        caller with several trackers start all their shutdowns at once."""
        for pid_start in set(self.scan().items()) - self._terminated:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid_start[0], signal.SIGTERM)
            self._terminated.add(pid_start)

    def stop_all(self, grace_s: float = 10.0) -> list[int]:
        """SIGTERM everything, SIGKILL what is left after ``grace_s``; return survivors' PIDs."""
        self._stop.set()
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            deadline = time.monotonic() + wait_s
            sent = set(self._terminated) if sig == signal.SIGTERM else set()
            while (alive := self.scan()) and time.monotonic() < deadline:
                for pid_start in set(alive.items()) - sent:  # once: a 2nd SIGTERM forces uvicorn
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid_start[0], sig)
                    sent.add(pid_start)
                time.sleep(0.2)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2)  # reap our direct child
        return sorted(self.scan())


def _start_superlink(home: Path, env: dict[str, str], log_path: Path, trackers: list[Tracker],
                     watchdog: Watchdog, timeout_s: float = 60.0) -> int:
    """Start ``flower-superlink`` in its own session on a free port, wait for ``/health``, write
    the connection into ``$FLWR_HOME/config.toml`` and return the port (3 tries: port races)."""
    for _ in range(3):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        cmd = ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
               "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
               "--port", str(port)]
        with open(log_path, "ab") as log_fh:
            trackers.append(Tracker(subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent)))
        watchdog.adopt(trackers[-1].proc.pid)  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout_s
        while trackers[-1].proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError), urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/health", timeout=0.5):  # raises unless 2xx
                conn = {"address": f"127.0.0.1:{port}", "insecure": True}
                (home / "config.toml").write_text(
                    tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))
                return port
            time.sleep(0.1)
        trackers[-1].stop_all(grace_s=3.0)
    tail = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"flower-superlink did not become ready; log tail:\n{tail}")


def run_status(env: dict[str, str], run_id: str, connection: str = CONNECTION) -> str:
    """The run's final status as the SuperLink reports it, e.g. ``finished:completed``."""
    out = subprocess.run(["flwr", "ls", connection, "--run-id", run_id, "--format", "json"],
                         env=env, capture_output=True, text=True, timeout=60, check=False)
    try:
        run = json.loads(out.stdout)["runs"][0]
        return f"{run['status']} ({run.get('status-details', '')})"
    except (ValueError, KeyError, IndexError):
        return f"unknown: {out.stdout.strip()[-300:]} {out.stderr.strip()[-300:]}"


def pump(source: Iterable[str], sink: queue.Queue[str | None]) -> None:
    for line in source:
        sink.put(line)
    sink.put(None)


def federation_config(supernodes: int, cpus_per_client: int, gpus_per_client: float) -> str:
    """``flwr run --federation-config``: the virtual nodes and each actor's resources."""
    text = f"num-supernodes={int(supernodes)} client-resources-num-cpus={int(cpus_per_client)}"
    if gpus_per_client:
        text += f" client-resources-num-gpus={float(gpus_per_client)}"
    return text


def ray_env(ray_address: str, home: Path) -> dict[str, str]:
    """Where the simulation's Ray runs. '' (default): a private Ray for this run, on loopback,
    its sockets and files in ``home`` (``RAY_ADDRESS=local`` never joins a cluster this machine
    may belong to). Else join the cluster at ``ray_address`` ('HOST:PORT' of the head, or
    'auto'): Ray's own files then live where the cluster keeps them, and Ray's multi-node
    switch and temp folder stay as the user's environment sets them."""
    if not ray_address:
        return {"RAY_ADDRESS": "local", "RAY_TMPDIR": str(home),
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return {"RAY_ADDRESS": ray_address}


def run_simulation_app(app_dir: Path, run_config: Mapping[str, RunValue], num_supernodes: int,
                       num_cpus_per_client: int = 1, log_dir: Path | None = None,
                       stream: Callable[[str], None] | None = None,
                       timeout_s: float | None = None, num_gpus_per_client: float = 0.0,
                       ray_address: str = "") -> int:
    """Run the Flower app in ``app_dir`` in the simulation runtime and return its exit status.

    0 when the run finished ``completed``; :data:`EXIT_FAILED` when it did not (e.g. the
    ServerApp raised: ``flwr run`` itself exits 0 then; ``sys.exit`` in a ServerApp is NOT a
    failure); :data:`EXIT_TIMEOUT` when the run outlived ``timeout_s``; else ``flwr run``'s code.
    Output lines (ServerApp stdout/stderr/logs, ClientApp output via Ray) go to ``stream`` without
    ANSI colours (default: this module's logger). ``log_dir`` gets ``superlink.log``/``run.log``.
    Relative paths in the run config resolve against the current directory. ``ray_address``:
    see :func:`ray_env`.
    """
    emit = stream or _LOG.info
    # Under /tmp like Ray's default: Ray's AF_UNIX socket paths (<=107 bytes) live in RAY_TMPDIR.
    tmp_root = "/tmp" if Path("/tmp").is_dir() else None
    home = Path(tempfile.mkdtemp(prefix="fedpeft-sim-", dir=tmp_root))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_INTERNAL_")}
    bin_dir = str(Path(sys.executable).parent)  # Flower spawns its CLIs by name: venv first
    env.update(ENV, FLWR_HOME=str(home), PATH=os.pathsep.join([bin_dir, env.get("PATH", "")]),
               **ray_env(ray_address, home))
    logs = log_dir or home
    trackers: list[Tracker] = []
    client: subprocess.Popen[str] | None = None
    guard = (sigterm_as_keyboard_interrupt() if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
             else contextlib.nullcontext())
    watchdog = Watchdog(held_fds(log_dir))  # if we are killed: stops what we started
    watchdog.remove_on_death(home)
    try:
        with guard:
            logs.mkdir(parents=True, exist_ok=True)
            t0 = time.monotonic()
            port = _start_superlink(home, env, logs / "superlink.log", trackers, watchdog)
            _LOG.info("SuperLink on 127.0.0.1:%d ready after %.1f s", port, time.monotonic() - t0)
            cmd = ["flwr", "run", str(Path(app_dir).resolve()), CONNECTION, "--stream",
                   "--federation-config", federation_config(num_supernodes, num_cpus_per_client,
                                                            num_gpus_per_client)]
            if run_config:  # via a TOML file: no quoting problems with spaces or quotes in paths
                (home / "run_config.toml").write_text(tomli_w.dumps(dict(run_config)))
                cmd += ["--run-config", str(home / "run_config.toml")]
            client = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      errors="replace", bufsize=1, start_new_session=True,
                                      preexec_fn=die_with_parent)
            watchdog.adopt(client.pid)
            lines: queue.Queue[str | None] = queue.Queue()
            threading.Thread(target=pump, args=(client.stdout, lines), daemon=True).start()
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            run_id = None
            with open(logs / "run.log", "a", encoding="utf-8") as run_log:
                while (line := next_line(lines, deadline)) is not None:
                    line = ANSI.sub("", line.rstrip("\n"))
                    run_log.write(line + "\n")
                    run_id = run_id or (m.group(1) if (m := RUN_ID.search(line)) else None)
                    emit(line)
            code = client.wait()
            if code != 0 or run_id is None:
                return code or EXIT_FAILED
            status = run_status(env, run_id)
            if not status.startswith("finished:completed"):
                emit(f"[launcher] run {run_id} ended with status {status}")
                return EXIT_FAILED
            return 0
    except RunTimeout:
        emit(f"[launcher] timed out after {timeout_s} s")
        return EXIT_TIMEOUT
    finally:
        _cleanup(client, trackers, home)
        watchdog.close()


def next_line(lines: queue.Queue[str | None], deadline: float | None) -> str | None:
    """The next output line, None at EOF; raise RunTimeout once ``deadline`` has passed."""
    while deadline is None or time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            return lines.get(timeout=0.5)
    raise RunTimeout


def _cleanup(client: subprocess.Popen[str] | None, trackers: list[Tracker], home: Path) -> None:
    """Stop ``flwr run``, then each SuperLink's whole process tree; remove the private home.
    SIGINT/SIGTERM are ignored meanwhile so that a second Ctrl-C cannot leave processes behind."""
    main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)} \
        if main else {}
    try:
        if client is not None and client.poll() is None:
            client.terminate()
            try:
                client.wait(5)
            except subprocess.TimeoutExpired:
                client.kill()
                client.wait()
        for tracker in trackers:
            t0, survivors = time.monotonic(), tracker.stop_all()
            _LOG.info("stopped %d processes in %.1f s", len(tracker.known), time.monotonic() - t0)
            if survivors:
                _LOG.warning("processes survived SIGKILL: %s", survivors)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        shutil.rmtree(home, ignore_errors=True)
