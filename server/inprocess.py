"""The in-process transport of the round loop: clients called in this process, one after
another, no Flower and no Ray (what single-process research code does: one model, adapters
swapped per client). Every message is encoded and decoded as on the wire (so bytes are
measured the same way), and each client answers through :func:`fedpeft.client.step.client_step`,
the ClientApp's own code: only the transport differs from a Flower run, so a benchmark against
it measures Flower's overhead and nothing else.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from fedpeft.client.attacks import attack_upload
from fedpeft.client.evaluator import client_evaluate
from fedpeft.client.step import client_step
from fedpeft.strategies import ClientProfile, Method

from fedpeft.core.adapters import AdapterModel
from fedpeft.core.config import FedConfig, load_config
from fedpeft.core.keys import CLIENT_RANK, PARTITION, RANK, ROUND
from fedpeft.core.payload import ClientState, Payload
from fedpeft.core.wire import transmit
from fedpeft.core.workspace import Workspace, default_threads, get_workspace, set_torch_threads

from .client_eval import EvalReply
from .reporting import MetricsLog
from .rounds import Reply, RoundLoop, new_loop, run_rounds
from .secagg import InProcessSecAgg


class InProcessTransport:
    """Clients called in this process, one after another, each with its own client state."""

    def __init__(self, cfg: FedConfig, method: Method, workspace: Workspace) -> None:
        self.cfg, self.method, self.workspace = cfg, method, workspace
        self.states: dict[int, ClientState] = {}
        self.secagg = InProcessSecAgg(cfg, method, self.states)  # [secagg] enabled

    def nodes(self) -> list[int]:
        return list(range(self.cfg.federation.clients))

    def train(self, loop: RoundLoop, rnd: int, attempt: int) -> dict:
        if self.cfg.secagg.enabled:  # four protocol stages instead of one call (server/secagg.py)
            return self.secagg.train(loop, rnd, attempt, self.nodes())
        replies, clients = [], []
        for profile in loop.sample(rnd, attempt, self.nodes()):
            reply, bytes_down, bytes_up = self.train_one(loop, rnd, profile)
            replies.append(reply)
            clients.append({"partition": profile.partition_id, CLIENT_RANK: profile.rank,
                            "bytes_down": bytes_down, "bytes_up": bytes_up})
        stats = loop.collect(rnd, replies)
        return {**stats, "clients_sampled": len(replies), "clients_timed_out": 0,
                "bytes_down": sum(c["bytes_down"] for c in clients),
                "bytes_up": sum(c["bytes_up"] for c in clients), "client_bytes": clients}

    def train_one(self, loop: RoundLoop, rnd: int, profile: ClientProfile
                  ) -> tuple[Reply, int, int]:
        """One client's round: the downlink through the wire, the client's own step, its
        upload through the wire (after an ``[attacks]`` attacker's change, as the ClientApp's
        mod makes it); the reply and the messages' bytes."""
        comp = self.cfg.compression
        state = self.states.setdefault(profile.partition_id, ClientState())
        down, bytes_down = transmit(loop.downlink(profile), filters=comp.down)
        scalars = {**down.scalars, ROUND: rnd, PARTITION: profile.partition_id,
                   RANK: profile.rank}  # what the Flower message adds

        def decode(model: AdapterModel) -> Payload:
            return down

        answer = client_step(self.cfg, self.method, scalars, decode, state, {})
        upload, bytes_up = None, 0  # nothing to send (a spent DP budget, a rank mismatch)
        if answer.payload is not None:
            tensors = attack_upload(self.cfg, profile.partition_id, rnd, answer.payload.tensors,
                                    answer.reference)
            upload, bytes_up = transmit(Payload(tensors, answer.payload.scalars),
                                        filters=comp.up, reference=answer.reference, state=state)
        return (Reply(profile, answer.metrics, upload, fingerprint=answer.fingerprint),
                bytes_down, bytes_up)

    def evaluate(self, loop: RoundLoop, rnd: int,
                 profiles: list[ClientProfile]) -> tuple[list[EvalReply], dict]:
        """Client-side evaluation: each client scores the downlink, as decoded, on its own
        holdout with its own state; a client that fails counts as failed."""
        replies, bytes_down = [], 0
        for profile in profiles:
            down, nbytes = transmit(loop.downlink(profile), filters=self.cfg.compression.down)
            bytes_down += nbytes
            state = self.states.get(profile.partition_id, ClientState())
            try:
                figures = client_evaluate(self.cfg, self.method, self.workspace, down,
                                          partition_id=profile.partition_id, rank=profile.rank,
                                          server_round=rnd, client_state=state)
            except (ValueError, RuntimeError) as exc:
                replies.append(EvalReply(profile, error=str(exc)))
                continue
            replies.append(EvalReply(profile, figures))
        return replies, {"eval_bytes_down": bytes_down}

    def extra_state(self) -> dict:
        return {}

    def restore_extra_state(self, data: dict) -> None:
        return None


def run_inprocess(cfg: FedConfig, out: Path) -> dict:
    """A whole run through the in-process transport, its outputs in ``out``; the summary."""
    set_torch_threads(default_threads())
    workspace = get_workspace(cfg)
    loop = new_loop(cfg, workspace, simulation=True)
    return run_rounds(loop, InProcessTransport(cfg, loop.method, workspace), workspace, out)


def run_plain(config: str | None, overrides: list[str], out: Path | None = None) -> list[dict]:
    """The run's metrics rows (as in ``metrics.jsonl``, bytes per round and per client
    included); outputs go to ``out`` (default: a temporary folder)."""
    cfg = load_config(config, overrides)
    with tempfile.TemporaryDirectory(prefix="fedpeft-plain-") as tmp:
        folder = out or Path(tmp)
        run_inprocess(cfg, folder)
        return MetricsLog.read(folder / "metrics.jsonl")
