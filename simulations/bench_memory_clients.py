"""Peak memory of a ``fedpeft simulate`` process tree against the number of virtual clients: the
default experiment (MiniLM-L6, 10 clients per round) at each client count, an iid split (the
movie split has 508 movies, fewer than 1,000 clients), a few rounds, evaluation only at round 0
and the end. Memory is sampled from ``/proc`` over the whole tree (``simulations/benchmark.py``'s
sampler: summed PSS and RSS), one run at a time:

    python -m simulations.bench_memory_clients --clients 100 1000 --rounds 3

Writes ``simulations/results/precision/memory_clients.json``; the figure to quote is the peak
PSS at the largest count over that at the smallest.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from simulations.benchmark import run_simulation

RESULTS = Path(__file__).parent / "results" / "precision"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", dest="extra", action="append", default=[])
    parser.add_argument("--work", type=Path, default=Path("runs/memory-clients"))
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()
    extra = ['data.partitioner="iid"', *args.extra]
    rows = {}
    for clients in args.clients:
        result = run_simulation(clients, args.rounds, extra, args.work, args.timeout)
        keep = {k: v for k, v in result.items() if k.startswith(("peak", "startup", "round"))}
        rows[clients] = keep
        print(f"{clients} clients: {json.dumps(keep, default=str)[:400]}", flush=True)
    low, high = min(rows), max(rows)
    pss = {c: r.get("peak_pss_mib") for c, r in rows.items()}
    out = {"overrides": extra, "rounds": args.rounds, "runs": rows,
           "pss_ratio": (pss[high] / pss[low]) if pss[low] and pss[high] else None}
    print(f"peak PSS MiB: {pss}; {high} / {low} clients: {out['pss_ratio']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory_clients.json").write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
