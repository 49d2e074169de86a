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
    reported_rank,
)
from fedpeft.strategies import Upload, build_method
from fedpeft.strategies.base import CLIENT_TIMINGS

from fedpeft.core.adapters import build_adapter_model
from fedpeft.core.config import ConfigError, load_config
from fedpeft.core.payload import ClientState, Payload
from fedpeft.core.privacy import BUDGET_SPENT
from fedpeft.core.sampling import sample_clients
from fedpeft.core.wire import payload_to_records, serialized_nbytes
from fedpeft.core.workspace import default_threads, get_workspace, set_torch_threads


def run_plain(config: str | None, overrides: list[str], out: Path | None = None,
              log: bool = True, count_bytes: bool = False) -> list[dict]:
    """``count_bytes``: add ``bytes_down``/``bytes_up`` per round and ``client_bytes`` per client,
    the Flower serialisation of each payload's records (the Flower run's messages also carry the
    config record, ~1 KB each)."""
    cfg = load_config(config, overrides)
    set_torch_threads(default_threads())
    method = build_method(cfg)
    ws = get_workspace(cfg)
    # A freshly built adapter, as the ServerApp does: the workspace's cached model may carry the
    # training of an earlier run in this process (experiment scripts run several back to back).
    pristine = build_adapter_model(cfg.model, ws.num_labels, cfg.model.rank)
    state = method.init(pristine.state())
    del pristine
    states: dict[int, ClientState] = {}
    ranks: dict[int, int] = {}  # ranks clients reported (rank pruning)
    epsilon = 0.0
    if cfg.privacy.client_level != "off":
        raise ConfigError("privacy.client_level needs Flower's DP strategy wrappers: use "
                          "`fedpeft simulate` (this loop runs without Flower's strategies)")
    rows = []
    for rnd in range(cfg.federation.rounds + 1):
        start = time.perf_counter()
        row: dict = {"round": rnd}
        if rnd > 0:
            uploads, train_s = [], 0.0
            fed = cfg.federation
            for pid in sample_clients(fed.clients, fed.clients_per_round, fed.seed, rnd):
                profile = client_profile(cfg, pid, reported_rank=ranks.get(pid))
                down = method.downlink(state, profile)
                res = client_round(
                    cfg, method, ws, down, partition_id=pid,
                    rank=profile.rank, server_round=rnd,
                    client_state=states.setdefault(pid, ClientState()),
                )
                train_s += res.metrics["train_s"]
                for key in CLIENT_TIMINGS:  # a method's own client timings (Ferret's)
                    if key in res.metrics:
                        row[key] = row.get(key, 0.0) + res.metrics[key]
                epsilon = max(epsilon, res.metrics.get("epsilon", 0.0))
                if res.metrics.get(BUDGET_SPENT):  # DP budget spent: it did not train
                    row["clients_budget_spent"] = row.get("clients_budget_spent", 0) + 1
                    continue
                ranks[pid] = reported_rank(res.metrics) or profile.rank
                if count_bytes:
                    sizes = {"down": _nbytes(down), "up": _nbytes(res.payload)}
                    row["bytes_down"] = row.get("bytes_down", 0) + sizes["down"]
                    row["bytes_up"] = row.get("bytes_up", 0) + sizes["up"]
                    row.setdefault("client_bytes", []).append(
                        {"partition": pid, "rank": profile.rank, **sizes})
                uploads.append(Upload(profile, res.payload, res.num_examples, res.metrics))
            if uploads:
                state = method.aggregate(state, uploads)
            if cfg.privacy.enabled:
                row["epsilon"] = epsilon  # the largest client epsilon so far
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


def _nbytes(payload: Payload) -> int:
    return serialized_nbytes(payload_to_records(payload))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    run_plain(args.config, args.overrides, args.out)


if __name__ == "__main__":
    main()
