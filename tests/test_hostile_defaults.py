"""`fedpeft server` assumes hostile devices by default: claimed example counts are capped, every
upload's update norm is bounded (for every method), a reported rank is bounded by the layer
sizes, and the user can opt out of each. Replies go through the server's real reply path."""

from __future__ import annotations

import random

import pytest
import torch
from fedpeft.client import app as client_app
from fedpeft.server.app import FedPeftStrategy
from fedpeft.server.federation import rank_limit
from fedpeft.server.rounds import Reply, RoundLoop, new_loop
from fedpeft.strategies import ClientProfile, build_method
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedpeft.core.config import FedConfig
from fedpeft.core.payload import Payload
from fedpeft.core.wire import METRICS_RECORD, payload_to_records, records_to_payload
from fedpeft.core.workspace import get_workspace
from fedpeft.deploy.coordinator import ServerOptions, deployment_config, hostility_line
from fedpeft.deploy.processes import DEPLOY_MAX_UPDATE_NORM
from tests.helpers import TINY

KEYS = {"m.lora_A.weight": (4, 16), "m.lora_B.weight": (16, 4), "head.weight": (2, 16)}


def _deployed(*sets: str, method: str = "fedit") -> FedConfig:
    """The config `fedpeft server` would run (three devices, insecure test setup)."""
    opts = ServerOptions(overrides=[*TINY, f'method.name="{method}"', *sets], clients=3,
                         insecure=True)
    return deployment_config(opts, 0)


def test_the_deployment_caps_counts_and_bounds_update_norms_unless_the_user_opts_out() -> None:
    cfg = _deployed()
    fed, train = cfg.federation, cfg.train
    assert fed.max_examples_per_client == train.local_steps * train.batch_size
    assert fed.max_update_norm == DEPLOY_MAX_UPDATE_NORM
    line = hostility_line(cfg)
    assert f"capped at {fed.max_examples_per_client}" in line and "norm bound 1000" in line
    opted_out = _deployed("federation.max_update_norm=0", "federation.max_examples_per_client=0")
    assert (opted_out.federation.max_update_norm, opted_out.federation.max_examples_per_client) \
        == (0, 0)
    assert "UNCAPPED" in hostility_line(opted_out) and "NO update-norm" in hostility_line(opted_out)
    uniform = _deployed('federation.weighting="uniform"')
    assert uniform.federation.max_examples_per_client == 0  # uniform needs no cap
    assert "uniform weights" in hostility_line(uniform)
    assert _deployed(method="flora").federation.max_update_norm == DEPLOY_MAX_UPDATE_NORM


def _loop(cfg: FedConfig) -> RoundLoop:
    gen = torch.Generator().manual_seed(0)
    start = {k: torch.randn(s, generator=gen) * 0.01 for k, s in KEYS.items()}
    method = build_method(cfg)
    return RoundLoop(cfg, method, method.init(start))


def _upload(loop: RoundLoop, partition: int, move: float, examples: float) -> Reply:
    """A client whose update is ``move`` on every entry (clients that roughly agree)."""
    profile = ClientProfile(partition, 8, node_id=partition)
    sent = loop.downlink(profile).tensors
    tensors = {k: v + move for k, v in sent.items()}
    return Reply(profile, {"num-examples": examples, "train_s": 1.0}, Payload(tensors))


def _global_move(cfg: FedConfig, liar_examples: float) -> float:
    loop = _loop(cfg)
    before = loop.state.tensors["m.lora_B.weight"].clone()
    honest = [_upload(loop, p, 0.001 * (p + 1), 40) for p in range(2)]
    loop.collect(1, [*honest, _upload(loop, 2, 0.05, liar_examples)])
    return float((loop.state.tensors["m.lora_B.weight"] - before).abs().max())


def test_a_liar_claiming_1e15_examples_moves_the_global_update_no_more_than_a_capped_client(
) -> None:
    cfg = _deployed()
    cap = cfg.federation.max_examples_per_client
    liar, capped = _global_move(cfg, 1e15), _global_move(cfg, cap)
    assert liar <= capped * (1 + 1e-9)
    uncapped = _deployed("federation.max_examples_per_client=0")
    assert _global_move(uncapped, 1e15) == pytest.approx(0.05, rel=1e-4)  # the liar's own move


def test_norm_clip_cannot_be_steered_by_a_claimed_count() -> None:
    cfg = _deployed('federation.aggregator="norm-clip"')
    assert _global_move(cfg, 1e15) == pytest.approx(_global_move(cfg, 1), rel=1e-9)


def test_a_reported_rank_is_bounded_by_the_layer_sizes() -> None:
    cfg = _deployed(method="hetlora")
    loop = new_loop(cfg, get_workspace(cfg), simulation=False)
    widest = loop.rank_limit
    assert widest == rank_limit(get_workspace(cfg).adapter_model(cfg.model.rank).state())
    assert 8 <= widest < 4096
    for claim, kept in ((widest + 1, None), (4096, None), (widest, widest), (4, 4)):
        profile = ClientProfile(1, 8, node_id=7)
        loop.collect(1, [Reply(profile, {"num-examples": 0, "next_rank": claim,
                                         "rank_mismatch": 1})])
        assert loop.ranks.get(7) == kept
        loop.ranks.clear()


# --- a x1e6 upload under FLoRA and Ferret, with the deployment's defaults ---


class Grid:
    def __init__(self, n: int) -> None:
        self.nodes = list(range(1, n + 1))

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _scaled(msg: Message, honest: Message, factor: float) -> Message:
    """The honest reply's tensors times ``factor``, packed again with its scalars and metrics."""
    payload = records_to_payload(honest.content)
    scaled = Payload({k: v * factor for k, v in payload.tensors.items()}, payload.scalars)
    content = payload_to_records(scaled)
    content[METRICS_RECORD] = MetricRecord(dict(honest.content[METRICS_RECORD]))
    for name in ("fedpeft.info",):
        if name in honest.content:
            content[name] = ConfigRecord(dict(honest.content[name]))
    reply = Message(content=content, reply_to=msg)
    reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
    return reply


@pytest.mark.usefixtures("in_process")
@pytest.mark.parametrize("method", ["flora", "ferret"])
def test_a_scaled_upload_never_reaches_another_clients_downlink(method: str) -> None:
    extra = ["method.k=3", "method.block_size=512"] if method == "ferret" else []
    cfg = _deployed("federation.clients_per_round=3", "federation.min_replies=1",
                    "train.local_steps=1", "train.batch_size=4", *extra, method=method)
    loop = new_loop(cfg, get_workspace(cfg), simulation=False)
    strategy, grid = FedPeftStrategy(loop), Grid(3)
    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(),
                           run_config={}) for n in grid.nodes}
    rng = random.Random(0)
    for rnd in (1, 2, 3):
        messages = list(strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid))
        for msg in messages:  # what every client receives: never the hostile scale
            down = records_to_payload(msg.content)
            assert all(float(t.abs().max()) < 1e3 for t in down.tensors.values()
                       if t.is_floating_point() and t.numel())
        replies = [client_app.app(m, contexts[m.metadata.dst_node_id]) for m in messages]
        for msg, reply in zip(messages, replies, strict=True):
            reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
        hostile = rng.randrange(3)
        replies[hostile] = _scaled(messages[hostile], replies[hostile], 1e6)
        _, stats = strategy.aggregate_train(rnd, replies)
        assert (stats["clients_ok"], stats["clients_rejected"], stats["aggregated"]) == (2, 1, 1)
