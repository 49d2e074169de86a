"""End to end: a loopback TLS `fedpeft server` (FLoRA, the deployment's hostile defaults) with two
honest devices and one hostile device (tests/hostile_device.py: fedpeft's own client whose reply
is altered) that sends N1, N2 (list, inf, string, 1e300 as FLoRA's synced scalar) and N3 in
turn. Every round aggregates the honest uploads, the hostile device is counted in
clients_rejected each round, and the coordinator exits 0."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from fedpeft.server.reporting import MetricsLog

from fedpeft.deploy.certs import make_certs
from fedpeft.deploy.processes import free_port, spawn, stop_all
from fedpeft.run.launcher import Tracker
from tests.helpers import FEDPEFT, flower_env, wait_listening

HOSTILE = [sys.executable, str(Path(__file__).with_name("hostile_device.py"))]
ROUNDS = 6  # one attack per round: N1, N2 x 4, N3


def _csv(path: Path, seed: int, rows: int = 24) -> Path:
    words = ["good", "great", "fine", "bad", "awful", "poor"]
    lines = ["text,label"]
    for i in range(rows):
        k = (i + seed) % 6
        lines.append(f"{words[k]} film {i},{'fresh' if k < 3 else 'rotten'}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_a_hostile_device_cannot_end_or_stall_the_run(tmp_path: Path) -> None:
    pki = make_certs(tmp_path / "pki", [], nodes=3)
    env = flower_env(tmp_path / "flwr_home")
    port, out, logs = free_port(), tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    superlink = f"127.0.0.1:{port}"
    server = [*FEDPEFT, "server", "--certs", str(pki.root), "--host", "127.0.0.1", "--port",
              str(port), "--out", str(out), "--timeout", "500", "--node-keys",
              *(str(pki.node_pub(i)) for i in (1, 2, 3))]
    for item in ('model.name="tiny-bert"', 'method.name="flora"', f"federation.rounds={ROUNDS}",
                 "federation.clients_per_round=3", "federation.min_replies=2",
                 "federation.round_timeout_s=120", "train.local_steps=1", "train.batch_size=8",
                 "eval.subset=50", "data.test_size=100", 'data.partitioner="iid"'):
        server += ["--set", item]
    trackers: list[Tracker] = []
    try:
        trackers.append(spawn(server, env, logs / "server.log"))
        wait_listening(port, trackers[0].proc, 240)
        for i in (1, 2, 3):
            device = HOSTILE if i == 3 else [*FEDPEFT]
            args = ["client"] if i != 3 else []
            trackers.append(spawn(
                [*device, *args, "--superlink", superlink, "--ca", str(pki.ca_cert), "--key",
                 str(pki.node_key(i)), "--data", str(_csv(tmp_path / f"d{i}.csv", i)),
                 "--threads", "1", "--max-wait", "30"], env, logs / f"device{i}.log"))
        rc = trackers[0].proc.wait(540)
    finally:
        stop_all(trackers, print)
    server_log = (logs / "server.log").read_text(errors="replace")
    assert rc == 0, server_log[-4000:]
    rows = MetricsLog.read(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    for row in rows[1:]:
        assert (row["clients_ok"], row["clients_rejected"], row["aggregated"]) == (2, 1, 1), row
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_not_aggregated"] == 0
    assert "devices are not trusted" in server_log
    hostile_log = (logs / "device3.log").read_text(errors="replace")
    for attack in ("n1", "synced=[1, 2]", "synced=inf", "synced='7'", "synced=1e+300", "n3"):
        assert f"sent {attack}" in hostile_log, hostile_log[-3000:]
