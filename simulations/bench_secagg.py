"""What SecAgg+ costs per round: the protocol alone (fedpeft/core/secagg) on real adapter sizes.

For each model the upload size is the real one (FedIT's: every trainable adapter tensor of the
packaged model at model.rank, built once), and each client's vector is a LoRA-like update. All
clients run in this one process one after another, so "client s" is the mean per client and
stage sum, and "server s" is the server's own computation (requests, checks, unmasking). Bytes
are the fields of the protocol's messages (headers included), per client and round, against a
plain float32 upload. Without SecAgg the server's aggregation is a weighted mean of n float32
vectors (numpy), timed the same way.

    python -m simulations.bench_secagg --models minilm-l6 smollm2-135m --clients 10 100
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fedpeft.core.secagg import SecAggClient, SecAggParams, SecAggServer, respond, run_instance


def adapter_floats(model: str) -> int:
    """The number of floats FedIT uploads for ``model`` at the default config."""
    from fedpeft.core.adapters import build_adapter_model
    from fedpeft.core.config import load_config
    from fedpeft.core.models import infer_task

    cfg = load_config(None, [f'model.name="{model}"'])
    num_labels = 2 if infer_task(cfg.model) == "classification" else 0
    state = build_adapter_model(cfg.model, num_labels).state()
    return int(sum(t.numel() for t in state.values()))


def one_round(n: int, m: int, params: SecAggParams, seed: int, drop: float = 0.0) -> dict:
    """One instance; a ``drop`` share of the clients goes silent at the masked-input stage (the
    server then rebuilds their mask keys and removes their pairwise masks)."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(0, 0.01, m).astype(np.float32)
    ups = {u: (shared + rng.normal(0, 0.004, m).astype(np.float32), float(rng.integers(50, 500)))
           for u in range(1, n + 1)}
    clients = {u: SecAggClient(u, run=1) for u in ups}
    client_s = {}
    silent = set(range(1, round(drop * n) + 1))

    def exchange(stage: str, requests: dict) -> dict:
        t0 = time.perf_counter()
        replies = {u: respond(clients[u], stage, f, lambda u=u: ups[u])
                   for u, f in requests.items()
                   if stage in ("setup", "share_keys") or u not in silent}
        client_s[stage] = (time.perf_counter() - t0) / len(requests)
        return replies

    server = SecAggServer(params, 1, 1, list(ups), m)
    out = run_instance(server, exchange)
    assert out.result is not None, out.aborted
    t0 = time.perf_counter()
    kept = [u for u in ups if u not in silent]
    w = np.array([ups[u][1] for u in kept])
    plain = (w[:, None] * np.stack([ups[u][0] for u in kept])).sum(0) / w.sum()
    plain_s = time.perf_counter() - t0
    assert np.abs(out.result.mean - plain).max() <= out.result.error_bound + 1e-6
    stages = {st.stage: {"client_s": client_s.get(st.stage, 0.0), "server_s": st.server_s,
                         "up_per_client": st.bytes_up / max(st.survivors, 1),
                         "down_per_client": st.bytes_down / max(st.sent, 1)}
              for st in out.stats}
    return {"clients": n, "dropped": len(silent), "floats": m,
            "neighbours": params.neighbours, "threshold": server.t, "bits": params.bits,
            "stages": stages,
            "client_s": sum(s["client_s"] for s in stages.values()),
            "server_s": sum(s["server_s"] for s in stages.values()),
            "up_bytes": sum(s["up_per_client"] for s in stages.values()),
            "down_bytes": sum(s["down_per_client"] for s in stages.values()),
            "plain_up_bytes": 4 * m, "plain_server_s": plain_s,
            "error_bound": out.result.error_bound}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["minilm-l6", "smollm2-135m"])
    ap.add_argument("--clients", nargs="+", type=int, default=[10, 100])
    ap.add_argument("--neighbours", type=int, default=38,
                    help="SecAgg+ degree where clients > neighbours + 1 (else all)")
    ap.add_argument("--bits", type=int, default=40)
    ap.add_argument("--drop", type=float, default=0.0,
                    help="share of clients silent from the masked-input stage on")
    ap.add_argument("--out", default="simulations/results/secagg/bench.json")
    args = ap.parse_args()
    rows = []
    for model in args.models:
        m = adapter_floats(model)
        for n in args.clients:
            params = SecAggParams(neighbours=args.neighbours if n > args.neighbours + 1 else 0,
                                  bits=args.bits)
            row = {"model": model, **one_round(n, m, params, seed=0, drop=args.drop)}
            rows.append(row)
            print(f"{model:14s} n={n:4d} drop={row['dropped']:3d} m={m:8d} "
                  f"k={row['neighbours']:3d} t={row['threshold']:3d} "
                  f"client {row['client_s']:.3f}s server {row['server_s']:.3f}s "
                  f"(plain {row['plain_server_s']:.4f}s) up {row['up_bytes'] / 1e6:.3f} MB "
                  f"(plain {row['plain_up_bytes'] / 1e6:.3f} MB, "
                  f"x{row['up_bytes'] / row['plain_up_bytes']:.2f}) "
                  f"down {row['down_bytes'] / 1e3:.1f} kB", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
