"""Differential privacy in the real Flower run (SuperLink + Ray), tiny-bert: kept apart from
tests/test_privacy.py because one simulation takes 30-45 s on two cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fedpeft.server.reporting import MetricsLog

from fedpeft.cli import main
from tests.helpers import TINY


@pytest.mark.slow
def test_flower_simulation_with_sample_and_client_level_dp(tmp_path: Path) -> None:
    """ffa-lora with DP-SGD on the clients plus client-level DP (each client clips its update,
    Flower's DifferentialPrivacyClientSideFixedClipping noises the mean): epsilon per round in
    metrics.jsonl, the final one in summary.json."""
    args = ["simulate", "--method", "ffa-lora", "--out", str(tmp_path)]
    for item in [*TINY, "federation.clients=3", "privacy.enabled=true", "privacy.epsilon=3",
                 'privacy.client_level="client-fixed"', "privacy.client_noise=0.5"]:
        args += ["--set", item]
    assert main(args) == 0
    rows = MetricsLog.read(tmp_path / "metrics.jsonl")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all(r["clients_ok"] == 3 and r["clients_rejected"] == 0 for r in rows[1:])
    eps = [r["epsilon"] for r in rows[1:]]
    assert 0 < eps[0] <= eps[1] <= 3.0 and summary["epsilon"] == eps[-1]
    assert 0 < rows[1]["client_epsilon"] < rows[2]["client_epsilon"] == summary["client_epsilon"]
    # every participating client's own epsilon; it grows from round 1 to round 2 for the same
    # client, so its accountant survived Flower's Context.state between rounds
    for row in rows[1:]:
        assert row["epsilon_clients"] == [0, 1, 2]
        assert max(row["epsilon_per_client"]) == row["epsilon"]
    assert all(0 < a < b for a, b in zip(rows[1]["epsilon_per_client"],
                                         rows[2]["epsilon_per_client"], strict=True))
