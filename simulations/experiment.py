"""Pieces the comparison scripts share: a command line and a cached, timed single-process run."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from fedpeft.server.reporting import write_json_atomic

from fedpeft.core.workspace import clear_workspaces
from simulations.plain_loop import run_plain

RESULTS = Path("simulations/results")


def experiment_cli(doc: str, choices: dict[str, list[str]]) -> argparse.Namespace:
    """``--<name> ...`` to pick a subset of each choice list, ``--out``, ``--set k=v`` (extra
    overrides for every run) and ``--report-only`` (rebuild the report from stored runs)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, allowed in choices.items():
        parser.add_argument(f"--{name}", nargs="+", default=allowed, choices=allowed)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--report-only", action="store_true")
    return parser.parse_args()


def timed_run(overrides: list[str], path: Path, **fields: Any) -> dict[str, Any]:
    """Run ``plain_loop`` with byte counting from a fresh workspace (the cached template adapter
    would otherwise carry the previous run's training) and store rows, settings and wall time."""
    clear_workspaces()
    started = time.perf_counter()
    rows = run_plain(None, overrides)
    record = {**fields, "overrides": overrides, "rows": rows,
              "wall_s": time.perf_counter() - started}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)
    return record


def save_figure(fig: Any, title: str, path: Path) -> None:
    """Grid and legend on every panel, a title, written as PNG and closed."""
    import matplotlib.pyplot as plt

    for ax in fig.axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
