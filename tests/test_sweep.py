"""``fedpeft sweep``: grid expansion, cell folder states, refusals, the results math, and a real
tiny sweep stopped mid-cell and continued (the same numbers as an uninterrupted sweep)."""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from fedpeft.server.reporting import MetricsLog
from safetensors.torch import load_file

from fedpeft.cli import main
from fedpeft.core.config import ConfigError, load_config, to_toml
from fedpeft.run import sweep as sweep_mod
from fedpeft.run.sweep import cell_dir, cell_state, expand, load_sweep, run_sweep
from fedpeft.run.sweepreport import aggregate, curve, last_accuracy, markdown, rounds_to_target
from tests.helpers import TINY

TINY_SETS = "set = [" + ", ".join(repr(s) for s in TINY) + "]"


def _write(tmp: Path, text: str, name: str = "sweep.toml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# grid expansion


def test_cartesian_grid_methods_and_seeds(tmp_path: Path) -> None:
    path = _write(tmp_path, f"""
methods = ["fedit", "ffa-lora"]
seeds = [0, 1, 2]
[base]
{TINY_SETS}
train.weight_decay = 0.1
[grid]
"train.batch_size" = [8, 16]
data.partitioner = ["iid", "dirichlet"]
""")
    cells = expand(load_sweep(path))
    assert len(cells) == 2 * 2 * 2 * 3
    assert len({c.name for c in cells}) == len(cells)
    assert [c.index for c in cells] == list(range(1, 25))
    assert [c.labels["seed"] for c in cells] == [0] * 8 + [1] * 8 + [2] * 8  # seeds outermost
    combos = {(c.config.method.name, c.config.train.batch_size, c.config.data.partitioner,
               c.config.federation.seed) for c in cells}
    assert len(combos) == 24
    for c in cells:
        assert c.config.train.weight_decay == 0.1  # the inline base key
        assert c.config.federation.clients == 6  # base.set
        assert c.config.data.seed == c.config.federation.seed == c.labels["seed"]
        assert c.labels["method"] == c.config.method.name
        assert c.labels["train.batch_size"] == c.config.train.batch_size
    first = cells[0]
    assert first.name == "fedit_batch-size=8_partitioner=iid_s0"
    assert list(first.labels) == ["method", "train.batch_size", "data.partitioner", "seed"]


def test_settings_times_grid_and_seed_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, f"""
seeds = [4, 5]
seed_keys = ["federation.seed"]
[base]
{TINY_SETS}
[grid]
"train.lr" = [0.001, 0.01]
[[settings]]
name = "hetlora-mixed"
"method.name" = "hetlora"
"federation.rank_mix" = "2:0.5,8:0.5"
[[settings]]
method.name = "fedit"
model.rank = 2
""")
    cells = expand(load_sweep(path))
    assert len(cells) == 2 * 2 * 2
    settings = [c.labels["setting"] for c in cells[:4]]
    assert settings == ["hetlora-mixed"] * 2 + ["name=fedit,rank=2"] * 2
    het = cells[0].config
    assert (het.method.name, het.federation.rank_mix, het.train.lr) == ("hetlora",
                                                                         "2:0.5,8:0.5", 0.001)
    fedit = cells[3].config
    assert (fedit.method.name, fedit.model.rank, fedit.train.lr) == ("fedit", 2, 0.01)
    assert [c.config.federation.seed for c in cells] == [4] * 4 + [5] * 4
    assert {c.config.data.seed for c in cells} == {0}  # not in seed_keys
    assert cells[-1].name == "fedit_name=fedit-rank=2_lr=0.01_s5"


def test_settings_axes_multiply(tmp_path: Path) -> None:
    path = _write(tmp_path, f"""
seeds = [0]
[base]
{TINY_SETS}
[[settings.run]]
name = "fedit"
method.name = "fedit"
train.lr = 0.01
[[settings.run]]
name = "ffa"
method.name = "ffa-lora"
train.lr = 0.02
[[settings.dp]]
name = "no-dp"
privacy.enabled = false
[[settings.dp]]
name = "eps3"
privacy.enabled = true
privacy.epsilon = 3.0
""")
    cells = expand(load_sweep(path))
    got = [(c.labels["run"], c.labels["dp"], c.config.method.name, c.config.train.lr,
            c.config.privacy.enabled, c.config.privacy.epsilon) for c in cells]
    assert got == [("fedit", "no-dp", "fedit", 0.01, False, 3.0),
                   ("fedit", "eps3", "fedit", 0.01, True, 3.0),
                   ("ffa", "no-dp", "ffa-lora", 0.02, False, 3.0),
                   ("ffa", "eps3", "ffa-lora", 0.02, True, 3.0)]
    assert [c.name for c in cells] == ["fedit_fedit_no-dp_s0", "fedit_fedit_eps3_s0",
                                       "ffa-lora_ffa_no-dp_s0", "ffa-lora_ffa_eps3_s0"]
    assert list(cells[0].labels) == ["method", "run", "dp", "seed"]


def test_no_grid_is_one_cell_of_the_base(tmp_path: Path) -> None:
    cells = expand(load_sweep(_write(tmp_path, f"[base]\n{TINY_SETS}\n")))
    assert len(cells) == 1 and cells[0].config == load_config(None, list(TINY))


# ---------------------------------------------------------------------------------------------
# bad sweep files: one clear message, before anything runs

BAD = {
    "unknown top key": ('methods = ["fedit"]\nrounds = [1]\n', "unknown key 'rounds'"),
    "unknown base key": ("[base]\nconfigs = 'x.toml'\n", "unknown key base.configs"),
    "unknown config key": ('[grid]\n"train.nope" = [1, 2]\n', "unknown key train.nope"),
    "unknown section": ('[grid]\n"trains.lr" = [1, 2]\n', "grid key 'trains.lr' is not a "
                        "config key"),
    "empty grid list": ('[grid]\n"train.lr" = []\n', "expected a non-empty list"),
    "empty grid table": ("[grid]\n", "[grid] is empty"),
    "grid value not a list": ('[grid]\n"train.lr" = 0.1\n', "expected a non-empty list"),
    "empty methods": ("methods = []\n", "methods = []: expected a non-empty list"),
    "seed twice": ("seeds = [1, 1]\n", "lists a value twice"),
    "bad value": ('[grid]\n"train.batch_size" = [8, 0]\n', "train.batch_size = 0 is out of "
                  "range"),
    "method in two places": ('methods = ["fedit"]\n[[settings]]\n"method.name" = "ffa-lora"\n',
                             "method.name is set both by settings"),
    "missing base config": ("[base]\nconfig = 'nowhere.toml'\n", "does not exist"),
    "not toml": ("methods = [\n", "is not valid TOML"),
    "key on two axes": ('[[settings.a]]\n"train.lr" = 0.1\n[[settings.b]]\n"train.lr" = 0.2\n',
                        "train.lr is set both by settings 'lr=0.2' and by settings axis 'a'"),
    "bad axis name": ('[[settings.seed]]\n"train.lr" = 0.1\n', "settings axis 'seed'"),
    "base key twice": ("[base]\nset = ['train.lr=0.1']\ntrain.lr = 0.2\n",
                       "train.lr is set both inline in [base] and in base.set"),
    "bad target": ("target_accuracy = 70\n", "expected a number in (0, 1]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_sweep_file_gives_one_message(case: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    text, message = BAD[case]
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        expand(load_sweep(path))
    assert message in str(err.value)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    stderr = capsys.readouterr().err
    assert message in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# cell folders: finished, stopped, other config


def _one_cell_sweep(tmp_path: Path, *extra: str) -> Path:
    sets = ", ".join(repr(s) for s in (*TINY, *extra))
    return _write(tmp_path, f'methods = ["fedit"]\nseeds = [0]\ntarget_accuracy = 0.6\n'
                            f"[base]\nset = [{sets}]\n")


def _fake_finished(folder: Path, cfg_toml: str, accuracies: list[float]) -> None:
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(cfg_toml)
    rows = [{"round": i, "accuracy": a, "bytes_up": 100 * i, "bytes_down": 200 * i, "wall_s": 1.0}
            for i, a in enumerate(accuracies)]
    MetricsLog(folder / "metrics.jsonl", rows)
    (folder / "summary.json").write_text("{}")


def test_finished_cells_are_skipped_and_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    sweep = load_sweep(_one_cell_sweep(tmp_path))
    (cell,) = expand(sweep)
    out = tmp_path / "out"
    _fake_finished(cell_dir(out, cell), to_toml(cell.config), [0.5, 0.55, 0.7])
    monkeypatch.setattr(sweep_mod, "run_cell", lambda *a: pytest.fail("a finished cell ran"))
    assert run_sweep(sweep, out) == 0
    assert "[cell 1/1] fedit_s0: finished earlier, skipped" in capsys.readouterr().out
    with open(out / "results.csv") as fh:
        (row,) = list(csv.DictReader(fh))
    assert (row["method"], row["seed"], row["final_accuracy"], row["best_accuracy"]) == (
        "fedit", "0", "0.7", "0.7")
    assert (row["rounds_to_target"], row["bytes_up"], row["bytes_down"]) == ("2", "300", "600")
    assert (out / "curves.png").stat().st_size > 10_000
    assert "| fedit | 1 | 0.700 | 0.700 | 0.625 | 2.0 (1/1) |" in (out / "results.md").read_text()


def test_report_writes_the_finished_cells_and_runs_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
        ) -> None:
    path = _one_cell_sweep(tmp_path)
    path.write_text(path.read_text().replace("seeds = [0]", "seeds = [0, 1]"))
    first, second = expand(load_sweep(path))
    out = tmp_path / "out"
    _fake_finished(cell_dir(out, first), to_toml(first.config), [0.5, 0.6, 0.65])
    monkeypatch.setattr(sweep_mod, "run_cell", lambda *a: pytest.fail("--report ran a cell"))
    assert main(["sweep", str(path), "--out", str(out), "--report"]) == 0
    assert "1 of 2 cells finished" in capsys.readouterr().out
    with open(out / "results.csv") as fh:
        assert [r["cell"] for r in csv.DictReader(fh)] == [first.name]
    assert f"Not finished (1): {second.name}" in (out / "results.md").read_text()
    assert not cell_dir(out, second).exists()
    with sweep_mod.sweep_lock(out):  # a sweep running there: refused, nothing written
        (out / "results.md").unlink()
        assert main(["sweep", str(path), "--out", str(out), "--report"]) == 2
    assert "another fedpeft sweep is running" in capsys.readouterr().err
    assert not (out / "results.md").exists()


def test_cell_states(tmp_path: Path) -> None:
    sweep = load_sweep(_one_cell_sweep(tmp_path))
    (cell,) = expand(sweep)
    folder = tmp_path / "cell"
    assert cell_state(cell, folder).kind == "new"
    folder.mkdir()
    (folder / "config.toml").write_text(to_toml(cell.config))
    assert cell_state(cell, folder).kind == "restart"  # stopped before its first checkpoint
    (folder / "checkpoint").mkdir()
    (folder / "checkpoint" / "state.safetensors").write_bytes(b"x")
    assert cell_state(cell, folder).kind == "resume"
    (folder / "summary.json").write_text("{}")
    assert cell_state(cell, folder).kind == "done"
    dp = load_sweep(_one_cell_sweep(tmp_path, "privacy.enabled=true"))
    (dp_cell,) = expand(dp)
    (folder / "config.toml").write_text(to_toml(dp_cell.config))
    (folder / "summary.json").unlink()
    state = cell_state(dp_cell, folder)
    assert state.kind == "restart" and "accountants" in state.note


def test_a_folder_of_another_config_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = _one_cell_sweep(tmp_path)
    (cell,) = expand(load_sweep(path))
    out = tmp_path / "out"
    other = load_config(None, [*TINY, "train.local_steps=3"])
    _fake_finished(cell_dir(out, cell), to_toml(other), [0.5, 0.6])
    monkeypatch.setattr(sweep_mod, "run_cell", lambda *a: pytest.fail("a refused cell ran"))
    assert main(["sweep", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "hold runs of another config" in err and "train.local_steps = 2 (run: 3)" in err
    assert main(["sweep", str(path), "--out", str(out), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert "fedit_s0: REFUSED" in captured.out
    assert "hold runs of another config" in captured.err


# ---------------------------------------------------------------------------------------------
# the results math


def _record(method: str, seed: int, accs: list[float], up: int, target: float) -> dict:
    rows = [{"round": i, "accuracy": a, "bytes_up": up if i else 0} for i, a in enumerate(accs)]
    return {"cell": f"{method}{seed}", "method": method, "seed": seed,
            "final_accuracy": accs[-1], "best_accuracy": max(accs),
            "last3_accuracy": last_accuracy(rows),
            "rounds_to_target": rounds_to_target(rows, target), "bytes_up": up * (len(accs) - 1),
            "bytes_down": 0, "wall_s": 10.0 + seed, "rows": rows}


def test_mean_and_std_over_seeds(tmp_path: Path) -> None:
    records = [_record("a", 0, [0.5, 0.6, 0.7], 10, 0.65),
               _record("a", 1, [0.5, 0.8, 0.8], 20, 0.65),
               _record("a", 2, [0.5, 0.5, 0.9], 30, 0.65),
               _record("b", 0, [0.5, 0.55, 0.6], 1, 0.65)]
    a, b = aggregate(records, ["method"])
    assert (a["method"], a["n"], b["n"]) == ("a", 3, 1)
    assert a["final_accuracy"][0] == pytest.approx(0.8)
    assert a["final_accuracy"][1] == pytest.approx(0.1)  # sample std: sqrt(0.02 / 2)
    assert a["best_accuracy"] == pytest.approx((0.8, 0.1))
    assert a["rounds_to_target"] == pytest.approx((5 / 3, statistics.stdev([2, 1, 2])))
    assert a["reached"] == 3 and b["reached"] == 0 and b["rounds_to_target"] == (None, None)
    assert a["wall_s"] == pytest.approx((11.0, 1.0))
    assert b["final_accuracy"] == (0.6, None)  # one seed: no std
    text = markdown("t", "intro", [a, b], ["method"], 0.65, ["b1"])
    # last rounds after round 0: (0.6, 0.7), (0.8, 0.8), (0.5, 0.9)
    last = [0.65, 0.8, 0.7]
    assert a["last3_accuracy"] == pytest.approx((statistics.fmean(last), statistics.stdev(last)))
    assert "| a | 3 | 0.800 ± 0.100 | 0.800 ± 0.100 | 0.717 ± 0.076 | 1.7 ± 0.6 (3/3) |" in text
    assert "| b | 1 | 0.600 | 0.600 | 0.575 | - (0/1) |" in text and "Not finished (1): b1." in text
    c = curve(a["records"])
    assert c["round"] == [0, 1, 2]
    assert c["mean"] == pytest.approx([0.5, 0.6333333, 0.8])
    assert c["std"] == pytest.approx([0.0, statistics.stdev([0.6, 0.8, 0.5]), 0.1])
    assert c["up"] == pytest.approx([0, 20, 40])  # mean cumulative uplink after each round


# ---------------------------------------------------------------------------------------------
# a real tiny sweep, stopped mid-cell and continued


def _stop_group_at_round(proc: subprocess.Popen[bytes], folder: Path, rnd: int,
                         result: dict) -> None:
    """SIGTERM the sweep's process group once the cell has checkpointed round ``rnd``; then
    wait for every process the sweep started (Flower's run in their own sessions too)."""
    from fedpeft.server.checkpoint import checkpoint_round

    from fedpeft.run.launcher import Tracker

    tracker = Tracker(proc)
    while (checkpoint_round(folder) or -1) < rnd and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    result["rc"] = proc.wait(120)
    result["round"] = checkpoint_round(folder)  # where the cell stopped
    deadline = time.monotonic() + 60
    while tracker.scan() and time.monotonic() < deadline:
        time.sleep(0.5)
    result["survivors"] = sorted(tracker.scan())
    for pid in result["survivors"]:  # do not leave them to other tests
        os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_stopped_sweep_continues_to_the_same_numbers(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A sweep stopped (its process group signalled) after round 1 of its cell and run again
    resumes the cell and ends with the numbers, and the adapter, of an uninterrupted sweep (which
    runs meanwhile); a third run skips the finished cell."""
    path = _one_cell_sweep(tmp_path, "federation.rounds=4")
    cut, ref = tmp_path / "cut", tmp_path / "ref"
    folder = cell_dir(cut, expand(load_sweep(path))[0])
    proc = subprocess.Popen([sys.executable, "-m", "fedpeft.cli", "sweep", str(path), "--out",
                             str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    stopped: dict = {}
    stopper = threading.Thread(target=_stop_group_at_round, args=(proc, folder, 1, stopped))
    stopper.start()
    assert main(["sweep", str(path), "--out", str(ref)]) == 0
    stopper.join()
    assert stopped["rc"] != 0 and not stopped["survivors"]
    assert 1 <= stopped["round"] < 4 and not (folder / "summary.json").exists()
    capsys.readouterr()

    assert main(["sweep", str(path), "--out", str(cut)]) == 0
    out = capsys.readouterr().out
    assert "fedit_s0: resume after its last checkpoint" in out
    assert f"resuming after round {stopped['round']}" in out  # the child's own lines, passed on
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["resumed_after"] == stopped["round"]
    results = [_csv_row(d / "results.csv") for d in (cut, ref)]
    for key in ("final_accuracy", "best_accuracy", "bytes_up", "bytes_down", "rounds"):
        assert results[0][key] == results[1][key], key
    ref_folder = Path(results[1]["cell_dir"])
    assert _accuracies(folder) == _accuracies(ref_folder)
    got = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(ref_folder / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert any(want[k].abs().sum() > 0 for k in want if "lora_B" in k)  # it did train

    stamp = (folder / "summary.json").stat().st_mtime_ns
    assert main(["sweep", str(path), "--out", str(cut)]) == 0
    assert "fedit_s0: finished earlier, skipped" in capsys.readouterr().out
    assert (folder / "summary.json").stat().st_mtime_ns == stamp


def _csv_row(path: Path) -> dict[str, str]:
    with open(path) as fh:
        (row,) = list(csv.DictReader(fh))
    return row


def _accuracies(folder: Path) -> list[float | None]:
    return [r.get("accuracy") for r in MetricsLog.read(folder / "metrics.jsonl")]
