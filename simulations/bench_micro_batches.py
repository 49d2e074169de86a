"""What grouping micro-batches by length saves: one accumulated batch's forward + backward.

``train.accumulate = k`` splits each (Poisson) batch into k micro-batches, and each pads to its
own longest example. ``fedpeft.core.training.micro_batches`` sorts the batch by length before
splitting; this measures that against a split in sampled order, on the real model and data
(MiniLM-L6 with LoRA, a Rotten Tomatoes client of the DP sweep's iid split), with Opacus'
per-example hooks on as under DP-SGD, alternating the two orders in one process:

    python -m simulations.bench_micro_batches --batch 1024 --accumulate 8 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from fedpeft.core.config import load_config
from fedpeft.core.privacy import per_sample_hooks
from fedpeft.core.training import micro_batches
from fedpeft.core.workspace import get_workspace


def padded_tokens(data, chunks: list[np.ndarray]) -> int:
    return int(sum(len(c) * data.lengths(c).max() for c in chunks))


def run_batch(model: torch.nn.Module, data, chunks: list[np.ndarray]) -> float:
    start = time.perf_counter()
    for chunk in chunks:
        model(**data.batch(chunk)).loss.backward()
        for p in model.parameters():
            p.grad, p.__dict__["grad_sample"] = None, None
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--accumulate", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config(None, ["federation.clients=3", "federation.clients_per_round=3",
                                'data.partitioner="iid"'])
    ws = get_workspace(cfg)
    data = ws.partition(0, cfg.federation.clients)
    adapter = ws.adapter_model(cfg.model.rank)
    adapter.set_trainable(None)
    model = adapter.model.train()
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {"sampled order": [], "by length": []}
    tokens: dict[str, list[int]] = {"sampled order": [], "by length": []}
    with per_sample_hooks(model):
        for _ in range(args.repeats):
            indices = rng.choice(len(data), size=min(args.batch, len(data)), replace=False)
            for name, chunks in (
                    ("sampled order", np.array_split(indices, args.accumulate)),
                    ("by length", micro_batches(data, indices, args.accumulate))):
                tokens[name].append(padded_tokens(data, chunks))
                times[name].append(run_batch(model, data, chunks))
    real = int(data.lengths(np.arange(len(data))).mean() * args.batch)
    print(f"batch {args.batch} in {args.accumulate} micro-batches, {args.repeats} batches each, "
          f"threads {torch.get_num_threads()}; real tokens per batch ~{real}")
    print("| order | padded tokens per batch | seconds per batch (median) |")
    print("|---|---:|---:|")
    for name in times:
        print(f"| {name} | {statistics.mean(tokens[name]):.0f} | "
              f"{statistics.median(times[name]):.2f} |")
    ratio = statistics.median(times["sampled order"]) / statistics.median(times["by length"])
    print(f"speed-up of grouping by length: {ratio:.2f}x")


if __name__ == "__main__":
    main()
