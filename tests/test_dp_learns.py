"""What the optimiser needs under DP-SGD (issue 15): gradient accumulation over micro-batches of one
Poisson batch (same gradient, same clipping, same accounting as one physical batch), a learning
rate for the task head, SGD momentum, their refusals, and the DP sweep file (tiny-bert)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import create_accountant
from opacus.optimizers import DPOptimizer

from fedpeft.core import privacy
from fedpeft.core.adapters import AdapterModel
from fedpeft.core.config import ConfigError, FedConfig, load_config
from fedpeft.core.payload import ClientState
from fedpeft.core.training import client_optimizer, make_optimizer, micro_batches, train_steps
from fedpeft.core.workspace import Workspace, get_workspace
from fedpeft.run.sweep import expand, load_sweep
from tests.helpers import TINY

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the (largest|smallest) alpha",
                                        "ignore:Full backward hook is firing")
DP = [*TINY, "privacy.enabled=true", "privacy.epsilon=8", "privacy.delta=1e-5"]
CPU = torch.device("cpu")
SWEEP = Path(__file__).resolve().parents[1] / "simulations" / "sweeps" / "dp.toml"


def _cfg(*extra: str) -> FedConfig:
    return load_config(None, [*DP, *extra])


@pytest.fixture(scope="module")
def ws() -> Workspace:
    return get_workspace(_cfg())


@pytest.fixture
def adapter(ws: Workspace) -> Iterator[AdapterModel]:
    """The shared tiny-bert adapter with fixed random tensors (every tensor gets a gradient),
    fully trainable, dropout off (two passes over a batch are identical); restored after."""
    model = ws.adapter_model(8)
    initial = model.state()
    dropouts = [m for m in model.model.modules() if isinstance(m, torch.nn.Dropout)]
    rates = [m.p for m in dropouts]
    gen = torch.Generator().manual_seed(0)
    model.load({k: (0.01 * torch.randn(p.shape, generator=gen) if ".lora_B." in k
                    else torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
                for k, p in model.params.items()})
    model.set_trainable(None)
    for m in dropouts:
        m.p = 0.0
    yield model
    model.load(initial)
    for m, rate in zip(dropouts, rates, strict=True):
        m.p = rate


def _data(cfg: FedConfig):
    return get_workspace(cfg).partition(0, cfg.federation.clients)


def _dp_update(adapter: AdapterModel, indices: np.ndarray, *, accumulate: int, clip: float,
               lora_clip: float = 0.0, noise: float = 0.0, expected: int = 0,
               ) -> tuple[dict[str, torch.Tensor], float | None]:
    """The gradient one DP step (noiseless by default) handed to its optimizer (``p.grad`` at
    ``step()``), and the loss it reported; the adapter is restored after. ``lora_clip``: the
    LoRA factors clipped apart from the head (group-wise clipping)."""
    params = {k: adapter.params[k] for k in adapter.trainable_keys()}
    before = {k: p.detach().clone() for k, p in params.items()}
    dp_opt = DPOptimizer(make_optimizer(list(params.values()), "sgd", 1.0, 0.0),
                         noise_multiplier=noise, max_grad_norm=clip,
                         expected_batch_size=expected or len(indices))
    priv = _cfg(f"privacy.max_grad_norm={clip}", f"privacy.lora_max_grad_norm={lora_clip}").privacy
    groups = privacy.ClipGroups.of(adapter, params, priv)
    with privacy.per_sample_hooks(adapter.model):
        loss = privacy.dp_step(adapter.model, _data(_cfg()), indices, params, dp_opt, CPU,
                               accumulate=accumulate, groups=groups)
        assert all(p.grad_sample is None for p in params.values())  # freed per micro-batch
        grad = {k: p.grad.detach().clone() for k, p in params.items()}
    adapter.load(before, strict=False)
    return grad, loss


# ---- accumulation ---------------------------------------------------------------------------
def test_accumulated_noiseless_unclipped_dp_gradient_is_the_logical_batch_gradient(
        adapter: AdapterModel) -> None:
    """10 examples in 3 micro-batches (4, 3, 3), no noise, a clipping bound that never binds:
    the step applies the plain mean gradient of all 10 and reports their mean loss."""
    indices = np.arange(10)
    adapter.model.train()
    adapter.model.zero_grad(set_to_none=True)
    plain_loss = adapter.model(**_data(_cfg()).batch(indices)).loss
    plain_loss.backward()
    params = {k: adapter.params[k] for k in adapter.trainable_keys()}
    plain = {k: p.grad.detach().clone() for k, p in params.items()}
    adapter.model.zero_grad(set_to_none=True)
    grad, loss = _dp_update(adapter, indices, accumulate=3, clip=1e9)
    for key in plain:
        assert torch.allclose(grad[key], plain[key], rtol=1e-4, atol=1e-8), key
    assert loss == pytest.approx(float(plain_loss), rel=1e-5)


def test_accumulation_clips_per_example_like_one_batch(adapter: AdapterModel) -> None:
    """With a clipping bound that binds for every example, splitting the batch changes
    nothing: clipping is per example, the sum and the division by the logical batch are kept."""
    indices = np.arange(9)
    one, _ = _dp_update(adapter, indices, accumulate=1, clip=1e-3)
    split, _ = _dp_update(adapter, indices, accumulate=4, clip=1e-3)
    unclipped, _ = _dp_update(adapter, indices, accumulate=1, clip=1e9)
    for key in one:
        assert torch.allclose(split[key], one[key], rtol=1e-4, atol=1e-10), key
    norm = torch.sqrt(sum((g ** 2).sum() for g in one.values()))
    assert norm <= 1e-3 * (1 + 1e-4)  # mean of 9 vectors of norm <= C
    assert not torch.allclose(one[next(iter(one))], unclipped[next(iter(one))])  # it did clip


# ---- group-wise clipping --------------------------------------------------------------------
def _norm(grads: dict[str, torch.Tensor], keys: list[str]) -> float:
    return float(torch.sqrt(sum((grads[k] ** 2).sum() for k in keys)))


def test_group_clipping_that_never_binds_is_the_plain_gradient(adapter: AdapterModel) -> None:
    """No noise and group norms that never bind: the scaling in and out cancels exactly."""
    indices = np.arange(8)
    flat, _ = _dp_update(adapter, indices, accumulate=2, clip=1e9)
    grouped, _ = _dp_update(adapter, indices, accumulate=2, clip=1e9, lora_clip=1e9)
    for key in flat:
        assert torch.allclose(grouped[key], flat[key], rtol=1e-4, atol=1e-10), key


def test_group_clipping_bounds_lora_without_touching_the_head(adapter: AdapterModel) -> None:
    """A LoRA norm that binds for every example clips LoRA's mean gradient to it, and the head's
    gradient stays the plain one: one group's clipping does not drag the other down, as flat
    clipping at the same small norm does."""
    indices = np.arange(8)
    lora = [k for k in adapter.trainable_keys() if k not in adapter.head_keys]
    head = [k for k in adapter.trainable_keys() if k in adapter.head_keys]
    assert lora and head
    plain, _ = _dp_update(adapter, indices, accumulate=1, clip=1e9)
    grouped, _ = _dp_update(adapter, indices, accumulate=2, clip=1e9, lora_clip=1e-4)
    flat, _ = _dp_update(adapter, indices, accumulate=1, clip=1e-4)
    assert _norm(plain, lora) > 1e-3  # so 1e-4 binds
    assert _norm(grouped, lora) <= 1e-4 * (1 + 1e-4)
    for key in head:
        assert torch.allclose(grouped[key], plain[key], rtol=1e-4, atol=1e-10), key
    assert _norm(flat, head) < 1e-3 * _norm(plain, head)
    one, _ = _dp_update(adapter, indices[:1], accumulate=1, clip=1e9, lora_clip=1e-4)
    assert _norm(one, lora) == pytest.approx(1e-4, rel=1e-3)  # one example: clipped to C_lora


def test_group_noise_scales_with_each_groups_norm(adapter: AdapterModel) -> None:
    """An empty Poisson batch is noise only: each group's noise has std sigma C_g sqrt(G) / B
    (G = 2 groups), and the two groups' noises differ by the ratio of their norms."""
    sigma, head_clip, lora_clip, expected = 1.0, 2.0, 0.01, 4
    grads, loss = _dp_update(adapter, np.array([], dtype=int), accumulate=1, clip=head_clip,
                             lora_clip=lora_clip, noise=sigma, expected=expected)
    assert loss is None
    lora = torch.cat([grads[k].flatten() for k in grads if k not in adapter.head_keys])
    head = torch.cat([grads[k].flatten() for k in grads if k in adapter.head_keys])
    assert lora.numel() > 1000 and head.numel() > 50
    want = sigma * 2 ** 0.5 / expected
    assert float(lora.std()) == pytest.approx(want * lora_clip, rel=0.1)
    assert float(head.std()) == pytest.approx(want * head_clip, rel=0.3)


def test_group_clipping_keeps_sigma_and_epsilon(adapter: AdapterModel) -> None:
    """Group-wise clipping is post-processing of the same Gaussian mechanism: dp_train plans the
    same sigma and spends the same epsilon as with one clipping norm."""
    runs = []
    for extra in ([], ["privacy.lora_max_grad_norm=0.05"]):
        cfg = _cfg("train.batch_size=8", "train.local_steps=2", *extra)
        result, metrics = privacy.dp_train(adapter, _data(cfg), cfg=cfg, lr=0.01, device=CPU,
                                           client_state=ClientState())
        assert result is not None and result.steps == 2
        runs.append(metrics)
    assert runs[0] == runs[1]


@pytest.mark.parametrize("value", ["nan", "-0.1", "inf"])
def test_lora_max_grad_norm_refuses_bad_values(value: str) -> None:
    with pytest.raises(ConfigError, match="lora_max_grad_norm"):
        _cfg(f"privacy.lora_max_grad_norm={value}")


def test_accumulation_keeps_the_logical_sample_rate_and_steps(adapter: AdapterModel) -> None:
    """The accountant sees q = batch_size / n and local_steps steps whatever train.accumulate
    is: epsilon with 4 micro-batches equals Opacus's epsilon of local_steps steps at the
    logical batch (and the physical-batch rate would give a different one)."""
    cfg1 = _cfg("train.batch_size=16", "train.local_steps=3")
    cfg4 = _cfg("train.batch_size=16", "train.local_steps=3", "train.accumulate=4")
    n = len(_data(cfg1))
    state1, state4 = ClientState(), ClientState()
    r1, m1 = privacy.dp_train(adapter, _data(cfg1), cfg=cfg1, lr=0.01, device=CPU,
                              client_state=state1)
    r4, m4 = privacy.dp_train(adapter, _data(cfg4), cfg=cfg4, lr=0.01, device=CPU,
                              client_state=state4)
    assert r1 is not None and r4 is not None and r4.steps == 3
    assert m4["sample_rate"] == m1["sample_rate"] == pytest.approx(16 / n)
    assert m4["noise_multiplier"] == m1["noise_multiplier"]
    q, steps = 16 / n, cfg4.federation.rounds * 3
    sigma = privacy.noise_multiplier(cfg4.privacy, q, steps)
    acc = create_accountant(mechanism="rdp")
    for _ in range(3):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    assert m4["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert m4["epsilon"] == m1["epsilon"]
    assert privacy.load_history(state4, "rdp") == [(sigma, q, 3)]
    micro = create_accountant(mechanism="rdp")
    for _ in range(12):
        micro.step(noise_multiplier=sigma, sample_rate=q / 4)
    assert micro.get_epsilon(delta=1e-5) != pytest.approx(m4["epsilon"], rel=1e-3)


def test_accumulation_without_dp_takes_the_same_step(adapter: AdapterModel) -> None:
    """train_steps with 3 micro-batches of a batch of 10 takes the same SGD step as with one."""
    params = {k: adapter.params[k] for k in adapter.trainable_keys()}
    before = adapter.state()
    after = []
    for k in (1, 3):
        adapter.load(before)
        opt = make_optimizer(list(params.values()), "sgd", 0.5, 0.0)
        result = train_steps(adapter.model, _data(_cfg()), steps=1, batch_size=10, optimizer=opt,
                             rng=np.random.default_rng(0), device=CPU, accumulate=k,
                             precision="fp32")  # bfloat16 rounds each micro-batch differently
        assert result.examples == 10 and result.steps == 1
        after.append((adapter.state(), result.loss))
    assert after[1][1] == pytest.approx(after[0][1], rel=1e-5)
    moved = [k for k in params if not torch.equal(before[k], after[0][0][k])]
    assert moved
    for key in params:
        assert torch.allclose(after[1][0][key], after[0][0][key], rtol=1e-5, atol=1e-7), key


def test_micro_batches_group_similar_lengths_and_keep_every_example() -> None:
    """The accumulated batch is split by length (less padding: each micro-batch pads to its own
    longest example), and is still exactly the sampled batch."""
    data = _data(_cfg())
    indices = np.random.default_rng(0).choice(len(data), size=min(64, len(data)), replace=False)
    assert len(set(data.lengths(indices).tolist())) > 4  # real sentences vary in length
    chunks = micro_batches(data, indices, 4)
    assert sorted(np.concatenate(chunks).tolist()) == sorted(indices.tolist())
    assert [len(c) for c in chunks] == [len(c) for c in np.array_split(indices, 4)]
    widths = [data.lengths(c) for c in chunks]
    assert all(a.max() <= b.min() for a, b in itertools.pairwise(widths))
    padded = sum(len(c) * int(data.lengths(c).max()) for c in chunks)
    unsorted = sum(len(c) * int(data.lengths(c).max()) for c in np.array_split(indices, 4))
    assert padded < unsorted
    assert [c.tolist() for c in micro_batches(data, indices, 1)] == [indices.tolist()]


# ---- learning rate per group, momentum ------------------------------------------------------
def test_head_lr_puts_the_head_in_its_own_group(adapter: AdapterModel) -> None:
    cfg = _cfg('train.optimizer="sgd"', "train.momentum=0.9", "train.head_lr=0.5")
    opt = client_optimizer(adapter, cfg.train, 0.01)
    head = {id(adapter.params[k]) for k in adapter.head_keys}
    assert head and len(head) < len(adapter.trainable_keys())
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert by_lr[0.5] == head
    assert not by_lr[0.01] & head and len(by_lr[0.01]) == len(adapter.trainable_keys()) - len(head)
    assert isinstance(opt, torch.optim.SGD)
    assert all(g["momentum"] == 0.9 for g in opt.param_groups)
    default = client_optimizer(adapter, _cfg().train, 0.01)
    assert [g["lr"] for g in default.param_groups] == [0.01, 0.01]


def test_dp_train_uses_head_lr(adapter: AdapterModel) -> None:
    """Under DP-SGD too: body rate 0 and head rate 0.5, so only the head moves (and the guard
    that every trainable tensor changes after the first step says so)."""
    cfg = _cfg('train.optimizer="sgd"', "train.head_lr=0.5", "train.local_steps=1")
    before = adapter.state()
    with pytest.raises(privacy.PrivacyError, match="unchanged"):  # the body did not move
        privacy.dp_train(adapter, _data(cfg), cfg=cfg, lr=0.0, device=CPU,
                         client_state=ClientState())
    moved = {k for k, p in adapter.params.items() if not torch.equal(before[k], p.detach())}
    assert moved == set(adapter.head_keys)


@pytest.mark.parametrize(("sets", "message"), [
    (["train.momentum=0.9"], "applies to train.optimizer = 'sgd' only"),
    (['train.optimizer="sgd"', "train.momentum=1.0"], "train.momentum"),
    (["train.batch_size=4", "train.accumulate=8"], "exceeds train.batch_size"),
    (["train.accumulate=0"], "train.accumulate"),
])
def test_refusals(sets: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg(*sets)


# ---- the sweep file --------------------------------------------------------------------------
def test_dp_sweep_is_the_documented_grid() -> None:
    """fedit and ffa-lora x epsilon {1, 3, 8, no DP} x seeds [0, 1], every cell a valid config
    in the documented setting (few clients, all sampled, large batches, mean pooling)."""
    sweep = load_sweep(SWEEP)
    cells = expand(sweep)
    assert sorted(sweep.methods) == ["fedit", "ffa-lora"] and sweep.seeds == [0, 1]
    assert len(cells) == 16
    budgets = {c.config.privacy.epsilon if c.config.privacy.enabled else None for c in cells}
    assert budgets == {1.0, 3.0, 8.0, None}
    for cell in cells:
        cfg = cell.config
        assert cfg.federation.clients == cfg.federation.clients_per_round <= 5
        assert cfg.train.batch_size >= 256 and cfg.model.pooling == "mean"
        assert cfg.data.partitioner == "iid"


def test_dp_lr_controls_are_dp_toml_at_the_other_methods_learning_rate() -> None:
    """dp_lr.toml's cells are dp.toml's cells of seed 0 (epsilon 8, or no DP) with one change:
    the learning rate is the other method's default (so the controls cannot drift from the
    curve)."""
    import dataclasses

    import strategies  # noqa: F401  (registers the methods)
    from strategies.base import METHODS

    def budget(cfg: FedConfig) -> float | None:
        return cfg.privacy.epsilon if cfg.privacy.enabled else None

    curve = {(c.config.method.name, c.config.federation.seed, budget(c.config)): c.config
             for c in expand(load_sweep(SWEEP))}
    controls = expand(load_sweep(SWEEP.with_name("dp_lr.toml")))
    assert sorted((c.config.method.name, str(budget(c.config))) for c in controls) == [
        ("fedit", "8.0"), ("fedit", "None"), ("ffa-lora", "8.0")]
    other = {"fedit": "ffa-lora", "ffa-lora": "fedit"}
    for cell in controls:
        cfg = cell.config
        assert cfg.train.lr == METHODS[other[cfg.method.name]].default_lr
        assert cfg.train.lr != METHODS[cfg.method.name].default_lr
        twin = curve[(cfg.method.name, cfg.federation.seed, budget(cfg))]
        assert dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=0.0)) == twin
