"""``train.lr_schedule``: the factor per round, the rates a client trains at (the method's own
default and the head's rate scaled alike), and one real client round under 'cosine' moving the
adapter by exactly that factor times the constant-rate step (tiny-bert)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from fedpeft.client.trainer import client_round, round_rates
from fedpeft.strategies import ClientProfile, build_method

from fedpeft.core.config import ConfigError, load_config
from fedpeft.core.payload import ClientState
from fedpeft.core.training import lr_factor
from fedpeft.core.workspace import get_workspace
from tests.helpers import TINY


def test_constant_keeps_the_rate() -> None:
    assert [lr_factor("constant", t, 5) for t in range(1, 6)] == [1.0] * 5


def test_cosine_falls_from_the_full_rate_and_stays_above_zero() -> None:
    rounds = 10
    factors = [lr_factor("cosine", t, rounds) for t in range(1, rounds + 1)]
    assert factors[0] == 1.0
    assert all(a > b for a, b in itertools.pairwise(factors))
    assert factors[5] == pytest.approx(0.5)  # round 6 of 10: cos(pi / 2) = 0
    assert factors[-1] == pytest.approx((1 + math.cos(math.pi * 0.9)) / 2) and factors[-1] > 0
    for t in range(2, rounds + 1):  # cosine's symmetry about mid-run
        assert factors[t - 1] + lr_factor("cosine", rounds + 2 - t, rounds) == pytest.approx(1.0)
    assert lr_factor("cosine", 0, rounds) == 1.0  # outside the plan: the nearest planned round
    assert lr_factor("cosine", 14, rounds) == factors[-1]
    assert lr_factor("cosine", 1, 1) == 1.0


def test_round_rates_scale_the_methods_default_and_the_head() -> None:
    cfg = load_config(None, [*TINY, 'method.name="ffa-lora"', 'train.lr_schedule="cosine"',
                             "federation.rounds=4", "train.head_lr=0.01"])
    method = build_method(cfg)
    factor = lr_factor("cosine", 3, 4)
    assert factor == pytest.approx(0.5)
    round_cfg, lr = round_rates(cfg, method, 3)
    assert lr == pytest.approx(0.02 * factor)  # train.lr = 0: FFA-LoRA's default, scaled
    assert round_cfg.train.head_lr == pytest.approx(0.01 * factor)
    assert cfg.train.head_lr == 0.01  # the run's config is left as it was
    first_cfg, first_lr = round_rates(cfg, method, 1)
    assert first_lr == pytest.approx(0.02) and first_cfg.train.head_lr == 0.01
    constant = load_config(None, [*TINY, "federation.rounds=4", "train.lr=0.003"])
    assert round_rates(constant, build_method(constant), 3)[1] == pytest.approx(0.003)


def test_an_unknown_schedule_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"train\.lr_schedule.*constant.*cosine"):
        load_config(None, [*TINY, 'train.lr_schedule="linear"'])


def test_a_cosine_round_moves_the_adapter_by_the_factor() -> None:
    """One SGD step from the same downlink on the same batch and dropout seed: the update under
    'cosine' in round 3 of 4 is 0.5 x the update at the constant rate, tensor by tensor."""
    common = [*TINY, "federation.rounds=4", "train.local_steps=1", 'train.optimizer="sgd"',
              "train.lr=0.05", "train.head_lr=0.1", 'train.precision="fp32"']
    cfgs = {s: load_config(None, [*common, f'train.lr_schedule="{s}"'])
            for s in ("constant", "cosine")}
    workspace = get_workspace(cfgs["constant"])
    rank = cfgs["constant"].model.rank
    state = build_method(cfgs["constant"]).init(workspace.adapter_model(rank).state())
    deltas = {}
    for schedule, cfg in cfgs.items():  # the same start: the shared adapter moves in a round
        method = build_method(cfg)
        down = method.downlink(state, ClientProfile(0, rank))
        result = client_round(cfg, method, workspace, down, partition_id=0, rank=rank,
                              server_round=3, client_state=ClientState())
        deltas[schedule] = {k: result.payload.tensors[k] - state.tensors[k]
                            for k in state.tensors}
    moved = [k for k, d in deltas["constant"].items() if d.abs().max() > 0]
    assert any("lora_B" in k for k in moved)  # the adapter moved
    assert any("lora_" not in k for k in moved)  # and the head, at its own rate
    for key, step in deltas["constant"].items():
        torch.testing.assert_close(deltas["cosine"][key], 0.5 * step, rtol=1e-4, atol=1e-7)
