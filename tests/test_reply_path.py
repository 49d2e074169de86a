"""One reply path: the ClientApp and the in-process transport answer alike (under DP-SGD too),
the server decides on a reply once and only an accepted reply changes what it remembers of a
client, and client-level DP works on the loop's validated uploads (one decode, one state write
per round, Flower's clip and noise)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fedpeft.client import app as client_app
from fedpeft.server.app import FedPeftStrategy
from fedpeft.server.client_dp import flower_dp
from fedpeft.server.inprocess import InProcessTransport, run_plain
from fedpeft.server.rounds import Reply, RoundLoop, new_loop
from fedpeft.strategies import RANK_KEY, ClientProfile, Payload, build_method
from fedpeft.strategies import flora as fl
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.core import wire
from fedpeft.core.config import FedConfig, load_config
from fedpeft.core.keys import (
    BASE_FINGERPRINT,
    CLIENT_S,
    EPSILON,
    NEXT_RANK,
    NUM_EXAMPLES,
    PARTITION,
    RANK,
    RANK_MISMATCH,
    REPLY_INFO,
    ROUND,
    TRAIN_LOSS,
    TRAIN_S,
)
from fedpeft.core.payload import ClientState
from fedpeft.core.wire import (
    CONFIG_RECORD,
    METRICS_RECORD,
    config_record,
    payload_to_records,
    save_client_state,
)
from fedpeft.core.workspace import get_workspace
from tests.helpers import TINY

DP = [*TINY, "privacy.enabled=true", "privacy.epsilon=3", "privacy.delta=1e-5"]
TIMINGS = (TRAIN_S, CLIENT_S)  # wall-clock seconds: the only values two runs cannot share


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for attr in ("_task_id", "_run_id", "_node_id"):  # lets a test build Flower messages
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _through_clientapp(cfg: FedConfig, loop: RoundLoop, profile: ClientProfile, rnd: int,
                       state: ClientState) -> RecordDict:
    """The reply content the real ClientApp sends for ``profile``'s downlink."""
    extra = {ROUND: rnd, PARTITION: profile.partition_id, RANK: profile.rank}
    content = payload_to_records(loop.downlink(profile), extra, filters=cfg.compression.down)
    content[CONFIG_RECORD] = config_record(cfg)
    msg = Message(content=content, dst_node_id=profile.node_id, message_type=MessageType.TRAIN,
                  group_id=str(rnd))
    store = RecordDict()
    save_client_state(store, state)
    ctx = Context(run_id=1, node_id=profile.node_id, node_config={}, state=store, run_config={})
    return client_app.train(msg, ctx).content


def _same_metrics(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    assert {k: v for k, v in a.items() if k not in TIMINGS} == \
        {k: v for k, v in b.items() if k not in TIMINGS}


def test_the_clientapp_and_the_plain_loop_send_the_same_reply_under_dp_sgd() -> None:
    """One seeded round of one client under DP-SGD: the same metrics (redacted alike: no loss),
    the same example count and epsilon, the same decision by the server."""
    cfg = load_config(None, [*DP, 'method.name="ffa-lora"', "train.local_steps=1"])
    workspace = get_workspace(cfg)
    loop = new_loop(cfg, workspace, simulation=True)
    profile = loop.sample(1, 0, list(range(cfg.federation.clients)))[0]
    transport = InProcessTransport(cfg, loop.method, workspace)
    plain, _, _ = transport.train_one(loop, 1, profile)
    content = _through_clientapp(cfg, loop, profile, 1, ClientState())
    flower = dict(content[METRICS_RECORD])
    _same_metrics(flower, dict(plain.metrics))
    assert TRAIN_LOSS not in flower and 0 < flower[EPSILON] <= 3.0
    assert flower[NUM_EXAMPLES] == len(workspace.partition(profile.partition_id,
                                                           cfg.federation.clients))
    decoded = Reply(profile, flower, wire.records_to_payload(
        content, reference=loop.received(profile).tensors),
        fingerprint=content[REPLY_INFO][BASE_FINGERPRINT])
    a, b = loop.decide(1, plain), loop.decide(1, decoded)
    assert (a.count, a.epsilon, a.upload.num_examples) == \
        (b.count, b.epsilon, b.upload.num_examples) == ("clients_ok", flower[EPSILON],
                                                       flower[NUM_EXAMPLES])


def test_a_rank_mismatch_is_answered_alike_by_both_transports() -> None:
    """A client whose method lowered its rank (HetLoRA's pruning, in its state) answers a
    downlink of another rank without training, through either transport, with the same
    reply; the server then sends it its own rank."""
    cfg = load_config(None, [*TINY, 'method.name="hetlora"'])
    workspace = get_workspace(cfg)
    loop = new_loop(cfg, workspace, simulation=True)
    profile = loop.sample(1, 0, list(range(cfg.federation.clients)))[0]
    transport = InProcessTransport(cfg, loop.method, workspace)
    transport.states[profile.partition_id] = ClientState(values={RANK_KEY: 4})
    plain, _, _ = transport.train_one(loop, 1, profile)
    flower = dict(_through_clientapp(cfg, loop, profile, 1,
                                     ClientState(values={RANK_KEY: 4}))[METRICS_RECORD])
    assert flower == dict(plain.metrics) == {NUM_EXAMPLES: 0, NEXT_RANK: 4, RANK_MISMATCH: 1}
    loop.collect(1, [plain])
    assert loop.ranks == {profile.node_id: 4}
    assert loop.sample(2, 0, [profile.node_id])[0].rank == 4


# ---- validate, then apply ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def flora_cfg() -> FedConfig:
    return load_config(None, [*TINY, 'method.name="flora"', "federation.clients=8",
                              "federation.clients_per_round=8"])


def _honest(loop: RoundLoop, profile: ClientProfile, seed: int, epsilon: float = 1.0) -> Reply:
    """A well-formed FLoRA upload: the expected tensors (small values), synced to round 0."""
    spec = loop.method.expected_upload(loop.state, profile)
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: 0.01 * torch.randn(shape, generator=gen) for k, shape in spec.tensors.items()}
    metrics = {NUM_EXAMPLES: 20, NEXT_RANK: profile.rank, EPSILON: epsilon}
    return Reply(profile, metrics, Payload(tensors, {fl.SYNCED: 0}), fingerprint=loop.fingerprint)


def _hostile(loop: RoundLoop, profile: ClientProfile, kind: str) -> Reply:
    """A reply that must be rejected, claiming a new rank and a large epsilon that the server
    would remember if it accepted the reply."""
    reply = _honest(loop, profile, 99, epsilon=50.0)
    reply.metrics = {**reply.metrics, NEXT_RANK: 2}
    payload = reply.payload
    if kind == "fingerprint":
        reply.fingerprint = "0123456789abcdef"
    elif kind == "undecodable":
        reply.payload, reply.problem = None, "undecodable payload: bad manifest"
    elif kind == "shape":
        key = sorted(payload.tensors)[0]
        payload.tensors[key] = payload.tensors[key][:-1].clone()
    elif kind.startswith("count="):
        reply.metrics[NUM_EXAMPLES] = float(kind.removeprefix("count="))
    elif kind == "synced-missing":
        payload.scalars.clear()
    else:  # synced=<value>
        payload.scalars[fl.SYNCED] = {"list": [1], "str": "0", "inf": math.inf, "huge": 1e300,
                                      "future": 5, "half": 0.5}[kind.removeprefix("synced=")]
    return reply


HOSTILE = ["fingerprint", "undecodable", "shape", "count=-3", "count=0.5", "count=1e300",
           "synced-missing", "synced=list", "synced=str", "synced=inf", "synced=huge",
           "synced=future", "synced=half"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_a_rejected_reply_leaves_the_servers_memory_of_its_client_unchanged(
        flora_cfg: FedConfig, kind: str) -> None:
    loop = new_loop(flora_cfg, get_workspace(flora_cfg), simulation=True)
    profiles = loop.sample(1, 0, list(range(flora_cfg.federation.clients)))
    bad = profiles[0]
    before = dict(loop.state.scalars)
    stats = loop.collect(1, [_hostile(loop, bad, kind),
                             *(_honest(loop, p, i) for i, p in enumerate(profiles[1:4]))])
    assert (stats["clients_ok"], stats["clients_rejected"], stats["aggregated"]) == (3, 1, 1)
    assert bad.node_id not in loop.ranks and loop.epsilon == 1.0  # nothing of it remembered
    assert fl.client_key(bad) not in loop.state.scalars  # nor by the method
    assert all(fl.client_key(p) in loop.state.scalars for p in profiles[1:4])
    assert loop.state.scalars[fl.ROUND] == before[fl.ROUND] + 1


def test_an_error_while_judging_one_reply_rejects_that_reply_not_the_round(
        flora_cfg: FedConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = new_loop(flora_cfg, get_workspace(flora_cfg), simulation=True)
    profiles = loop.sample(1, 0, list(range(flora_cfg.federation.clients)))[:3]
    replies = [_honest(loop, p, i) for i, p in enumerate(profiles)]
    real = type(loop.method).expected_upload

    def expected_upload(self, state, profile):
        if profile == profiles[0]:
            raise OverflowError("cannot convert float infinity to integer")
        return real(self, state, profile)

    monkeypatch.setattr(type(loop.method), "expected_upload", expected_upload)
    outcome = loop.decide(1, replies[0])
    assert outcome.count == "clients_rejected" and "OverflowError" in outcome.reason
    stats = loop.collect(1, replies)
    assert (stats["clients_ok"], stats["clients_rejected"], stats["aggregated"]) == (2, 1, 1)


# ---- client-level DP on validated uploads -------------------------------------------------
def _dp_strategy(mode: str, noise: float, per_round: int = 3) -> tuple[FedPeftStrategy, dict, list]:
    cfg = load_config(None, [*TINY, 'method.name="fedit"', f'privacy.client_level="{mode}"',
                             f"privacy.client_noise={noise}", "privacy.client_clip=1.0",
                             f"federation.clients_per_round={per_round}"])
    method = build_method(cfg)
    gen = torch.Generator().manual_seed(3)
    start = {"m.lora_A.weight": torch.randn(4, 50, generator=gen),
             "m.lora_B.weight": torch.randn(60, 4, generator=gen)}
    strategy = FedPeftStrategy(RoundLoop(cfg, method, method.init(start)))
    grid = SimpleNamespace(get_node_ids=lambda: list(range(10, 10 + cfg.federation.clients)))
    nodes = [m.metadata.dst_node_id for m in strategy.configure_train(1, None, None, grid)]
    return strategy, start, nodes


def _message(node: int, tensors: dict, examples: int) -> SimpleNamespace:
    content = payload_to_records(Payload(tensors))
    content[METRICS_RECORD] = MetricRecord({NUM_EXAMPLES: examples})
    return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), content=content,
                           has_error=lambda: False, has_content=lambda: True)


def _moved(start: dict, scale: float, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in start.items()}


def test_client_level_dp_decodes_each_reply_once_and_writes_the_state_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    strategy, start, nodes = _dp_strategy("server-fixed", noise=0.5)
    decodes, writes = [], []
    real_unpack = wire.unpack
    monkeypatch.setattr(wire, "unpack", lambda *a, **k: decodes.append(1) or real_unpack(*a, **k))
    prop = RoundLoop.state
    monkeypatch.setattr(RoundLoop, "state", property(
        prop.fget, lambda self, value: writes.append(1) or prop.fset(self, value)))
    replies = [_message(n, _moved(start, 0.1, i), 10) for i, n in enumerate(nodes)]
    _, stats = strategy.aggregate_train(1, replies)
    assert stats["aggregated"] == 1 and stats["clients_ok"] == 3
    assert len(decodes) == 3 and len(writes) == 1


def test_client_level_dp_is_flowers_clip_and_noise_of_the_mean() -> None:
    """new = G + (1/m) sum_k clip(U_k - G) + N(0, (z C / m)^2), computed here with Flower's own
    helpers from the same numpy seed: the loop's result is those numbers."""
    strategy, start, nodes = _dp_strategy("server-fixed", noise=0.7)
    uploads = [_moved(start, 1.0, 1), _moved(start, 1e-3, 2)]  # clipped; within the bound
    dp = flower_dp()
    keys = list(start)
    clipped = []
    for up in uploads:
        arrays = [up[k].numpy().copy() for k in keys]
        dp.compute_clip_model_update(arrays, [start[k].numpy() for k in keys], 1.0)
        clipped.append(arrays)
    expected = [start[k].double().numpy() + sum(c[i].astype(np.float64) - start[k].numpy()
                                                for c in clipped) / 3
                for i, k in enumerate(keys)]
    np.random.seed(11)
    noise = [np.zeros(start[k].shape, dtype=np.float32) for k in keys]
    dp.add_gaussian_noise_inplace(noise, dp.compute_stdv(0.7, 1.0, 3))
    np.random.seed(11)
    replies = [_message(n, u, 10 ** (i + 1))  # the claimed counts must not matter
               for i, (n, u) in enumerate(zip(nodes[:2], uploads, strict=True))]
    _, stats = strategy.aggregate_train(1, replies)
    assert stats["clients_ok"] == 2 and stats["aggregated"] == 1 and stats["client_epsilon"] > 0
    for i, key in enumerate(keys):
        got = strategy.loop.state.tensors[key].double().numpy()
        assert np.allclose(got, expected[i] + noise[i], atol=1e-5), key
    assert strategy.loop.checkpoint_state(nodes)["dp_releases"] == 1


def test_the_plain_loop_runs_client_level_dp() -> None:
    """Client-level DP is a stage of the round loop, so the in-process transport has it too."""
    rows = run_plain(None, [*TINY, 'privacy.client_level="client-fixed"',
                            "privacy.client_noise=0.5", "privacy.client_clip=5.0"])
    assert [r["aggregated"] for r in rows[1:]] == [1, 1]
    assert 0 < rows[1]["client_epsilon"] < rows[2]["client_epsilon"]

