"""RoLoRA, FedSVD, FedEx-LoRA and Fed-SB: each aggregate against an independent float64 formula on
uploads that look like training (clients that roughly agree, unequal example counts, non-square
layers), the payload keys and sizes, and one client round on tiny-bert."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fedpeft.client.trainer import client_round
from fedpeft.strategies import ClientProfile, Upload, build_method
from fedpeft.strategies.fed_sb import CORE, FACTORS, GRAD, HOLDS, STAGE, lora_sb_init
from fedpeft.strategies.fedex_lora import RES
from fedpeft.strategies.fedsvd import refactor_full, refactor_qr
from fedpeft.strategies.rolora import PHASE

from fedpeft.core.config import ConfigError, load_config
from fedpeft.core.payload import ClientState, Payload
from fedpeft.core.wire import payload_to_records, records_to_payload, serialized_nbytes
from fedpeft.core.workspace import get_workspace
from tests.helpers import LORA_RANK, LORA_SHAPES, TINY, lora_template, near_upload

R = LORA_RANK
SHAPES = LORA_SHAPES  # layer -> (d_out, d_in)
HEAD = ("head.weight", "head.bias")
SIZES = [5, 40, 13, 22]


def _method(name: str, *overrides: str):
    return build_method(load_config(None, [f'method.name="{name}"', f"model.rank={R}",
                                           "model.alpha=8", *overrides]))


def _uploads(method, state: Payload, sizes=SIZES) -> list[Upload]:
    uploads = []
    for i, n in enumerate(sizes):
        profile = ClientProfile(i, R)
        spec = method.expected_upload(state, profile)
        sent = {**state.tensors, **method.downlink(state, profile).tensors}
        scalars = {HOLDS: int(state.scalars[FACTORS])} if HOLDS in spec.scalars else {}
        upload = near_upload(sent, spec.tensors, 100 + i)
        uploads.append(Upload(profile, Payload(upload, scalars), n))
    return uploads


def _weights(sizes=SIZES) -> list[float]:
    return [n / sum(sizes) for n in sizes]


def _pairs():
    return [(f"{layer}.lora_A.weight", f"{layer}.lora_B.weight", layer) for layer in SHAPES]


def _loss(model: torch.nn.Module, data) -> torch.Tensor:
    """The task loss of the first 8 examples (float32, no autocast)."""
    batch = data.batch(np.arange(8))
    return model(**batch).loss


def _mean(uploads: list[Upload], key: str) -> torch.Tensor:
    return sum(p * u.payload.tensors[key].double() for p, u in zip(_weights(), uploads,
                                                                  strict=True))


# ---- RoLoRA -----------------------------------------------------------------------------------
def test_rolora_alternates_b_then_a_and_each_aggregate_is_exact() -> None:
    method = _method("rolora")
    state = method.init(lora_template())
    assert method.downlink(state, ClientProfile(0, R)).scalars == {PHASE: "B"}
    up_keys = set(method.expected_upload(state, ClientProfile(0, R)).tensors)
    assert up_keys == {b for _, b, _ in _pairs()} | set(HEAD)  # B-phase: no lora_A travels up
    uploads = _uploads(method, state)
    new = method.aggregate(state, uploads).state
    for a_key, b_key, _ in _pairs():
        assert torch.equal(new.tensors[a_key], state.tensors[a_key])  # A bit-identical
        a = state.tensors[a_key].double()
        mean_of_products = sum(p * u.payload.tensors[b_key].double() @ a
                               for p, u in zip(_weights(), uploads, strict=True))
        assert torch.allclose(new.tensors[b_key].double() @ a, mean_of_products, rtol=1e-6,
                              atol=1e-9)
    for key in HEAD:
        assert torch.allclose(new.tensors[key].double(), _mean(uploads, key), atol=1e-7)
    # second aggregate: the A-phase, the mirror image
    assert method.downlink(new, ClientProfile(0, R)).scalars == {PHASE: "A"}
    assert set(method.expected_upload(new, ClientProfile(0, R)).tensors) == (
        {a for a, _, _ in _pairs()} | set(HEAD))
    uploads = _uploads(method, new)
    newer = method.aggregate(new, uploads).state
    for a_key, b_key, _ in _pairs():
        assert torch.equal(newer.tensors[b_key], new.tensors[b_key])
        b = new.tensors[b_key].double()
        mean_of_products = sum(p * b @ u.payload.tensors[a_key].double()
                               for p, u in zip(_weights(), uploads, strict=True))
        assert torch.allclose(b @ newer.tensors[a_key].double(), mean_of_products, rtol=1e-6,
                              atol=1e-9)
    assert method.downlink(newer, ClientProfile(0, R)).scalars == {PHASE: "B"}


def test_rolora_aggregate_ignores_client_order_and_uplink_is_half_of_fedit() -> None:
    method = _method("rolora")
    state = method.init(lora_template())
    uploads = _uploads(method, state)
    forward = method.aggregate(state, uploads).state
    backward = method.aggregate(state, uploads[::-1]).state
    for key in forward.tensors:
        assert torch.allclose(forward.tensors[key], backward.tensors[key], atol=1e-7)
    lora = sum(v.numel() for k, v in uploads[0].payload.tensors.items() if ".lora_" in k)
    assert lora == sum(d_out * R for d_out, _ in SHAPES.values())  # L r d_out: B only
    assert 2 * lora == sum(v.numel() for k, v in state.tensors.items() if ".lora_" in k)


def test_rolora_a_gets_no_gradient_while_b_is_zero_so_b_goes_first() -> None:
    """The guard behind the B-first schedule: with peft's B = 0, dL/dA = s B^T dL/dW = 0."""
    cfg = load_config(None, [*TINY, 'method.name="rolora"'])
    workspace = get_workspace(cfg)
    adapter = workspace.adapter_model(cfg.model.rank)
    adapter.reset_base()
    adapter.load({k: torch.zeros_like(v) if "lora_B" in k else v
                  for k, v in adapter.state().items()})
    adapter.set_trainable(None)
    batch = workspace.partition(0, cfg.federation.clients)
    _loss(adapter.model, batch).backward()
    grads = {k: p.grad for k, p in adapter.params.items()}
    assert all(float(g.abs().max()) == 0.0 for k, g in grads.items() if "lora_A" in k)
    assert any(float(g.abs().max()) > 0.0 for k, g in grads.items() if "lora_B" in k)
    adapter.model.zero_grad(set_to_none=True)


def test_rolora_client_trains_only_the_phase_factor() -> None:
    cfg = load_config(None, [*TINY, 'method.name="rolora"'])
    method = build_method(cfg)
    workspace = get_workspace(cfg)
    state = method.init(workspace.adapter_model(cfg.model.rank).state())
    for phase in ("B", "A"):
        profile = ClientProfile(0, cfg.model.rank)
        down = records_to_payload(payload_to_records(method.downlink(state, profile)))
        assert down.scalars[PHASE] == phase
        result = client_round(cfg, method, workspace, down, partition_id=0,
                              rank=cfg.model.rank, server_round=1, client_state=ClientState())
        frozen = "lora_A" if phase == "B" else "lora_B"
        assert not any(frozen in k for k in result.payload.tensors)
        adapter = workspace.adapter_model(cfg.model.rank)
        for key, value in adapter.state().items():
            if frozen in key:
                assert torch.equal(value, state.tensors[key])  # not trained
        moved = [k for k, v in result.payload.tensors.items()
                 if ".lora_" in k and not torch.equal(v, state.tensors[k])]
        assert moved
        state = method.aggregate(state, [Upload(profile, result.payload,
                                                result.num_examples)]).state


# ---- FedSVD ---------------------------------------------------------------------------------
def test_fedsvd_refactorisation_keeps_the_product_and_makes_a_orthonormal() -> None:
    method = _method("fedsvd")
    state = method.init(lora_template())
    up_keys = set(method.expected_upload(state, ClientProfile(0, R)).tensors)
    assert up_keys == {b for _, b, _ in _pairs()} | set(HEAD)  # no lora_A upstream
    uploads = _uploads(method, state)
    new = method.aggregate(state, uploads).state
    for a_key, b_key, _ in _pairs():
        a_old = state.tensors[a_key].double()
        target = sum(p * u.payload.tensors[b_key].double() @ a_old  # sum_k p_k B_k A
                     for p, u in zip(_weights(), uploads, strict=True))
        a, b = new.tensors[a_key].double(), new.tensors[b_key].double()
        assert float((b @ a - target).norm() / target.norm()) < 1e-5  # float32 state
        assert torch.allclose(a @ a.T, torch.eye(R, dtype=torch.float64), atol=1e-5)
        gram = b.T @ b
        assert torch.allclose(gram - torch.diag(torch.diag(gram)), torch.zeros(R, R,
                              dtype=torch.float64), atol=1e-6 * float(gram.abs().max()))
        norms = torch.diag(gram).sqrt()
        assert torch.all(norms[:-1] >= norms[1:] - 1e-7)
        assert torch.allclose(norms, torch.linalg.svdvals(target)[:R], rtol=1e-4)


def test_fedsvd_qr_core_and_full_svd_agree_in_float64() -> None:
    gen = torch.Generator().manual_seed(3)
    b = torch.randn(48, R, generator=gen, dtype=torch.float64)
    a = torch.randn(R, 80, generator=gen, dtype=torch.float64)
    for refactor in (refactor_qr, refactor_full):
        nb, na = refactor(b, a)
        assert float((nb @ na - b @ a).norm() / (b @ a).norm()) < 1e-10
    assert torch.allclose(refactor_qr(b, a)[0].norm(dim=0), refactor_full(b, a)[0].norm(dim=0),
                          rtol=1e-10)
    zero_b, za = refactor_qr(torch.zeros(48, R, dtype=torch.float64), a)  # P = 0: B = 0, A rows
    assert float(zero_b.abs().max()) == 0.0  # still orthonormal (directions arbitrary)
    assert torch.allclose(za @ za.T, torch.eye(R, dtype=torch.float64), atol=1e-10)


def test_fedsvd_period_option_and_client_keeps_a_frozen() -> None:
    method = _method("fedsvd", "method.period=2")
    state = method.init(lora_template())
    once = method.aggregate(state, _uploads(method, state)).state
    assert all(torch.equal(once.tensors[a], state.tensors[a]) for a, _, _ in _pairs())
    twice = method.aggregate(once, _uploads(method, once)).state
    assert not any(torch.equal(twice.tensors[a], once.tensors[a]) for a, _, _ in _pairs())
    cfg = load_config(None, [*TINY, 'method.name="fedsvd"'])
    method = build_method(cfg)
    workspace = get_workspace(cfg)
    state = method.init(workspace.adapter_model(cfg.model.rank).state())
    down = records_to_payload(payload_to_records(method.downlink(state, ClientProfile(0, 8))))
    result = client_round(cfg, method, workspace, down, partition_id=0, rank=cfg.model.rank,
                          server_round=1, client_state=ClientState())
    assert not any("lora_A" in k for k in result.payload.tensors)
    adapter = workspace.adapter_model(cfg.model.rank)
    for key, value in adapter.state().items():
        if "lora_A" in key:
            assert torch.equal(value, state.tensors[key])


# ---- FedEx-LoRA -------------------------------------------------------------------------------
def test_fedex_global_model_is_the_exact_weighted_mean_over_two_rounds() -> None:
    """After each aggregate, W0 + residuals + s B_bar A_bar is the weighted mean of the clients'
    models W0 + residuals_before + s B_k A_k, in the layers' native (d_out, d_in) layout,
    non-square layers included."""
    method = _method("fedex-lora")
    s = 8 / R
    state = method.init(lora_template())
    for layer, shape in SHAPES.items():
        assert tuple(state.tensors[RES + layer].shape) == shape
    for _ in range(2):
        uploads = _uploads(method, state)
        assert set(uploads[0].payload.tensors) == set(lora_template())  # FedIT's uplink
        new = method.aggregate(state, uploads).state
        for a_key, b_key, layer in _pairs():
            clients = [state.tensors[RES + layer].double()
                       + s * u.payload.tensors[b_key].double() @ u.payload.tensors[a_key].double()
                       for u in uploads]
            exact = sum(p * w for p, w in zip(_weights(), clients, strict=True))
            whole = (new.tensors[RES + layer].double()
                     + s * new.tensors[b_key].double() @ new.tensors[a_key].double())
            assert torch.allclose(whole, exact, atol=1e-7)
            assert torch.allclose(new.tensors[a_key].double(), _mean(uploads, a_key), atol=1e-7)
            assert torch.allclose(new.tensors[b_key].double(), _mean(uploads, b_key), atol=1e-7)
            this_round = new.tensors[RES + layer].double() - state.tensors[RES + layer].double()
            rank = int(torch.linalg.matrix_rank(this_round, rtol=1e-4))  # float32 state
            # sum_{k<K} p_k (B_k - B_bar)(A_k - A_K): rank <= (K - 1) r, below full rank here
            assert rank <= (len(SIZES) - 1) * R < min(SHAPES[layer])
            fedit_gap = float((s * _mean(uploads, b_key) @ _mean(uploads, a_key)
                               + state.tensors[RES + layer].double() - exact).norm())
            assert fedit_gap > 1e-4 * float(exact.norm())  # FedIT alone would not be exact
        state = new


def test_fedex_client_and_server_models_hold_the_residual_in_their_base() -> None:
    cfg = load_config(None, [*TINY, 'method.name="fedex-lora"'])
    method = build_method(cfg)
    workspace = get_workspace(cfg)
    adapter = workspace.adapter_model(cfg.model.rank)
    adapter.reset_base()
    w0 = {layer: adapter.base_weight(layer).detach().clone() for layer in adapter.pairs}
    state = method.init(adapter.state())
    uploads = []
    for pid in range(3):
        down = records_to_payload(payload_to_records(method.downlink(state, ClientProfile(pid, 8))))
        res = client_round(cfg, method, workspace, down, partition_id=pid, rank=8,
                           server_round=1, client_state=ClientState())
        uploads.append(Upload(ClientProfile(pid, 8), res.payload, res.num_examples))
    state = method.aggregate(state, uploads).state
    assert any(float(state.tensors[RES + layer].abs().max()) > 0 for layer in w0)
    adapter.reset_base()
    method.load(adapter, method.downlink(state, ClientProfile(0, 8)), ClientState())
    for layer in w0:
        assert torch.allclose(adapter.base_weight(layer), w0[layer] + state.tensors[RES + layer])
    adapter.reset_base()
    method.load_global(adapter, state)
    for layer in w0:
        assert torch.allclose(adapter.base_weight(layer), w0[layer] + state.tensors[RES + layer])
    adapter.reset_base()
    # the downlink's cost: the dense residual of every wrapped layer on top of FedIT's tensors
    fedit_bytes = serialized_nbytes(payload_to_records(Payload(adapter.state())))
    down_bytes = serialized_nbytes(payload_to_records(method.downlink(state, ClientProfile(0, 8))))
    dense = sum(4 * w.numel() for w in w0.values())
    assert dense < down_bytes - fedit_bytes < dense * 1.01
    export = method.export(state)
    assert export.note and set(export.tensors) == set(adapter.state())


# ---- Fed-SB -----------------------------------------------------------------------------------
def _fed_sb_state(method, seed: int = 0) -> tuple[Payload, list[Upload]]:
    state = method.init(lora_template(seed))
    assert method.downlink(state, ClientProfile(0, R)).tensors == {}  # gradient round
    spec = method.expected_upload(state, ClientProfile(0, R)).tensors
    assert spec == {GRAD + layer: shape for layer, shape in SHAPES.items()}
    common = {k: torch.randn(shape, generator=torch.Generator().manual_seed(9))
              for k, shape in spec.items()}
    uploads = []
    for i, n in enumerate(SIZES):  # clients' gradients: a shared direction plus their own
        gen = torch.Generator().manual_seed(50 + i)
        grads = {k: common[k] + 0.8 * torch.randn(common[k].shape, generator=gen)
                 for k in spec}
        uploads.append(Upload(ClientProfile(i, R), Payload(grads), n))
    return state, uploads


def test_fed_sb_lora_sb_initialisation_from_the_summed_gradient() -> None:
    method = _method("fed-sb", "method.init_lr=0.01")
    s = 8 / R
    state, uploads = _fed_sb_state(method)
    new = method.aggregate(state, uploads).state
    assert new.scalars[STAGE] == 1
    for a_key, b_key, layer in _pairs():
        grad = _mean(uploads, GRAD + layer)  # sign after the (weighted) sum
        g_hat = -0.01 * torch.sign(grad)
        sv = torch.linalg.svdvals(g_hat)
        a, b = new.tensors[a_key].double(), new.tensors[b_key].double()
        core = new.tensors[CORE + layer].double()
        err = float((s * b @ core @ a - g_hat).norm())
        assert err == pytest.approx(float(sv[R:].pow(2).sum().sqrt()), rel=1e-4)
        assert torch.allclose(a @ a.T, torch.eye(R, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(b.T @ b, torch.eye(R, dtype=torch.float64), atol=1e-5)
        sum_of_signs = sum(torch.sign(u.payload.tensors[GRAD + layer].double()) for u in uploads)
        assert not torch.equal(torch.sign(sum_of_signs), torch.sign(grad))  # they differ here
    b64, r64, a64 = lora_sb_init(torch.randn(30, 20, dtype=torch.float64), 3, 0.1, 2.0)
    assert b64.shape == (30, 3) and r64.shape == (3, 3) and a64.shape == (3, 20)


def test_fed_sb_training_rounds_average_r_exactly_and_upload_r_squared() -> None:
    method = _method("fed-sb")
    state, uploads = _fed_sb_state(method)
    state = method.aggregate(state, uploads).state
    spec = method.expected_upload(state, ClientProfile(0, R)).tensors
    assert spec == {**{CORE + layer: (R, R) for layer in SHAPES},
                    **{k: tuple(lora_template()[k].shape) for k in HEAD}}
    assert sum(math.prod(v) for k, v in spec.items() if k.startswith(CORE)) == len(SHAPES) * R * R
    uploads = _uploads(method, state)
    new = method.aggregate(state, uploads).state
    for a_key, b_key, layer in _pairs():
        assert torch.equal(new.tensors[a_key], state.tensors[a_key])
        assert torch.equal(new.tensors[b_key], state.tensors[b_key])
        a, b = state.tensors[a_key].double(), state.tensors[b_key].double()
        target = sum(p * b @ u.payload.tensors[CORE + layer].double() @ a
                     for p, u in zip(_weights(), uploads, strict=True))
        assert torch.allclose(b @ new.tensors[CORE + layer].double() @ a, target, atol=1e-7)
    export = method.export(new)  # exact peft adapter: lora_B = B R
    assert export.note is None
    for a_key, b_key, layer in _pairs():
        assert torch.allclose(export.tensors[b_key].double() @ export.tensors[a_key].double(),
                              new.tensors[b_key].double() @ new.tensors[CORE + layer].double()
                              @ new.tensors[a_key].double(), atol=1e-6)


def test_fed_sb_sends_a_and_b_once_per_client_and_resends_after_a_lost_state() -> None:
    method = _method("fed-sb")
    state, uploads = _fed_sb_state(method)
    state = method.aggregate(state, uploads).state
    lora = {k for a, b, _ in _pairs() for k in (a, b)}
    first = method.downlink(state, ClientProfile(0, R))
    assert lora <= set(first.tensors)  # never confirmed: A and B travel
    uploads = _uploads(method, state)
    lost = Upload(ClientProfile(9, R), Payload(dict(uploads[0].payload.tensors), {HOLDS: 0}), 50)
    new = method.aggregate(state, [*uploads, lost])
    assert new.metrics["fed_sb_resent"] == 1.0
    without_lost = method.aggregate(state, uploads).state
    for key in without_lost.tensors:  # the lost client's upload is left out of the mean
        assert torch.equal(new.state.tensors[key], without_lost.tensors[key])
    again = method.downlink(new.state, ClientProfile(0, R))
    assert not lora & set(again.tensors)  # confirmed: R and the head only
    assert set(again.tensors) == {CORE + layer for layer in SHAPES} | set(HEAD)
    assert lora <= set(method.downlink(new.state, ClientProfile(9, R)).tensors)  # resent
    with pytest.raises(ValueError, match="without the frozen A and B"):
        method.aggregate(state, [lost])


def test_fed_sb_client_rounds_on_tiny_bert() -> None:
    """Gradient round: W does not move and nothing trains; training round: only R and the head
    move, the hooked model computes what the folded export computes, and nothing is left
    attached to the shared model afterwards."""
    cfg = load_config(None, [*TINY, 'method.name="fed-sb"'])
    method = build_method(cfg)
    workspace = get_workspace(cfg)
    adapter = workspace.adapter_model(cfg.model.rank)
    adapter.reset_base()
    w0 = {layer: adapter.base_weight(layer).detach().clone() for layer in adapter.pairs}
    state = method.init(adapter.state())
    uploads = []
    for pid in range(2):
        down = records_to_payload(payload_to_records(method.downlink(state, ClientProfile(pid, 8))))
        res = client_round(cfg, method, workspace, down, partition_id=pid, rank=8,
                           server_round=1, client_state=ClientState())
        assert set(res.payload.tensors) == set(method.expected_upload(
            state, ClientProfile(pid, 8)).tensors)
        assert all(float(g.abs().max()) > 0 for g in res.payload.tensors.values())
        for layer in w0:
            assert torch.equal(adapter.base_weight(layer), w0[layer])  # gradients only
        uploads.append(Upload(ClientProfile(pid, 8), res.payload, res.num_examples))
    state = method.aggregate(state, uploads).state
    down = records_to_payload(payload_to_records(method.downlink(state, ClientProfile(0, 8))))
    kept = ClientState()
    res = client_round(cfg, method, workspace, down, partition_id=0, rank=8, server_round=2,
                       client_state=kept)
    assert not any(".lora_" in k for k in res.payload.tensors)
    assert any(not torch.equal(res.payload.tensors[k], state.tensors[k])
               for k in res.payload.tensors if k.startswith(CORE))
    for key, value in adapter.state().items():
        if ".lora_" in key:
            assert torch.equal(value, state.tensors[key])  # A and B frozen
    modules = [m for m in adapter.model.modules() if m._forward_hooks or hasattr(m, "fed_sb_core")]
    assert modules == []
    # the hooked forward (clients) equals the folded adapter (server evaluation, export)
    adapter.reset_base()
    batch = workspace.partition(0, cfg.federation.clients)
    method.load(adapter, down, ClientState())
    adapter.model.eval()
    with torch.no_grad():
        hooked = float(_loss(adapter.model, batch))
    method.uplink(adapter, down, ClientState())  # detaches
    method.load_global(adapter, state)
    with torch.no_grad():
        folded = float(_loss(adapter.model, batch))
    assert hooked == pytest.approx(folded, rel=1e-5)
    assert res.payload.scalars[HOLDS] == state.scalars[FACTORS]
    later = method.aggregate(state, [Upload(ClientProfile(0, 8), res.payload, 10)]).state
    short = records_to_payload(payload_to_records(method.downlink(later, ClientProfile(0, 8))))
    assert not any(".lora_" in k for k in short.tensors)  # this client holds A and B now
    again = client_round(cfg, method, workspace, short, partition_id=0, rank=8, server_round=3,
                         client_state=kept)
    assert again.payload.scalars[HOLDS] == state.scalars[FACTORS]
    for key, value in adapter.state().items():  # it trained on its own copy of A and B
        if ".lora_" in key:
            assert torch.equal(value, state.tensors[key])
    fresh = client_round(cfg, method, workspace, short, partition_id=0, rank=8, server_round=3,
                         client_state=ClientState())  # lost its state: says so
    assert fresh.payload.scalars[HOLDS] == 0


# ---- what each method composes with --------------------------------------------------------
@pytest.mark.parametrize("name", ["rolora", "fedsvd", "fedex-lora", "fed-sb"])
def test_compression_robust_aggregation_and_dp_are_allowed_or_refused_with_a_reason(
        name: str) -> None:
    build_method(load_config(None, [f'method.name="{name}"',
                                    'compression.up=["int8", "deflate"]',
                                    'compression.down=["fp16"]']))
    # robust aggregators, secure aggregation, client-level DP: tests/test_compose_new_methods.py
    dp = [f'method.name="{name}"', "privacy.enabled=true"]
    if name == "fed-sb":
        with pytest.raises(ConfigError, match="not a peft adapter tensor"):
            build_method(load_config(None, dp))
    else:
        build_method(load_config(None, dp))


# ---- invariants every method shares -------------------------------------------------------
def _ready(name: str):
    """The method and a state past its first aggregate (Fed-SB: past the gradient round)."""
    method = _method(name)
    if name == "fed-sb":
        state, uploads = _fed_sb_state(method)
        return method, method.aggregate(state, uploads).state
    return method, method.init(lora_template())


@pytest.mark.parametrize("name", ["rolora", "fedsvd", "fedex-lora", "fed-sb"])
def test_aggregate_ignores_client_order_and_one_client_is_local_training(name: str) -> None:
    method, state = _ready(name)
    uploads = _uploads(method, state)
    forward = method.aggregate(state, uploads).state
    backward = method.aggregate(state, uploads[::-1]).state
    assert set(forward.tensors) == set(state.tensors)
    for key in forward.tensors:
        assert torch.allclose(forward.tensors[key], backward.tensors[key], atol=1e-6), key
    alone = method.aggregate(state, uploads[2:3]).state  # one client: its own model
    s = 8 / R
    for a_key, b_key, layer in _pairs():
        sent = uploads[2].payload.tensors
        a = sent.get(a_key, state.tensors[a_key]).double()
        b = sent.get(b_key, state.tensors[b_key]).double()
        if name == "fed-sb":
            b = b @ sent[CORE + layer].double()
            got = alone.tensors[b_key].double() @ alone.tensors[CORE + layer].double()
        else:
            got = alone.tensors[b_key].double()
        client = s * b @ a + (state.tensors[RES + layer].double() if name == "fedex-lora" else 0)
        server = s * got @ alone.tensors[a_key].double()
        if name == "fedex-lora":
            server = server + alone.tensors[RES + layer].double()
        assert torch.allclose(server, client, atol=1e-6), (name, layer)
    for key in HEAD:
        assert torch.allclose(alone.tensors[key], uploads[2].payload.tensors[key])


@pytest.mark.parametrize("name", ["rolora", "fedsvd", "fedex-lora", "fed-sb"])
def test_a_client_round_is_deterministic(name: str) -> None:
    """Same seeds, same downlink: bit-identical uploads (on CPU)."""
    cfg = load_config(None, [*TINY, f'method.name="{name}"'])
    method = build_method(cfg)
    workspace = get_workspace(cfg)
    state = method.init(workspace.adapter_model(cfg.model.rank).state())
    down = records_to_payload(payload_to_records(method.downlink(state, ClientProfile(1, 8))))
    results = [client_round(cfg, method, workspace, down, partition_id=1, rank=8,
                            server_round=1, client_state=ClientState()) for _ in range(2)]
    first, second = (r.payload.tensors for r in results)
    assert set(first) == set(second)
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("name", ["rolora", "fedsvd", "fedex-lora"])
def test_dp_sgd_trains_exactly_the_methods_factors(name: str) -> None:
    """Under DP-SGD only the method's trainable tensors require gradients, and they move."""
    cfg = load_config(None, [*TINY, f'method.name="{name}"', "privacy.enabled=true",
                             "privacy.epsilon=8", "federation.rounds=2"])
    method = build_method(cfg)
    workspace = get_workspace(cfg)
    state = method.init(workspace.adapter_model(cfg.model.rank).state())
    down = records_to_payload(payload_to_records(method.downlink(state, ClientProfile(0, 8))))
    result = client_round(cfg, method, workspace, down, partition_id=0, rank=8,
                          server_round=1, client_state=ClientState())
    adapter = workspace.adapter_model(cfg.model.rank)
    trained = set(adapter.trainable_keys())
    frozen_factor = {"rolora": "lora_A", "fedsvd": "lora_A", "fedex-lora": None}[name]
    assert trained == {k for k in adapter.params
                       if frozen_factor is None or frozen_factor not in k}
    assert result.metrics["epsilon"] > 0
    assert any(not torch.equal(result.payload.tensors[k], state.tensors[k])
               for k in result.payload.tensors if "lora_B" in k)


# ---- end to end -------------------------------------------------------------------------------
NEW = ["rolora", "fedsvd", "fedex-lora", "fed-sb"]


@pytest.mark.parametrize("name", NEW)
def test_plain_loop_runs_each_method_with_lossy_uplink_compression(name: str) -> None:
    """The single-process loop (the product's round loop, clients in this process), with the
    uplink quantised: every round aggregated, the global model evaluated."""
    from fedpeft.server.inprocess import run_plain

    rows = run_plain(None, [*TINY, f'method.name="{name}"', 'compression.up=["int8"]'])
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["aggregated"] == 1 and row["clients_ok"] == 3
        assert row["accuracy"] is not None and row["bytes_up"] > 0
    if name == "fed-sb":  # round 1 uploads dense gradients, round 2 only R and the head
        assert rows[2]["bytes_up"] < rows[1]["bytes_up"] / 2


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW)
def test_flower_simulation_runs_each_method(name: str, tmp_path) -> None:
    """`fedpeft simulate` (SuperLink + Flower simulation), the deployment's code path."""
    import json

    from fedpeft.server.reporting import MetricsLog

    from fedpeft.cli import main

    rounds = 4 if name == "fed-sb" else 2  # fed-sb: clients sampled again hold A and B
    args = ["simulate", "--method", name, "--out", str(tmp_path)]
    for item in [*TINY, f"federation.rounds={rounds}"]:
        args += ["--set", item]
    assert main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == name and summary["rounds"] == rounds
    rows = MetricsLog.read(tmp_path / "metrics.jsonl")
    if name == "fed-sb":  # A and B survived in the clients' Flower state between rounds
        assert all(r.get("fed_sb_resent", 0) == 0 for r in rows[2:])
        per_client = [c["bytes_down"] for r in rows[2:] for c in r["client_bytes"]]
        assert min(per_client) < max(per_client) / 2  # some clients got R and the head only
    assert summary["final_accuracy"] is not None
    assert summary["adapter_exact"] is (name != "fedex-lora")
    assert summary.get("rounds_not_aggregated", 0) == 0


@pytest.mark.parametrize("name", ["fedex-lora", "fed-sb"])
def test_merged_export_scores_the_servers_last_loss(name: str, tmp_path) -> None:
    """`fedpeft export --merged`: FedEx-LoRA's from checkpoint/ (residuals in the base; adapter/
    is a truncated SVD), Fed-SB's from adapter/ (R folded into B); plain transformers then scores
    the server's final held-out loss."""
    import json

    from fedpeft.server.inprocess import run_plain
    from transformers import AutoModelForSequenceClassification

    from fedpeft.cli import main

    run = tmp_path / "run"
    rows = run_plain(None, [*TINY, f'method.name="{name}"', "federation.rounds=3",
                            'train.precision="fp32"'], out=run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["adapter_exact"] is (name == "fed-sb")
    assert main(["export", str(run), "--merged", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    data = get_workspace(load_config(run / "config.toml")).test_set(0)
    with torch.no_grad():
        losses = [float(torch.nn.functional.cross_entropy(
            merged(input_ids=torch.tensor([ids])).logits.float(), torch.tensor([int(label)])))
            for ids, label in zip(data.ids, data.labels, strict=True)]
    assert float(np.mean(losses)) == pytest.approx(rows[-1]["loss"], abs=1e-4)
