"""A sweep's outputs from its finished cells: ``results.csv`` (a row per cell), ``results.md``
(mean +- sample standard deviation over the seeds of each setting) and ``curves.png`` (accuracy
per round and per cumulative uplink byte, mean with a +-1 std band, a line per setting)."""

from __future__ import annotations

import csv
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedpeft.core.runfiles import METRICS_FILE, SUMMARY_FILE
from fedpeft.server.reporting import MetricsLog, human_bytes, summarize

# client-side evaluation (eval.where = 'clients'/'both'): the last evaluated round's figures
CLIENT_METRICS = ("clients_accuracy", "clients_accuracy_p10", "clients_accuracy_min",
                  "clients_loss")
METRICS = ("final_accuracy", "best_accuracy", "last3_accuracy", "rounds_to_target", "bytes_up",
           "bytes_down", "wall_s", *CLIENT_METRICS)
LAST = 3  # last3_accuracy: mean over the last evaluated rounds (one round's figure is noisy)
COLUMNS = (*METRICS, "initial_accuracy", "epsilon", "rounds", "cell_dir")


def rounds_to_target(rows: Sequence[dict], target: float | None) -> int | None:
    """The first evaluated round whose accuracy is at least ``target`` (None: never / no target)."""
    if target is None:
        return None
    return next((r["round"] for r in rows
                 if r.get("accuracy") is not None and r["accuracy"] >= target), None)


def last_accuracy(rows: Sequence[dict], last: int = LAST) -> float | None:
    """Mean accuracy of the last ``last`` evaluated rounds after round 0 (None: none)."""
    return last_value(rows, "accuracy", last)


def last_value(rows: Sequence[dict], metric: str, last: int = LAST) -> float | None:
    """Mean of ``metric`` over the last ``last`` rounds after round 0 that have it (None:
    none); the tuning stage's score."""
    values = [r[metric] for r in rows if r.get("round", 0) > 0
              and isinstance(r.get(metric), int | float) and not isinstance(r[metric], bool)]
    return statistics.fmean(values[-last:]) if values else None


def cell_record(name: str, labels: dict[str, str], folder: Path,
                target: float | None) -> dict[str, Any] | None:
    """A finished cell's row (labels, results, its metrics rows under "rows"); None while it has
    no summary.json. Wall = the rounds' own wall time summed (without process start-up; the
    same for a resumed cell)."""
    if not (folder / SUMMARY_FILE).is_file():
        return None
    rows = MetricsLog.read(folder / METRICS_FILE)
    s = summarize(rows)
    return {"cell": name, **labels,
            "final_accuracy": s["final_accuracy"], "best_accuracy": s["best_accuracy"],
            "last3_accuracy": last_accuracy(rows),
            "rounds_to_target": rounds_to_target(rows, target),
            "bytes_up": s["total_bytes_up"], "bytes_down": s["total_bytes_down"],
            "wall_s": s["rounds_wall_s"], "initial_accuracy": s["initial_accuracy"],
            "epsilon": s.get("epsilon"), "rounds": s["rounds"], "cell_dir": str(folder),
            **{k: s.get(f"final_{k}") for k in CLIENT_METRICS}, "rows": rows}


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std None below two values."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def aggregate(records: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """A row per setting (the values of ``keys``), in first-seen order: n, and (mean, std) of
    every metric over the setting's cells; rounds to target over the cells that reached it."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(tuple(rec[k] for k in keys), []).append(rec)
    table = []
    for key, recs in groups.items():
        row: dict[str, Any] = {**dict(zip(keys, key, strict=True)), "n": len(recs)}
        for metric in METRICS:
            row[metric] = mean_std([r[metric] for r in recs if r.get(metric) is not None])
        row["reached"] = sum(r["rounds_to_target"] is not None for r in recs)
        row["records"] = recs
        table.append(row)
    return table


def write_results(out: Path, records: Sequence[dict[str, Any]], keys: Sequence[str],
                  target: float | None, title: str, intro: str, missing: Sequence[str],
                  references: Sequence[str] | None = None,
                  centralised: Sequence[str] = (), row_keys: Sequence[str] = ()) -> None:
    """Rewrite results.csv, results.md and curves.png from the finished cells' records (a
    setting = the values of ``keys``; ``missing``: the cells not finished). ``references``
    (the method-column names of the reference rows; None: no discrimination lines) and
    ``centralised`` (those of them that are the pooled-data upper bound): results.md ends with
    :func:`discrimination` per setting (``row_keys``: labels that are not part of it)."""
    write_csv(out / "results.csv", records, [*keys, "seed"])
    table = aggregate(records, keys)
    text = markdown(title, intro, table, keys, target, missing)
    if references is not None:
        text += discrimination(table, keys, references, centralised, row_keys)
    _write_atomic(out / "results.md", text)
    if records:
        plot_curves(table, keys, out / "curves.png", title)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_csv(path: Path, records: Sequence[dict[str, Any]], labels: Sequence[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["cell", *labels, *COLUMNS])
        for rec in records:
            writer.writerow([rec["cell"], *(rec[k] for k in labels),
                             *("" if rec[c] is None else rec[c] for c in COLUMNS)])
    os.replace(tmp, path)


def fmt(pair: tuple[float | None, float | None], spec: str = ".3f") -> str:
    mean, std = pair
    if mean is None:
        return "-"
    return f"{mean:{spec}}" + ("" if std is None else f" ± {std:{spec}}")


def fmt_bytes(pair: tuple[float | None, float | None]) -> str:
    mean, std = pair
    if mean is None:
        return "-"
    return human_bytes(mean) + ("" if std is None or std == 0 else f" ± {human_bytes(std)}")


def markdown(title: str, intro: str, table: Sequence[dict[str, Any]], keys: Sequence[str],
             target: float | None, missing: Sequence[str]) -> str:
    clients = any(row["clients_loss"][0] is not None for row in table)
    lines = [f"# {title}", "", intro, "",
             "Accuracy of the global model on the held-out split at the last round (final), at "
             f"its best round, and averaged over the last {LAST} evaluated rounds; each entry "
             "is the mean ± sample standard deviation (n - 1) over the "
             "n seeds of the setting. Bytes: all messages of a run, uplink and downlink. Wall: "
             "the rounds' own wall time per run (without process start-up)."
             + (f" Rounds to {target:g}: the first round at or above it, over the seeds that "
                "reached it (reached / n)." if target is not None else "")
             + (" Clients acc / p10 / min / loss: the last evaluated round's figures on the "
                "clients' own held-out examples (example-weighted mean, 10th percentile and "
                "minimum across clients, mean loss; docs/evaluation.md)." if clients else ""), "",
             "| " + " | ".join([*keys, "n", "final acc", "best acc", f"last-{LAST} acc",
                                *([f"rounds to {target:g}"] if target is not None else []),
                                *(["clients acc", "clients p10", "clients min", "clients loss"]
                                  if clients else []),
                                "uplink", "downlink", "wall s"]) + " |",
             "|" + "---|" * len(keys) + "---:|" * (7 + (target is not None) + 4 * clients)]
    for row in table:
        cells = [str(row[k]) for k in keys] + [
            str(row["n"]), fmt(row["final_accuracy"]), fmt(row["best_accuracy"]),
            fmt(row["last3_accuracy"])]
        if target is not None:
            cells.append(f"{fmt(row['rounds_to_target'], '.1f')} ({row['reached']}/{row['n']})")
        if clients:
            cells += [fmt(row[k]) for k in CLIENT_METRICS]
        cells += [fmt_bytes(row["bytes_up"]), fmt_bytes(row["bytes_down"]),
                  fmt(row["wall_s"], ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    if missing:
        lines += ["", f"Not finished ({len(missing)}): " + ", ".join(missing[:20])
                  + (" ..." if len(missing) > 20 else "") + "."]
    return "\n".join(lines) + "\n"


def score_key(records: Sequence[dict[str, Any]]) -> str:
    """The curves' accuracy: the server's, or the clients' where only the clients scored."""
    rows = [r for rec in records for r in rec["rows"]]
    if any(r.get("accuracy") is not None for r in rows):
        return "accuracy"
    return "clients_accuracy" if any(r.get("clients_accuracy") is not None for r in rows) \
        else "accuracy"


def curve(records: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Per round evaluated in every record: round, accuracy mean and std (0 for one record),
    mean cumulative uplink bytes up to and including the round."""
    accs, ups = [], []
    key = score_key(records)
    for rec in records:
        total, cum = 0, {}
        for row in rec["rows"]:
            total += row.get("bytes_up", 0)
            cum[row["round"]] = total
        accs.append({r["round"]: r[key] for r in rec["rows"] if r.get(key) is not None})
        ups.append(cum)
    rounds = sorted(set.intersection(*(set(a) for a in accs))) if accs else []
    out: dict[str, list[float]] = {"round": [], "mean": [], "std": [], "up": []}
    for rnd in rounds:
        values = [a[rnd] for a in accs]
        out["round"].append(rnd)
        out["mean"].append(statistics.fmean(values))
        out["std"].append(statistics.stdev(values) if len(values) > 1 else 0.0)
        out["up"].append(statistics.fmean(u[rnd] for u in ups))
    return out


def legend_label(row: dict[str, Any], keys: Sequence[str]) -> str:
    parts = [str(row[k]) if k in ("method", "setting") else f"{k.split('.')[-1]}={row[k]}"
             for k in keys]
    return ", ".join(parts) + f" (n={row['n']})"


def plot_curves(table: Sequence[dict[str, Any]], keys: Sequence[str], path: Path,
                title: str) -> None:
    """Left: accuracy per round; right: accuracy per cumulative uplink byte (log scale when the
    settings' uplinks span more than 50x). Mean line, +-1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    curves = [(legend_label(row, keys), curve(row["records"])) for row in table]
    fig, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.get_cmap("tab20" if len(curves) > 10 else "tab10")
    for i, (label, c) in enumerate(curves):
        color = colors(i % colors.N)
        lo = [m - s for m, s in zip(c["mean"], c["std"], strict=True)]
        hi = [m + s for m, s in zip(c["mean"], c["std"], strict=True)]
        by_round.plot(c["round"], c["mean"], marker=".", color=color, label=label)
        by_round.fill_between(c["round"], lo, hi, color=color, alpha=0.2)
        mb = [u / 1e6 for u in c["up"]]
        by_bytes.plot(mb, c["mean"], marker=".", color=color, label=label)
        by_bytes.fill_between(mb, lo, hi, color=color, alpha=0.2)
    ends = [c["up"][-1] for _, c in curves if c["up"] and c["up"][-1] > 0]
    if ends and max(ends) / min(ends) > 50:
        by_bytes.set_xscale("log")  # round 0 (no bytes yet) is off this scale
    key = score_key([rec for row in table for rec in row["records"]])
    ylabel = "test accuracy" if key == "accuracy" else "clients' accuracy (own held-out rows)"
    by_round.set(xlabel="round", ylabel=ylabel, title="Accuracy per round")
    by_round.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_bytes.set(xlabel="cumulative uplink MB (all clients)", ylabel=ylabel,
                 title="Accuracy per uplink byte")
    for ax in (by_round, by_bytes):
        ax.grid(True, alpha=0.3)
    by_round.legend(fontsize="small")
    fig.suptitle(f"{title}: mean ± 1 std over seeds")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def cell_line(rec: dict[str, Any] | None, rc: int, seconds: float, target: float | None) -> str:
    """The progress line at the end of a cell (``rec``: its record, None if it did not finish)."""
    if rc != 0 or rec is None:
        return f"FAILED (exit {rc}) after {seconds:.0f} s"
    reached = rec["rounds_to_target"]
    return (f"finished in {seconds:.0f} s: final acc {fmt((rec['final_accuracy'], None))} "
            f"(best {fmt((rec['best_accuracy'], None))}), uplink {human_bytes(rec['bytes_up'])}, "
            f"downlink {human_bytes(rec['bytes_down'])}"
            + (f", {target:g} reached in round {reached}" if reached is not None else "")
            + (f", clients acc {rec['clients_accuracy']:.3f} (p10 "
               f"{fmt((rec.get('clients_accuracy_p10'), None))})"
               if rec.get("clients_accuracy") is not None else ""))


def discrimination(table: Sequence[dict[str, Any]], keys: Sequence[str],
                   references: Sequence[str], centralised: Sequence[str],
                   row_keys: Sequence[str] = ()) -> str:
    """Per setting (the labels other than the method and ``row_keys``, the tuned value, which
    differs per row anyway): the spread of the method rows' mean final accuracy (best minus
    worst, reference rows left out), the largest standard deviation among them, whether
    spread > 3 x that std (the benchmark separates the methods), and whether each centralised
    reference's mean is above every method's."""
    setting_keys = [k for k in keys if k != "method" and k not in row_keys]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in table:
        groups.setdefault(tuple(row[k] for k in setting_keys), []).append(row)
    lines = ["", "## Does the benchmark discriminate?", "",
             "Final test accuracy, method rows only (references left out): spread = the best "
             "method's mean minus the worst's; it discriminates when the spread exceeds 3 x the "
             "largest standard deviation among the method rows.", ""]
    for key, rows in groups.items():
        where = ", ".join(f"{k} = {v}" for k, v in zip(setting_keys, key, strict=True))
        lines.append(f"- {where or 'all cells'}: " + _spread_line(rows, references, centralised))
    return "\n".join(lines) + "\n"


def _spread_line(rows: Sequence[dict[str, Any]], references: Sequence[str],
                 centralised: Sequence[str]) -> str:
    methods = [r for r in rows if r["method"] not in references
               and r["final_accuracy"][0] is not None]
    if len(methods) < 2:
        return "fewer than 2 method rows finished."
    means = {r["method"]: r["final_accuracy"][0] for r in methods}
    stds = [r["final_accuracy"][1] for r in methods]
    best, worst = max(means, key=means.__getitem__), min(means, key=means.__getitem__)
    spread = means[best] - means[worst]
    text = f"spread {spread:.3f} ({best} {means[best]:.3f} - {worst} {means[worst]:.3f})"
    if any(s is None for s in stds):
        text += "; a method row has fewer than 2 seeds, so no standard deviation to test"
    else:
        top = max(stds)
        text += (f", largest std {top:.3f}: spread {'>' if spread > 3 * top else '<='} 3 x std "
                 f"({'discriminates' if spread > 3 * top else 'does not discriminate'})")
    for name in centralised:
        ref = next((r for r in rows if r["method"] == name), None)
        if ref is None or ref["final_accuracy"][0] is None:
            text += f"; {name}: not finished"
            continue
        mean = ref["final_accuracy"][0]
        above = mean > max(means.values())
        text += (f"; {name} {mean:.3f} is {'above' if above else 'NOT above'} every method"
                 + ("" if above else f" (best method {best} {means[best]:.3f})"))
    return text + "."


def write_tuning(out: Path, entries: Sequence[dict[str, Any]], keys: Sequence[str], key: str,
                 metric: str, note: str) -> None:
    """tuning.csv (a row per tuning cell: the row's labels, the value, its validation score,
    whether it was chosen, the cell) and tuning.md (the same as a table, under ``note``)."""
    tmp = out / "tuning.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*keys, key, f"validation_{metric}_last{LAST}", "chosen", "cell"])
        for e in entries:
            writer.writerow([*(e[k] for k in keys), e[key],
                             "" if e["score"] is None else e["score"], int(e["chosen"]),
                             e["cell"]])
    os.replace(tmp, out / "tuning.csv")
    lines = ["# Tuning stage", "", note, "",
             "| " + " | ".join([*keys, key, f"validation {metric} (last {LAST})", "chosen"])
             + " |", "|" + "---|" * (len(keys) + 1) + "---:|---|"]
    for e in entries:
        score = "not finished" if e["score"] is None else f"{e['score']:.4f}"
        lines.append("| " + " | ".join([*(str(e[k]) for k in keys), str(e[key]), score,
                                        "**yes**" if e["chosen"] else ""]) + " |")
    _write_atomic(out / "tuning.md", "\n".join(lines) + "\n")
