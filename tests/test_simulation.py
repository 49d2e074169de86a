"""End to end through the CLI entry point: a real Flower simulation (SuperLink + Ray) with
tiny-bert and a few clients."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fedpeft.server.reporting import MetricsLog
from safetensors.torch import load_file

from fedpeft.cli import main
from fedpeft.core.config import load_config
from tests.helpers import TINY


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim")
    args = ["simulate", "--out", str(out)]
    for item in TINY:
        args += ["--set", item]
    assert main(args) == 0
    return out


@pytest.mark.slow
def test_metrics_files(tiny_run: Path) -> None:
    rows = MetricsLog.read(tiny_run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    for key in ("accuracy", "loss", "bytes_up", "bytes_down", "clients_sampled", "clients_ok",
                "clients_failed", "wall_s"):
        assert all(key in r for r in rows), key
    assert rows[0]["bytes_up"] == 0
    for r in rows[1:]:
        assert r["clients_sampled"] == 3 and r["clients_ok"] == 3 and r["clients_failed"] == 0
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
    summary = json.loads((tiny_run / "summary.json").read_text())
    for key in ("method", "rounds", "clients", "final_accuracy", "total_bytes_up",
                "total_bytes_down", "wall_s"):
        assert key in summary
    assert summary["method"] == "fedit" and summary["rounds"] == 2 and summary["clients"] == 6
    assert summary["total_bytes_up"] == sum(r["bytes_up"] for r in rows)
    assert (tiny_run / "report.png").stat().st_size > 10_000


@pytest.mark.slow
def test_uplink_is_the_adapter_only(tiny_run: Path) -> None:
    """Per client, the uplink is the adapter's float32 bytes plus Flower's small headers."""
    rows = MetricsLog.read(tiny_run / "metrics.jsonl")
    summary = json.loads((tiny_run / "summary.json").read_text())
    adapter_bytes = summary["adapter_floats"] * 4
    per_client = rows[1]["bytes_up"] / rows[1]["clients_ok"]
    assert adapter_bytes < per_client < adapter_bytes + 8_000  # ~26 arrays + a metrics record


@pytest.mark.slow
def test_global_adapter_changed_and_reloads_with_peft(tiny_run: Path) -> None:
    """The export is plain peft: `fedpeft evaluate` loads it with PeftModel.from_pretrained."""
    from fedpeft.core.adapters import build_adapter_model
    from fedpeft.core.evaluation import evaluate_adapter_dir

    cfg = load_config(tiny_run / "config.toml")
    initial = build_adapter_model(cfg.model, 2).state()
    saved = load_file(str(tiny_run / "adapter" / "adapter_model.safetensors"))
    b_keys = [k for k in saved if "lora_B" in k]
    assert b_keys and any(saved[k].abs().sum() > 0 for k in b_keys)  # B starts at zero
    head = next(k for k in saved if "classifier" in k and k.endswith("weight"))
    assert not torch.equal(saved[head], initial[head])
    result = evaluate_adapter_dir(tiny_run / "adapter")
    rows = MetricsLog.read(tiny_run / "metrics.jsonl")
    assert result["accuracy"] == pytest.approx(rows[-1]["accuracy"], abs=1e-9)


def test_bad_config_stops_before_anything_starts(tmp_path: Path, capsys) -> None:
    assert main(["simulate", "--out", str(tmp_path), "--set", "model.rank=0"]) == 2
    assert "model.rank = 0 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "metrics.jsonl").exists()
