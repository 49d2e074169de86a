"""Heterogeneous LoRA ranks: HetLoRA, FlexLoRA and FLoRA on a mixed-rank federation, next to FedIT
at the smallest common rank (what a one-rank method forces a mixed federation into).

Real model and data (MiniLM-L6, Rotten Tomatoes split by movie), run in one process through
``simulations/plain_loop.py`` (the same client and server code as the Flower run). Bytes are the
Flower serialisation of every payload, per client (the Flower messages add ~1 KB of config each).

    python simulations/compare_ranks.py                      # all four, then the report
    python simulations/compare_ranks.py --methods flora      # one run (results are cached)
    python simulations/compare_ranks.py --report-only        # rebuild table + plot from the runs

Outputs in ``--out`` (default simulations/results): compare_ranks.{json,md,png} and one
``compare_ranks_runs/<method>.json`` per run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from fedpeft.server.reporting import human_bytes, write_json_atomic

from simulations.plain_loop import run_plain

RANK_MIX = "2:0.3,8:0.5,16:0.2"
COMMON = [
    "federation.clients=30",
    "federation.clients_per_round=5",
    "federation.rounds=8",
    'data.partitioner="movie"',
    "train.local_steps=10",  # at 5 steps and lr 0.002, 8 rounds of 5 clients stay on the
    "train.lr=0.005",  # majority class for every method (measured), so nothing is compared
]
RUNS: dict[str, list[str]] = {
    "hetlora": ['method.name="hetlora"', f'federation.rank_mix="{RANK_MIX}"'],
    "flexlora": ['method.name="flexlora"', f'federation.rank_mix="{RANK_MIX}"'],
    "flora": ['method.name="flora"', f'federation.rank_mix="{RANK_MIX}"'],
    "hetlora-raw": ['method.name="hetlora"', f'federation.rank_mix="{RANK_MIX}"',
                    "method.rescale=false"],
    "fedit-r2": ['method.name="fedit"', "model.rank=2"],
}
LABELS = {"hetlora": f"HetLoRA (ranks {RANK_MIX})", "flexlora": f"FlexLoRA (ranks {RANK_MIX})",
          "flora": f"FLoRA (ranks {RANK_MIX})", "fedit-r2": "FedIT, everyone at rank 2",
          "hetlora-raw": "HetLoRA, raw factors (method.rescale=false)"}


def run_one(name: str, extra: list[str], runs_dir: Path) -> dict[str, Any]:
    overrides = [*COMMON, *RUNS[name], *extra]
    started = time.perf_counter()
    rows = run_plain(None, overrides)
    result = {"method": name, "overrides": overrides, "rows": rows,
              "wall_s": time.perf_counter() - started}
    runs_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(runs_dir / f"{name}.json", result)
    return result


def per_rank_bytes(rows: list[dict]) -> dict[int, dict[str, float]]:
    """Mean downlink / uplink bytes of one client message, by the rank it was sent."""
    acc: dict[int, list[tuple[int, int]]] = {}
    for row in rows:
        for c in row.get("client_bytes", []):
            acc.setdefault(int(c["rank"]), []).append((c["bytes_down"], c["bytes_up"]))
    return {rank: {"down": sum(d for d, _ in v) / len(v), "up": sum(u for _, u in v) / len(v),
                   "messages": len(v)} for rank, v in sorted(acc.items())}


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    rows = result["rows"]
    trained = [r for r in rows if r["round"] > 0]
    return {
        "method": result["method"],
        "label": LABELS.get(result["method"], result["method"]),
        "initial_accuracy": rows[0]["accuracy"],
        "final_accuracy": rows[-1]["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in rows if r.get("accuracy") is not None),
        "accuracy_by_round": [r.get("accuracy") for r in rows],
        "bytes_down_per_round": sum(r["bytes_down"] for r in trained) / len(trained),
        "bytes_up_per_round": sum(r["bytes_up"] for r in trained) / len(trained),
        "bytes_down_by_round": [r.get("bytes_down", 0) for r in rows],
        "total_bytes": sum(r["bytes_down"] + r["bytes_up"] for r in trained),
        "per_rank_message_bytes": per_rank_bytes(rows),
        "wall_s": result["wall_s"],
        "train_s": sum(r.get("train_s", 0.0) for r in rows),
    }


def markdown(summaries: list[dict[str, Any]], settings: list[str]) -> str:
    lines = [
        "# Heterogeneous LoRA ranks on Rotten Tomatoes (MiniLM-L6, split by movie)",
        "",
        "Settings: " + ", ".join(f"`{s}`" for s in settings) + "; other keys at their defaults "
        "(AdamW, batch 16, LoRA alpha 16 on query/value, max length 64, seed 0). Accuracy on "
        "the fixed held-out split (500-snippet subset in between, all 1,000 at the last round). "
        "Bytes: Flower serialisation of each client's payload (one process, "
        "`simulations/plain_loop.py`).",
        "",
        "| method | final acc | best acc | down / round | up / round | total bytes | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['label']} | {s['final_accuracy']:.3f} | {s['best_accuracy']:.3f} | "
            f"{human_bytes(s['bytes_down_per_round'])} | {human_bytes(s['bytes_up_per_round'])} | "
            f"{human_bytes(s['total_bytes'])} | {s['wall_s']:.0f} |"
        )
    rounds = len(summaries[0]["accuracy_by_round"])
    lines += ["", "Accuracy by round (round 0 = before training):", "",
              "| method | " + " | ".join(str(r) for r in range(rounds)) + " |",
              "|---|" + "---:|" * rounds]
    for s in summaries:
        accs = " | ".join("-" if a is None else f"{a:.3f}" for a in s["accuracy_by_round"])
        lines.append(f"| {s['method']} | {accs} |")
    lines += ["", "Mean bytes of one client message by the rank it was sent (downlink / uplink):",
              "", "| method | rank: down / up (messages) |", "|---|---|"]
    for s in summaries:
        cells = "; ".join(f"r{r}: {human_bytes(v['down'])} / {human_bytes(v['up'])} "
                          f"({v['messages']})" for r, v in s["per_rank_message_bytes"].items())
        lines.append(f"| {s['method']} | {cells} |")
    lines += ["", "FLoRA's downlink per round, which grows with the rounds a client missed: "
              + ", ".join(human_bytes(b) for b in next(
                  (s["bytes_down_by_round"][1:] for s in summaries if s["method"] == "flora"),
                  []))]
    return "\n".join(lines) + "\n"


def plot(summaries: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for s in summaries:
        accs = s["accuracy_by_round"]
        ax1.plot([i for i, a in enumerate(accs) if a is not None],
                 [a for a in accs if a is not None], marker="o", label=s["method"])
        cum, total = [], 0.0
        for b in s["bytes_down_by_round"]:
            total += b / 1e6
            cum.append(total)
        ax2.plot(range(len(cum)), cum, marker=".", label=s["method"])
    ax1.set(xlabel="round", ylabel="test accuracy", title="Global model accuracy")
    ax2.set(xlabel="round", ylabel="cumulative downlink MB", title="Downlink bytes", yscale="log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Mixed ranks {RANK_MIX} vs FedIT at rank 2 (MiniLM-L6, split by movie)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(out: Path, names: list[str]) -> str:
    runs_dir = out / "compare_ranks_runs"
    results = [json.loads((runs_dir / f"{n}.json").read_text()) for n in names
               if (runs_dir / f"{n}.json").exists()]
    if not results:
        raise SystemExit(f"no runs in {runs_dir}")
    summaries = [summarise(r) for r in results]
    settings = [s for s in results[0]["overrides"] if s not in RUNS[results[0]["method"]]]
    write_json_atomic(out / "compare_ranks.json", {"rank_mix": RANK_MIX, "settings": settings,
                                                   "runs": summaries})
    text = markdown(summaries, settings)
    (out / "compare_ranks.md").write_text(text)
    plot(summaries, out / "compare_ranks.png")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--out", type=Path, default=Path("simulations/results"))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra config overrides for every run")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if not args.report_only:
        for name in args.methods:
            run_one(name, args.overrides, args.out / "compare_ranks_runs")
    print(report(args.out, list(RUNS)))


if __name__ == "__main__":
    main()
