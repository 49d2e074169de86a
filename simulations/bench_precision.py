"""What ``train.precision = bf16`` buys per client step and per evaluation batch on the real
model: the product's own training loop (``fedpeft.core.training.train_steps``) and the task's
evaluation, float32 and bfloat16 autocast alternating in one process on the same batches, one
torch thread by default (what each of the simulation's actors uses):

    python -m simulations.bench_precision --repeats 3 --steps 4
    python -m simulations.bench_precision --config '' --steps 8   # the default MiniLM-L6 job

Each repeat runs both precisions back to back (fp32, bf16, then bf16, fp32 in the next repeat)
from the same adapter and data, so a load spike from other processes hits both alike; the
ratio of medians is the figure to quote. Each arm also records its CPU seconds (process time:
with one torch thread, the compute itself, which other processes' load barely changes).
Writes ``simulations/results/precision/bench_*.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from fedpeft.core.config import load_config
from fedpeft.core.precision import cpu_bf16_flags
from fedpeft.core.training import autocast, client_optimizer, train_steps
from fedpeft.core.workspace import get_workspace, set_torch_threads

CPU = torch.device("cpu")
RESULTS = Path(__file__).parent / "results" / "precision"


def one_arm(workspace, cfg, data, test, precision: str, steps: int, seed: int,
            start: dict) -> dict:
    """``steps`` training steps from the adapter state ``start``, then one pass over ``test``."""
    adapter = workspace.adapter_model(cfg.model.rank)
    adapter.reset_base()
    adapter.load({k: v.clone() for k, v in start.items()})  # the shared model: undo the last arm
    adapter.set_trainable(list(adapter.params))
    optimizer = client_optimizer(adapter, cfg.train, cfg.train.lr or 1e-3)
    cpu = time.process_time()
    result = train_steps(adapter.model, data, steps=steps, batch_size=cfg.train.batch_size,
                         optimizer=optimizer, rng=np.random.default_rng(seed), device=CPU,
                         precision=precision)
    train_cpu = time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    with autocast(precision, CPU):
        ev = workspace.task.evaluate(adapter.model, test, cfg.eval.batch_size, CPU)
    return {"step_s": result.seconds / result.steps, "step_cpu_s": train_cpu / result.steps,
            "train_loss": result.loss, "tokens": result.tokens,
            "eval_s": time.perf_counter() - start, "eval_cpu_s": time.process_time() - cpu,
            "eval_loss": ev.loss, "eval_accuracy": ev.accuracy, "load1": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="simulations/configs/smollm2-rt.toml",
                        help="run config ('' = the default experiment)")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per arm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--partition", type=int, default=0)
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    set_torch_threads(args.threads)
    cfg = load_config(args.config or None)
    workspace = get_workspace(cfg)
    data = workspace.partition(args.partition, cfg.federation.clients)
    test = workspace.test_set(args.eval_examples)
    start = {k: v.detach().clone() for k, v in workspace.adapter_model(cfg.model.rank).state()
             .items()}
    one_arm(workspace, cfg, data, test, "fp32", 1, 99, start)  # warm-up: allocator, kernels
    one_arm(workspace, cfg, data, test, "bf16", 1, 99, start)
    runs: dict[str, list[dict]] = {"fp32": [], "bf16": []}
    for rep in range(args.repeats):
        order = ("fp32", "bf16") if rep % 2 == 0 else ("bf16", "fp32")
        for precision in order:
            row = one_arm(workspace, cfg, data, test, precision, args.steps, rep, start)
            runs[precision].append(row)
            print(f"repeat {rep} {precision}: {row['step_s']:.3f} s/step ({row['step_cpu_s']:.3f}"
                  f" CPU s), eval {row['eval_s']:.2f} s, train loss {row['train_loss']:.4f}, "
                  f"load {row['load1']:.1f}", flush=True)
    keys = ("step_s", "step_cpu_s", "eval_s", "eval_cpu_s")
    median = {p: {k: statistics.median(r[k] for r in rows) for k in keys}
              for p, rows in runs.items()}
    summary = {
        "model": cfg.model.name, "batch_size": cfg.train.batch_size, "steps": args.steps,
        "repeats": args.repeats, "threads": args.threads, "cpu_bf16": list(cpu_bf16_flags()),
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "median": median,
        "speedup": {k: median["fp32"][k] / median["bf16"][k] for k in keys},
        "runs": runs,
    }
    for key in keys:
        print(f"{key}: fp32 {median['fp32'][key]:.3f}, bf16 {median['bf16'][key]:.3f}, "
              f"{summary['speedup'][key]:.2f}x")
    out = Path(args.out) if args.out else RESULTS / f"bench_{cfg.model.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
