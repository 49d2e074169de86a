"""A/B of ``train.precision`` on a whole experiment: ``fedpeft simulate`` (the default experiment
unless ``--set`` changes it) with ``"fp32"`` and with ``"auto"``, seeds interleaved
(fp32 s0, auto s0, fp32 s1, ...), one run at a time, so that a change in the machine's load
hits both arms of a pair alike:

    python -m simulations.bench_precision_ab --seeds 0 1 2 --work runs/precision-ab
    python -m simulations.bench_precision_ab --work runs/precision-ab --report-only

A finished run (its ``summary.json`` present) is not run again. The report gives, per arm, the
CLI's wall time, the final accuracy and the mean per-round ``train_s`` (the clients' summed
compute time) with mean +- std over the seeds, the ratio of the means, the per-pair wall-time
ratios, and the machine's mean 1-minute load average during each run. It writes
``simulations/results/precision/ab.json`` and ``ab.md`` and copies each run's
``metrics.jsonl``, ``summary.json`` and ``config.toml`` under ``simulations/results/precision/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ARMS = ("fp32", "auto")
RESULTS = Path(__file__).parent / "results" / "precision"


def run_one(work: Path, arm: str, seed: int, extra: list[str]) -> None:
    out = work / f"{arm}-s{seed}"
    if (out / "summary.json").is_file():
        return
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", "--out", str(out),
           "--set", f"federation.seed={seed}", "--set", f'train.precision="{arm}"']
    for item in extra:
        cmd += ["--set", item]
    loads: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(30):
            loads.append(os.getloadavg()[0])

    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    with (work / f"{arm}-s{seed}.log").open("w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    done.set()
    (work / f"{arm}-s{seed}.run.json").write_text(json.dumps(
        {"rc": rc, "wall_s": time.perf_counter() - start, "load1": loads}))


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def collect(work: Path, seeds: list[int]) -> dict:
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for seed in seeds:
        for arm in ARMS:
            out = work / f"{arm}-s{seed}"
            if not (out / "summary.json").is_file():
                continue
            summary = json.loads((out / "summary.json").read_text())
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            trained = [r["train_s"] for r in rows if r["round"] > 0 and "train_s" in r]
            scored = [r["eval_s"] for r in rows if 0 < r["round"] < len(rows) - 1
                      and r.get("eval_s")]  # the 500-snippet subset (the last round: all)
            meta_path = work / f"{arm}-s{seed}.run.json"
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
            runs[arm].append({
                "seed": seed, "precision": summary.get("precision"),
                "wall_s": meta.get("wall_s") or summary.get("cli_wall_s"),
                "final_accuracy": summary["final_accuracy"],
                "train_s_per_round": statistics.mean(trained),
                "eval_s_per_round": statistics.mean(scored) if scored else 0.0,
                "load1": statistics.mean(meta["load1"]) if meta.get("load1") else None})
            dest = RESULTS / "ab" / f"{arm}-s{seed}"
            dest.mkdir(parents=True, exist_ok=True)
            for name in ("metrics.jsonl", "summary.json", "config.toml"):
                shutil.copy2(out / name, dest / name)
    return runs


def report(runs: dict[str, list[dict]]) -> tuple[dict, str]:
    stats = {arm: {key: mean_std([r[key] for r in rows])
                   for key in ("wall_s", "final_accuracy", "train_s_per_round",
                               "eval_s_per_round")}
             for arm, rows in runs.items() if rows}
    pairs = {r["seed"]: r for r in runs["fp32"]}
    ratios = [r["wall_s"] / pairs[r["seed"]]["wall_s"] for r in runs["auto"] if r["seed"] in pairs]
    lines = ["| arm | precision ran | seeds | wall s | final accuracy | train_s / round | "
             "eval_s / round | load (1 min) per run |", "|---|---|---|---:|---:|---:|---:|---|"]
    for arm, rows in runs.items():
        if not rows:
            continue
        st = stats[arm]
        loads = ", ".join(f"{r['load1']:.1f}" if r["load1"] is not None else "-" for r in rows)
        lines.append(f"| {arm} | {rows[0]['precision']} | {', '.join(str(r['seed']) for r in rows)}"
                     f" | {st['wall_s'][0]:.0f} +- {st['wall_s'][1]:.0f} | "
                     f"{st['final_accuracy'][0]:.3f} +- {st['final_accuracy'][1]:.3f} | "
                     f"{st['train_s_per_round'][0]:.1f} +- {st['train_s_per_round'][1]:.1f} | "
                     f"{st['eval_s_per_round'][0]:.1f} +- {st['eval_s_per_round'][1]:.1f} | "
                     f"{loads} |")
    summary = {"stats": stats, "pair_wall_ratios": ratios, "runs": runs}
    if len(stats) == 2:
        summary["wall_ratio_of_means"] = stats["auto"]["wall_s"][0] / stats["fp32"]["wall_s"][0]
        summary["train_ratio_of_means"] = (stats["auto"]["train_s_per_round"][0]
                                           / stats["fp32"]["train_s_per_round"][0])
        lines += ["", f"auto / fp32: wall {summary['wall_ratio_of_means']:.2f}x (per seed: "
                  f"{', '.join(f'{x:.2f}' for x in ratios)}), train_s per round "
                  f"{summary['train_ratio_of_means']:.2f}x"]
    return summary, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=Path("runs/precision-ab"))
    parser.add_argument("--set", dest="extra", action="append", default=[])
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for seed in args.seeds:
            for arm in ARMS:
                run_one(args.work, arm, seed, args.extra)
    summary, table = report(collect(args.work, args.seeds))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ab.json").write_text(json.dumps(summary, indent=2))
    (RESULTS / "ab.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
