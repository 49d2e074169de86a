"""Secure aggregation as the train phase of a round (``[secagg] enabled``; SecAgg+ in
``fedpeft.core.secagg``, docs/secure-aggregation.md).

Instead of one train message per client, an attempt runs four request/reply stages over the
Flower Grid (message types ``train.secagg_setup``, ``..._share_keys``, ``..._masked_input``,
``..._unmask``), each waited on with ``federation.round_timeout_s``. Only the masked-input request
carries the downlink and starts local training; its reply is the masked vector and nothing else
(no metrics, no example count). The server ends with the example-weighted mean of the survivors'
clipped updates, and the method aggregates one upload holding it. Too few survivors at any stage:
no partial result, the attempt counts as not aggregated (retried or skipped by the loop).

With ``privacy.client_level`` the noise is distributed (``fedpeft.core.secagg.dp``): each client
clips its update to ``client_clip`` and adds its share of the noise before masking, the server
aborts below ``privacy.min_survivors`` masked inputs, and it unmasks only the noised sum S of
the K survivors. The new state is the method's aggregate of one upload G + S / m (m sampled, a
dropped client counting as a zero update, as ``client_dp.py`` averages): no server-side noise
and no un-noised sum anywhere. Every decoded sum counts as a release for ``client_epsilon``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

from fedpeft.client.secagg import client_policy, masked_upload
from fedpeft.strategies import ClientProfile, ClientState, Method, Upload
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log

from fedpeft.core.config import FedConfig
from fedpeft.core.keys import CLIENT_RANK, PARTITION, RANK, ROUND
from fedpeft.core.payload import Payload
from fedpeft.core.secagg import (
    STAGES,
    RoundAborted,
    SecAggClient,
    SecAggParams,
    SecAggRefusal,
    SecAggServer,
    respond,
    run_instance,
)
from fedpeft.core.secagg.dp import noise_for
from fedpeft.core.secagg.layout import layout_digest, layout_size, unflatten_update
from fedpeft.core.secagg.messages import LAYOUT_KEY, SECAGG_RECORD, field_bytes
from fedpeft.core.wire import (
    CONFIG_RECORD,
    SCALARS,
    payload_to_records,
    serialized_nbytes,
    transmit,
)

from .client_dp import CLIENT_EPSILON
from .rounds import RoundLoop
from .validation import all_finite

STAGE_TYPES = {s: f"{MessageType.TRAIN}.secagg_{s}" for s in STAGES}

SendReceive = Callable[[Any, list[Message], float | None], list[Message]]


def secagg_params(cfg: FedConfig) -> SecAggParams:
    """The instance's settings; with ``privacy.client_level`` the clients' distributed noise."""
    sa, noise = cfg.secagg, noise_for(cfg)
    dp = {} if noise is None else {"noise_clip": noise.clip, "noise_std": noise.std,
                                   "min_survivors": noise.min_survivors}
    return SecAggParams(threshold=sa.threshold, neighbours=sa.neighbours, clip=sa.clip_range,
                        bits=sa.bits, max_weight=sa.max_weight, **dp)


@dataclass
class Outbox:
    """One stage's requests for a transport to deliver: node -> (profile, protocol fields);
    ``digest``: the vector layout's, sent with the downlink; byte counters to add to."""

    stage: str
    rnd: int
    requests: dict[int, tuple[ClientProfile, dict]]
    digest: str
    down: dict[int, int]
    up: dict[int, int]


Deliver = Callable[[RoundLoop, Outbox], dict[int, "dict | None"]]


def secure_train(loop: RoundLoop, rnd: int, attempt: int, nodes: list[int], run_id: int,
                 deliver: Deliver) -> dict:
    """One attempt of a round through SecAgg+; ``deliver`` carries each stage's requests and
    returns the replies' fields (None or absent: no usable reply). The round's stats."""
    profiles = loop.sample(rnd, attempt, nodes)
    by_node = {p.node_id: p for p in profiles}
    first = min(profiles, key=lambda p: p.partition_id)
    shapes = dict(loop.method.expected_upload(loop.state, first).tensors)
    try:
        server = SecAggServer(secagg_params(loop.cfg), run_id, rnd, list(by_node),
                              layout_size(shapes))
    except RoundAborted as exc:  # too few clients sampled for the threshold
        log(WARNING, "round %d: %s; no partial result is used", rnd, exc)
        return {"secagg": True, "secagg_aborted_stage": exc.stage, "aggregated": 0,
                "clients_sampled": len(profiles), "clients_ok": 0, "clients_failed": 0,
                "clients_rejected": 0, "clients_timed_out": 0, "bytes_down": 0, "bytes_up": 0}
    down, up = dict.fromkeys(by_node, 0), dict.fromkeys(by_node, 0)
    digest = layout_digest(shapes)

    def exchange(stage: str, requests: dict[int, dict]) -> dict[int, dict | None]:
        box = Outbox(stage, rnd, {u: (by_node[u], f) for u, f in requests.items()}, digest,
                     down, up)
        return {u: r for u, r in deliver(loop, box).items() if u in requests}

    start = time.perf_counter()
    outcome = run_instance(server, exchange)
    stats = {**outcome.row(), "secagg_s": time.perf_counter() - start}
    for node, why in outcome.rejected.items():
        log(WARNING, "round %d: secagg: client %d's reply not used (%s)", rnd,
            by_node[node].partition_id, why)
    aggregated = False
    if outcome.aborted is not None:
        log(WARNING, "round %d: %s; no partial result is used", rnd, outcome.aborted)
    elif outcome.result is not None:
        aggregated = _aggregate(loop, rnd, first, shapes, outcome.result)
        stats["secagg_error_bound"] = outcome.result.error_bound
    if loop.client_dp is not None:
        stats[CLIENT_EPSILON] = _count_release(loop, outcome)
    ok = outcome.result.survivors if aggregated and outcome.result is not None else 0
    rejected = len(set(outcome.rejected) - (server.u3 if aggregated else set()))
    return {**stats, "bytes_down": sum(down.values()), "bytes_up": sum(up.values()),
            "clients_sampled": len(profiles), "clients_ok": ok, "clients_rejected": rejected,
            "clients_failed": len(profiles) - ok - rejected, "clients_timed_out": 0,
            "aggregated": int(aggregated),
            "client_bytes": [{"partition": by_node[n].partition_id, CLIENT_RANK: by_node[n].rank,
                              "bytes_down": down[n], "bytes_up": up[n]}
                             for n in sorted(by_node, key=lambda n: by_node[n].partition_id)]}


def _count_release(loop: RoundLoop, outcome: Any) -> float:
    """Client-level DP: a noised sum the server decoded is a release, aggregated or not (an
    abort in the unmask stage may have revealed it; one before reveals no sum). The client-level
    epsilon so far."""
    assert loop.client_dp is not None
    revealed = outcome.result is not None or (
        outcome.aborted is not None and outcome.aborted.stage == "unmask")
    loop.client_dp.releases += int(revealed)
    return loop.client_dp.epsilon()


class SecAggPhase:
    """The Flower transport's SecAgg+ round: one Message per request over the Grid."""

    def __init__(self, grid: Any, send: SendReceive, timeout_s: float | None,
                 config: ConfigRecord | None) -> None:
        self.grid, self.send, self.timeout_s, self.config = grid, send, timeout_s, config

    def train(self, loop: RoundLoop, rnd: int, attempt: int) -> dict:
        run_id = int(getattr(getattr(self.grid, "run", None), "run_id", 0) or 0)
        return secure_train(loop, rnd, attempt, sorted(self.grid.get_node_ids()), run_id,
                            self.deliver)

    def deliver(self, loop: RoundLoop, box: Outbox) -> dict[int, dict | None]:
        msgs = [self._message(loop, box, profile, fields)
                for profile, fields in box.requests.values()]
        for m in msgs:
            box.down[m.metadata.dst_node_id] += serialized_nbytes(m.content)
        return self._replies(self.send(self.grid, msgs, self.timeout_s), box)

    def _message(self, loop: RoundLoop, box: Outbox, profile: ClientProfile,
                 fields: dict) -> Message:
        extra = {ROUND: box.rnd, PARTITION: profile.partition_id, RANK: profile.rank}
        if box.stage == "masked_input":  # the downlink travels here, and training starts
            content = payload_to_records(loop.downlink(profile),
                                         {**extra, LAYOUT_KEY: box.digest},
                                         filters=loop.cfg.compression.down)
        else:
            content = RecordDict({SCALARS: ConfigRecord(extra)})
        content[SECAGG_RECORD] = ConfigRecord(fields)
        if self.config is not None:
            content[CONFIG_RECORD] = self.config
        return Message(content=content, dst_node_id=profile.node_id,
                       message_type=STAGE_TYPES[box.stage], group_id=str(box.rnd))

    @staticmethod
    def _replies(replies: list[Message], box: Outbox) -> dict[int, dict | None]:
        """One record per asked node; an error reply or a reply without the record counts as
        no reply (a dropout at this stage)."""
        out: dict[int, dict | None] = {}
        for r in replies:
            node = r.metadata.src_node_id
            if node not in box.requests or node in out:
                continue
            if r.has_error():
                out[node] = None
                continue
            box.up[node] += serialized_nbytes(r.content)
            record = r.content.get(SECAGG_RECORD)
            out[node] = dict(record) if isinstance(record, ConfigRecord) else None
        return out


class InProcessSecAgg:
    """The in-process transport's SecAgg+ round: each client's protocol state and method state
    kept here, its handler called directly; bytes are the protocol fields' and the downlink's."""

    def __init__(self, cfg: FedConfig, method: Method, states: dict[int, ClientState]) -> None:
        self.cfg, self.method, self.states = cfg, method, states
        self.clients: dict[int, SecAggClient] = {}

    def train(self, loop: RoundLoop, rnd: int, attempt: int, nodes: list[int]) -> dict:
        return secure_train(loop, rnd, attempt, nodes, 0, self.deliver)

    def deliver(self, loop: RoundLoop, box: Outbox) -> dict[int, dict | None]:
        out: dict[int, dict | None] = {}
        for node, (profile, fields) in box.requests.items():
            client = self.clients.setdefault(profile.partition_id,
                                             SecAggClient(node, 0, client_policy(self.cfg)))
            box.down[node] += _nbytes(fields)
            try:
                out[node] = respond(client, box.stage, fields,
                                    lambda p=profile: self._upload(loop, box, p))
            except (SecAggRefusal, ValueError, RuntimeError) as exc:
                log(WARNING, "round %d: secagg: client %d: %s", box.rnd, profile.partition_id,
                    exc)
                out[node] = None
                continue
            box.up[node] += _nbytes(out[node])
        return out

    def _upload(self, loop: RoundLoop, box: Outbox, profile: ClientProfile) -> tuple:
        down, nbytes = transmit(loop.downlink(profile), filters=self.cfg.compression.down)
        box.down[profile.node_id] += nbytes
        scalars = {**down.scalars, ROUND: box.rnd, PARTITION: profile.partition_id,
                   RANK: profile.rank, LAYOUT_KEY: box.digest}
        state = self.states.setdefault(profile.partition_id, ClientState())
        return masked_upload(self.cfg, self.method, scalars, lambda model: down, state, {}, "")


def _nbytes(fields: dict | None) -> int:
    """A record's protocol payload bytes (ints 8, bytes and strings their length)."""
    return sum(field_bytes(v) for v in (fields or {}).values())


def _aggregate(loop: RoundLoop, rnd: int, first: ClientProfile, shapes: dict,
               result: Any) -> bool:
    """The method's aggregate of one upload: the survivors' weighted mean."""
    if result.survivors < loop.cfg.federation.min_replies:
        log(WARNING, "round %d: secagg summed %d clients < federation.min_replies = %d; not "
            "aggregated", rnd, result.survivors, loop.cfg.federation.min_replies)
        return False
    reference = loop.received(first).tensors
    if loop.client_dp is not None:  # the clients' noised sum over the sampled count
        total = result.mean * result.survivors  # the unmasked noisy sum (weights all 1)
        noised = unflatten_update(total / loop.client_dp.sampled, reference, shapes)
        agg = loop.method.aggregate(loop.state, [Upload(first, Payload(noised), 1, {})])
        log(INFO, "round %d: secagg summed %d clients' clipped and noised updates (unit "
            "weights: client-level DP ignores federation.weighting), divided by the %d sampled",
            rnd, result.survivors, loop.client_dp.sampled)
    else:
        mean = unflatten_update(result.mean, reference, shapes)
        upload = Upload(first, Payload(mean), result.total_weight, {})
        agg = loop.method.aggregate(loop.state, [upload])
    if not all_finite(agg.state.tensors):
        log(WARNING, "round %d: the secure aggregate is not finite; state kept", rnd)
        return False
    loop.state = agg.state
    log(INFO, "round %d: secagg summed %d clients (weight %d)", rnd, result.survivors,
        result.total_weight)
    return True
