"""Ferret's random-number cost: seconds of one projection and one reconstruction of an update of
the full target's size (10,786,178 floats, MiniLM-L6) for several K and block sizes, on 2 torch
threads. A sweep cannot express this (it times the method's math, not a run).

    python -m simulations.ferret_timings            # prints a markdown table

Recorded in docs/results.md#ferret (and simulations/results/compare_ferret/results.md).
"""

from __future__ import annotations

import argparse
import time

import torch
from fedpeft.strategies.ferret import apply_round, project

from fedpeft.core.workspace import set_torch_threads

FULL_TARGET = 10_786_178
GRID = ((1, 32768), (2, 65536), (4, 131072), (8, 262144), (64, 131072), (32, 1048576))


def timings(total: int, k: int, block_size: int) -> dict[str, float]:
    """Seconds of one projection and one reconstruction of a ``total``-float update."""
    update = torch.randn(total, generator=torch.Generator().manual_seed(0)) * 1e-4
    start = time.perf_counter()
    coefs = project(update, 0, 1, k, block_size)
    projected = time.perf_counter() - start
    start = time.perf_counter()
    apply_round(torch.zeros(total), coefs, 0, 1, block_size, 1.0)
    return {"k": k, "block_size": block_size, "coefficients": coefs.numel(),
            "project_s": projected, "reconstruct_s": time.perf_counter() - start}


def table(rows: list[dict[str, float]]) -> str:
    lines = ["| K | block | coefficients | project s | reconstruct s |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['k']} | {r['block_size']} | {r['coefficients']} | {r['project_s']:.2f} | "
              f"{r['reconstruct_s']:.2f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total", type=int, default=FULL_TARGET, help="floats in the update")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_torch_threads(args.threads)
    print(table([timings(args.total, k, block) for k, block in GRID]))


if __name__ == "__main__":
    main()
