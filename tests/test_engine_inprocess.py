"""simulation.engine = "inprocess": ``fedpeft simulate`` without SuperLink and Ray writes the same
files and the same numbers as Flower's engine, resumes like it, and refuses what it cannot do."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from fedpeft.server.reporting import MetricsLog
from safetensors.torch import load_file

from fedpeft.cli import main
from fedpeft.core.config import ConfigError, load_config
from tests.helpers import TINY

INPROCESS = 'simulation.engine="inprocess"'
SAME = ("accuracy", "loss", "train_loss", "clients_sampled", "clients_ok", "clients_failed",
        "clients_rejected")
OUTPUTS = ("metrics.jsonl", "summary.json", "report.png", "config.toml",
           "adapter/adapter_config.json", "adapter/adapter_model.safetensors")


def simulate(out: Path, *extra: str) -> float:
    args = ["simulate", "--out", str(out)]
    for item in (*TINY, *extra):
        args += ["--set", item]
    start = time.perf_counter()
    assert main(args) == 0
    return time.perf_counter() - start


def test_engine_choices() -> None:
    assert load_config(None, []).simulation.engine == "flower"
    assert load_config(None, [INPROCESS]).simulation.engine == "inprocess"
    for extra, why in (('simulation.ray_address="auto"', "ray_address"),
                       ("faults.crash=[1]", r"\[faults\]"),
                       ('simulation.engine="ray"', "engine")):
        with pytest.raises(ConfigError, match=why):
            load_config(None, [INPROCESS, extra])


def test_inprocess_stop_and_resume_is_bit_identical(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that fails in round 2 reports the error (exit 1, error.json), and resumed after
    its round-1 checkpoint it ends with the same rows and adapter as an uninterrupted run."""
    from fedpeft.server import inprocess

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    simulate(whole, INPROCESS)
    train = inprocess.InProcessTransport.train

    def stop_in_round_2(self, loop, rnd: int, attempt: int) -> dict:
        if rnd == 2:
            raise RuntimeError("stopped in round 2")
        return train(self, loop, rnd, attempt)

    monkeypatch.setattr(inprocess.InProcessTransport, "train", stop_in_round_2)
    args = ["simulate", "--out", str(cut)]
    for item in (*TINY, INPROCESS):
        args += ["--set", item]
    assert main(args) == 1
    assert "stopped in round 2" in json.loads((cut / "error.json").read_text())["message"]
    assert "stopped in round 2" in (cut / "run.log").read_text()
    monkeypatch.undo()
    assert main(["simulate", "--resume", str(cut)]) == 0
    assert json.loads((cut / "summary.json").read_text())["resumed_after"] == 1
    rows = {p: MetricsLog.read(p / "metrics.jsonl") for p in (whole, cut)}
    assert [r["round"] for r in rows[cut]] == [0, 1, 2]
    for a, b in zip(rows[whole], rows[cut], strict=True):
        assert {k: a.get(k) for k in SAME} == {k: b.get(k) for k in SAME}
    tensors = [load_file(p / "adapter" / "adapter_model.safetensors") for p in (whole, cut)]
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])


@pytest.mark.slow
def test_same_files_and_numbers_as_flower(tmp_path: Path) -> None:
    flower, inproc = tmp_path / "flower", tmp_path / "inprocess"
    flower_s = simulate(flower)
    inproc_s = simulate(inproc, INPROCESS)
    print(f"smoke wall: flower {flower_s:.1f} s, inprocess {inproc_s:.1f} s")
    for name in OUTPUTS:
        assert (flower / name).is_file() and (inproc / name).is_file(), name
    assert (inproc / "checkpoint").is_dir() and any((inproc / "checkpoint").iterdir())
    rows = [MetricsLog.read(p / "metrics.jsonl") for p in (flower, inproc)]
    assert [r["round"] for r in rows[0]] == [r["round"] for r in rows[1]] == [0, 1, 2]
    for a, b in zip(*rows, strict=True):
        assert {k: a.get(k) for k in SAME} == {k: b.get(k) for k in SAME}, a["round"]
        assert a.get("bytes_up", 0) > 0 or a["round"] == 0
    summaries = [json.loads((p / "summary.json").read_text()) for p in (flower, inproc)]
    for key in ("final_accuracy", "initial_accuracy", "best_accuracy", "rounds",
                "adapter_floats", "base_fingerprint", "precision", "train_precision"):
        assert summaries[0][key] == summaries[1][key], key
    tensors = [load_file(p / "adapter" / "adapter_model.safetensors") for p in (flower, inproc)]
    assert tensors[0].keys() == tensors[1].keys()
    for key in tensors[0]:
        assert torch.equal(tensors[0][key], tensors[1][key]), key
    configs = [load_config(p / "config.toml").to_dict() for p in (flower, inproc)]
    assert configs[1]["simulation"].pop("engine") == "inprocess"
    configs[0]["simulation"].pop("engine")
    assert configs[0] == configs[1]
