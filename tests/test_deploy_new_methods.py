"""RoLoRA, FedSVD, Fed-SB and FedEx-LoRA in a real deployment on loopback: `fedpeft server` (TLS,
SuperNode authentication) and two registered `fedpeft client` devices, each a long-running
SuperNode with its own CSV, on tiny-bert. What a simulation cannot show: Fed-SB's devices keep the
frozen A and B in their Flower state between rounds (sent once, never again), RoLoRA's phases
alternate across real rounds, and every process started is stopped."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from fedpeft.server.reporting import MetricsLog
from safetensors.numpy import load_file

from fedpeft.deploy.certs import make_certs
from fedpeft.deploy.processes import free_port, spawn, stop_all
from fedpeft.run.launcher import Tracker
from tests.helpers import FEDPEFT, client_cmd, flower_env, review_csv, wait_exit, wait_listening

TIMEOUT_S = 240


@dataclass
class Run:
    server_rc: int
    device_rcs: list[int]
    rows: list[dict]
    summary: dict
    out: Path
    logs: Path
    pids: list[int]
    survivors: list[int]


def _deploy(tmp_path: Path, method: str, rounds: int) -> Run:
    """One coordinator and two registered devices; every process stopped before returning."""
    pki = make_certs(tmp_path / "pki", [], nodes=2)
    out, logs, env = tmp_path / "out", tmp_path / "logs", flower_env(tmp_path / "home")
    logs.mkdir()
    port = free_port()
    server_cmd = [*FEDPEFT, "server", "--certs", str(pki.root), "--host", "127.0.0.1", "--port",
                  str(port), "--out", str(out), "--timeout", str(TIMEOUT_S), "--node-keys",
                  str(pki.node_pub(1)), str(pki.node_pub(2))]
    for item in ('model.name="tiny-bert"', f'method.name="{method}"', f"federation.rounds={rounds}",
                 "train.local_steps=2", "train.batch_size=8", "eval.subset=100",
                 "data.test_size=200", 'data.partitioner="iid"'):
        server_cmd += ["--set", item]
    trackers: list[Tracker] = []
    try:
        trackers.append(spawn(server_cmd, env, logs / "server.log"))
        wait_listening(port, trackers[0].proc, 90)
        for i in (1, 2):
            trackers.append(spawn(client_cmd(f"127.0.0.1:{port}", pki.ca_cert, pki.node_key(i),
                                             review_csv(tmp_path / f"d{i}.csv", i),
                                             ["--max-wait", "5"]), env, logs / f"device{i}.log"))
        server_rc = wait_exit(trackers[0].proc, TIMEOUT_S)
        device_rcs = [wait_exit(t.proc, 40) for t in trackers[1:]]
    finally:
        stop_all(trackers, print)
    pids = sorted({pid for t in trackers for pid in t.known})
    survivors = sorted({pid for t in trackers for pid in t.scan()})
    server_log = (logs / "server.log").read_text(errors="replace")
    assert server_rc == 0, server_log[-3000:]
    return Run(server_rc, device_rcs, MetricsLog.read(out / "metrics.jsonl"),
               json.loads((out / "summary.json").read_text()), out, logs, pids, survivors)


@pytest.mark.slow
@pytest.mark.parametrize("method,rounds", [("rolora", 2), ("fedsvd", 2), ("fed-sb", 4),
                                           ("fedex-lora", 2)])
def test_new_method_trains_in_a_tls_deployment(tmp_path: Path, method: str, rounds: int) -> None:
    run = _deploy(tmp_path, method, rounds)
    assert run.device_rcs == [0, 0], (run.logs / "device1.log").read_text(errors="replace")[-2000:]
    assert len(run.pids) >= 6 and run.survivors == []  # coordinator, SuperLink, .., 2 devices
    assert not [p for p in run.pids if Path(f"/proc/{p}").exists()
                and "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1][:3]]
    assert [r["round"] for r in run.rows] == list(range(rounds + 1))
    for row in run.rows[1:]:
        assert row["clients_ok"] == 2 and row["clients_rejected"] == 0, row
        assert row["clients_failed"] == 0 and len(row["client_bytes"]) == 2
    assert run.summary["method"] == method and run.summary["rounds"] == rounds
    assert run.summary.get("rounds_not_aggregated", 0) == 0
    assert run.summary["final_accuracy"] is not None
    assert (run.out / "adapter" / "adapter_model.safetensors").exists()
    for i in (1, 2):  # each device trained every round in one long-running SuperNode
        log = (run.logs / f"device{i}.log").read_text(errors="replace")
        assert log.count("round task done") == rounds and "FAILED" not in log, log[-2000:]
    down = [[c["bytes_down"] for c in r["client_bytes"]] for r in run.rows[1:]]
    up = [[c["bytes_up"] for c in r["client_bytes"]] for r in run.rows[1:]]
    if method == "fed-sb":  # round 1: gradients; round 2: A and B sent; then R and the head only
        assert all(r["fed_sb_resent"] == 0 for r in run.rows[2:])
        assert max(down[2] + down[3]) < min(down[1]) / 4, down
    if method == "rolora":  # B then A; both factors go down, one (and the head) comes up
        assert [r["rolora_phase_b"] for r in run.rows[1:]] == [1.0, 0.0]
        lora = sum(v.nbytes for k, v in load_file(run.out / "adapter" / "adapter_model"
                                                  ".safetensors").items() if ".lora_" in k)
        for us, ds in zip(up, down, strict=True):  # FedIT's uplink would be about its downlink
            assert all(u > lora / 2 and d - u > 0.4 * lora for u, d in zip(us, ds, strict=True))
