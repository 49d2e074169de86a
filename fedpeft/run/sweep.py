"""``fedpeft sweep SWEEP.toml``: a grid of simulations, methods x settings x grid x seeds. The
sweep file's format and its outputs: docs/sweeps.md; reading it: ``fedpeft.run.sweepfile``.

Every cell is a ``fedpeft simulate`` child process (the product path, one at a time) writing into
``OUT/cells/<cell>/``. A rerun of the same sweep skips the finished cells (``summary.json``
present, ``config.toml`` equal to the cell's config), continues a cell that was stopped after a
checkpoint (``fedpeft simulate --resume``: bit-identical to an uninterrupted run), restarts one
stopped before its first checkpoint (or under DP-SGD, whose client accountants do not survive a
restart), and refuses a cell folder that holds another config. After every cell it rewrites
``OUT/results.csv``, ``OUT/results.md`` and ``OUT/curves.png`` (``fedpeft.run.sweepreport``),
and with [tune] ``OUT/tuning.csv`` and ``OUT/tuning.md``.

Cells = (methods + [[reference]] rows) x settings axes x [grid] x seeds, every key optional but
at least one cell. With a ``[tune]`` table a tuning stage runs first: per row (everything but the
seed) one cell per candidate value of the tuned key on a validation split carved from the
training data; each row's seeds then run on the test split with the value that scored best
(``fedpeft.run.sweeptune``; docs/sweeps.md).

Several lists of settings, each an axis of the product, are ``[[settings.<axis>]]`` tables; the
plain ``[[settings]]`` is the axis ``setting``. A config key may be set in one place only (a
settings axis, [grid], methods or seeds; [base] inline or base.set), and these override [base];
a reference's keys come last (they win).
Cells run seeds outermost, so a sweep stopped half way holds whole seeds of every setting.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.core.config import ConfigError, FedConfig, load_config
from fedpeft.core.precision import resolve_precision
from fedpeft.core.runfiles import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    STATE_FILE,
    SUMMARY_FILE,
)
from fedpeft.run.sweepfile import Sweep, label_text, load_sweep, override
from fedpeft.run.sweepreport import (
    cell_line,
    cell_record,
    last_value,
    write_results,
    write_tuning,
)
from fedpeft.run.sweeptune import (
    CENTRALISED,
    SPLIT_KEY,
    VALIDATION_KEY,
    Reference,
    candidates,
    centralised_overrides,
    choose,
    effective_value,
)

CELLS_DIR = "cells"
CELL_LOG = "sweep.log"  # the cell's console output, appended by every attempt
LOCK_FILE = ".sweep.lock"
Echo = Callable[[str], None]


@dataclass(frozen=True)
class Row:
    """A line of results.md: a method or reference x a settings point x a grid combination.
    ``stem``: its cells' name without the seed; ``key``: the stem made unique among the rows
    (what its tuning cells are named and its choice is filed by); ``sets``: its overrides,
    seeds and the tuned value not included; ``values``: the candidates of the tuning stage
    (empty: not tuned)."""

    stem: str
    key: str
    labels: dict[str, Any]
    sets: tuple[str, ...]
    config: FedConfig
    values: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Cell:
    """One simulation of the sweep. ``labels`` (method, setting, grid keys, the tuned value,
    seed) are its row in results.csv; all of them but the seed name its setting in results.md.
    ``row``: its row's key; ``waiting``: a final cell whose row's tuning has not finished (its
    config holds a placeholder value: it is checked, never run)."""

    index: int
    name: str
    labels: dict[str, Any]
    overrides: tuple[str, ...]
    config: FedConfig
    row: str = ""
    waiting: bool = False

    @property
    def group(self) -> tuple[tuple[str, str], ...]:
        return tuple((k, label_text(v)) for k, v in self.labels.items() if k != "seed")


@dataclass(frozen=True)
class CellState:
    kind: str  # new | done | resume | restart | conflict | wait (for its row's tuning)
    note: str = ""


# ---------------------------------------------------------------------------------------------
# the cells


def rows(sweep: Sweep) -> list[Row]:
    """The rows in run order: (methods, then references) x settings points x grid combos, each
    with its validated config (seeds not set) and, with [tune], its candidate values."""
    out: list[Row] = []
    keys: set[str] = set()
    combos = list(itertools.product(*sweep.grid.values()))
    points = list(itertools.product(*sweep.settings.values()))
    heads: list[tuple[str | None, Reference | None]] = [(m, None) for m in sweep.methods or [None]]
    heads += [(ref.name, ref) for ref in sweep.references]
    for (method, ref), point, combo in itertools.product(heads, points, combos):
        grid = dict(zip(sweep.grid, combo, strict=True))
        sets = [*sweep.base_sets, *(override(k, v) for _, values in point
                                    for k, v in values.items()),
                *(override(k, v) for k, v in grid.items())]
        labels = {"method": method,
                  **{axis: name for axis, (name, _) in zip(sweep.settings, point, strict=True)},
                  **grid}
        if ref is not None:
            pooled = centralised_overrides(_load(sweep, sets, labels)) if ref.kind else {}
            sets += [override(k, v) for k, v in {**pooled, **ref.values}.items()]
        elif method is not None:
            sets.append(override("method.name", method))
        cfg = _load(sweep, sets, labels)
        if ref is None:
            labels["method"] = cfg.method.name
        values: tuple[Any, ...] = ()
        if sweep.tune is not None and (ref is None or ref.tune):
            try:
                values = (ref.tune_values if ref is not None and ref.tune_values
                          else tuple(candidates(sweep.tune, cfg)))
            except ConfigError as exc:
                raise ConfigError(f"{sweep.path}: the row {_where(labels)}: {exc}") from exc
        stem = cell_name(sweep, labels)
        out.append(Row(stem, _unique(stem, keys), labels, tuple(sets), cfg, values))
    return out


def _load(sweep: Sweep, sets: list[str], labels: dict[str, Any]) -> FedConfig:
    try:
        return load_config(sweep.base_config, sets)
    except ConfigError as exc:
        raise ConfigError(f"{sweep.path}: the cell {_where(labels)} has a bad config: "
                          f"{exc}") from exc


def _where(labels: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {label_text(v)}" for k, v in labels.items()
                     if v is not None) or "(base)"


def tune_seed(sweep: Sweep) -> int | None:
    return sweep.tune.seed if sweep.tune is not None else None


def expand_tuning(sweep: Sweep, row_list: list[Row] | None = None) -> list[Cell]:
    """The tuning stage's cells (none without [tune]): per tuned row and candidate value, one
    cell on the validation split with the tuning seed."""
    tune = sweep.tune
    if tune is None:
        return []
    cells: list[Cell] = []
    names: set[str] = set()
    tail = tune.key.split(".")[-1]
    seed = tune_seed(sweep)
    for row in rows(sweep) if row_list is None else row_list:
        for value in row.values:
            sets = [*row.sets, override(tune.key, value),
                    override(VALIDATION_KEY, tune.validation_size),
                    override(SPLIT_KEY, "validation")]
            if seed is not None:
                sets += [override(k, seed) for k in sweep.seed_keys]
            labels = {**row.labels, tune.key: value}
            cfg = _load(sweep, sets, labels)
            labels["seed"] = cfg.federation.seed
            name = _unique(f"tune_{row.key}_{_safe(f'{tail}={label_text(value)}')}", names)
            cells.append(Cell(len(cells) + 1, name, labels, tuple(sets), cfg, row=row.key))
    return cells


def expand(sweep: Sweep, chosen: dict[str, Any] | None = None,
           row_list: list[Row] | None = None) -> list[Cell]:
    """The final cells in run order (seeds outermost), each with its validated config. A tuned
    row's cells use ``chosen[row key]``; a row without a choice yet gets ``waiting`` cells
    (checked with its first candidate, never run)."""
    cells: list[Cell] = []
    names: set[str] = set()
    tune = sweep.tune
    row_list = rows(sweep) if row_list is None else row_list
    for seed, row in itertools.product(sweep.seeds or [None], row_list):
        sets, labels, waiting = list(row.sets), dict(row.labels), False
        if tune is not None:
            value = (chosen or {}).get(row.key) if row.values else None
            waiting = bool(row.values) and value is None
            if row.values:
                value = row.values[0] if waiting else value
                sets.append(override(tune.key, value))
            else:
                value = effective_value(row.config, tune.key)
            # the test split even where base.config says otherwise (not a [tune]-owned key
            # the sweep file can see)
            sets += [override(VALIDATION_KEY, tune.validation_size), override(SPLIT_KEY, "test")]
            labels[tune.key] = value
        if seed is not None:
            sets += [override(k, seed) for k in sweep.seed_keys]
        cfg = _load(sweep, sets, labels)
        labels["seed"] = cfg.federation.seed
        name = _unique(row.stem + (f"_s{labels['seed']}" if sweep.seeds else ""), names)
        cells.append(Cell(len(cells) + 1, name, labels, tuple(sets), cfg, row.key, waiting))
    return cells


def cell_name(sweep: Sweep, labels: dict[str, Any]) -> str:
    """A readable folder name without the seed: method, setting, grid values (by their last key
    part where that is unambiguous)."""
    tails = [k.split(".")[-1] for k in sweep.grid]
    parts = [labels["method"], *(labels[axis] for axis in sweep.settings)]
    parts += [f"{t if tails.count(t) == 1 else k}={label_text(labels[k])}"
              for k, t in zip(sweep.grid, tails, strict=True)]
    return "_".join(_safe(str(p)) for p in parts)


def _safe(text: str) -> str:
    """A part of a folder name ('_' separates the parts)."""
    return re.sub(r"[^A-Za-z0-9.=+-]+", "-", text).strip("-")


def _unique(name: str, taken: set[str]) -> str:
    candidate, i = name, 2
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    taken.add(candidate)
    return candidate


def cell_dir(out: Path, cell: Cell) -> Path:
    return out / CELLS_DIR / cell.name


def cell_state(cell: Cell, folder: Path) -> CellState:
    """What a run of the sweep does with this cell's folder."""
    if not (folder / CONFIG_FILE).is_file():
        return CellState("new")
    conflict = config_conflict(cell.config, folder / CONFIG_FILE)
    if conflict:
        return CellState("conflict", conflict)
    if (folder / SUMMARY_FILE).is_file():
        return CellState("done")
    if not (folder / CHECKPOINT_DIR / STATE_FILE).is_file():
        return CellState("restart", "stopped before its first checkpoint")
    if cell.config.privacy.enabled:
        return CellState("restart", "DP-SGD: the clients' privacy accountants do not survive "
                                    "a stop, so the cell starts over")
    return CellState("resume")


def config_conflict(cfg: FedConfig, saved: Path) -> str:
    """Why the run in ``saved``'s folder is not this config ('' when it is)."""
    try:
        old = load_config(saved).to_dict()
    except ConfigError as exc:
        return f"its {saved.name} cannot be read ({exc})"
    new = cfg.to_dict()
    for d in (old, new):  # 'auto' precision: as `fedpeft simulate` records it on this host
        d["train"]["precision"] = resolve_precision(d["train"]["precision"], d["train"]["device"])
    if old == new:
        return ""
    from fedpeft.server.checkpoint import config_differences  # torch: only on this path

    diffs = config_differences(old, new)
    return f"it holds a run of another config: {'; '.join(diffs[:4])}"


# ---------------------------------------------------------------------------------------------
# running


Steps = list[tuple[Cell, CellState]]
WAIT = CellState("wait", "for its row's tuning")


def plan(cells: list[Cell], out: Path) -> Steps:
    return [(cell, WAIT if cell.waiting else cell_state(cell, cell_dir(out, cell)))
            for cell in cells]


@dataclass
class Stages:
    """The two stages of a sweep: its tuning cells (none without [tune]) and its final cells
    (with each tuned row's chosen value, or waiting for it)."""

    tuning: Steps
    final: Steps


def plan_stages(sweep: Sweep, out: Path, row_list: list[Row] | None = None) -> Stages:
    """Both stages as a run would find them now: the choices re-derived from the finished
    tuning cells' metrics."""
    row_list = rows(sweep) if row_list is None else row_list
    tuning = expand_tuning(sweep, row_list)
    final = expand(sweep, choices(sweep, out, tuning), row_list)
    return Stages(plan(tuning, out), plan(final, out))


def tuning_scores(sweep: Sweep, out: Path, tuning: list[Cell]) -> dict[str, float | None]:
    """Each tuning cell's score by cell name: the mean of ``tune.metric`` over its last 3
    evaluated rounds (None while it has not finished)."""
    from fedpeft.server.reporting import MetricsLog  # torch: only on this path

    assert sweep.tune is not None
    metric, scores = sweep.tune.metric, {}
    for cell in tuning:
        folder = cell_dir(out, cell)
        if not (folder / SUMMARY_FILE).is_file():
            scores[cell.name] = None
            continue
        score = last_value(MetricsLog.read(folder / METRICS_FILE), metric)
        if score is None:
            raise ConfigError(f"tuning cell {cell.name} has no {metric!r} in its "
                              f"{METRICS_FILE}: set tune.metric to a per-round metric its rows "
                              "record (accuracy when the server evaluates)")
        scores[cell.name] = score
    return scores


def choices(sweep: Sweep, out: Path, tuning: list[Cell]) -> dict[str, Any]:
    """{row key: chosen value} for the rows whose tuning cells have all finished."""
    if sweep.tune is None:
        return {}
    by_row: dict[str, list[tuple[Any, float | None]]] = {}
    scores = tuning_scores(sweep, out, tuning)
    for cell in tuning:
        by_row.setdefault(cell.row, []).append((cell.labels[sweep.tune.key], scores[cell.name]))
    lower = sweep.tune.lower_is_better
    picked = {row: choose(scores, lower) for row, scores in by_row.items()}
    return {row: value for row, value in picked.items() if value is not None}


def check_conflicts(steps: Steps, out: Path) -> None:
    bad = [(c, s) for c, s in steps if s.kind == "conflict"]
    if bad:
        cell, state = bad[0]
        raise ConfigError(
            f"{len(bad)} cell folder{'s' if len(bad) > 1 else ''} in {out} hold runs of another "
            f"config, e.g. {cell_dir(out, cell)}: {state.note} (run: the saved config, sweep: "
            "in brackets). Use another --out, or delete those folders to rerun them")


def describe(cell: Cell, state: CellState) -> str:
    text = {"new": "new", "done": "finished", "resume": "resume after its last checkpoint",
            "restart": "start over", "conflict": "REFUSED", "wait": "waiting"}[state.kind]
    return text + (f" ({state.note})" if state.note else "")


def dry_run(sweep: Sweep, out: Path, echo: Echo = print) -> int:
    """List the cells of both stages, what a run would do with each, and their own
    overrides."""
    stages = plan_stages(sweep, out)
    base = len(sweep.base_sets)
    for stage, steps in (("tuning", stages.tuning), ("final", stages.final)):
        if stage == "tuning" and sweep.tune is None:
            continue
        echo(header(sweep, out, steps, stage))
        for cell, state in steps:
            echo(f"{cell.index:>4}/{len(steps)} {cell.name}: {describe(cell, state)}")
            sets = [f"--set {s}" for s in cell.overrides[base:]]
            if cell.waiting and sweep.tune is not None:
                tuned = override(sweep.tune.key, cell.labels[sweep.tune.key])
                sets = [s if s != f"--set {tuned}" else f"--set {sweep.tune.key}=<tuned>"
                        for s in sets]
            echo("         " + " ".join(sets))
    check_conflicts(stages.tuning + stages.final, out)
    return 0


def header(sweep: Sweep, out: Path, steps: Steps, stage: str = "final") -> str:
    counts = {k: sum(s.kind == k for _, s in steps)
              for k in ("done", "resume", "restart", "new", "wait")}
    tune = sweep.tune
    if stage == "tuning" and tune is not None:
        rows_ = len({c.row for c, _ in steps})
        what = (f"tuning stage, {len(steps)} cells ({rows_} row{'s' if rows_ != 1 else ''} x up to "
                f"{len(tune.values or tune.factors)} values of {tune.key}"
                + (f" (factors {', '.join(map(str, tune.factors))} of each row's own)"
                   if tune.factors else "")
                + (f", seed {tune.seed}" if tune.seed is not None else "")
                + f", validation split of {tune.validation_size} examples)")
    else:
        shape = " x ".join(f"{len(v)} {k}" for k, v in (
            ("methods", sweep.methods), ("references", sweep.references),
            *sweep.settings.items(), *sweep.grid.items(), ("seeds", sweep.seeds)) if v)
        shape = shape.replace("methods x ", "methods + ", 1) if sweep.references else shape
        what = f"{len(steps)} cells ({shape or 'the base config'})"
    return (f"fedpeft sweep {sweep.path}: {what} in {out}; {counts['done']} finished, "
            f"{counts['resume']} to resume, {counts['restart']} to start over, "
            f"{counts['new']} new" + (f", {counts['wait']} waiting for their row's tuning"
                                      if counts["wait"] else ""))


@contextlib.contextmanager
def sweep_lock(out: Path) -> Iterator[None]:
    """One sweep at a time per output folder (two would run the same cells at once)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise ConfigError(f"another fedpeft sweep is running in {out} (pid "
                              f"{fh.read().strip() or '?'}); wait for it or use another --out") \
                from None
        fh.truncate(0)
        fh.write(str(os.getpid()))
        fh.flush()
        yield


def run_sweep(sweep: Sweep, out: Path, echo: Echo = print) -> int:
    """Run the tuning stage's unfinished cells, then every final cell that is not finished and
    whose row has its value; 0 when all are finished, 1 when some failed or still wait."""
    row_list = rows(sweep)
    expand_tuning(sweep, row_list)  # every cell's config is checked before anything is written
    expand(sweep, row_list=row_list)
    with sweep_lock(out):
        stages = plan_stages(sweep, out, row_list)
        check_conflicts(stages.tuning + stages.final, out)
        failed: list[Cell] = []
        if sweep.tune is not None:
            echo(header(sweep, out, stages.tuning, "tuning"))
            failed += run_steps(sweep, out, stages.tuning, "tune", echo, row_list)
            stages = plan_stages(sweep, out, row_list)  # the choices of the finished rows
            check_conflicts(stages.final, out)
        echo(header(sweep, out, stages.final))
        failed += run_steps(sweep, out, stages.final, "cell", echo, row_list)
        write_outputs(sweep, out, plan_stages(sweep, out, row_list))
    waiting = [c for c, s in stages.final if s.kind == "wait"]
    echo(f"fedpeft sweep: results in {out}/results.csv, results.md, curves.png"
         + (f", tuning in {out}/tuning.md" if sweep.tune is not None else "")
         + (f"; {len(failed)} cells FAILED: {', '.join(c.name for c in failed)}"
            if failed else "")
         + (f"; {len(waiting)} final cells not run: their row's tuning did not finish"
            if waiting else ""))
    return 1 if failed or waiting else 0


def run_steps(sweep: Sweep, out: Path, steps: Steps, stage: str, echo: Echo,
              row_list: list[Row]) -> list[Cell]:
    """Run one stage's unfinished cells in order; the ones that failed."""
    failed: list[Cell] = []
    for cell, state in steps:
        tag = f"[{stage} {cell.index}/{len(steps)}] {cell.name}"
        if state.kind in ("done", "wait"):
            echo(f"{tag}: " + ("finished earlier, skipped" if state.kind == "done"
                               else "not run: its row's tuning did not finish"))
            continue
        echo(f"{tag}: {describe(cell, state)} -> {cell_dir(out, cell)}")
        started = time.monotonic()
        try:
            rc = run_cell(sweep, cell, state, cell_dir(out, cell), echo)
        except KeyboardInterrupt:
            write_outputs(sweep, out, plan_stages(sweep, out, row_list))
            echo(f"{tag}: interrupted; run the same command again to continue")
            raise
        if rc == 2:
            raise ConfigError(f"cell {cell.name} was refused (message above); fix the sweep "
                              "file and run it again")
        if rc != 0:
            failed.append(cell)
        echo(f"{tag}: " + cell_line(record(sweep, cell, out), rc, time.monotonic() - started,
                                    sweep.target_accuracy))
        if rc != 0:
            echo(f"{tag}: its output: {cell_dir(out, cell) / CELL_LOG}, Flower's log: "
                 f"{cell_dir(out, cell) / 'run.log'}")
        write_outputs(sweep, out, plan_stages(sweep, out, row_list))
    return failed


def report_sweep(sweep: Sweep, out: Path, echo: Echo = print) -> int:
    """Write the results files from the cells finished in ``out``; run nothing. For a sweep
    run in parts (a subset file with the same ``--out``), the whole file's report."""
    row_list = rows(sweep)
    expand_tuning(sweep, row_list)  # a bad config: refused before the folder is made
    with sweep_lock(out):
        stages = plan_stages(sweep, out, row_list)
        check_conflicts(stages.tuning + stages.final, out)
        write_outputs(sweep, out, stages)
    done = sum(state.kind == "done" for _, state in stages.final)
    tuned = sum(state.kind == "done" for _, state in stages.tuning)
    echo(f"fedpeft sweep: {done} of {len(stages.final)} cells finished"
         + (f" ({tuned} of {len(stages.tuning)} tuning cells)" if stages.tuning else "")
         + f"; results in {out}/results.csv, results.md, curves.png"
         + (", tuning.md" if stages.tuning else ""))
    return 0


def record(sweep: Sweep, cell: Cell, out: Path) -> dict[str, Any] | None:
    labels = {k: label_text(v) for k, v in cell.labels.items()}
    return cell_record(cell.name, labels, cell_dir(out, cell), sweep.target_accuracy)


def write_outputs(sweep: Sweep, out: Path, stages: Stages) -> None:
    """results.csv, results.md and curves.png from the final cells finished so far; with
    [tune], tuning.csv and tuning.md from the tuning cells."""
    cells = [c for c, _ in stages.final]
    records = [r for c in cells if not c.waiting and (r := record(sweep, c, out)) is not None]
    done = {r["cell"] for r in records}
    keys = [k for k in cells[0].labels if k != "seed"]
    protocol = sweep.tune is not None or bool(sweep.references)
    write_results(out, records, keys, sweep.target_accuracy, sweep.name or sweep.path.stem,
                  intro(sweep, len(records), len(cells)),
                  [c.name for c in cells if c.name not in done],
                  references=[r.name for r in sweep.references] if protocol else None,
                  centralised=[r.name for r in sweep.references if r.kind == CENTRALISED],
                  row_keys=[sweep.tune.key] if sweep.tune is not None else [])
    if sweep.tune is not None:
        write_tuning_outputs(sweep, out, [c for c, _ in stages.tuning])


def write_tuning_outputs(sweep: Sweep, out: Path, tuning: list[Cell]) -> None:
    """tuning.csv and tuning.md: per row and value, the validation score and the choice."""
    assert sweep.tune is not None
    scores = tuning_scores(sweep, out, tuning)
    picked = choices(sweep, out, tuning)
    key = sweep.tune.key
    entries = [{**{k: label_text(v) for k, v in c.labels.items() if k != "seed"},
                "score": scores[c.name], "cell": c.name,
                "chosen": c.row in picked and picked[c.row] == c.labels[key]} for c in tuning]
    keys = [k for k in tuning[0].labels if k not in ("seed", key)] if tuning else ["method"]
    write_tuning(out, entries, keys, key, sweep.tune.metric, tuning_note(sweep))


def tuning_note(sweep: Sweep) -> str:
    tune = sweep.tune
    assert tune is not None
    how = (f"{', '.join(map(str, tune.factors))} x each row's own value (train.lr left at 0: "
           "the method's default_lr)" if tune.factors
           else ", ".join(label_text(v) for v in tune.values))
    return (f"`{tune.key}` picked per row from {how}, on a validation split of "
            f"{tune.validation_size} examples carved from the training data before "
            f"partitioning (`data.validation_size`, `eval.split = \"validation\"`)"
            + (f", seed {tune.seed}" if tune.seed is not None else "")
            + f": the value with the {'lowest' if tune.lower_is_better else 'highest'} mean "
            f"`{tune.metric}` over the last 3 evaluated "
            "rounds (ties: the first listed). The final cells run the seeds on the test split "
            "with the chosen value and the same validation split carved out.")


def intro(sweep: Sweep, finished: int, total: int) -> str:
    """The paragraph under results.md's title: what ran, from which file."""
    base = (f"base config `{shown(sweep.base_config)}`" if sweep.base_config
            else "the built-in default config")
    sets = ", ".join(f"`{s}`" for s in sweep.base_sets)
    seeds = (f"seeds {', '.join(map(str, sweep.seeds))} (each sets {', '.join(sweep.seed_keys)})"
             if sweep.seeds else "one seed per setting")
    text = sweep.description.strip() + "\n\n" if sweep.description.strip() else ""
    refs = "".join(f" Reference row `{r.name}`: "
                   + ("centralised training on the pooled data (one client, train.local_steps x "
                      "clients_per_round steps per round)" if r.kind == CENTRALISED else
                      ", ".join(f"`{override(k, v)}`" for k, v in r.values.items()))
                   + ("" if r.tune or sweep.tune is None else ", not tuned")
                   + (f", tuned on its own values {', '.join(map(label_text, r.tune_values))}"
                      if r.tune_values else "") + "."
                   for r in sweep.references)
    tuned = f" {tuning_note(sweep)} Per row: tuning.md." if sweep.tune is not None else ""
    return (text + f"`fedpeft sweep {shown(sweep.path)}`: {base}"
            + (f" with {sets}" if sets else "") + f"; {seeds}. {finished} of {total} cells "
            f"finished; each cell's config, metrics and logs (its console output: {CELL_LOG}) "
            f"are in `{CELLS_DIR}/<cell>/`." + tuned + refs)


def shown(path: Path | None) -> str:
    """``path`` relative to the current folder where it is below it."""
    if path is None:
        return ""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def cell_command(sweep: Sweep, cell: Cell, state: CellState, folder: Path) -> list[str]:
    cmd = [sys.executable, "-m", "fedpeft.cli", "simulate"]
    if state.kind == "resume":
        return [*cmd, "--resume", str(folder)]
    if sweep.base_config is not None:
        cmd.append(str(sweep.base_config))
    cmd += ["--out", str(folder)]
    for item in cell.overrides:
        cmd += ["--set", item]
    return cmd


def run_cell(sweep: Sweep, cell: Cell, state: CellState, folder: Path, echo: Echo) -> int:
    """Run one cell's ``fedpeft simulate`` in this process group (a Ctrl-C reaches both), its
    output passed through indented and appended to the cell's sweep.log; its exit status."""
    from fedpeft.run.launcher import sigterm_as_keyboard_interrupt

    folder.mkdir(parents=True, exist_ok=True)
    cmd = cell_command(sweep, cell, state, folder)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(folder / CELL_LOG, "a", encoding="utf-8") as log, sigterm_as_keyboard_interrupt():
        log.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", env=env)
        try:
            for line in proc.stdout or ():
                log.write(line)
                echo("    " + line.rstrip("\n"))
            return proc.wait()
        except KeyboardInterrupt as exc:
            stop_child(proc, terminated=bool(exc.args))  # args: "signal 15" from a SIGTERM
            raise


def stop_child(proc: subprocess.Popen[str], terminated: bool) -> None:
    """Wait for the child to stop everything it started. A signal to the process group (Ctrl-C,
    ``kill -- -PGID``) reached it too and it is stopping already (ignoring further signals while
    it stops its processes); a signal to the sweep alone is passed on as SIGTERM after a grace
    period, 2 s for a SIGTERM, 30 s for a SIGINT."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=2 if terminated else 30)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=60)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------
# the command line


def default_out(sweep: Sweep) -> Path:
    return Path("runs") / "sweeps" / sweep.path.stem


def cmd_sweep(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.sweep)
    out = Path(args.out or default_out(sweep)).resolve()
    if args.dry_run:
        return dry_run(sweep, out)
    if args.report:
        return report_sweep(sweep, out)
    return run_sweep(sweep, out)


def add_command(sub: argparse._SubParsersAction) -> None:
    """``fedpeft sweep SWEEP.toml [--out DIR] [--dry-run | --report]``."""
    sw = sub.add_parser("sweep", help="run a grid of simulations (methods x settings x seeds), "
                        "resumable; with [tune] a stage that first picks each row's learning "
                        "rate on a validation split; results.csv, results.md, curves.png")
    sw.add_argument("sweep", help="sweep file (TOML; see simulations/sweeps/)")
    sw.add_argument("--out", help="output folder (default runs/sweeps/<sweep file name>)")
    sw.add_argument("--dry-run", action="store_true",
                    help="list the cells (the tuning stage's first) and what a run would do "
                    "with each; run nothing")
    sw.add_argument("--report", action="store_true",
                    help="write results.csv, results.md and curves.png from the cells "
                    "finished in the output folder; run nothing")
    sw.set_defaults(func=cmd_sweep)
