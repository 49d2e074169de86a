"""The yardstick: the same federated workload in one PyTorch process, no Flower and no Ray.

What single-process research code does: one model, adapters swapped per client, clients trained
back to back. Used by the performance benchmark and to pick the default experiment's settings.

    python simulations/plain_loop.py [CONFIG] --set federation.rounds=5 --out runs/plain
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fedpeft.client.trainer import client_round
from fedpeft.server.federation import (
    client_profile,
    eval_due,
    eval_subset,
    evaluate_global,
    sample_clients,
)
from fedpeft.strategies import Upload, build_method

from fedpeft.config import load_config
from fedpeft.payload import ClientState
from fedpeft.runtime import default_threads, get_workspace, set_torch_threads


def run_plain(config: str | None, overrides: list[str], out: Path | None = None,
              log: bool = True) -> list[dict]:
    cfg = load_config(config, overrides)
    set_torch_threads(default_threads())
    method = build_method(cfg)
    ws = get_workspace(cfg)
    state = method.init(ws.adapter_model(cfg.model.rank).state())
    states: dict[int, ClientState] = {}
    rows = []
    for rnd in range(cfg.federation.rounds + 1):
        start = time.perf_counter()
        row: dict = {"round": rnd}
        if rnd > 0:
            uploads, train_s = [], 0.0
            fed = cfg.federation
            for pid in sample_clients(fed.clients, fed.clients_per_round, fed.seed, rnd):
                profile = client_profile(cfg, pid)
                res = client_round(
                    cfg, method, ws, method.downlink(state, profile), partition_id=pid,
                    rank=profile.rank, server_round=rnd,
                    client_state=states.setdefault(pid, ClientState()),
                )
                train_s += res.metrics["train_s"]
                uploads.append(Upload(profile, res.payload, res.num_examples, res.metrics))
            state = method.aggregate(state, uploads)
            row.update(train_s=train_s, round_s=time.perf_counter() - start)
        if eval_due(cfg, rnd):
            ev = evaluate_global(cfg, method, state, ws, eval_subset(cfg, rnd))
            row.update(accuracy=ev.accuracy, loss=ev.loss, eval_s=ev.seconds)
        row["wall_s"] = time.perf_counter() - start
        rows.append(row)
        if log:
            print(json.dumps(row), flush=True)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "plain_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    run_plain(args.config, args.overrides, args.out)


if __name__ == "__main__":
    main()
