"""train.precision: how 'auto' resolves, that bf16 autocast really engages in training and
evaluation, and that parameters, gradients and optimizer state stay float32."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft.core import precision
from fedpeft.core.config import ConfigError, load_config
from fedpeft.core.precision import check_precision, pin_precision, precisions, resolve_precision
from fedpeft.core.training import autocast, client_optimizer, train_steps
from fedpeft.core.workspace import get_workspace
from tests.helpers import TINY

CPU = torch.device("cpu")


@pytest.fixture
def bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ("avx512_bf16",))


@pytest.fixture
def plain_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ())


def test_cpuinfo_flags_parsed(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_bf16 avx512_bf16 amx_tile\n"
                    "processor\t: 1\nflags\t\t: fpu sse2 avx512f amx_bf16 avx512_bf16\n")
    assert precision.cpu_bf16_flags(str(info)) == ("avx512_bf16", "amx_bf16")
    plain = tmp_path / "plain"
    plain.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    assert precision.cpu_bf16_flags(str(plain)) == ()
    assert precision.cpu_bf16_flags(str(tmp_path / "absent")) == ()


def test_auto_is_bf16_on_a_bf16_cpu(bf16_cpu: None) -> None:
    assert resolve_precision("auto", CPU) == "bf16"
    assert resolve_precision("auto", "cpu") == "bf16"
    assert resolve_precision("fp32", CPU) == "fp32"
    assert check_precision("bf16", "cpu") == "bf16"


def test_auto_is_fp32_without_native_bf16(plain_cpu: None) -> None:
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"  # a run's recorded choice is kept
    with pytest.raises(ValueError, match="no native bfloat16"):
        check_precision("bf16", "cpu")
    with pytest.raises(ValueError, match="expected one of"):
        resolve_precision("fp16", CPU)


def test_cli_pins_auto_and_refuses_emulated_bf16(plain_cpu: None) -> None:
    cfg = load_config(None, TINY)
    assert cfg.train.precision == "auto"
    pinned, line = pin_precision(cfg)
    assert pinned.train.precision == "fp32" and "fp32 (auto" in line
    assert cfg.train.precision == "auto"  # frozen: the caller's config is not changed
    forced = load_config(None, [*TINY, 'train.precision="bf16"'])
    with pytest.raises(ConfigError, match=r"train\.precision = 'bf16'.*no native bfloat16"):
        pin_precision(forced)


def test_pin_and_summary_fields(bf16_cpu: None) -> None:
    cfg = load_config(None, TINY)
    pinned, line = pin_precision(cfg)
    assert "bf16 (auto: native" in line and pinned.train.precision == "bf16"
    assert load_config(None, [*TINY, 'train.precision="bf16"']).train.precision == "bf16"
    assert precisions(pinned) == {"precision": "bf16", "train_precision": "bf16"}
    dp = load_config(None, [*TINY, "privacy.enabled=true"])
    _, line = pin_precision(dp)
    assert "DP-SGD training float32" in line
    assert precisions(dp) == {"precision": "bf16", "train_precision": "fp32"}
    with pytest.raises(ConfigError, match=r"train\.precision"):
        load_config(None, [*TINY, 'train.precision="fp16"'])


def _adapter() -> tuple[object, object]:
    cfg = load_config(None, TINY)
    workspace = get_workspace(cfg)
    adapter = workspace.adapter_model(cfg.model.rank)
    adapter.reset_base()
    adapter.set_trainable(list(adapter.params))
    return cfg, workspace, adapter


def _linear_dtypes(model: torch.nn.Module, run) -> set[torch.dtype]:
    """Output dtypes of every Linear layer while ``run`` runs."""
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
             for m in model.modules() if type(m) is torch.nn.Linear]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("mode, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_training_autocast_engages_and_state_stays_fp32(mode: str, dtype: torch.dtype) -> None:
    cfg, workspace, adapter = _adapter()
    data = workspace.partition(0, cfg.federation.clients)
    optimizer = client_optimizer(adapter, cfg.train, 1e-2)
    before = {k: p.detach().clone() for k, p in adapter.params.items()}

    def run() -> None:
        train_steps(adapter.model, data, steps=2, batch_size=8, optimizer=optimizer,
                    rng=np.random.default_rng(0), device=CPU, precision=mode)

    assert _linear_dtypes(adapter.model, run) == {dtype}
    changed = [k for k, p in adapter.params.items() if not torch.equal(before[k], p.detach())]
    assert changed  # it trained
    for key, p in adapter.params.items():
        assert p.dtype == torch.float32, key
        assert p.grad is None or p.grad.dtype == torch.float32, key
    states = [s for s in optimizer.state.values() if s]
    assert states
    for state in states:
        assert state["exp_avg"].dtype == torch.float32
        assert state["exp_avg_sq"].dtype == torch.float32


def test_evaluation_under_bf16_scores_like_fp32() -> None:
    _cfg, workspace, adapter = _adapter()
    test = workspace.test_set(100)
    scores = {}
    for mode, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        def run(mode: str = mode) -> None:
            with autocast(mode, CPU):
                scores[mode] = workspace.task.evaluate(adapter.model, test, 32, CPU)

        assert _linear_dtypes(adapter.model, run) == {dtype}
    assert scores["bf16"].examples == scores["fp32"].examples
    assert abs(scores["bf16"].loss - scores["fp32"].loss) < 0.02 * abs(scores["fp32"].loss) + 1e-3
    assert abs(scores["bf16"].accuracy - scores["fp32"].accuracy) <= 0.05


@pytest.mark.parametrize("dp", [False, True])
def test_client_round_follows_precision_except_under_dp_sgd(dp: bool) -> None:
    """A client round under train.precision = 'bf16' trains in bfloat16, but DP-SGD's stays
    float32: under autocast Opacus' per-example gradients (and their clipped sum) come out in
    bfloat16."""
    from fedpeft.client.trainer import client_round
    from fedpeft.strategies import ClientProfile, build_method

    from fedpeft.core.payload import ClientState

    extra = ['train.precision="bf16"', *(["privacy.enabled=true", "privacy.epsilon=8"] if dp
                                         else [])]
    cfg = load_config(None, [*TINY, *extra])
    method = build_method(cfg)
    workspace = get_workspace(cfg)
    state = method.init(workspace.adapter_model(cfg.model.rank).state())
    down = method.downlink(state, ClientProfile(0, cfg.model.rank))
    adapter = workspace.adapter_model(cfg.model.rank)
    results = []

    def run() -> None:
        results.append(client_round(cfg, method, workspace, down, partition_id=0,
                                    rank=cfg.model.rank, server_round=1,
                                    client_state=ClientState()))

    assert _linear_dtypes(adapter.model, run) == {torch.float32 if dp else torch.bfloat16}
    assert results[0].payload.tensors
    assert all(t.dtype == torch.float32 for t in results[0].payload.tensors.values())


def test_frozen_weights_held_in_bf16_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Holding the frozen Linear weights in bfloat16 for a block gives bit-identical results to
    autocast's own per-call cast, restores the float32 weights after, and remakes a copy when
    its float32 weight changed (a base merge)."""
    from fedpeft.core import training

    cfg, workspace, adapter = _adapter()
    data = workspace.partition(0, cfg.federation.clients)
    start = adapter.state()
    frozen = [m for m in adapter.model.modules()
              if type(m) is torch.nn.Linear and not m.weight.requires_grad]
    assert frozen

    def run() -> tuple[dict, float]:
        adapter.load({k: v.clone() for k, v in start.items()})
        optimizer = client_optimizer(adapter, cfg.train, 1e-2)
        torch.manual_seed(0)
        train_steps(adapter.model, data, steps=2, batch_size=8, optimizer=optimizer,
                    rng=np.random.default_rng(0), device=CPU, precision="bf16")
        with autocast("bf16", CPU, adapter.model):
            loss = workspace.task.evaluate(adapter.model, workspace.test_set(50), 32, CPU).loss
        return adapter.state(), loss

    held, held_loss = run()
    assert all(m.weight.dtype == torch.float32 for m in frozen)  # restored
    monkeypatch.setattr(training, "bf16_frozen_weights", lambda model: contextlib.nullcontext())
    plain, plain_loss = run()
    assert held_loss == plain_loss
    assert all(torch.equal(held[k], plain[k]) for k in held)
    monkeypatch.undo()
    layer, weight = frozen[0], frozen[0].weight
    with training.bf16_frozen_weights(adapter.model):
        first = layer.weight.detach().clone()
        assert first.dtype == torch.bfloat16 and weight.dtype == torch.float32
    assert layer.weight is weight
    with torch.no_grad():
        weight.mul_(2.0)  # the float32 base changes in place
    with training.bf16_frozen_weights(adapter.model):
        assert torch.equal(layer.weight.detach(), (first.float() * 2).to(torch.bfloat16))
    with torch.no_grad():
        weight.div_(2.0)
