"""Processes of a deployment: the Flower environment, free ports, starting a process that dies
with us, stopping process trees, waiting for a TLS health check. Shared by the coordinator and
the device."""


from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from fedpeft.run import launcher

CONNECTION = "fedpeft-deploy"
DEFAULT_PORT = 9092
SERVERAPP = "fedpeft.server.app:app"
CLIENTAPP = "fedpeft.client.app:app"
DEVICE_CLIENTAPP = "fedpeft.client.app:device_app"  # what a device runs: no injection mods
EXIT_USAGE = 2
DEPLOY_ROUND_TIMEOUT_S = 600.0  # a silent device costs a round this long, never the whole run
MiB = 2**20
# A deployment assumes hostile devices unless the user says otherwise (docs/robustness.md):
# an upload whose update norm exceeds this is rejected (honest LoRA updates: about 1 to 100)
DEPLOY_MAX_UPDATE_NORM = 1000.0
SIMULATION_ONLY = ("faults", "attacks")  # sections a deployment refuses: clients misbehave
Emit = Callable[[str], None]


class DeployError(RuntimeError):
    """A problem the user can fix (missing file, port in use, key refused); no traceback."""


# --------------------------------------------------------------------------------- processes


def private_home(prefix: str) -> Path:
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


def tls_context(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def wait_healthy(url: str, ctx: ssl.SSLContext | None, proc: subprocess.Popen,
                  timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=0.5, context=ctx):
            return True
        time.sleep(0.1)
    return False


def insecure_warning(emit: Emit) -> None:
    emit("fedpeft: WARNING: --insecure: no TLS and no SuperNode authentication. Model updates "
         "travel in clear text and any host that reaches this port can join the federation. "
         "Use it only on a trusted network for testing.")


def say(line: str) -> None:
    """Print now, also into a pipe (``fedpeft server | tee log``)."""
    print(line, flush=True)
