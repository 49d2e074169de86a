"""SecAgg+ in a real deployment on loopback: `fedpeft server` (TLS, SuperNode authentication) and
four `fedpeft client` devices, each its own OS process on its own CSV. Device 4 is killed with
SIGKILL as soon as round 1 is recorded, so it is sampled for round 2 and vanishes in its protocol
(on this machine: before answering the setup stage; dropouts after the shares went out are
tested through the ClientApp in test_secagg_flower.py). Every round must still aggregate, rounds
2 and 3 over the three survivors."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from fedpeft.server.reporting import MetricsLog

from fedpeft.deploy.certs import make_certs
from fedpeft.deploy.processes import free_port, spawn, stop_all
from tests.helpers import FEDPEFT, flower_env

ROUNDS = 3
TEXTS = (["a wonderful, moving film", "great acting", "loved every minute"],
         ["a dull, lifeless mess", "boring from start to finish", "awful dialogue"])


def _csv(path: Path, seed: int, rows: int = 24) -> Path:
    lines = ["text,label"]
    for i in range(rows):
        good = (i + seed) % 2 == 0
        lines.append(f'"{TEXTS[0 if good else 1][(i + seed) % 3]} ({i})",'
                     f'{"fresh" if good else "rotten"}')
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_four_devices_one_killed_mid_protocol_every_round_aggregates(tmp_path: Path) -> None:
    pki = make_certs(tmp_path / "pki", [], nodes=4)
    out, logs = tmp_path / "out", tmp_path / "logs"
    env, port = flower_env(tmp_path / "home"), free_port()
    logs.mkdir()
    superlink = f"127.0.0.1:{port}"
    server_cmd = [*FEDPEFT, "server", "--certs", str(pki.root), "--host", "127.0.0.1", "--port",
                  str(port), "--out", str(out), "--timeout", "300"]
    for item in ('model.name="tiny-bert"', f"federation.rounds={ROUNDS}", "train.local_steps=2",
                 "train.batch_size=8", "eval.subset=100", "data.test_size=200",
                 'data.partitioner="iid"', "secagg.enabled=true",
                 "federation.round_timeout_s=60"):
        server_cmd += ["--set", item]
    trackers = [spawn(server_cmd, env, logs / "server.log")]
    try:
        deadline = time.monotonic() + 90
        while not (logs / "server.log").exists() or "listening" not in (
                logs / "server.log").read_text(errors="replace").lower():
            assert trackers[0].proc.poll() is None, (logs / "server.log").read_text()[-3000:]
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for i in (1, 2, 3, 4):
            trackers.append(spawn(
                [*FEDPEFT, "client", "--superlink", superlink, "--ca", str(pki.ca_cert),
                 "--key", str(pki.node_key(i)), "--data", str(_csv(tmp_path / f"d{i}.csv", i)),
                 "--threads", "1", "--max-wait", "30"], env, logs / f"device{i}.log"))
        deadline = time.monotonic() + 400
        while len(MetricsLog.read(out / "metrics.jsonl")) < 2:  # round 1 recorded
            assert trackers[0].proc.poll() is None, (logs / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (logs / "server.log").read_text()[-3000:]
            time.sleep(0.1)
        os.kill(trackers[4].proc.pid, signal.SIGKILL)  # device 4, in round 2's stages
        rc = trackers[0].proc.wait(600)
    finally:
        stop_all(trackers, print)
    log = (logs / "server.log").read_text(errors="replace")
    assert rc == 0, log[-4000:]
    rows = MetricsLog.read(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    assert all(r["secagg"] and r["aggregated"] == 1 for r in rows[1:]), rows
    assert rows[1]["secagg_unmask_survivors"] == 4
    assert all(r["secagg_unmask_survivors"] == 3 for r in rows[3:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["secagg"] is True and summary["rounds_not_aggregated"] == 0
