"""A killed CLI leaves nothing behind (issue 16, finding 9): ``kill -9`` of ``fedpeft simulate``,
``fedpeft server`` or ``fedpeft client`` (what the OOM killer does) stops every process it
started within seconds, and a run folder is refused to a second run while anything of the first
can still write into it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedpeft.run.launcher import LOCK_FILE, Tracker
from tests.helpers import TINY

FEDPEFT = [sys.executable, "-m", "fedpeft.cli"]
GONE_WITHIN_S = 20.0  # SIGTERM, the watchdog's grace, SIGKILL; generous for a busy machine


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


@contextlib.contextmanager
def _started(args: list[str], env: dict[str, str], log: Path) -> Iterator[Tracker]:
    """``fedpeft ARGS`` in a session of its own, tracked with every process it starts; whatever
    is still alive at the end is SIGKILLed (a failing test leaves nothing behind either)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([*FEDPEFT, *args], env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    tracker = Tracker(proc)
    try:
        yield tracker
    finally:
        for pid in tracker.scan():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def _wait_for(check, timeout_s: float, what: str, tracker: Tracker) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert tracker.proc.poll() is None, f"the CLI exited early while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout_s} s"
        time.sleep(0.2)


def _names(tracker: Tracker) -> dict[int, str]:
    names = {}
    for pid in tracker.scan():
        with contextlib.suppress(OSError):
            names[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:90]
    return {pid: name.decode(errors="replace") for pid, name in names.items()}


def _homes(pids: Iterator[int] | list[int], prefix: bytes) -> set[Path]:
    """The private FLWR_HOME folders (``prefix``...) the tracked processes run with."""
    homes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            homes |= {Path(e[10:].decode()) for e in env if e.startswith(b"FLWR_HOME=" + prefix)}
    return homes


def _sigkill_and_wait(tracker: Tracker) -> tuple[dict[int, str], dict[int, str]]:
    """SIGKILL the CLI alone; return (what ran before, what still runs after GONE_WITHIN_S)."""
    before = _names(tracker)
    os.kill(tracker.proc.pid, signal.SIGKILL)
    tracker.proc.wait()
    deadline = time.monotonic() + GONE_WITHIN_S
    while tracker.scan() and time.monotonic() < deadline:
        time.sleep(0.2)
    return before, _names(tracker)


def _lock_is_free(folder: Path) -> bool:
    with open(folder / LOCK_FILE, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
        return True


def _refused(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """A second CLI run that must be refused at once (bounded even if it is not)."""
    proc = subprocess.Popen([*FEDPEFT, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the second run was not refused: {out[-1000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


@pytest.mark.slow
def test_sigkill_of_simulate_stops_everything_and_frees_the_folder(tmp_path: Path) -> None:
    """Mid-run (SuperLink, SuperExec, flwr-simulation and Ray up), a second simulate into the
    same folder is refused; then SIGKILL of the CLI alone: all its descendants are gone within
    seconds, its private FLWR_HOME is removed and the folder's lock is free again."""
    out, env = tmp_path / "run", _env(tmp_path / "flwr_home")
    sets = [arg for item in (*TINY, "federation.rounds=200") for arg in ("--set", item)]
    with _started(["simulate", "--out", str(out), *sets], env, tmp_path / "cli.log") as tracker:
        _wait_for(lambda: (out / "metrics.jsonl").exists(), 180, "round 0", tracker)
        second = _refused(["simulate", "--out", str(out), *sets], env)
        assert second.returncode == 2 and f"{out} is in use" in second.stdout, second.stdout
        assert not _lock_is_free(out)
        homes = _homes(tracker.scan(), b"/tmp/fedpeft-sim-")
        before, after = _sigkill_and_wait(tracker)
    assert any("flwr-simulation" in n for n in before.values()), before  # it was mid-run
    assert not after, f"still running {GONE_WITHIN_S} s after kill -9: {after}"
    assert homes and not any(h.exists() for h in homes)
    assert _lock_is_free(out)


@pytest.mark.slow
def test_sigkill_of_server_and_client_stops_everything(tmp_path: Path) -> None:
    """``fedpeft server --insecure`` waiting for its device, and a device that cannot reach its
    coordinator: SIGKILL of each CLI leaves none of its processes; a second server into the
    coordinator's folder is refused while the first runs."""
    out, env = tmp_path / "deploy", _env(tmp_path / "flwr_home")
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"review {i},{('good', 'bad')[i % 2]}\n"
                                             for i in range(40)))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sets = [arg for item in ('model.name="tiny-bert"', "data.test_size=200")
            for arg in ("--set", item)]
    server = ["server", "--insecure", "--clients", "1", "--host", "127.0.0.1", "--port",
              str(port), "--out", str(out), *sets]
    with _started(server, env, tmp_path / "server.log") as tracker:
        _wait_for(lambda: _listening(port), 180, "coordinator listening", tracker)
        _wait_for(lambda: any("flwr-serverapp" in n for n in _names(tracker).values()), 120,
                  "the ServerApp", tracker)
        second = _refused([*server[:-len(sets)], "--port", str(port + 1), *sets], env)
        assert second.returncode == 2 and f"{out} is in use" in second.stdout, second.stdout
        before, after = _sigkill_and_wait(tracker)
    assert any("flower-superlink" in n for n in before.values()), before
    assert any("flwr-serverapp" in n for n in before.values()), before
    assert not after, f"coordinator processes still running after kill -9: {after}"
    assert _lock_is_free(out)

    client = ["client", "--insecure", "--superlink", f"127.0.0.1:{port}", "--data", str(data),
              "--threads", "1"]
    with _started(client, env, tmp_path / "client.log") as tracker:
        _wait_for(lambda: any("flower-supernode" in n for n in _names(tracker).values()), 60,
                  "the SuperNode", tracker)
        homes = _homes(tracker.scan(), b"/tmp/fedpeft-node-")
        before, after = _sigkill_and_wait(tracker)
    assert not after, f"device processes still running after kill -9: {after}"
    assert homes and not any(h.exists() for h in homes)


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False
