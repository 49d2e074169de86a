"""simulation.ray_address: a Flower simulation joins an existing Ray cluster. A two-node cluster
is started on this machine (two ``ray start`` processes on loopback addresses 127.0.0.2 and
127.0.0.3, one CPU each), a short tiny-bert simulation runs on it, and Ray's actor table must show
the ClientApp actors on both nodes. Only the processes this test started are stopped (by their
process groups, never ``ray stop``)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedpeft.cli import main
from fedpeft.core.config import ConfigError, load_config
from fedpeft.run.launcher import ray_env
from tests.helpers import TINY

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"  # loopback on Linux (127/8), not rewritten by Ray
RAY = str(Path(sys.executable).parent / "ray")


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ray_start(args: list[str], ip: str, log: Path) -> subprocess.Popen[bytes]:
    """One ``ray start --block`` node in its own process group (stopped with it)."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    ports = [f"--dashboard-agent-listen-port={free_port(ip)}",
             f"--metrics-export-port={free_port(ip)}", f"--node-manager-port={free_port(ip)}",
             f"--object-manager-port={free_port(ip)}"]
    with log.open("wb") as out:
        return subprocess.Popen([RAY, "start", "--block", "--num-cpus=1", f"--node-ip-address={ip}",
                                 "--disable-usage-stats", *ports, *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def ray_query(address: str, code: str, timeout: float = 120) -> str:
    """Run ``code`` in a fresh Python connected to the cluster as a driver; its stdout."""
    script = ("import json, ray\n"
              f"ray.init(address={address!r}, logging_level='ERROR')\n" + code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=timeout, check=True).stdout


def stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def two_nodes() -> Iterator[str]:
    temp = Path(tempfile.mkdtemp(prefix="fp-ray-", dir="/tmp"))  # Ray's socket paths are short
    port = free_port(HEAD_IP)
    address = f"{HEAD_IP}:{port}"
    procs = [ray_start(["--head", f"--port={port}", f"--temp-dir={temp}",
                        "--include-dashboard=false",
                        f"--ray-client-server-port={free_port(HEAD_IP)}"],
                       HEAD_IP, temp / "head.log")]
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in (temp / "head.log").read_text(errors="replace"):
            assert procs[0].poll() is None and time.monotonic() < deadline, \
                (temp / "head.log").read_text(errors="replace")[-2000:]
            time.sleep(1)
        procs.append(ray_start([f"--address={address}"], WORKER_IP, temp / "worker.log"))
        count = "print(sum(1 for n in ray.nodes() if n['Alive']))"
        while int(ray_query(address, count).strip() or 0) < 2:
            assert procs[1].poll() is None and time.monotonic() < deadline, \
                (temp / "worker.log").read_text(errors="replace")[-2000:]
            time.sleep(2)
        yield address
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_address_values() -> None:
    for ok in ("", "auto", "10.0.0.5:6379", "head.cluster:6379"):
        assert load_config(None, [f'simulation.ray_address="{ok}"']).simulation.ray_address == ok
    for bad in ("10.0.0.5", "host:0", "host:99999", ":6379", "ray://h:1/x", "a b:1"):
        with pytest.raises(ConfigError, match=r"simulation\.ray_address"):
            load_config(None, [f'simulation.ray_address="{bad}"'])
    home = Path("/tmp/x")
    assert ray_env("", home) == {"RAY_ADDRESS": "local", "RAY_TMPDIR": str(home),
                                 "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    assert ray_env("10.0.0.5:6379", home) == {"RAY_ADDRESS": "10.0.0.5:6379"}


@pytest.mark.slow
def test_simulation_runs_on_both_nodes(two_nodes: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["simulate", "--out", str(out), "--set", f'simulation.ray_address="{two_nodes}"']
    for item in TINY:
        args += ["--set", item]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["clients_failed"] == 0
    table = ray_query(two_nodes, (
        "from ray._private import state\n"  # Ray's GCS actor table (no dashboard needed)
        "nodes = {n['NodeID']: n['NodeManagerAddress'] for n in ray.nodes()}\n"
        "print(json.dumps([[a.get('ActorClassName', ''), nodes.get(a['Address']['NodeID'])]\n"
        "                  for a in state.actors().values()]))\n"))
    actors = json.loads(table.strip().splitlines()[-1])
    client_nodes = {ip for name, ip in actors if "ClientAppActor" in name}
    assert client_nodes == {HEAD_IP, WORKER_IP}, actors
