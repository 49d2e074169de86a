"""Hostile replies through the real round loop (``server/rounds.py``): claimed example counts
are bounded, malformed metrics are a per-client rejection, and a fuzzer's replies never raise
and never put garbage into the global state."""

from __future__ import annotations

import math
import random

import pytest
import torch
from fedpeft.server.rounds import Reply, RoundLoop
from fedpeft.strategies import ClientProfile, build_method

from fedpeft.core.config import load_config
from fedpeft.core.payload import Payload

KEYS = {"m.lora_A.weight": (4, 16), "m.lora_B.weight": (16, 4), "head.weight": (2, 16)}


def _loop(*sets: str) -> RoundLoop:
    cfg = load_config(None, ['method.name="fedit"', "federation.clients=6",
                             "federation.clients_per_round=6", "federation.min_replies=1", *sets])
    gen = torch.Generator().manual_seed(0)
    start = {k: torch.randn(s, generator=gen) * 0.01 for k, s in KEYS.items()}
    method = build_method(cfg)
    return RoundLoop(cfg, method, method.init(start))


def _honest(loop: RoundLoop, partition: int, value: float, examples: float = 10) -> Reply:
    """A client whose every tensor moved to ``value`` (roughly agreeing clients: values near
    each other)."""
    sent = loop.downlink(ClientProfile(partition, 8))
    tensors = {k: torch.full_like(v, value) for k, v in sent.tensors.items()}
    return Reply(ClientProfile(partition, 8, node_id=partition),
                 {"num-examples": examples, "train_s": 1.0, "train_loss": 0.5}, Payload(tensors))


def _mean_value(loop: RoundLoop) -> float:
    return float(loop.state.tensors["m.lora_B.weight"].mean())


def test_a_client_claiming_a_billion_examples_does_not_dominate() -> None:
    # today's behaviour (no bound): the liar's value wins the weighted mean
    loop = _loop()
    loop.collect(1, [_honest(loop, 0, 0.0), _honest(loop, 1, 0.0), _honest(loop, 2, 1000.0, 1e9)])
    assert _mean_value(loop) == pytest.approx(1000.0, rel=1e-3)
    bounded = _loop("federation.max_examples_per_client=10")
    bounded.collect(1, [_honest(bounded, 0, 0.0), _honest(bounded, 1, 0.0),
                        _honest(bounded, 2, 1000.0, 1e9)])
    assert _mean_value(bounded) == pytest.approx(1000.0 / 3, rel=1e-5)
    uniform = _loop('federation.weighting="uniform"')
    uniform.collect(1, [_honest(uniform, 0, 0.0, 90), _honest(uniform, 1, 0.0, 5),
                        _honest(uniform, 2, 1000.0, 1e9)])
    assert _mean_value(uniform) == pytest.approx(1000.0 / 3, rel=1e-5)


def test_in_simulation_a_claim_is_capped_at_the_partitions_real_size() -> None:
    loop = _loop()
    loop.example_cap = {0: 10, 1: 10, 2: 10}.__getitem__  # what new_loop(simulation) installs
    loop.collect(1, [_honest(loop, 0, 0.0), _honest(loop, 1, 0.0), _honest(loop, 2, 1000.0, 1e9)])
    assert _mean_value(loop) == pytest.approx(1000.0 / 3, rel=1e-5)


@pytest.mark.parametrize("bad", [[1.0, 2.0], "1.5", float("nan"), float("inf"), 1e300, None,
                                 {"a": 1}])
def test_a_malformed_metric_is_a_rejection_not_a_crash(bad: object) -> None:
    loop = _loop()
    hostile = _honest(loop, 2, 1000.0)
    hostile.metrics = {**hostile.metrics, "train_s": bad}
    stats = loop.collect(1, [_honest(loop, 0, 0.1), _honest(loop, 1, 0.3), hostile])
    assert (stats["clients_ok"], stats["clients_rejected"], stats["aggregated"]) == (2, 1, 1)
    assert _mean_value(loop) == pytest.approx(0.2, rel=1e-5)
    assert math.isfinite(stats["train_s"])


def _random_value(rng: random.Random) -> object:
    return rng.choice([
        rng.uniform(-1e6, 1e6), rng.randint(-10**20, 10**20), float("nan"), float("inf"),
        -float("inf"), [rng.random() for _ in range(rng.randint(0, 3))], "x" * rng.randint(0, 9),
        None, True, b"\x00\x01", 1e308, -0.0, {"k": 1},
    ])


def _random_tensors(rng: random.Random, loop: RoundLoop) -> dict:
    sent = loop.downlink(ClientProfile(0, 8)).tensors
    out = {}
    for key, value in sent.items():
        kind = rng.random()
        if kind < 0.1:
            continue  # missing key
        shape = tuple(value.shape)
        if kind < 0.2:
            shape = (shape[0] + rng.randint(1, 3), *shape[1:])  # wrong shape
        dtype = rng.choice([torch.float32, torch.float32, torch.float64, torch.int64,
                            torch.float16])
        tensor = (torch.randn(shape) * rng.choice([1e-3, 1.0, 1e30])).to(dtype) \
            if dtype.is_floating_point else torch.randint(0, 9, shape)
        if dtype.is_floating_point and rng.random() < 0.2:
            tensor.view(-1)[0] = rng.choice([float("nan"), float("inf")])
        out[key] = tensor
    if rng.random() < 0.2:
        out["extra.key"] = torch.zeros(3)
    return out


def test_fuzz_hostile_replies_never_raise_and_never_aggregate_garbage() -> None:
    rng = random.Random(1234)
    loop = _loop("federation.max_update_norm=1000")
    for rnd in range(1, 301):
        replies = [_honest(loop, 0, 0.01 * rng.random())]  # one honest client every round
        for partition in range(1, rng.randint(2, 6)):
            metrics = {rng.choice(["num-examples", "train_s", "epsilon", "next_rank",
                                   "rank_mismatch", "budget_spent", "zz" * rng.randint(0, 40)]):
                       _random_value(rng) for _ in range(rng.randint(0, 6))}
            if rng.random() < 0.7:
                metrics.setdefault("num-examples", rng.choice([1, 10, 0, -5, 2.5, 1e12]))
            payload = Payload(_random_tensors(rng, loop)) if rng.random() < 0.9 else None
            replies.append(Reply(ClientProfile(partition, 8, node_id=partition), metrics,
                                 payload))
        rng.shuffle(replies)
        stats = loop.collect(rnd, replies)
        assert stats["clients_ok"] + stats["clients_rejected"] + stats["clients_resized"] \
            + stats["clients_budget_spent"] + stats["clients_failed"] == len(replies)
        for tensor in loop.state.tensors.values():
            assert torch.isfinite(tensor).all() and tensor.dtype == torch.float32
            assert float(tensor.abs().max()) < 1e3  # only honest-sized values were averaged
