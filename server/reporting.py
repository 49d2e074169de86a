"""Run outputs: ``metrics.jsonl`` (a line per round), ``summary.json``, ``report.png`` and the
results table printed at the end."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedpeft.core.keys import EPSILON, TRAIN_S


def write_json_atomic(path: Path, data: Any) -> None:
    """Write then rename, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


class MetricsLog:
    """Appends one JSON object per round to ``metrics.jsonl`` and keeps them in memory."""

    def __init__(self, path: Path, rows: Sequence[dict] = ()) -> None:
        self.path = path
        self.rows: list[dict] = list(rows)
        path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def append(self, row: dict) -> None:
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    @staticmethod
    def read(path: Path) -> list[dict]:
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def round_line(row: dict, rounds: int) -> str:
    """One progress line per round: accuracy where the task has labels, else the held-out loss
    (and perplexity, for a causal LM)."""
    if row.get("accuracy") is not None:
        score = f"acc {row['accuracy']:.3f}"
    elif row.get("loss") is not None:
        score = f"loss {row['loss']:.3f}" + (f" ppl {row['perplexity']:.2f}"
                                              if row.get("perplexity") is not None else "")
    else:
        score = "acc   -  " if row.get("clients_evaluated") is None else ""
    parts = [
        f"round {row['round']:>3}/{rounds}",
        *([score] if score else []),
        *clients_scores(row),
        f"clients {row.get('clients_ok', 0)}/{row.get('clients_sampled', 0)} ok",
        f"up {human_bytes(row.get('bytes_up', 0))}",
        f"down {human_bytes(row.get('bytes_down', 0))}",
        f"{row.get('wall_s', 0):.1f}s",
    ]
    timings = row.get("method_timings") or []  # a method's own client seconds (Method.timings)
    if timings:
        own = " ".join(f"{name.removesuffix('_s')} {row.get(name, 0):.1f}s" for name in timings)
        parts.append(f"train {row.get(TRAIN_S, 0):.1f}s {own} (summed over clients)")
    if row.get(EPSILON) is not None:
        parts.append(f"eps {row[EPSILON]:.2f}")
    if row.get("clients_failed") or row.get("clients_rejected"):
        parts.append(f"failed {row.get('clients_failed', 0)} rejected "
                     f"{row.get('clients_rejected', 0)}")
    if row.get("clients_timed_out"):
        parts.append(f"timed out {row['clients_timed_out']}")
    if row.get("retries"):
        parts.append(f"retries {row['retries']}")
    if row.get("aggregated") == 0:
        parts.append("NOT AGGREGATED")
    return " | ".join(parts)


def clients_scores(row: dict) -> list[str]:
    """The progress line's client-side figures (eval.where = 'clients'/'both'), if any."""
    if row.get("clients_evaluated") is None:
        return []
    if row.get("clients_accuracy") is not None:
        return [f"clients acc {row['clients_accuracy']:.3f} p10 "
                f"{row['clients_accuracy_p10']:.3f} min {row['clients_accuracy_min']:.3f} "
                f"({row['clients_evaluated']} evaluated)"]
    if row.get("clients_perplexity") is not None:
        return [f"clients loss {row['clients_loss']:.3f} ppl {row['clients_perplexity']:.2f} "
                f"p90 {row['clients_perplexity_p90']:.2f} ({row['clients_evaluated']} evaluated)"]
    return [f"clients - ({row['clients_evaluated']} evaluated)"]


# The results table's client-side columns: (row key, header, format)
CLIENT_COLUMNS = {
    "accuracy": (("clients_accuracy", "clients acc", ".3f"),
                 ("clients_accuracy_p10", "clients p10", ".3f"),
                 ("clients_accuracy_min", "clients min", ".3f")),
    "perplexity": (("clients_loss", "clients loss", ".3f"),
                   ("clients_perplexity", "clients ppl", ".2f"),
                   ("clients_perplexity_p90", "clients ppl p90", ".2f")),
}


def client_columns(rows: list[dict]) -> tuple[tuple[str, str, str], ...]:
    """The client-side columns the rows call for (none when the clients never evaluated)."""
    if any(r.get("clients_accuracy") is not None for r in rows):
        return CLIENT_COLUMNS["accuracy"]
    if any(r.get("clients_perplexity") is not None for r in rows):
        return CLIENT_COLUMNS["perplexity"]
    return ()


def results_table(rows: list[dict]) -> str:
    """A Markdown table of the rounds (printed at the end of a run), with a column for each
    per-client timing the method reports (``Method.timings``)."""
    timings = list(dict.fromkeys(n for r in rows for n in r.get("method_timings") or []))
    ppl = any(r.get("perplexity") is not None for r in rows)  # a causal LM's column
    clients = client_columns(rows)
    head = ("| round | accuracy | loss " + "| perplexity " * ppl
            + "".join(f"| {h} " for _, h, _ in clients) + "| clients ok/sampled | "
            "bytes up | bytes down | train s "
            + "".join(f"| {n.removesuffix('_s')} s " for n in timings) + "| wall s |")
    lines = [head, "|" + "---:|" * (8 + ppl + len(clients) + len(timings))]
    for r in rows:
        acc = f"{r['accuracy']:.3f}" if r.get("accuracy") is not None else "-"
        loss = f"{r['loss']:.3f}" if r.get("loss") is not None else "-"
        if ppl:
            loss += f" | {r['perplexity']:.2f}" if r.get("perplexity") is not None else " | -"
        own = "".join(f" {r.get(n, 0):.1f} |" for n in timings)
        for key, _, fmt in clients:
            loss += f" | {r[key]:{fmt}}" if r.get(key) is not None else " | -"
        lines.append(
            f"| {r['round']} | {acc} | {loss} | {r.get('clients_ok', 0)}/"
            f"{r.get('clients_sampled', 0)} | {human_bytes(r.get('bytes_up', 0))} | "
            f"{human_bytes(r.get('bytes_down', 0))} | {r.get(TRAIN_S, 0):.1f} |{own} "
            f"{r.get('wall_s', 0):.1f} |"
        )
    return "\n".join(lines)


def summarize(rows: list[dict], **fields: Any) -> dict:
    scored = [r for r in rows if r.get("accuracy") is not None]
    privacy = {key: max(r[key] for r in rows if r.get(key) is not None)  # DP runs only
               for key in (EPSILON, "client_epsilon") if any(r.get(key) is not None
                                                               for r in rows)}
    return {
        **privacy,
        **fields,
        "rounds": max((r["round"] for r in rows), default=0),
        "initial_accuracy": scored[0]["accuracy"] if scored else None,
        "final_accuracy": scored[-1]["accuracy"] if scored else None,
        "best_accuracy": max((r["accuracy"] for r in scored), default=None),
        "total_bytes_up": sum(r.get("bytes_up", 0) for r in rows),
        "total_bytes_down": sum(r.get("bytes_down", 0) for r in rows),
        "clients_failed": sum(r.get("clients_failed", 0) for r in rows),
        "clients_rejected": sum(r.get("clients_rejected", 0) for r in rows),
        "rounds_wall_s": sum(r.get("wall_s", 0) for r in rows),
        **clients_summary(rows),
    }


# summary.json's client-side figures: the last evaluated round's value of each
CLIENT_SUMMARY = ("clients_accuracy", "clients_accuracy_p10", "clients_accuracy_min",
                  "clients_accuracy_std", "clients_loss", "clients_perplexity",
                  "clients_perplexity_p90", "clients_perplexity_max", "clients_evaluated")


def clients_summary(rows: list[dict]) -> dict:
    """``final_clients_*``: the client-side figures of the last round the clients evaluated
    (none when they never did); ``best_clients_accuracy`` over the rounds."""
    evaluated = [r for r in rows if r.get("clients_evaluated")]
    if not evaluated:
        return {}
    last = evaluated[-1]
    out = {f"final_{k}": last[k] for k in CLIENT_SUMMARY if last.get(k) is not None}
    accs = [r["clients_accuracy"] for r in evaluated if r.get("clients_accuracy") is not None]
    if accs:
        out["best_clients_accuracy"] = max(accs)
    return out


def plot_report(rows: list[dict], path: Path, title: str = "") -> list[str]:
    """Accuracy (where the task has labels), held-out loss and perplexity (causal LMs), and
    cumulative bytes, per round, side by side; returns the panels drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r.get("accuracy") is not None]
    losses = [r for r in rows if r.get("loss") is not None]
    clients = [r for r in rows if r.get("clients_evaluated")]
    panels = (["accuracy"] * bool(scored or not (losses or clients)) + ["loss"] * bool(losses)
              + ["clients"] * bool(clients) + ["bytes"])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, panel in zip(axes, panels, strict=True):
        if panel == "accuracy":
            ax.plot([r["round"] for r in scored], [r["accuracy"] for r in scored], marker="o")
            ax.set(xlabel="round", ylabel="test accuracy", title="Global adapter accuracy")
        elif panel == "loss":
            _plot_loss(ax, losses)
        elif panel == "clients":
            _plot_clients(ax, clients)
        else:
            _plot_bytes(ax, rows)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return panels


def _plot_loss(ax: Any, rows: list[dict]) -> None:
    """Held-out loss, and perplexity on a second axis where the task reports it."""
    rounds = [r["round"] for r in rows]
    ax.plot(rounds, [r["loss"] for r in rows], marker="o", color="tab:red", label="loss")
    ax.set(xlabel="round", ylabel="held-out loss", title="Held-out loss")
    ppl = [r.get("perplexity") for r in rows]
    if all(p is not None for p in ppl):
        twin = ax.twinx()
        twin.plot(rounds, ppl, marker=".", color="tab:purple", label="perplexity")
        twin.set(ylabel="perplexity")
        ax.set_title("Held-out loss and perplexity")
        ax.legend(handles=[*ax.get_lines(), *twin.get_lines()])


def _plot_clients(ax: Any, rows: list[dict]) -> None:
    """The clients' figures on their own held-out examples: the example-weighted mean, the 10th
    percentile and the minimum across clients (accuracy), or the loss (causal LM)."""
    rounds = [r["round"] for r in rows]
    if all(r.get("clients_accuracy") is not None for r in rows):
        for key, label in (("clients_accuracy", "mean"), ("clients_accuracy_p10", "10th pct"),
                           ("clients_accuracy_min", "min")):
            ax.plot(rounds, [r[key] for r in rows], marker=".", label=label)
        ax.set(xlabel="round", ylabel="accuracy on own held-out examples",
               title="Clients' accuracy")
    else:
        ax.plot(rounds, [r.get("clients_loss") for r in rows], marker=".", label="mean loss")
        ax.set(xlabel="round", ylabel="held-out loss", title="Clients' held-out loss")
    ax.legend()


def _plot_bytes(ax: Any, rows: list[dict]) -> None:
    rounds = [r["round"] for r in rows]
    up = down = 0.0
    cum_up, cum_down = [], []
    for r in rows:
        up += r.get("bytes_up", 0) / 1e6
        down += r.get("bytes_down", 0) / 1e6
        cum_up.append(up)
        cum_down.append(down)
    ax.plot(rounds, cum_up, label="uplink", marker=".")
    ax.plot(rounds, cum_down, label="downlink", marker=".")
    ax.set(xlabel="round", ylabel="cumulative MB", title="Bytes on the wire")
    ax.legend()
