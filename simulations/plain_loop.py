"""The yardstick: the same federated workload in one PyTorch process, no Flower and no Ray.

What single-process research code does: one model, adapters swapped per client, clients trained
back to back. The server side is the product's own round loop (``server/rounds.py``): only the
transport differs, so the benchmark measures Flower's overhead and nothing else.

    python simulations/plain_loop.py [CONFIG] --set federation.rounds=5 --out runs/plain
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from fedpeft.client.attacks import attack_upload
from fedpeft.client.trainer import client_round
from fedpeft.server.reporting import MetricsLog
from fedpeft.server.rounds import Reply, RoundLoop, new_loop, run_rounds
from fedpeft.strategies import Method

from fedpeft.core.config import FedConfig, load_config
from fedpeft.core.keys import NUM_EXAMPLES
from fedpeft.core.payload import ClientState
from fedpeft.core.wire import transmit
from fedpeft.core.workspace import Workspace, default_threads, get_workspace, set_torch_threads


class InProcessTransport:
    """Clients called in this process, one after another, each with its own client state."""

    def __init__(self, cfg: FedConfig, method: Method, workspace: Workspace) -> None:
        self.cfg, self.method, self.workspace = cfg, method, workspace
        self.states: dict[int, ClientState] = {}

    def nodes(self) -> list[int]:
        return list(range(self.cfg.federation.clients))

    def train(self, loop: RoundLoop, rnd: int, attempt: int) -> dict:
        replies, clients = [], []
        comp = self.cfg.compression
        for profile in loop.sample(rnd, attempt, self.nodes()):
            state = self.states.setdefault(profile.partition_id, ClientState())
            down, bytes_down = transmit(loop.downlink(profile), filters=comp.down)
            res = client_round(self.cfg, self.method, self.workspace, down,
                               partition_id=profile.partition_id, rank=profile.rank,
                               server_round=rnd, client_state=state)
            res.payload.tensors = attack_upload(self.cfg, profile.partition_id, rnd,
                                                res.payload.tensors, down.tensors)  # [attacks]
            upload, bytes_up = None, 0  # a client whose DP budget is spent sends nothing
            if res.payload.tensors:
                upload, bytes_up = transmit(res.payload, filters=comp.up,
                                            reference=down.tensors, state=state)
            replies.append(Reply(profile, {**res.metrics, NUM_EXAMPLES: res.num_examples},
                                 upload, fingerprint=res.fingerprint))
            clients.append({"partition": profile.partition_id, "rank": profile.rank,
                            "bytes_down": bytes_down, "bytes_up": bytes_up})
        stats = loop.collect(rnd, replies)
        return {**stats, "clients_sampled": len(replies), "clients_timed_out": 0,
                "bytes_down": sum(c["bytes_down"] for c in clients),
                "bytes_up": sum(c["bytes_up"] for c in clients), "client_bytes": clients}

    def extra_state(self) -> dict:
        return {}

    def restore_extra_state(self, data: dict) -> None:
        return None


def run_plain(config: str | None, overrides: list[str], out: Path | None = None) -> list[dict]:
    """The run's metrics rows (as in ``metrics.jsonl``, bytes per round and per client
    included: each message is encoded and decoded as on the wire); outputs go to ``out``
    (default: a temporary folder)."""
    cfg = load_config(config, overrides)
    set_torch_threads(default_threads())
    workspace = get_workspace(cfg)
    loop = new_loop(cfg, workspace, simulation=True)
    transport = InProcessTransport(cfg, loop.method, workspace)
    with tempfile.TemporaryDirectory(prefix="fedpeft-plain-") as tmp:
        folder = out or Path(tmp)
        run_rounds(loop, transport, workspace, folder)
        return MetricsLog.read(folder / "metrics.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    run_plain(args.config, args.overrides, args.out)


if __name__ == "__main__":
    main()
