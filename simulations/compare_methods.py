"""FedIT vs FFA-LoRA vs LoRA-FAIR under one budget, on two non-IID splits of Rotten Tomatoes.

Real model and data (MiniLM-L6), run in one process through ``simulations/plain_loop.py`` (the
same client and server code as the Flower run). Every method gets the same clients, rounds,
sampled clients, local steps and seeds; each trains with its own default learning rate
(``Method.default_lr``: FFA-LoRA's frozen A needs a larger one). Bytes are the Flower
serialisation of every payload (the Flower messages add ~1 KB of config each).

Splits: ``dirichlet`` = label skew, Dirichlet alpha 0.1 over 20 clients (most clients hold one
class; ``data.min_partition_size=1`` because alpha 0.1 cannot give every client 2 examples);
``movie`` = the natural split by movie.

    python -m simulations.compare_methods                        # all six runs, then the report
    python -m simulations.compare_methods --splits movie --methods lora-fair   # one run (cached)
    python -m simulations.compare_methods --report-only          # rebuild tables + plots

Outputs in ``--out`` (default simulations/results): compare_methods.{json,md},
compare_methods_<split>.png and one ``compare_methods_runs/<split>-<method>.json`` per run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedpeft.client.trainer import client_lr as method_lr
from fedpeft.server.reporting import human_bytes, write_json_atomic
from fedpeft.strategies import build_method

from fedpeft.core.config import load_config
from simulations.compare_ranks import summarise as summarise_rows
from simulations.experiment import experiment_cli, save_figure, timed_run

COMMON = [
    "federation.clients=20",
    "federation.clients_per_round=5",
    "federation.rounds=8",
    "train.local_steps=10",
]
SPLITS: dict[str, list[str]] = {
    "dirichlet": ['data.partitioner="dirichlet"', "data.dirichlet_alpha=0.1",
                  "data.min_partition_size=1"],
    "movie": ['data.partitioner="movie"'],
}
SPLIT_TITLES = {"dirichlet": "Dirichlet label skew (alpha 0.1)", "movie": "natural split by movie"}
METHODS = ("fedit", "ffa-lora", "lora-fair")
SETUP = (
    "other keys at their defaults (AdamW, batch 16, LoRA r = 8, alpha = 16 on query/value, max "
    "length 64, seed 0; LoRA-FAIR: lambda 0.01, the paper's cosine objective solved by L-BFGS). "
    "One seed per cell. Accuracy on the fixed held-out split (500-snippet subset in between, all "
    "1,000 at the last round); final loss = test cross-entropy at the last round. Wall s: a "
    "2-core machine shared with other work, so timings vary by +-50% between runs. Bytes: Flower "
    "serialisation of every client payload (`simulations/plain_loop.py`, one process). Command: "
    "`python -m simulations.compare_methods`."
)


def settings(split: str, method: str, extra: list[str]) -> list[str]:
    return [*COMMON, *SPLITS[split], f'method.name="{method}"', *extra]


def client_lr(overrides: list[str]) -> float:
    """The learning rate the clients of a run train with (``train.lr`` or the method default)."""
    cfg = load_config(None, overrides)
    return method_lr(cfg, build_method(cfg))


def run_cached(split: str, method: str, extra: list[str], runs_dir: Path) -> None:
    """Run one (split, method) pair and store its rows and timing as JSON."""
    overrides = settings(split, method, extra)
    timed_run(overrides, runs_dir / f"{split}-{method}.json", method=method, split=split,
              lr=client_lr(overrides))


def summarise(record: dict[str, Any]) -> dict[str, Any]:
    """compare_ranks' per-run summary, without its per-rank breakdown (one rank here)."""
    out = summarise_rows(record)
    del out["per_rank_message_bytes"], out["label"]
    rows = record["rows"]
    out.update(split=record["split"], lr=record["lr"],
               total_bytes_per_round=out["total_bytes"] / (len(rows) - 1),
               message_bytes=steady_message_bytes(rows), final_loss=rows[-1]["loss"],
               bytes_by_round=[r.get("bytes_down", 0) + r.get("bytes_up", 0) for r in rows])
    return out


def split_table(split: str, runs: list[dict[str, Any]]) -> list[str]:
    lrs = ", ".join(f"{s['method']} {s['lr']:g}" for s in runs)
    lines = [f"### {SPLIT_TITLES[split]}", "",
             f"| method (client lr: {lrs}) | final acc | best acc | final loss | total bytes | "
             "bytes / round (down + up) | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for s in runs:
        lines.append(
            f"| {s['method']} | {s['final_accuracy']:.3f} | {s['best_accuracy']:.3f} | "
            f"{s['final_loss']:.3f} | "
            f"{human_bytes(s['total_bytes'])} | {human_bytes(s['total_bytes_per_round'])} "
            f"({human_bytes(s['bytes_down_per_round'])} + {human_bytes(s['bytes_up_per_round'])})"
            f" | {s['wall_s']:.0f} |")
    rounds = len(runs[0]["accuracy_by_round"])
    lines += ["", "| accuracy by round | " + " | ".join(map(str, range(rounds))) + " |",
              "|---|" + "---:|" * rounds]
    for s in runs:
        cells = " | ".join("-" if a is None else f"{a:.3f}" for a in s["accuracy_by_round"])
        lines.append(f"| {s['method']} | {cells} |")
    by = {s["method"]: s for s in runs}
    if "fedit" in by and "ffa-lora" in by:
        ffa, fedit = by["ffa-lora"]["message_bytes"], by["fedit"]["message_bytes"]
        ratio = by["ffa-lora"]["total_bytes"] / by["fedit"]["total_bytes"]
        lines += ["", f"FFA-LoRA / FedIT: one client message from round 2 on {human_bytes(ffa)} "
                  f"/ {human_bytes(fedit)} = {ffa / fedit:.3f} (A never travels; B, the head and "
                  f"the framing do); all bytes of the run {ratio:.3f} (B = 0 serialises small, "
                  "so FFA-LoRA's first downlink is nearly empty while FedIT's carries A)."]
    return [*lines, ""]


def steady_message_bytes(rows: list[dict[str, Any]]) -> float:
    """Mean bytes of one client message (down or up) from round 2 on, when B is no longer 0."""
    sizes = [c[way] for r in rows if r["round"] >= 2 for c in r.get("client_bytes", [])
             for way in ("down", "up")]
    return sum(sizes) / len(sizes)


def markdown(by_split: dict[str, list[dict[str, Any]]], common: list[str]) -> str:
    budget = ", ".join(f"`{s}`" for s in common)
    lines = ["# FedIT vs FFA-LoRA vs LoRA-FAIR on Rotten Tomatoes (MiniLM-L6)", "",
             f"Same budget for every method: {budget}; {SETUP}", ""]
    for split, runs in by_split.items():
        lines += split_table(split, runs)
    return "\n".join(lines)


def plot(split: str, runs: list[dict[str, Any]], path: Path) -> None:
    """Left: global accuracy per round. Right: cumulative bytes (down + up) per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, bytes_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for s in runs:
        scored = [(i, a) for i, a in enumerate(s["accuracy_by_round"]) if a is not None]
        acc_ax.plot(*zip(*scored, strict=True), marker="o", label=f"{s['method']} (lr {s['lr']:g})")
        running = [sum(s["bytes_by_round"][: i + 1]) / 1e6 for i in range(len(s["bytes_by_round"]))]
        bytes_ax.plot(range(len(running)), running, marker=".", label=s["method"])
    acc_ax.set(xlabel="round", ylabel="test accuracy", title="Global model accuracy")
    bytes_ax.set(xlabel="round", ylabel="cumulative MB (down + up)", title="Bytes on the wire")
    save_figure(fig, f"FedIT / FFA-LoRA / LoRA-FAIR, MiniLM-L6, {SPLIT_TITLES[split]}", path)


def report(out: Path) -> str:
    runs_dir = out / "compare_methods_runs"
    by_split: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:
        for method in METHODS:
            path = runs_dir / f"{split}-{method}.json"
            if path.exists():
                by_split.setdefault(split, []).append(summarise(json.loads(path.read_text())))
    if not by_split:
        raise SystemExit(f"no runs in {runs_dir}")
    write_json_atomic(out / "compare_methods.json", {"settings": COMMON, "splits": SPLITS,
                                                     "runs": by_split})
    text = markdown(by_split, COMMON)
    (out / "compare_methods.md").write_text(text)
    for split, runs in by_split.items():
        plot(split, runs, out / f"compare_methods_{split}.png")
    return text


def main() -> None:
    args = experiment_cli(__doc__, {"splits": list(SPLITS), "methods": list(METHODS)})
    for split in [] if args.report_only else args.splits:
        for method in args.methods:
            run_cached(split, method, args.overrides, args.out / "compare_methods_runs")
    print(report(args.out))


if __name__ == "__main__":
    main()
