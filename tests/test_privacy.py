"""Differential privacy: DP-SGD accounting against Opacus, state across rounds, the Opacus + peft
guards, refusals, client-level DP with Flower's wrappers, and end-to-end runs (tiny-bert)."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fedpeft.client.trainer import client_round
from fedpeft.server.app import FedPeftStrategy
from fedpeft.server.inprocess import run_plain
from fedpeft.server.rounds import RoundLoop
from fedpeft.server.validation import check_upload
from fedpeft.strategies import METHODS, ClientProfile, Method, Payload, build_method
from fedpeft.strategies.base import check_privacy
from flwr.app import MetricRecord, RecordDict
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedpeft.core import privacy
from fedpeft.core.adapters import AdapterModel
from fedpeft.core.config import ConfigError, FedConfig, load_config
from fedpeft.core.payload import ClientState, update_norm
from fedpeft.core.training import make_optimizer, train_steps
from fedpeft.core.wire import load_client_state, payload_to_records, save_client_state
from fedpeft.core.workspace import Workspace, get_workspace
from tests.helpers import TINY

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the (largest|smallest) alpha")
DP = [*TINY, "privacy.enabled=true", "privacy.epsilon=3", "privacy.delta=1e-5"]
CPU = torch.device("cpu")


def _cfg(*extra: str) -> FedConfig:
    return load_config(None, [*DP, *extra])


@pytest.fixture(scope="module")
def ws() -> Workspace:
    return get_workspace(_cfg())


_INITIAL: dict[str, torch.Tensor] = {}


@pytest.fixture
def adapter(ws: Workspace) -> AdapterModel:
    """The workspace's shared tiny-bert adapter (the one every virtual client of a worker
    uses), reset to its initial state and fully trainable, with a small random B so that
    every tensor has a gradient."""
    model = ws.adapter_model(8)
    if not _INITIAL:
        _INITIAL.update(model.state())
    model.load(_INITIAL)
    gen = torch.Generator().manual_seed(0)
    model.load({k: 0.01 * torch.randn(p.shape, generator=gen)
                for k, p in model.params.items() if ".lora_B." in k}, strict=False)
    model.set_trainable(None)
    return model


def _train(adapter: AdapterModel, cfg: FedConfig, state: ClientState, lr: float = 0.01):
    return privacy.dp_train(adapter, _data(cfg), cfg=cfg, lr=lr, device=CPU, client_state=state)


def _data(cfg: FedConfig):
    return get_workspace(cfg).partition(0, cfg.federation.clients)


@functools.lru_cache
def _sigma(epsilon: float, delta: float, q: float, steps: int, accountant: str) -> float:
    return get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q,
                                steps=steps, accountant=accountant)


def _opacus_epsilon(cfg: FedConfig, n: int, steps_done: int) -> float:
    """Independently: sigma from the planned run, then Opacus's accountant stepped as DP-SGD
    steps it."""
    priv = cfg.privacy
    q = cfg.train.batch_size / n
    sigma = _sigma(priv.epsilon, priv.delta, q, cfg.federation.rounds * cfg.train.local_steps,
                   priv.accountant)
    acc = create_accountant(mechanism=priv.accountant)
    for _ in range(steps_done):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=priv.delta)


def _no_opacus_left(model: torch.nn.Module) -> bool:
    params_clean = all(not hasattr(p, attr) for p in model.parameters()
                       for attr in ("grad_sample", "_forward_counter", "summed_grad"))
    hooks_clean = all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    return params_clean and hooks_clean and not hasattr(model, "autograd_grad_sample_hooks")


# ---- accounting -----------------------------------------------------------------------------
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_reported_epsilon_equals_opacus_accountant(adapter: AdapterModel,
                                                   accountant: str) -> None:
    cfg = _cfg(f'privacy.accountant="{accountant}"')
    n = len(_data(cfg))
    result, metrics = _train(adapter, cfg, ClientState())
    assert result is not None and result.steps == cfg.train.local_steps
    assert metrics["sample_rate"] == pytest.approx(cfg.train.batch_size / n)
    expected = _opacus_epsilon(cfg, n, cfg.train.local_steps)
    assert metrics["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert 0 < metrics["epsilon"] < cfg.privacy.epsilon


def test_compose_merges_like_opacus_step() -> None:
    acc = RDPAccountant()
    history: privacy.History = []
    for sigma, q, steps in [(1.1, 0.01, 3), (1.1, 0.01, 2), (0.9, 0.02, 4)]:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
        history = privacy.compose(history, sigma, q, steps)
    assert history == acc.history
    assert privacy.epsilon_of(history, 1e-5, "rdp") == acc.get_epsilon(delta=1e-5)
    assert privacy.epsilon_of([], 1e-5, "rdp") == 0.0


def test_accountant_state_survives_rounds_and_the_budget_runs_out(adapter: AdapterModel) -> None:
    """Round by round through Flower's Context.state (a RecordDict): epsilon composes, ends
    within the target after the planned rounds, and one more round is refused, untrained."""
    cfg = _cfg("federation.rounds=2")
    n, steps = len(_data(cfg)), cfg.train.local_steps
    store = RecordDict()
    epsilons = []
    for _ in range(2):
        state = load_client_state(store)
        result, metrics = _train(adapter, cfg, state)
        assert result is not None
        save_client_state(store, state)
        epsilons.append(metrics["epsilon"])
    assert epsilons[1] > epsilons[0]
    assert epsilons[0] == pytest.approx(_opacus_epsilon(cfg, n, steps), rel=1e-9)
    assert epsilons[1] == pytest.approx(_opacus_epsilon(cfg, n, 2 * steps), rel=1e-9)
    assert cfg.privacy.epsilon - 0.02 < epsilons[1] <= cfg.privacy.epsilon
    before = adapter.state()
    result, metrics = _train(adapter, cfg, load_client_state(store))
    assert result is None and metrics[privacy.BUDGET_SPENT] == 1.0
    assert metrics["epsilon"] == pytest.approx(epsilons[1])
    assert all(torch.equal(before[k], v) for k, v in adapter.state().items())


def test_history_from_another_accountant_is_refused(adapter: AdapterModel) -> None:
    state = ClientState()
    _train(adapter, _cfg(), state)
    with pytest.raises(privacy.PrivacyError, match="kept by a 'rdp' accountant"):
        _train(adapter, _cfg('privacy.accountant="prv"'), state)


# ---- the model under DP-SGD -----------------------------------------------------------------
def test_only_trainable_tensors_change_and_the_shared_model_is_left_clean(
        adapter: AdapterModel) -> None:
    frozen = {k for k in adapter.params if ".lora_A." in k}  # as under FFA-LoRA
    adapter.set_trainable(set(adapter.params) - frozen)
    before = adapter.state()
    result, _ = _train(adapter, _cfg(), ClientState())
    assert result is not None
    after = adapter.state()
    for key in adapter.params:
        assert torch.equal(before[key], after[key]) == (key in frozen), key
    assert _no_opacus_left(adapter.model)
    # The next (virtual) client in this worker trains normally and can attach hooks again.
    params = [adapter.params[k] for k in adapter.trainable_keys()]
    train_steps(adapter.model, _data(_cfg()), steps=1, batch_size=4,
                optimizer=make_optimizer(params, "sgd", 0.01, 0.0),
                rng=np.random.default_rng(0), device=CPU)
    assert _train(adapter, _cfg(), ClientState())[0] is not None


def test_an_adapter_that_does_not_move_fails_loudly(adapter: AdapterModel) -> None:
    """The Opacus + peft failure (LoRA never updates while epsilon accrues), simulated with a
    learning rate of 0: the guard stops the round and the hooks are still removed."""
    with pytest.raises(privacy.PrivacyError, match=r"unchanged.*Opacus #820"):
        _train(adapter, _cfg(), ClientState(), lr=0.0)
    assert _no_opacus_left(adapter.model)


def test_empty_poisson_batch_is_a_noise_only_step(adapter: AdapterModel) -> None:
    from opacus.optimizers import DPOptimizer

    params = {k: adapter.params[k] for k in adapter.trainable_keys()}
    dp_opt = DPOptimizer(make_optimizer(list(params.values()), "sgd", 0.1, 0.0),
                         noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8)
    before = {k: p.detach().clone() for k, p in params.items()}
    with privacy.per_sample_hooks(adapter.model):
        loss = privacy.dp_step(adapter.model, _data(_cfg()), np.array([], dtype=int), params,
                               dp_opt, CPU, None)
    assert loss is None
    privacy.check_changed(before, params)  # noise moved every tensor
    assert _no_opacus_left(adapter.model)


def test_without_noise_and_clipping_the_dp_gradient_is_the_plain_gradient(
        adapter: AdapterModel) -> None:
    """The per-example machinery (Opacus hooks without wrapping, mean loss reduction, sum of
    clipped per-example gradients over the expected batch) reproduces the ordinary mean
    gradient exactly when the noise is 0 and the clipping bound never binds."""
    from opacus.optimizers import DPOptimizer

    dropouts = [m for m in adapter.model.modules() if isinstance(m, torch.nn.Dropout)]
    saved = [m.p for m in dropouts]
    for m in dropouts:  # Opacus needs train mode; dropout off makes both passes identical
        m.p = 0.0
    try:
        params = {k: adapter.params[k] for k in adapter.trainable_keys()}
        batch = _data(_cfg()).batch(np.arange(8))
        adapter.model.train()
        adapter.model.zero_grad(set_to_none=True)
        adapter.model(**batch).loss.backward()
        plain = {k: p.grad.detach().clone() for k, p in params.items()}
        adapter.model.zero_grad(set_to_none=True)
        dp_opt = DPOptimizer(make_optimizer(list(params.values()), "sgd", 0.1, 0.0),
                             noise_multiplier=0.0, max_grad_norm=1e9, expected_batch_size=8)
        with privacy.per_sample_hooks(adapter.model):
            dp_opt.zero_grad(set_to_none=True)
            adapter.model(**batch).loss.backward()
            assert dp_opt.pre_step()
            for key, param in params.items():
                assert torch.allclose(param.grad, plain[key], rtol=1e-4, atol=1e-9), key
    finally:
        for m, p in zip(dropouts, saved, strict=True):
            m.p = p


def test_regulariser_is_added_after_the_noise(adapter: AdapterModel) -> None:
    """A data-independent penalty (like HetLoRA's) still acts under DP-SGD: its gradient is
    added to the noised data gradient, not clipped away with it."""
    cfg = _cfg('train.optimizer="sgd"')
    key = next(k for k in adapter.params if ".lora_B." in k)
    target = adapter.params[key]

    def penalty() -> torch.Tensor:
        return 100.0 * target.sum()

    with_reg = adapter.state()
    privacy.dp_train(adapter, _data(cfg), cfg=cfg, lr=1e-3, device=CPU,
                     client_state=ClientState(), extra_loss=penalty)
    moved = float((with_reg[key] - adapter.state()[key]).mean())
    # each SGD step of lr 1e-3 on a gradient of 100 per entry moves it by 0.1; the clipped,
    # noised data gradient (std ~ sigma C / B ~ 0.1 per entry) moves its mean by ~1e-5
    assert moved == pytest.approx(0.1 * cfg.train.local_steps, abs=0.01)


def test_delta_above_one_over_n_warns(adapter: AdapterModel) -> None:
    with pytest.warns(UserWarning, match="allows leaking a whole record"):
        _train(adapter, _cfg("privacy.delta=0.01"), ClientState())


# ---- refusals --------------------------------------------------------------------------------
def test_model_without_trainable_tensors_is_refused(adapter: AdapterModel) -> None:
    adapter.set_trainable(set())
    with pytest.raises(privacy.PrivacyError, match="no trainable tensors"):
        _train(adapter, _cfg(), ClientState())
    adapter.set_trainable(None)
    base = next(p for n, p in adapter.model.named_parameters() if "embeddings" in n)
    base.requires_grad_(True)
    try:
        with pytest.raises(privacy.PrivacyError, match="not an adapter tensor"):
            _train(adapter, _cfg(), ClientState())
    finally:
        base.requires_grad_(False)


@pytest.mark.parametrize(("override", "message"), [
    ("privacy.delta=1.0", "privacy.delta = 1.0 is out of range: a number in (0, 1)"),
    ("privacy.delta=0", "privacy.delta = 0.0 is out of range: float > 0"),
    ("privacy.epsilon=0", "privacy.epsilon = 0.0 is out of range: float > 0"),
    ("privacy.max_grad_norm=-1", "privacy.max_grad_norm = -1.0 is out of range"),
    ('privacy.accountant="gdp"', "privacy.accountant = 'gdp' is not allowed: one of 'rdp'"),
    ('privacy.client_level="on"', "privacy.client_level = 'on' is not allowed: one of 'off'"),
    ('model.target_modules="query,word_embeddings"', "LoRA on embeddings"),
])
def test_bad_privacy_config_is_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _cfg(override)
    assert message in str(info.value)


def test_unsupported_method_combinations_are_refused() -> None:
    class ZerothOrder(Method):
        name = "zo-test"
        dp_refusal = "it estimates gradients from loss differences, not per-example gradients"

    with pytest.raises(ConfigError, match=r"not supported with method\.name = 'zo-test': it "
                                          r"estimates gradients"):
        check_privacy(ZerothOrder, _cfg())
    check_privacy(ZerothOrder, _cfg("privacy.enabled=false"))  # no DP: fine
    with pytest.raises(ConfigError, match=r"client_level = 'server-fixed' needs a method whose "
                                          r"aggregate is a mean.*'hetlora'"):
        build_method(_cfg('method.name="hetlora"', 'privacy.client_level="server-fixed"'))
    for name in ("fedit", "ffa-lora"):
        build_method(_cfg(f'method.name="{name}"', 'privacy.client_level="client-fixed"'))


# ---- client-level DP (Flower's wrappers) ---------------------------------------------------------
def _flower_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_task_id", "_run_id", "_node_id"):  # what a running ServerApp has set
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _reply(node: int, tensors: dict, examples: int):
    content = payload_to_records(Payload(tensors))
    content["metrics"] = MetricRecord({"num-examples": examples})
    return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), content=content,
                           has_error=lambda: False, has_content=lambda: True)


def _client_dp(mode: str, noise: float, clip: float = 1.0, per_round: int = 3):
    cfg = _cfg('method.name="fedit"', f'privacy.client_level="{mode}"',
               f"privacy.client_noise={noise}", f"privacy.client_clip={clip}",
               f"federation.clients_per_round={per_round}")
    method = build_method(cfg)
    gen = torch.Generator().manual_seed(3)
    start = {"m.lora_A.weight": torch.randn(4, 50, generator=gen),
             "m.lora_B.weight": torch.randn(60, 4, generator=gen)}
    inner = FedPeftStrategy(RoundLoop(cfg, method, method.init(start)))
    dp = inner  # client-level DP is a stage of the round loop: the strategy takes it as it is
    grid = SimpleNamespace(get_node_ids=lambda: list(range(10, 10 + cfg.federation.clients)))
    messages = list(dp.configure_train(1, None, None, grid))
    return cfg, inner, dp, start, [m.metadata.dst_node_id for m in messages]


def _update(start: dict, scale: float, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in start.items()}


def _clipped_delta(start: dict, upload: dict, clip: float) -> dict:
    delta = {k: (upload[k] - start[k]).double() for k in start}
    norm = float(torch.sqrt(sum((d ** 2).sum() for d in delta.values())))
    return {k: d * min(1.0, clip / norm) for k, d in delta.items()}


def test_server_side_clipping_unweighted_fixed_denominator(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """New global = G + (1/m) sum_k clip(U_k - G) over the m sampled clients, whatever their
    example counts, a missing client counting as zero (noise made negligible here)."""
    _flower_ids(monkeypatch)
    _, inner, dp, start, nodes = _client_dp("server-fixed", noise=1e-12)
    uploads = [_update(start, 1.0, 1), _update(start, 1e-3, 2)]  # clipped; not clipped
    replies = [_reply(nodes[0], uploads[0], 500), _reply(nodes[1], uploads[1], 5)]
    _, stats = dp.aggregate_train(1, replies)  # the third sampled client never answered
    assert stats["clients_ok"] == 2 and stats["aggregated"] == 1
    deltas = [_clipped_delta(start, u, 1.0) for u in uploads]
    for key in start:
        expected = start[key].double() + (deltas[0][key] + deltas[1][key]) / 3
        assert torch.allclose(inner.loop.state.tensors[key].double(), expected, atol=1e-5), key
    eps = RDPAccountant()
    eps.step(noise_multiplier=1e-12, sample_rate=1.0)
    assert stats["client_epsilon"] == pytest.approx(eps.get_epsilon(delta=1e-5))


def test_a_failed_client_counts_as_zero_and_the_round_goes_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's wrapper skips a round with any error reply; ours takes the error out first, so
    it counts as a zero update (like a missing client) and the other replies are aggregated."""
    _flower_ids(monkeypatch)
    _, inner, dp, start, nodes = _client_dp("server-fixed", noise=1e-12)
    upload = _update(start, 1e-3, 2)
    crashed = SimpleNamespace(metadata=SimpleNamespace(src_node_id=nodes[2]),
                              error=SimpleNamespace(reason="injected fault", code=0),
                              has_error=lambda: True, has_content=lambda: False)
    replies = [_reply(nodes[0], upload, 5), _reply(nodes[1], start, 5), crashed]
    _, stats = dp.aggregate_train(1, replies)
    assert stats["aggregated"] == 1 and stats["clients_failed"] == 1
    key = "m.lora_B.weight"  # node 1's zero update is dropped too: only node 0's moves it
    expected = start[key].double() + (upload[key] - start[key]).double() / 3
    assert torch.allclose(inner.loop.state.tensors[key].double(), expected, atol=1e-5)


def test_noise_std_is_z_clip_over_m(monkeypatch: pytest.MonkeyPatch) -> None:
    _flower_ids(monkeypatch)
    np.random.seed(0)  # Flower's wrapper draws from numpy's global generator
    _, inner, dp, start, nodes = _client_dp("server-fixed", noise=2.0, clip=0.5, per_round=4)
    still = [_update(start, 1e-9, seed) for seed in range(4)]  # (almost) no update
    dp.aggregate_train(1, [_reply(node, u, 10) for node, u in zip(nodes, still, strict=True)])
    noise = torch.cat([(inner.loop.state.tensors[k] - start[k]).flatten() for k in start])
    assert float(noise.std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.05)


def test_client_fixed_clips_on_the_client_and_the_server_checks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _flower_ids(monkeypatch)
    _, inner, dp, start, nodes = _client_dp("client-fixed", noise=1e-12)
    big = _update(start, 1.0, 4)
    clipped = privacy.clip_update(Payload(big), Payload(start), 1.0).tensors
    assert update_norm(clipped, start) == pytest.approx(1.0, rel=1e-5)
    small = _update(start, 1e-3, 5)
    kept = privacy.clip_update(Payload(small), Payload(start), 1.0).tensors
    assert all(torch.allclose(kept[k], small[k]) for k in small)
    replies = [_reply(nodes[0], clipped, 7), _reply(nodes[1], big, 7), _reply(nodes[2], kept, 7)]
    _, stats = dp.aggregate_train(1, replies)
    assert (stats["clients_ok"], stats["clients_rejected"]) == (2, 1)  # the unclipped one
    delta = _clipped_delta(start, clipped, 1.0)
    key = "m.lora_B.weight"
    expected = start[key].double() + (delta[key] + (small[key] - start[key]).double()) / 3
    assert torch.allclose(inner.loop.state.tensors[key].double(), expected, atol=1e-5)


def _np(tensors: dict) -> dict:
    return {k: v.numpy() for k, v in tensors.items()}


# ---- end to end -------------------------------------------------------------------------------
GRADIENT_METHODS = sorted(n for n, c in METHODS.items() if not c.dp_refusal)


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_every_gradient_method_trains_under_dp(name: str) -> None:
    """One client round of each method under DP-SGD: its trainable tensors move, it reports
    epsilon, and its upload is what the server expects."""
    cfg = _cfg(f'method.name="{name}"', "train.local_steps=1")
    method = build_method(cfg)
    ws = get_workspace(cfg)
    state = method.init(ws.adapter_model(cfg.model.rank).state())
    profile = ClientProfile(1, cfg.model.rank)
    down = method.downlink(state, profile)
    res = client_round(cfg, method, ws, down, partition_id=1, rank=cfg.model.rank,
                       server_round=1, client_state=ClientState())
    assert 0 < res.metrics["epsilon"] <= 3.0
    assert check_upload(res.payload, method.expected_upload(state, profile).tensors) is None
    adapter = ws.adapter_model(cfg.model.rank)
    assert adapter.trainable_keys() and _no_opacus_left(adapter.model)
    moved = [k for k in adapter.trainable_keys() if k in res.payload.tensors
             and k in down.tensors and not torch.equal(res.payload.tensors[k], down.tensors[k])]
    assert moved or name == "flora"  # FLoRA starts a fresh adapter: nothing to compare with


def test_plain_loop_with_dp_counts_clients_whose_budget_is_spent() -> None:
    """End to end in one process: budget planned for 1 round, 3 rounds, every client sampled
    every round; metrics carry the largest client epsilon."""
    rows = run_plain(None, [*DP, 'method.name="ffa-lora"', "privacy.rounds=1",
                            "federation.rounds=3", "eval.subset=0", "federation.clients=2",
                            "federation.clients_per_round=2"])
    assert rows[1].get("clients_budget_spent", 0) == 0 and rows[1]["accuracy"] is not None
    assert rows[2]["clients_budget_spent"] == rows[3]["clients_budget_spent"] == 2
    assert 0 < rows[1]["epsilon"] == rows[3]["epsilon"] <= 3.0
    assert rows[1]["loss"] == rows[2]["loss"] == rows[3]["loss"]  # nobody trained after round 1


def test_a_device_can_ask_for_its_own_dp_budget(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fedpeft client --epsilon 2` (node config epsilon = 2): the device trains under DP-SGD
    with its own budget in a run that does not ask for DP, and reports its epsilon; a method
    that cannot do DP-SGD is refused on the device with the reason."""
    from fedpeft.client import app as client_app
    from flwr.app import Context, Message, MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from fedpeft.core.wire import CONFIG_RECORD, config_record

    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    data = tmp_path / "mine.csv"
    data.write_text("text,label\n" + "".join(f'"review {i}",{("fresh", "rotten")[i % 2]}\n'
                                             for i in range(64)))
    node = {"data-path": str(data), "epsilon": 2.0, "threads": 1}
    for name in ("fedit", "ferret"):
        cfg = load_config(None, [*TINY, f'method.name="{name}"', 'data.labels=["rotten", "fresh"]'])
        method = build_method(cfg, num_labels=get_workspace(cfg).num_labels)
        state = method.init(get_workspace(cfg).adapter_model(cfg.model.rank).state())
        content = payload_to_records(method.downlink(state, ClientProfile(0, cfg.model.rank)),
                                     {"fedpeft.round": 1, "fedpeft.partition": 0})
        content[CONFIG_RECORD] = config_record(cfg)
        msg = Message(content=content, dst_node_id=5, message_type=MessageType.TRAIN,
                      group_id="1")
        ctx = Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config={})
        if name == "ferret":
            with pytest.raises(ConfigError, match=r"not supported with method\.name = 'ferret'"):
                client_app.train(msg, ctx)
            continue
        assert not cfg.privacy.enabled
        metrics = client_app.train(msg, ctx).content["metrics"]
        # its budget, not the spent epsilon (a function of its private n: test_device_privacy)
        assert metrics["epsilon"] == 2.0 and "noise_multiplier" not in metrics
