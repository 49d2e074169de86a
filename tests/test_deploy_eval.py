"""A coordinator with no data (issue 27): `fedpeft server` with eval.where = "clients", the
classes declared and a data path that does not exist, over TLS with SuperNode authentication;
two devices train on their own files and score the global model on their own held-out rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fedpeft.server.reporting import MetricsLog

from fedpeft.deploy.certs import make_certs
from fedpeft.deploy.processes import free_port, spawn, stop_all
from fedpeft.run.launcher import Tracker
from tests.helpers import FEDPEFT, flower_env, wait_exit, wait_listening

ROUNDS = 2
WORDS = {"fresh": ["a wonderful film", "great acting", "loved it", "brilliant and funny"],
         "rotten": ["a dull mess", "boring", "awful dialogue", "a tedious waste"]}


def _csv(path: Path, seed: int, rows: int = 30) -> Path:
    lines = ["text,label"]
    for i in range(rows):
        label = "fresh" if (i + seed) % 3 else "rotten"  # each device its own label mix
        lines.append(f'"{WORDS[label][(i + seed) % 4]} ({i})",{label}')
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_a_coordinator_without_data_gets_the_clients_figures(tmp_path: Path) -> None:
    pki = make_certs(tmp_path / "pki", [], nodes=2)
    out, logs = tmp_path / "out", tmp_path / "logs"
    env, port = flower_env(tmp_path / "home"), free_port()
    logs.mkdir()
    missing = tmp_path / "the-coordinator-has-no-such-file.csv"  # reading it would fail
    server_cmd = [*FEDPEFT, "server", "--certs", str(pki.root), "--host", "127.0.0.1", "--port",
                  str(port), "--out", str(out), "--timeout", "240", "--node-keys",
                  str(pki.node_pub(1)), str(pki.node_pub(2))]
    for item in ('model.name="tiny-bert"', 'data.dataset="file"', f'data.path="{missing}"',
                 'data.partitioner="iid"',
                 'data.labels=["rotten", "fresh"]', 'eval.where="clients"',
                 f"federation.rounds={ROUNDS}", "train.local_steps=2", "train.batch_size=8"):
        server_cmd += ["--set", item]
    save = tmp_path / "own-adapter"
    trackers: list[Tracker] = []
    try:
        trackers.append(spawn(server_cmd, env, logs / "server.log"))
        wait_listening(port, trackers[0].proc, 120)
        for i in (1, 2):
            extra = ["--save-adapter", str(save)] if i == 1 else []
            trackers.append(spawn([*FEDPEFT, "client", "--superlink", f"127.0.0.1:{port}",
                                   "--ca", str(pki.ca_cert), "--key", str(pki.node_key(i)),
                                   "--data", str(_csv(tmp_path / f"d{i}.csv", i)), "--threads",
                                   "1", "--max-wait", "5", *extra], env, logs / f"device{i}.log"))
        server_rc = wait_exit(trackers[0].proc, 240)
        device_rcs = [wait_exit(t.proc, 40) for t in trackers[1:]]
    finally:
        stop_all(trackers, print)
    server_log = (logs / "server.log").read_text(errors="replace")
    assert server_rc == 0, server_log[-3000:]
    assert device_rcs == [0, 0], (logs / "device1.log").read_text(errors="replace")[-2000:]
    assert not missing.exists()
    rows = MetricsLog.read(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    for row in rows:
        assert row["accuracy"] is None and row["clients_evaluated"] == 2, row
        assert 0 <= row["clients_accuracy_min"] <= row["clients_accuracy"] <= 1
        assert sorted(c["examples"] for c in row["client_eval"]) == [6, 6]  # 20% of 30 rows
        assert row["clients_eval_rejected"] == 0 and row["clients_eval_failed"] == 0
    for row in rows[1:]:
        assert row["clients_ok"] == 2 and row["clients_rejected"] == 0, row
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_clients_accuracy"] == rows[-1]["clients_accuracy"]
    assert (save / "adapter_model.safetensors").exists()  # the device kept its own adapter
