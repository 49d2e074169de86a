"""``fedpeft sweep``'s fair protocol: the [tune] stage (a value per row picked on a validation
split carved from the training data, then the seeds on the test split), [[reference]] rows, and
the validation split itself. Cells are faked (``run_cell`` writes the files a finished
``fedpeft simulate`` leaves), so the sweep's logic runs without training."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fedpeft.server.reporting import MetricsLog
from fedpeft.strategies import METHODS

from fedpeft.cli import main
from fedpeft.core.config import ConfigError, DataConfig, FedConfig, load_config, to_toml
from fedpeft.core.data import load_task_data, load_validation, partition_indices
from fedpeft.run import sweep as sweep_mod
from fedpeft.run.sweep import expand_tuning, load_sweep, run_sweep
from tests.helpers import TINY

TINY_SETS = "set = [" + ", ".join(repr(s) for s in TINY) + "]"
Score = Callable[[FedConfig], "list[float] | None"]


def _write(tmp: Path, text: str) -> Path:
    path = tmp / "sweep.toml"
    path.write_text(text)
    return path


def _sweep(tmp: Path, tune: str, extra: str = "", methods: str = '["fedit", "ffa-lora"]',
           seeds: str = "[0, 1]") -> Path:
    return _write(tmp, f"methods = {methods}\nseeds = {seeds}\n[base]\n{TINY_SETS}\n"
                       f"[tune]\n{tune}\n{extra}")


def _fake_runs(monkeypatch: pytest.MonkeyPatch, score: Score,
               metric: str = "accuracy") -> list[str]:
    """Replace the cell runner: each cell writes its config, metrics rows with the values of
    ``metric`` ``score(config)`` gives (None: the cell fails) and a summary. Returns the cells
    run."""
    ran: list[str] = []

    def run(sweep, cell, state, folder: Path, echo) -> int:
        ran.append(cell.name)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.toml").write_text(to_toml(cell.config))
        accs = score(cell.config)
        if accs is None:
            return 1
        MetricsLog(folder / "metrics.jsonl", [
            {"round": i, metric: a, "bytes_up": 100 * i, "bytes_down": 200 * i,
             "wall_s": 1.0} for i, a in enumerate(accs)])
        (folder / "summary.json").write_text("{}")
        return 0

    monkeypatch.setattr(sweep_mod, "run_cell", run)
    return ran


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------------------------------
# the choice and the final cells


def test_factors_multiply_each_methods_own_default_lr(tmp_path: Path) -> None:
    methods = ["fedit", "ffa-lora", "flora", "ferret"]
    path = _sweep(tmp_path, "factors = [0.5, 1, 3]", methods=str(methods).replace("'", '"'))
    tuning = expand_tuning(load_sweep(path))
    assert len(tuning) == len(methods) * 3
    for method in methods:
        default = METHODS[method].default_lr
        got = [c.config.train.lr for c in tuning if c.config.method.name == method]
        assert got == pytest.approx([0.5 * default, default, 3 * default])
    assert len({METHODS[m].default_lr for m in methods}) > 1  # the rows really differ
    for cell in tuning:  # one seed, on the validation split carved from the training data
        cfg = cell.config
        assert (cfg.eval.split, cfg.data.validation_size) == ("validation", 1000)
        assert cfg.federation.seed == cfg.data.seed == 0
    assert tuning[0].name == "tune_fedit_lr=0.001"


def test_the_choice_is_the_best_last3_mean_and_final_cells_use_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fedit: 0.004 has the better mean of the last 3 rounds though 0.001 ends higher; ffa-lora:
    its smallest factor. The seeds then run on the test split with those values."""
    curves = {0.001: [0.5, 0.6, 0.6, 0.75], 0.002: [0.5, 0.6, 0.62, 0.64],
              0.004: [0.5, 0.8, 0.8, 0.7], 0.01: [0.5, 0.7, 0.7, 0.7],
              0.02: [0.5, 0.6, 0.6, 0.6], 0.04: [0.5, 0.5, 0.5, 0.5]}

    def score(cfg: FedConfig) -> list[float]:
        accs = curves[cfg.train.lr]
        return accs if cfg.eval.split == "validation" else [a + 0.01 * cfg.federation.seed
                                                           for a in accs]

    path = _sweep(tmp_path, "factors = [0.5, 1, 2]\nvalidation_size = 300")
    out = tmp_path / "out"
    ran = _fake_runs(monkeypatch, score)
    assert run_sweep(load_sweep(path), out) == 0
    assert ran[:6] == [c.name for c in expand_tuning(load_sweep(path))]  # tuning first
    want = {"fedit": 0.004, "ffa-lora": 0.01}  # by the final round alone fedit would get 0.001
    finals = _csv(out / "results.csv")
    assert len(finals) == 4
    for row in finals:
        cfg = load_config(Path(row["cell_dir"]) / "config.toml")
        assert cfg.train.lr == want[row["method"]] == float(row["train.lr"])
        assert (cfg.eval.split, cfg.data.validation_size) == ("test", 300)
        assert cfg.federation.seed == int(row["seed"])
    tuning = _csv(out / "tuning.csv")
    chosen = {(r["method"], float(r["train.lr"])) for r in tuning if r["chosen"] == "1"}
    assert chosen == set(want.items())
    scores = {float(r["train.lr"]): float(r["validation_accuracy_last3"]) for r in tuning}
    assert scores[0.004] == pytest.approx(sum(curves[0.004][1:]) / 3)
    md = (out / "results.md").read_text()
    assert "| fedit | 0.004 | 2 |" in md and "| ffa-lora | 0.01 | 2 |" in md
    assert "on a validation split of 300 examples" in md
    assert "**yes**" in (out / "tuning.md").read_text()


@pytest.mark.parametrize("metric", ["loss", "perplexity"])
def test_a_metric_where_lower_is_better_picks_the_lowest(
        metric: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fedit: 0.002 has the lowest last-3 mean although 0.004 ends lowest; ffa-lora: 0.04
    diverged (a NaN loss counts as the worst), so the lower of the other two wins."""
    nan = float("nan")
    curves = {0.001: [9.0, 5.0, 5.0, 5.0], 0.002: [9.0, 3.0, 3.0, 4.0],
              0.004: [9.0, 6.0, 4.0, 2.5], 0.01: [9.0, 4.0, 4.0, 4.0],
              0.02: [9.0, 4.5, 4.5, 4.5], 0.04: [9.0, 1.0, 1.0, nan]}
    path = _sweep(tmp_path, f'factors = [0.5, 1, 2]\nmetric = "{metric}"')
    out = tmp_path / "out"
    _fake_runs(monkeypatch, lambda cfg: curves[cfg.train.lr], metric=metric)
    assert run_sweep(load_sweep(path), out) == 0
    tuning = _csv(out / "tuning.csv")
    chosen = {(r["method"], float(r["train.lr"])) for r in tuning if r["chosen"] == "1"}
    assert chosen == {("fedit", 0.002), ("ffa-lora", 0.01)}
    assert f"the lowest mean `{metric}`" in (out / "tuning.md").read_text()


def test_values_are_shared_by_every_row(tmp_path: Path) -> None:
    path = _sweep(tmp_path, 'values = [0.003, 0.03]\nseed = 7\nvalidation_size = 100')
    tuning = expand_tuning(load_sweep(path))
    assert [(c.config.method.name, c.config.train.lr) for c in tuning] == [
        ("fedit", 0.003), ("fedit", 0.03), ("ffa-lora", 0.003), ("ffa-lora", 0.03)]
    assert {c.config.federation.seed for c in tuning} == {7}


def test_resume_skips_finished_tuning_cells_and_rederives_the_choice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A tuning cell fails: its row's final cells wait, the other row's run. The rerun runs only
    the failed tuning cell and the waiting final cells, and picks the same value as before for
    the row that had finished."""
    path = _sweep(tmp_path, "values = [0.001, 0.01]")
    out = tmp_path / "out"
    broken = {"ffa-lora": 0.01}

    def score(cfg: FedConfig) -> list[float] | None:
        if cfg.eval.split == "validation" and broken.get(cfg.method.name) == cfg.train.lr:
            return None
        return [0.5, 0.6 + 10 * cfg.train.lr]  # the larger lr wins

    ran = _fake_runs(monkeypatch, score)
    assert run_sweep(load_sweep(path), out) == 1
    first = list(ran)
    assert "tune_ffa-lora_lr=0.01" in first and "ffa-lora_s0" not in first
    assert {"fedit_s0", "fedit_s1"} <= set(first)
    text = capsys.readouterr().out
    assert "2 final cells not run: their row's tuning did not finish" in text
    assert "Not finished (2): ffa-lora_s0, ffa-lora_s1" in (out / "results.md").read_text()

    broken.clear()
    ran.clear()
    assert run_sweep(load_sweep(path), out) == 0
    assert ran == ["tune_ffa-lora_lr=0.01", "ffa-lora_s0", "ffa-lora_s1"]
    assert "[tune 1/4] tune_fedit_lr=0.001: finished earlier, skipped" in capsys.readouterr().out
    lrs = {r["cell"]: float(r["train.lr"]) for r in _csv(out / "results.csv")}
    assert lrs == {"fedit_s0": 0.01, "fedit_s1": 0.01, "ffa-lora_s0": 0.01, "ffa-lora_s1": 0.01}
    ran.clear()
    assert run_sweep(load_sweep(path), out) == 0 and ran == []
    (out / "tuning.md").unlink()
    assert main(["sweep", str(path), "--out", str(out), "--report"]) == 0 and ran == []
    assert "(4 of 4 tuning cells)" in capsys.readouterr().out
    assert "| ffa-lora | 0.01 | 0.7000 | **yes** |" in (out / "tuning.md").read_text()


def test_dry_run_lists_tuning_and_waiting_final_cells(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _sweep(tmp_path, "factors = [1, 2]")
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "tuning stage, 4 cells (2 rows x up to 2 values of train.lr" in text
    assert "1/4 tune_fedit_lr=0.002: new" in text and "eval.split=\"validation\"" in text
    assert "4 waiting for their row's tuning" in text
    assert "1/4 fedit_s0: waiting (for its row's tuning)" in text
    assert "--set train.lr=<tuned>" in text
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# bad [tune] and [[reference]] tables

BAD = {
    "four values": ("values = [0.001, 0.002, 0.003, 0.004]", "", "at most 3"),
    "four factors": ("factors = [0.5, 1, 2, 4]", "", "at most 3"),
    "values and factors": ("values = [0.1]\nfactors = [1]", "", "not both"),
    "neither": ('metric = "accuracy"', "", "needs values"),
    "zero factor": ("factors = [0, 1]", "", "positive numbers"),
    "unknown tune key": ("values = [0.1]\nsteps = 3", "", "unknown key tune.steps"),
    "tuned key in the grid": ("values = [0.1]", '[grid]\n"train.lr" = [0.1, 0.2]\n',
                              "train.lr is set by [grid] and by [tune]"),
    "eval.split in a setting": ("values = [0.1]", '[[settings]]\n"eval.split" = "test"\n',
                                "eval.split is set by settings"),
    "validation size": ("values = [0.1]\nvalidation_size = 0", "", "positive number"),
    "factors on a zero key": ('key = "train.head_lr"\nfactors = [1, 2]', "",
                              "give [tune] values instead"),
    "reference named as a method": (
        "values = [0.1]", '[[reference]]\nname = "fedit"\n"model.rank" = 2\n', "already a method"),
    "reference of no kind": ("values = [0.1]", '[[reference]]\nname = "x"\nkind = "pooled"\n',
                             "kind = 'pooled'"),
    "reference without keys": ("values = [0.1]", '[[reference]]\nname = "x"\n',
                               "sets no config key"),
    "reference tunes its key": (
        "values = [0.1]", '[[reference]]\nname = "x"\n"train.lr" = 0.1\n',
        "train.lr is set by reference 'x' and by [tune]"),
    "clients evaluate": ("values = [0.1]", '[[settings]]\n"eval.where" = "clients"\n',
                         "eval.split = 'validation' is the server's split"),
    "own grid on an untuned reference": (
        "values = [0.1]", '[[reference]]\nname = "c"\nkind = "centralised"\ntune = false\n'
        'tune_values = [0.01]\n', "sets tune = false and tune_values"),
    "own grid of four values": (
        "values = [0.1]", '[[reference]]\nname = "c"\nkind = "centralised"\n'
        'tune_values = [0.1, 0.2, 0.3, 0.4]\n', "tune_values lists 4 values"),
    "own grid with a repeat": (
        "values = [0.1]", '[[reference]]\nname = "c"\nkind = "centralised"\n'
        'tune_values = [0.1, 0.1]\n', "lists a value twice"),
    "own grid empty": ("values = [0.1]", '[[reference]]\nname = "c"\nkind = "centralised"\n'
                       'tune_values = []\n', "expected a non-empty list"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tune_or_reference_gives_one_message(case: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    tune, extra, message = BAD[case]
    path = _sweep(tmp_path, tune, extra)
    with pytest.raises(ConfigError) as err:
        expand_tuning(load_sweep(path))
    assert message in str(err.value)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    stderr = capsys.readouterr().err
    assert message in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


def test_a_reference_grid_needs_a_tune_table(tmp_path: Path) -> None:
    path = _write(tmp_path, f'methods = ["fedit"]\n[base]\n{TINY_SETS}\n[[reference]]\n'
                            'name = "c"\nkind = "centralised"\ntune_values = [0.01]\n')
    with pytest.raises(ConfigError, match="sets tune_values but the sweep has no"):
        load_sweep(path)


def test_references_need_methods(tmp_path: Path) -> None:
    path = _write(tmp_path, f'[base]\n{TINY_SETS}\n[[reference]]\nname = "c"\nkind = '
                            '"centralised"\n')
    with pytest.raises(ConfigError, match="stand next to the methods"):
        load_sweep(path)


# ---------------------------------------------------------------------------------------------
# reference rows


def test_reference_rows_appear_in_the_results(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    level = {"fedit": 0.70, "ffa-lora": 0.60}

    def score(cfg: FedConfig) -> list[float]:
        top = 0.9 if cfg.federation.clients == 1 else level.get(cfg.method.name, 0.5)
        if cfg.model.rank == 2:
            top = 0.55  # the plain reference
        return [0.5, top - 0.05, top + 0.01 * cfg.federation.seed]

    path = _sweep(tmp_path, "values = [0.001, 0.01]", extra=(
        '[[reference]]\nname = "centralised"\nkind = "centralised"\n'
        '[[reference]]\nname = "rank2"\ntune = false\n"model.rank" = 2\n'))
    out = tmp_path / "out"
    ran = _fake_runs(monkeypatch, score)
    assert run_sweep(load_sweep(path), out) == 0
    assert "tune_rank2_lr=0.001" not in ran and "tune_centralised_lr=0.001" in ran
    rows = _csv(out / "results.csv")
    assert [r["method"] for r in rows] == ["fedit", "ffa-lora", "centralised", "rank2"] * 2
    base = load_config(None, list(TINY))
    for row in rows:
        cfg = load_config(Path(row["cell_dir"]) / "config.toml")
        if row["method"] == "centralised":  # one client, the federation's steps per round
            assert (cfg.method.name, cfg.federation.clients, cfg.federation.clients_per_round,
                    cfg.data.partitioner) == ("fedit", 1, 1, "iid")
            assert cfg.train.local_steps == (base.train.local_steps
                                             * base.federation.clients_per_round)
        if row["method"] == "rank2":  # not tuned: as given; the table shows the lr it used
            assert (cfg.model.rank, cfg.train.lr) == (2, 0.0)
            assert float(row["train.lr"]) == METHODS[cfg.method.name].default_lr
    md = (out / "results.md").read_text()
    assert "| centralised |" in md and "| rank2 |" in md
    assert "centralised training on the pooled data" in md
    means = {m: np.mean([float(r["final_accuracy"]) for r in rows if r["method"] == m])
             for m in ("fedit", "ffa-lora", "centralised")}
    stds = [np.std([float(r["final_accuracy"]) for r in rows if r["method"] == m], ddof=1)
            for m in ("fedit", "ffa-lora")]
    spread = means["fedit"] - means["ffa-lora"]
    assert spread > 3 * max(stds)
    assert (f"spread {spread:.3f} (fedit {means['fedit']:.3f} - ffa-lora "
            f"{means['ffa-lora']:.3f}), largest std {max(stds):.3f}: spread > 3 x std "
            "(discriminates)") in md
    assert f"centralised {means['centralised']:.3f} is above every method" in md


def test_a_reference_tuned_on_its_own_values(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The pooled run takes many more noisy steps than the federation's rounds, so its best
    rate can lie below the methods' grid: tune_values tunes that row alone on its own values,
    and its final cells run the one it chose."""
    def score(cfg: FedConfig) -> list[float]:
        if cfg.federation.clients == 1:  # the pooled run: best at 0.0002, below every method
            top = 0.9 - 100 * abs(cfg.train.lr - 0.0002)
        else:
            top = 0.7 - abs(cfg.train.lr - 0.01)
        return [0.5, top, top, top]

    path = _sweep(tmp_path, "values = [0.001, 0.01]", extra=(
        '[[reference]]\nname = "centralised"\nkind = "centralised"\n'
        "tune_values = [0.0001, 0.0002, 0.0004]\n"))
    tuning = expand_tuning(load_sweep(path))
    grids: dict[str, list[float]] = {}
    for cell in tuning:
        grids.setdefault(cell.labels["method"], []).append(cell.config.train.lr)
    assert grids == {"fedit": [0.001, 0.01], "ffa-lora": [0.001, 0.01],
                     "centralised": [0.0001, 0.0002, 0.0004]}
    out = tmp_path / "out"
    _fake_runs(monkeypatch, score)
    assert run_sweep(load_sweep(path), out) == 0
    rows = _csv(out / "results.csv")
    lrs = {r["method"]: float(r["train.lr"]) for r in rows}
    assert lrs == {"fedit": 0.01, "ffa-lora": 0.01, "centralised": 0.0002}
    md = (out / "results.md").read_text()
    assert "tuned on its own values 0.0001, 0.0002, 0.0004" in md
    assert "centralised 0.900 is above every method" in md


# ---------------------------------------------------------------------------------------------
# the validation split


def _unique_rows(tmp: Path, n: int = 400) -> Path:
    path = tmp / "rows.csv"
    path.write_text("text,label\n" + "".join(f"row {i},{'ab'[i % 3 == 0]}\n" for i in range(n)))
    return path


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_validation_split_is_apart_from_every_partition_and_the_test_split(
        tmp_path: Path, partitioner: str) -> None:
    path = _unique_rows(tmp_path)
    plain = DataConfig(dataset="file", path=str(path), test_size=50, partitioner=partitioner,
                       min_partition_size=5, seed=3)
    cfg = DataConfig(**{**plain.__dict__, "validation_size": 60})
    train, test = load_task_data(cfg)
    validation = set(load_validation(cfg).texts)
    assert len(validation) == 60 and len(test) == 50 and len(train) == 400 - 110
    assert not validation & set(test.texts) and not validation & set(train.texts)
    parts = partition_indices(cfg, 5)
    trained = [set(train.subset(p).texts) for p in parts]
    assert all(not validation & t for t in trained)
    assert set().union(*trained) | validation | set(test.texts) == {f"row {i}" for i in
                                                                       range(400)}
    plain_train, plain_test = load_task_data(plain)
    assert plain_test.texts == test.texts  # the test split does not move
    assert set(plain_train.texts) == set(train.texts) | validation
    assert load_validation(plain).texts == ()
    other = DataConfig(**{**cfg.__dict__, "seed": 4})
    assert set(load_validation(other).texts) != validation  # seeded by data.seed


def test_eval_split_validation_needs_a_validation_split() -> None:
    with pytest.raises(ConfigError, match=r"needs a validation split: set data\.validation_size"):
        load_config(None, [*TINY, 'eval.split="validation"'])
    with pytest.raises(ConfigError, match="is the server's split"):
        load_config(None, [*TINY, 'eval.split="validation"', "data.validation_size=100",
                           'eval.where="clients"'])
    with pytest.raises(ConfigError, match=r"eval\.split"):
        load_config(None, [*TINY, 'eval.split="train"'])
    cfg = load_config(None, [*TINY, 'eval.split="validation"', "data.validation_size=100"])
    assert (cfg.eval.split, cfg.data.validation_size) == ("validation", 100)


def test_too_large_a_validation_split_is_refused(tmp_path: Path) -> None:
    cfg = DataConfig(dataset="file", path=str(_unique_rows(tmp_path, 100)), test_size=50,
                     validation_size=50, partitioner="iid")
    with pytest.raises(ConfigError, match="leaves no training data"):
        load_task_data(cfg)


def test_the_server_scores_the_validation_split(tmp_path: Path) -> None:
    from fedpeft.core.workspace import get_workspace

    path = _unique_rows(tmp_path)
    sets = [*TINY, 'data.dataset="file"', f'data.path="{path}"', "data.test_size=50",
            "data.validation_size=60"]
    tuned = get_workspace(load_config(None, [*sets, 'eval.split="validation"']))
    final = get_workspace(load_config(None, sets))
    assert tuned.test.texts == load_validation(tuned.data_cfg).texts
    assert final.test.texts == load_task_data(final.data_cfg)[1].texts
    assert not set(tuned.test.texts) & set(final.test.texts)
    assert tuned.train.texts == final.train.texts  # the same training data


def test_discrimination_says_when_the_methods_are_not_separated() -> None:
    """Methods within noise of each other, a centralised row below the best method: both said
    plainly, per setting."""
    from fedpeft.run.sweepreport import aggregate, discrimination

    def rec(method: str, setting: str, acc: float) -> dict:
        return {"method": method, "setting": setting, "final_accuracy": acc}

    records = [rec("a", "s1", 0.70), rec("a", "s1", 0.74), rec("b", "s1", 0.71),
               rec("b", "s1", 0.75), rec("pooled", "s1", 0.72), rec("pooled", "s1", 0.72),
               rec("a", "s2", 0.6), rec("b", "s2", 0.8), rec("pooled", "s2", 0.9)]
    for r in records:
        r.update({k: None for k in ("best_accuracy", "last3_accuracy", "rounds_to_target",
                                    "bytes_up", "bytes_down", "wall_s", "clients_accuracy",
                                    "clients_accuracy_p10", "clients_accuracy_min",
                                    "clients_loss")})
    table = aggregate(records, ["method", "setting"])
    text = discrimination(table, ["method", "setting"], ["pooled"], ["pooled"])
    s1 = next(line for line in text.splitlines() if line.startswith("- setting = s1"))
    std = float(np.std([0.71, 0.75], ddof=1))
    assert f"spread 0.010 (b 0.730 - a 0.720), largest std {std:.3f}" in s1
    assert "does not discriminate" in s1 and "pooled 0.720 is NOT above every method" in s1
    s2 = next(line for line in text.splitlines() if line.startswith("- setting = s2"))
    assert "fewer than 2 seeds" in s2 and "pooled 0.900 is above every method" in s2


@pytest.mark.slow
def test_a_real_tuned_sweep_scores_tuning_on_validation_and_finals_on_test(
        tmp_path: Path) -> None:
    """tiny-bert, in-process engine: the tuning cells' server scores the validation split (its
    size in every evaluated round's eval_examples at the last round), the final cells the test
    split; the centralised reference trains one client; a rerun runs nothing."""
    path = _sweep(tmp_path, "values = [0.001, 0.02]\nvalidation_size = 150",
                  extra='[[reference]]\nname = "centralised"\nkind = "centralised"\n'
                        "tune = false\n", methods='["fedit"]', seeds="[0]")
    path.write_text(path.read_text().replace("[base]\n", '[base]\nsimulation.engine = '
                                                         '"inprocess"\n'))
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    test_size = load_config(None, list(TINY)).data.test_size
    for name, examples in (("tune_fedit_lr=0.001", 150), ("tune_fedit_lr=0.02", 150),
                           ("fedit_s0", test_size), ("centralised_s0", test_size)):
        rows = MetricsLog.read(out / "cells" / name / "metrics.jsonl")
        assert rows[-1]["eval_examples"] == examples, name
    rows = MetricsLog.read(out / "cells" / "centralised_s0" / "metrics.jsonl")
    assert {r["clients_sampled"] for r in rows if r["round"] > 0} == {1}
    tuning = _csv(out / "tuning.csv")
    best = max(tuning, key=lambda r: float(r["validation_accuracy_last3"]))
    assert [r["cell"] for r in tuning if r["chosen"] == "1"] == [best["cell"]]
    (final,) = [r for r in _csv(out / "results.csv") if r["method"] == "fedit"]
    assert final["train.lr"] == best["train.lr"]
    stamp = (out / "cells" / "fedit_s0" / "summary.json").stat().st_mtime_ns
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    assert (out / "cells" / "fedit_s0" / "summary.json").stat().st_mtime_ns == stamp


def test_rows_whose_names_collide_are_tuned_apart(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Two settings whose names give the same folder name: each row gets its own tuning cells
    and its own choice."""
    path = _sweep(tmp_path, "values = [0.001, 0.01]", methods='["fedit"]', seeds="[0]", extra=(
        '[[settings]]\nname = "x y"\n"model.rank" = 2\n'
        '[[settings]]\nname = "x-y"\n"model.rank" = 4\n'))
    tuning = expand_tuning(load_sweep(path))
    assert [c.name for c in tuning] == ["tune_fedit_x-y_lr=0.001", "tune_fedit_x-y_lr=0.01",
                                        "tune_fedit_x-y_2_lr=0.001", "tune_fedit_x-y_2_lr=0.01"]

    def score(cfg: FedConfig) -> list[float]:  # rank 2 prefers the small lr, rank 4 the large
        good = (cfg.model.rank == 2) == (cfg.train.lr == 0.001)
        return [0.5, 0.8 if good else 0.6]

    _fake_runs(monkeypatch, score)
    out = tmp_path / "out"
    assert run_sweep(load_sweep(path), out) == 0
    got = {(r["setting"], float(r["train.lr"])) for r in _csv(out / "results.csv")}
    assert got == {("x y", 0.001), ("x-y", 0.01)}


def test_final_cells_score_the_test_split_whatever_the_base_config_says(tmp_path: Path) -> None:
    """eval.split in base.config (a file the sweep file only names) cannot move the final
    cells onto the validation split they were tuned on."""
    (tmp_path / "base.toml").write_text('[eval]\nsplit = "validation"\n[data]\n'
                                        'validation_size = 50\n')
    path = _write(tmp_path, f'methods = ["fedit"]\nseeds = [0]\n[base]\nconfig = "base.toml"\n'
                            f'{TINY_SETS}\n[tune]\nvalues = [0.001, 0.002]\n')
    sweep = load_sweep(path)
    assert {c.config.eval.split for c in expand_tuning(sweep)} == {"validation"}
    final = sweep_mod.expand(sweep, {})
    assert final and {c.config.eval.split for c in final} == {"test"}
    assert {c.config.data.validation_size for c in final} == {1000}  # [tune]'s, not the file's


def test_a_centralised_reference_of_a_secagg_setting_runs_without_secagg(tmp_path: Path) -> None:
    """One client's sum is its update: the pooled-data row drops [secagg] (and the noise keys
    that only [secagg] takes) and keeps client-level DP, instead of refusing the sweep."""
    path = _write(tmp_path, f'methods = ["fedit"]\n[base]\n{TINY_SETS}\n'
                            'secagg.enabled = true\nprivacy.client_level = "client-fixed"\n'
                            'privacy.min_survivors = 2\n'
                            '[[reference]]\nname = "centralised"\nkind = "centralised"\n')
    cells = {c.labels["method"]: c.config for c in sweep_mod.expand(load_sweep(path))}
    assert cells["fedit"].secagg.enabled and cells["fedit"].privacy.min_survivors == 2
    pooled = cells["centralised"]
    assert not pooled.secagg.enabled and pooled.federation.clients == 1
    assert pooled.privacy.client_level == "client-fixed" and pooled.privacy.min_survivors == 0


def test_the_centralised_reference_drops_faults_and_attacks() -> None:
    from fedpeft.core.config import with_values
    from fedpeft.run.sweeptune import centralised_overrides

    cfg = load_config(None, ["faults.crash=[0]", "faults.nan_fraction=0.2",
                             'attacks.kind="sign-flip"', "attacks.fraction=0.1"])
    out = centralised_overrides(cfg)
    assert out["faults.crash"] == [] and out["faults.nan_fraction"] == 0.0
    assert out["attacks.kind"] == "none" and out["attacks.fraction"] == 0.0
    clean = centralised_overrides(load_config(None, []))
    assert not any(k.startswith(("faults.", "attacks.")) for k in clean)
    assert with_values(cfg, out, "test").federation.clients == 1  # a valid config
