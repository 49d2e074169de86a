"""The claims table of the benchmark (issue 31): each paper's headline claim, tested on the
benchmark scenarios' sweeps (simulations/sweeps/bench_*.toml), 3 seeds per row.

A claim compares one row with another on the same seeds (same split, client sample and
initialisation), so it reads the paired differences d_s = acc(row, s) - acc(other, s) of the
final test accuracy. With m = mean(d), h = 2 * std(d) / sqrt(n) (about a 90% one-sided
interval at n = 3):

- "beats": holds if m - h > 0; does not hold if m <= 0 (no gain; "reversed" if m + h < 0);
  inconclusive if 0 < m <= h;
- "matches" (at a fraction of the uplink): holds if m - h > -MARGIN and the row's uplink is
  smaller; does not hold if m + h < -MARGIN or the uplink is not smaller; inconclusive
  otherwise.

    python -m simulations.claims [--results simulations/results] [--out docs/claims.md]
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

MARGIN = 0.02  # "matches": not worse by more than 2 accuracy points
ZERO_SHOT = "zero-shot"  # the row's own round-0 accuracy (a fresh head), not another row


@dataclass(frozen=True)
class Claim:
    method: str
    paper: str
    claim: str
    scenario: str  # sweep output folder, e.g. bench_skew
    row: str
    other: str
    kind: str  # "beats" or "matches"


_CLAIMS = (
    Claim("FedIT", "Zhang et al., ICASSP 2024", "federated LoRA tuning beats the zero-shot "
          "model under heterogeneous data", "bench_skew", "fedit", ZERO_SHOT, "beats"),
    Claim("FFA-LoRA", "Sun et al., ICLR 2024", "freezing A beats FedIT under heterogeneous data",
          "bench_skew", "ffa-lora", "fedit", "beats"),
    Claim("FFA-LoRA", "Sun et al., ICLR 2024", "freezing A beats FedIT under DP-SGD",
          "bench_dp", "ffa-lora", "fedit", "beats"),
    Claim("LoRA-FAIR", "Bian et al., ICCV 2025", "the server-side correction beats FedIT under "
          "non-IID data", "bench_skew", "lora-fair", "fedit", "beats"),
    Claim("Ferret", "Shu et al., ICML 2025", "shared-randomness projections match FedAvg-style "
          "tuning at a fraction of the uplink", "bench_skew", "ferret", "fedit", "matches"),
    Claim("RoLoRA", "Chen et al., NeurIPS 2025", "alternating A/B beats FedIT",
          "bench_skew", "rolora", "fedit", "beats"),
    Claim("RoLoRA", "Chen et al., NeurIPS 2025", "alternating A/B beats FFA-LoRA",
          "bench_skew", "rolora", "ffa-lora", "beats"),
    Claim("FedSVD", "Lee et al., NeurIPS 2025", "re-factorising by SVD beats FFA-LoRA without DP",
          "bench_skew", "fedsvd", "ffa-lora", "beats"),
    Claim("FedSVD", "Lee et al., NeurIPS 2025", "re-factorising by SVD beats FFA-LoRA under "
          "DP-SGD", "bench_dp", "fedsvd", "ffa-lora", "beats"),
    Claim("Fed-SB", "Singhal et al., 2025", "training only R matches FedIT at a fraction of "
          "the uplink", "bench_skew", "fed-sb", "fedit", "matches"),
    Claim("FedEx-LoRA", "Singhal et al., ACL 2025", "exact aggregation beats FedIT",
          "bench_skew", "fedex-lora", "fedit", "beats"),
    Claim("HetLoRA", "Cho et al., EMNLP 2024", "mixed ranks beat homogeneous LoRA at the "
          "smallest rank", "bench_ranks", "hetlora", "fedit-r2", "beats"),
    Claim("FlexLoRA", "Bai et al., NeurIPS 2024", "SVD redistribution beats HetLoRA's "
          "zero-padding with mixed ranks", "bench_ranks", "flexlora", "hetlora", "beats"),
    Claim("FlexLoRA", "Bai et al., NeurIPS 2024", "mixed ranks beat homogeneous LoRA at the "
          "smallest rank", "bench_ranks", "flexlora", "fedit-r2", "beats"),
    Claim("FLoRA", "Wang et al., NeurIPS 2024", "stacking beats zero-padding (HetLoRA) with "
          "mixed ranks", "bench_ranks", "flora", "hetlora", "beats"),
    Claim("FLoRA", "Wang et al., NeurIPS 2024", "stacking beats homogeneous LoRA at the "
          "smallest rank", "bench_ranks", "flora", "fedit-r2", "beats"),
)
# The label-skew claims are tested on both skew scenarios: bench_skew (5 of 50 clients per round)
# and bench_skew_full (every client every round); the mixed-rank claims on the five rank
# scenarios: bench_ranks (iid), bench_ranks_full (the skew of bench_skew_full), bench_ranks_news
# (iid, 20 Newsgroups, where rank helps), bench_ranks_news_long (the same at twice the
# rounds) and bench_ranks_news_full (every client every round); the DP claims on both DP
# scenarios: bench_dp and bench_dp_head (the task head at one fixed rate; docs/results.md,
# "Benchmark").
SCENARIOS = {"bench_skew": ("bench_skew", "bench_skew_full"),
             "bench_ranks": ("bench_ranks", "bench_ranks_full", "bench_ranks_news",
                             "bench_ranks_news_long", "bench_ranks_news_full"),
             "bench_dp": ("bench_dp", "bench_dp_head")}
CLAIMS = tuple(replace(c, scenario=s) for c in _CLAIMS
               for s in SCENARIOS.get(c.scenario, (c.scenario,)))


def row_name(cell: str) -> str:
    """The row of a final cell: its folder name less the seed suffix."""
    return re.sub(r"_s\d+$", "", cell)


def load(results: Path, scenario: str) -> dict[str, dict[int, dict]]:
    """row -> seed -> the cell's results.csv record (final cells only)."""
    rows: dict[str, dict[int, dict]] = {}
    path = results / scenario / "results.csv"
    if not path.exists():
        return rows
    with path.open() as f:
        for rec in csv.DictReader(f):
            rows.setdefault(row_name(rec["cell"]), {})[int(rec["seed"])] = rec
    return rows


def find(rows: dict[str, dict[int, dict]], name: str) -> dict[int, dict]:
    """A row by its name: exact, else the unique row starting with it (settings suffixes)."""
    if name in rows:
        return rows[name]
    hits = [k for k in rows if k.startswith(name + "_")]
    return rows[hits[0]] if len(hits) == 1 else {}


def verdict(claim: Claim, d: list[float], smaller_uplink: bool) -> str:
    if len(d) < 3:
        return f"not run ({len(d)} paired seeds)"
    m, h = statistics.mean(d), 2 * statistics.stdev(d) / math.sqrt(len(d))
    if claim.kind == "beats":
        if m - h > 0:
            return "holds"
        if m + h < 0:
            return "does not hold (reversed)"
        return "does not hold (no gain)" if m <= 0 else "inconclusive"
    if m + h < -MARGIN:
        return "does not hold"
    if not smaller_uplink:
        return "does not hold (uplink not smaller)"
    return "holds" if m - h > -MARGIN else "inconclusive"


def acc(rec: dict) -> float:
    return float(rec["final_accuracy"])


def describe(claim: Claim, rows: dict[str, dict[int, dict]]) -> tuple[str, str]:
    mine = find(rows, claim.row)
    if claim.other == ZERO_SHOT:
        other = {s: {**r, "final_accuracy": r["initial_accuracy"]} for s, r in mine.items()}
    else:
        other = find(rows, claim.other)
    seeds = sorted(set(mine) & set(other))
    d = [acc(mine[s]) - acc(other[s]) for s in seeds]
    if not seeds:
        return "not run", verdict(claim, d, False)

    def stat(xs: list[float]) -> str:
        return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else (
            f"{xs[0]:.3f}")

    up = [float(mine[s]["bytes_up"]) / max(float(other[s]["bytes_up"]), 1) for s in seeds]
    text = (f"{claim.row} {stat([acc(mine[s]) for s in seeds])} vs {claim.other} "
            f"{stat([acc(other[s]) for s in seeds])}; paired diff {stat(d)} (n = {len(d)})")
    if claim.kind == "matches":
        text += f"; uplink {statistics.mean(up):.3g}x"
    return text, verdict(claim, d, statistics.mean(up) < 1)


def table(results: Path) -> str:
    lines = ["| method | paper | claim | scenario | our result (final test accuracy) | verdict |",
             "|---|---|---|---|---|---|"]
    cache: dict[str, dict] = {}
    for c in CLAIMS:
        rows = cache.setdefault(c.scenario, load(results, c.scenario))
        text, v = describe(c, rows)
        lines.append(f"| {c.method} | {c.paper} | {c.claim} | {c.scenario} | {text} | {v} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=Path("simulations/results"))
    ap.add_argument("--out", type=Path, default=None, help="write the table here (else print)")
    args = ap.parse_args()
    text = table(args.results)
    if args.out:
        args.out.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
