"""Why did a run's accuracy swing? The class mix of each round's sampled clients beside the
global model's accuracy after that round.

Under label skew with low participation the model after a round leans towards the classes of
that round's clients; this prints, per round, the mean class distribution over the sampled
clients (each client's own distribution, averaged with equal weight, as under
``federation.weighting = "uniform"``) and the accuracy, e.g. for a benchmark cell:

    python -m simulations.round_mix runs/sweeps/bench_skew/cells/fedit_s2

The partition is rebuilt from the run's ``config.toml`` (the same seeded split the run used);
the sampled clients come from ``metrics.jsonl`` (``client_bytes``' partitions).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fedpeft.core.config import load_config
from fedpeft.core.data import load_task_data, partition_indices
from server.reporting import MetricsLog


def round_mix(run: Path) -> list[dict]:
    """Per trained round: the round, its accuracy (None if not evaluated), the sampled
    partitions and the mean class distribution over them."""
    cfg = load_config(run / "config.toml")
    train, _ = load_task_data(cfg.data)
    if not train.label_names:
        raise SystemExit(f"{run}: the task has no class labels")
    labels = np.asarray(train.labels)
    parts = partition_indices(cfg.data, cfg.federation.clients)
    classes = len(train.label_names)
    out = []
    for row in MetricsLog.read(run / "metrics.jsonl"):
        ids = [c["partition"] for c in row.get("client_bytes") or []]
        if not ids:
            continue
        mixes = [np.bincount(labels[parts[i]], minlength=classes) / max(len(parts[i]), 1)
                 for i in ids]
        out.append({"round": row["round"], "accuracy": row.get("accuracy"), "clients": ids,
                    "mix": np.mean(mixes, axis=0)})
    return out


def table(rows: list[dict], label_names: tuple[str, ...]) -> str:
    head = "| round | accuracy | " + " | ".join(label_names) + " | clients |"
    lines = [head, "|" + "---|" * (len(label_names) + 3)]
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        mix = " | ".join(f"{m:.2f}" for m in r["mix"])
        lines.append(f"| {r['round']} | {acc} | {mix} | {', '.join(map(str, r['clients']))} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder (config.toml, metrics.jsonl)")
    run = parser.parse_args().run
    names = load_task_data(load_config(run / "config.toml").data)[0].label_names
    print(table(round_mix(run), tuple(names)))


if __name__ == "__main__":
    main()
