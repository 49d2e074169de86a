"""What RoLoRA, FedSVD, Fed-SB and FedEx-LoRA compose with: robust aggregators, client-level DP
and secure aggregation, each against the composition's own formula computed independently here
(numpy / scipy medians and trimmed means, our own clipping, Flower's noise draw replayed from the
same seed, the plain mean within SecAgg's fixed-point bound), on uploads that look like training
(clients that roughly agree, unequal example counts, non-square layers); and each refusal with
its reason."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from fedpeft.server.rounds import Reply, RoundLoop
from fedpeft.server.secagg import secure_train
from fedpeft.strategies import METHODS, ClientProfile, Upload, build_method
from fedpeft.strategies.base import client_dp_problem, method_help, robust_problem, secagg_problem
from fedpeft.strategies.fed_sb import CORE, FACTORS, GRAD, HOLDS, lora_sb_init
from fedpeft.strategies.fedex_lora import RES

from fedpeft.core.config import ConfigError, load_config
from fedpeft.core.keys import NUM_EXAMPLES
from fedpeft.core.payload import Payload
from fedpeft.core.secagg import SecAggClient, respond
from fedpeft.core.secagg.layout import flatten_update
from tests.helpers import LORA_RANK, LORA_SHAPES, TINY, lora_template, near_upload

R = LORA_RANK
ALPHA = 8
SHAPES = LORA_SHAPES  # layer -> (d_out, d_in)
HEAD = ("head.weight", "head.bias")
SIZES = [5, 40, 13, 22, 9, 31, 17]
RULES = ["median", "trimmed-mean", "norm-clip", "filtered-median"]


def _cfg(name: str, *overrides: str):
    return load_config(None, [f'method.name="{name}"', f"model.rank={R}", f"model.alpha={ALPHA}",
                              *overrides])


def _sent(method, state: Payload, profile: ClientProfile) -> dict[str, torch.Tensor]:
    return {**state.tensors, **method.downlink(state, profile).tensors}


def _uploads(method, state: Payload, hostile: int | None = None) -> list[Upload]:
    """Honest clients near the sent state; ``hostile``: that client sends 1000x its update."""
    uploads = []
    for i, n in enumerate(SIZES):
        profile = ClientProfile(i, R)
        spec = method.expected_upload(state, profile)
        sent = _sent(method, state, profile)
        tensors = near_upload(sent, spec.tensors, 100 + i)
        if i == hostile:
            tensors = {k: sent.get(k, torch.zeros_like(v)) + 1000 * (v - sent.get(k, 0))
                       for k, v in tensors.items()}
        scalars = {HOLDS: int(state.scalars[FACTORS])} if HOLDS in spec.scalars else {}
        uploads.append(Upload(profile, Payload(tensors, scalars), n))
    return uploads


def _fed_sb_gradient_uploads(method) -> tuple[Payload, list[Upload]]:
    state = method.init(lora_template())
    spec = method.expected_upload(state, ClientProfile(0, R)).tensors
    common = {k: torch.randn(shape, generator=torch.Generator().manual_seed(9))
              for k, shape in spec.items()}
    uploads = []
    for i, n in enumerate(SIZES):  # a shared direction plus each client's own
        gen = torch.Generator().manual_seed(50 + i)
        grads = {k: common[k] + 0.8 * torch.randn(common[k].shape, generator=gen) for k in spec}
        uploads.append(Upload(ClientProfile(i, R), Payload(grads), n))
    return state, uploads


def _ready(name: str, *overrides: str):
    """The method and a state past Fed-SB's gradient round (others: the initial state)."""
    method = build_method(_cfg(name, *overrides))
    if name == "fed-sb":
        state, uploads = _fed_sb_gradient_uploads(build_method(_cfg(name)))
        return method, build_method(_cfg(name)).aggregate(state, uploads).state
    return method, method.init(lora_template())


def _pairs():
    return [(f"{layer}.lora_A.weight", f"{layer}.lora_B.weight", layer) for layer in SHAPES]


# ---- independent formulas ----------------------------------------------------------------------
def _stack(uploads: list[Upload], key: str) -> np.ndarray:
    return np.stack([u.payload.tensors[key].double().numpy() for u in uploads])


def _norms(uploads: list[Upload], sent: dict, keys: list[str], centre=None) -> np.ndarray:
    """Each upload's L2 distance over ``keys`` from ``sent`` (or from ``centre`` per key)."""
    return np.sqrt(sum(((_stack(uploads, k) - (centre[k] if centre is not None
                                               else sent[k].double().numpy())) ** 2)
                       .reshape(len(uploads), -1).sum(axis=1) for k in keys))


def _expected(rule: str, uploads: list[Upload], sent: dict, keys: list[str]) -> dict:
    """The rule's aggregate of ``keys``, from numpy / scipy and docs/robustness.md's words."""
    if rule == "median":
        return {k: np.median(_stack(uploads, k), axis=0) for k in keys}
    if rule == "trimmed-mean":
        return {k: scipy.stats.trim_mean(_stack(uploads, k), 0.2, axis=0) for k in keys}
    if rule == "norm-clip":  # updates clipped to the median norm, then the plain mean
        norms = _norms(uploads, sent, keys)
        factor = np.minimum(1.0, np.median(norms) / norms)
        return {k: sent[k].double().numpy() + np.mean(
            (_stack(uploads, k) - sent[k].double().numpy()) * factor.reshape(-1, *[1] * len(
                sent[k].shape)), axis=0) for k in keys}
    medians = {k: np.median(_stack(uploads, k), axis=0) for k in keys}  # filtered-median
    distances = _norms(uploads, sent, keys, centre=medians)
    kept = [u for u, d in zip(uploads, distances, strict=True) if d <= 3 * np.median(distances)]
    assert len(kept) < len(uploads)  # the hostile client is dropped
    return {k: np.median(_stack(kept, k), axis=0) for k in keys}


def _plain_mean(uploads: list[Upload], key: str) -> np.ndarray:
    w = np.array([u.num_examples for u in uploads], dtype=np.float64)
    return np.tensordot(w / w.sum(), _stack(uploads, key), axes=1)


# ---- robust aggregators ------------------------------------------------------------------------
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name", ["rolora", "fedsvd", "fed-sb"])
def test_a_robust_rule_replaces_the_mean_of_the_uploaded_tensors(name: str, rule: str) -> None:
    """One hostile client (1000x its update): the rule's aggregate of the uploaded tensors is
    the method's, the frozen tensors stay bit for bit, and the product stays exact for it."""
    method, state = _ready(name, f'federation.aggregator="{rule}"')
    uploads = _uploads(method, state, hostile=3)
    keys = sorted(method.expected_upload(state, ClientProfile(0, R)).tensors)
    sent = _sent(method, state, ClientProfile(0, R))
    want = _expected(rule, uploads, sent, keys)
    for key in keys:  # the hostile upload would have moved the plain mean far away
        assert not np.allclose(want[key], _plain_mean(uploads, key), atol=1e-3), key
    new = method.aggregate(state, uploads).state
    for key in HEAD:
        assert np.allclose(new.tensors[key].double().numpy(), want[key], atol=1e-6), key
    for a_key, b_key, layer in _pairs():
        a_old = state.tensors[a_key].double().numpy()
        if name == "rolora":  # B-phase: B is the rule's B, A untouched
            assert torch.equal(new.tensors[a_key], state.tensors[a_key])
            assert np.allclose(new.tensors[b_key].double().numpy(), want[b_key], atol=1e-6)
        elif name == "fedsvd":  # the SVD re-factorises the rule's B times the old A
            product = new.tensors[b_key].double() @ new.tensors[a_key].double()
            assert np.allclose(product.numpy(), want[b_key] @ a_old, atol=1e-6)
            a = new.tensors[a_key].double()
            assert torch.allclose(a @ a.T, torch.eye(R, dtype=torch.float64), atol=1e-5)
        else:  # fed-sb: R is the rule's R, A and B untouched
            assert torch.equal(new.tensors[a_key], state.tensors[a_key])
            assert torch.equal(new.tensors[b_key], state.tensors[b_key])
            assert np.allclose(new.tensors[CORE + layer].double().numpy(), want[CORE + layer],
                               atol=1e-6)


@pytest.mark.parametrize("rule", RULES)
def test_rolora_a_phase_takes_the_robust_rule_too(rule: str) -> None:
    method, state = _ready("rolora", f'federation.aggregator="{rule}"')
    state = method.aggregate(state, _uploads(method, state)).state  # B-phase done
    uploads = _uploads(method, state, hostile=5)
    keys = sorted(method.expected_upload(state, ClientProfile(0, R)).tensors)
    assert all(".lora_B." not in k for k in keys)
    want = _expected(rule, uploads, _sent(method, state, ClientProfile(0, R)), keys)
    new = method.aggregate(state, uploads).state
    for a_key, b_key, _ in _pairs():
        assert torch.equal(new.tensors[b_key], state.tensors[b_key])
        assert np.allclose(new.tensors[a_key].double().numpy(), want[a_key], atol=1e-6)


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_fed_sb_gradient_round_takes_the_robust_rule(rule: str) -> None:
    """LoRA-SB's factors come from the rule's G (sign and SVD after it): s B R A is the best
    rank-r approximation of -eta sign(rule(G_k)), whatever a hostile client sends."""
    method = build_method(_cfg("fed-sb", "method.init_lr=0.01", f'federation.aggregator="{rule}"'))
    state, uploads = _fed_sb_gradient_uploads(method)
    uploads[2] = Upload(uploads[2].profile, Payload({k: -1e4 * v for k, v in
                                                     uploads[2].payload.tensors.items()}), 40)
    new = method.aggregate(state, uploads).state
    s = ALPHA / R
    for a_key, b_key, layer in _pairs():
        grad = _expected(rule, uploads, {}, [GRAD + layer])[GRAD + layer]
        assert not np.array_equal(np.sign(grad), np.sign(_plain_mean(uploads, GRAD + layer)))
        b_want, r_want, a_want = lora_sb_init(torch.from_numpy(grad), R, 0.01, s)
        got = (new.tensors[b_key].double() @ new.tensors[CORE + layer].double()
               @ new.tensors[a_key].double())
        assert torch.allclose(got, b_want @ r_want @ a_want, atol=1e-6)


@pytest.mark.parametrize("rule", RULES)
def test_fedex_lora_takes_the_robust_rule_over_the_clients_models(rule: str) -> None:
    """W0 + residual + s B_bar A_bar after the round = the old base + the rule's s B_k A_k (the
    clients' models, dense), the head the rule's, the factors the rule's A_k and B_k."""
    plain = build_method(_cfg("fedex-lora"))
    start = plain.init(lora_template())
    state = plain.aggregate(start, _uploads(plain, start)).state  # a non-zero residual
    method = build_method(_cfg("fedex-lora", f'federation.aggregator="{rule}"'))
    uploads = _uploads(method, state, hostile=3)
    s = ALPHA / R

    def model(tensors: dict) -> dict:
        out = {f"P::{layer}": s * tensors[b].double() @ tensors[a].double()
               for a, b, layer in _pairs()}
        return {**out, **{k: tensors[k] for k in HEAD}}

    models = [Upload(u.profile, Payload(model(u.payload.tensors)), u.num_examples)
              for u in uploads]
    sent = model(state.tensors)
    want = _expected(rule, models, sent, sorted(sent))
    factors = _expected(rule, uploads, state.tensors, [k for a, b, _ in _pairs() for k in (a, b)])
    new = method.aggregate(state, uploads).state
    for a_key, b_key, layer in _pairs():
        assert not np.allclose(want[f"P::{layer}"], _plain_mean(models, f"P::{layer}"), atol=1e-3)
        whole = (new.tensors[RES + layer].double()
                 + s * new.tensors[b_key].double() @ new.tensors[a_key].double())
        old = state.tensors[RES + layer].double().numpy()
        assert np.allclose(whole.numpy(), old + want[f"P::{layer}"], atol=1e-6), layer
        for key in (a_key, b_key):
            assert np.allclose(new.tensors[key].double().numpy(), factors[key], atol=1e-6)
    for key in HEAD:
        assert np.allclose(new.tensors[key].double().numpy(), want[key], atol=1e-6)


# ---- client-level DP ---------------------------------------------------------------------------
C, Z, M = 0.05, 0.7, 4  # clip, noise multiplier, clients sampled per round


def _dp_round(loop: RoundLoop, rnd: int, seed: int) -> tuple[dict, dict, list[Upload]]:
    """One round through the loop's collect: 3 of the M sampled clients answer (the 4th counts
    as a zero update). The stats, what they were sent, their uploads."""
    profiles = loop.sample(rnd, 0, list(range(loop.cfg.federation.clients)))
    assert len(profiles) == M
    sent = dict(loop.downlink(profiles[0]).tensors)
    spec = loop.method.expected_upload(loop.state, profiles[0]).tensors
    uploads = [Upload(p, Payload(near_upload(sent, spec, 200 + rnd * 10 + i)), SIZES[i])
               for i, p in enumerate(profiles[:3])]
    np.random.seed(seed)  # Flower's noise draws from numpy's global generator
    stats = loop.collect(rnd, [Reply(u.profile, {NUM_EXAMPLES: u.num_examples}, u.payload)
                               for u in uploads])
    return stats, sent, uploads


def _noised_mean(uploads: list[Upload], sent: dict, seed: int) -> dict[str, np.ndarray]:
    """G + (1/M) sum_k clip_C(U_k - G) + N(0, (Z C / M)^2), the noise drawn as Flower draws it
    (one normal array per key, keys in sorted order, from numpy's generator at ``seed``)."""
    keys = sorted(uploads[0].payload.tensors)
    norms = _norms(uploads, sent, keys)
    assert (norms > C).any()  # clipping acts
    factor = np.minimum(1.0, C / norms)
    rng = np.random.RandomState(seed)
    out = {}
    for key in keys:
        g = sent[key].double().numpy()
        deltas = (_stack(uploads, key) - g) * factor.reshape(-1, *[1] * g.ndim)
        out[key] = g + deltas.sum(axis=0) / M + rng.normal(0, Z * C / M, g.shape)
    return out


def _dp_loop(name: str, mode: str = "server-fixed") -> RoundLoop:
    cfg = _cfg(name, f'privacy.client_level="{mode}"', f"privacy.client_clip={C}",
               f"privacy.client_noise={Z}", "federation.clients=6",
               f"federation.clients_per_round={M}")
    method = build_method(cfg)
    return RoundLoop(cfg, method, method.init(lora_template()))


def test_rolora_client_dp_noises_the_trained_factor_only_in_both_phases() -> None:
    loop = _dp_loop("rolora")
    for rnd, (trained, frozen) in enumerate((("lora_B", "lora_A"), ("lora_A", "lora_B")), 1):
        before = loop.state
        stats, sent, uploads = _dp_round(loop, rnd, seed=rnd)
        assert stats["aggregated"] == 1 and stats["clients_ok"] == 3
        assert stats["client_epsilon"] > 0
        want = _noised_mean(uploads, sent, seed=rnd)
        for key, value in loop.state.tensors.items():
            if f".{frozen}." in key:  # the frozen factor: not released again, no noise
                assert torch.equal(value, before.tensors[key]), key
            else:
                assert f".{trained}." in key or key in HEAD
                assert np.allclose(value.double().numpy(), want[key], atol=1e-6), key


def test_fedsvd_client_dp_noises_the_mean_of_b_before_the_svd() -> None:
    loop = _dp_loop("fedsvd")
    before = loop.state
    stats, sent, uploads = _dp_round(loop, 1, seed=11)
    assert stats["aggregated"] == 1
    want = _noised_mean(uploads, sent, seed=11)
    for a_key, b_key, _ in _pairs():
        product = loop.state.tensors[b_key].double() @ loop.state.tensors[a_key].double()
        old_a = before.tensors[a_key].double().numpy()
        assert np.allclose(product.numpy(), want[b_key] @ old_a, atol=1e-6)
        a = loop.state.tensors[a_key].double()
        assert torch.allclose(a @ a.T, torch.eye(R, dtype=torch.float64), atol=1e-5)
    for key in HEAD:
        assert np.allclose(loop.state.tensors[key].double().numpy(), want[key], atol=1e-6)


def test_client_fixed_dp_rejects_an_unclipped_b_upload() -> None:
    """client-fixed: the server checks each update of the uploaded keys against C."""
    loop = _dp_loop("fedsvd", "client-fixed")
    stats, _, _ = _dp_round(loop, 1, seed=3)
    assert stats["clients_rejected"] >= 1  # the uploads above C were not clipped by a client


# ---- secure aggregation ------------------------------------------------------------------------
def _secure(loop: RoundLoop, uploads: dict[int, dict]) -> dict:
    """One SecAgg+ round of the real server code (secure_train) with in-memory clients that
    upload ``uploads[partition]``, masked against what each was sent."""
    clients: dict[int, SecAggClient] = {}

    def deliver(loop: RoundLoop, box) -> dict:
        out = {}
        for node, (profile, fields) in box.requests.items():
            client = clients.setdefault(node, SecAggClient(node, 0))
            tensors = uploads[profile.partition_id]
            shapes = {k: tuple(v.shape) for k, v in tensors.items()}
            vector = flatten_update(tensors, loop.received(profile).tensors, shapes)
            out[node] = respond(client, box.stage, fields,
                                lambda v=vector, p=profile: (v, float(SIZES[p.partition_id])))
        return out

    return secure_train(loop, 1, 0, list(range(loop.cfg.federation.clients)), 0, deliver)


@pytest.mark.parametrize("name", ["rolora", "fedsvd"])
def test_secagg_aggregate_equals_the_plain_one_within_the_fixed_point_bound(name: str) -> None:
    cfg = _cfg(name, "secagg.enabled=true", "federation.clients=5",
               "federation.clients_per_round=5", "secagg.clip_range=8")
    method = build_method(cfg)
    start = method.init(lora_template())
    loop = RoundLoop(cfg, method, start)
    plain = _uploads(method, start)[:5]
    stats = _secure(loop, {u.profile.partition_id: u.payload.tensors for u in plain})
    assert stats["aggregated"] == 1 and stats["clients_ok"] == 5
    bound = stats["secagg_error_bound"]
    assert 0 < bound < 1e-6
    want = method.aggregate(start, plain).state
    for key in HEAD:
        assert torch.allclose(loop.state.tensors[key].double(), want.tensors[key].double(),
                              atol=bound + 1e-7)
    for a_key, b_key, _ in _pairs():
        got = loop.state.tensors[b_key].double() @ loop.state.tensors[a_key].double()
        exp = want.tensors[b_key].double() @ want.tensors[a_key].double()
        scale = float(start.tensors[a_key].abs().max()) * R  # |(dB) A| <= r max|A| |dB|
        assert torch.allclose(got, exp, atol=bound * scale + 1e-6), (name, b_key)
        if name == "rolora":
            assert torch.equal(loop.state.tensors[a_key], start.tensors[a_key])


# ---- end to end in the plain loop --------------------------------------------------------------
@pytest.mark.parametrize(("name", "extra"), [
    ("rolora", 'federation.aggregator="median"'),
    ("fedsvd", 'federation.aggregator="filtered-median"'),
    ("fed-sb", 'federation.aggregator="trimmed-mean"'),
    ("fedex-lora", 'federation.aggregator="norm-clip"'),
    ("rolora", 'privacy.client_level="server-fixed"'),
    ("fedsvd", 'privacy.client_level="server-fixed"'),
    ("rolora", "secagg.enabled=true"),
    ("fedsvd", "secagg.enabled=true"),
])
def test_plain_loop_runs_each_new_composition(name: str, extra: str) -> None:
    """The single-process round loop on tiny-bert (real clients, real training): every round
    aggregated with the composition on, the global model scored."""
    from fedpeft.server.inprocess import run_plain

    rows = run_plain(None, [*TINY, f'method.name="{name}"', extra, "privacy.client_noise=0.1",
                            "train.local_steps=1", "eval.subset=40"])
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["aggregated"] == 1 and row["accuracy"] is not None
        if "client_level" in extra:
            assert row["client_epsilon"] > 0
        if "secagg" in extra:
            assert row["secagg_error_bound"] > 0


@pytest.mark.parametrize("name", ["rolora", "fedsvd"])
def test_plain_loop_runs_secagg_with_client_level_dp(name: str) -> None:
    """SecAgg+ with the clients' distributed noise: the method aggregates one upload holding the
    noised mean of its uploaded keys, as under server-side client-level DP."""
    from fedpeft.server.inprocess import run_plain

    rows = run_plain(None, [*TINY, f'method.name="{name}"', "secagg.enabled=true",
                            'privacy.client_level="server-fixed"', "privacy.client_noise=0.1",
                            "train.local_steps=1"])
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["aggregated"] == 1 for r in rows[1:])
    assert 0 < rows[1]["client_epsilon"] < rows[2]["client_epsilon"]


# ---- refusals ----------------------------------------------------------------------------------
REFUSED = [  # (method, override, what the error must say)
    ("fedex-lora", 'privacy.client_level="server-fixed"', "needs each client's product"),
    ("fedex-lora", "secagg.enabled=true", "mean of the clients' products"),
    ("fed-sb", 'privacy.client_level="server-fixed"', "uploads raw loss gradients"),
    ("fed-sb", "secagg.enabled=true", "whether it holds the frozen A and B"),
]


@pytest.mark.parametrize(("name", "override", "reason"), REFUSED)
def test_what_the_maths_does_not_allow_is_refused_with_the_reason(name: str, override: str,
                                                                   reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        build_method(_cfg(name, override))


def test_allowed_compositions_build_and_methods_lists_each() -> None:
    allowed = {"rolora": ('federation.aggregator="norm-clip"',
                          'privacy.client_level="client-fixed"', "secagg.enabled=true"),
               "fedsvd": ('federation.aggregator="median"', 'privacy.client_level="server-fixed"',
                          "secagg.enabled=true"),
               "fed-sb": ('federation.aggregator="filtered-median"',),
               "fedex-lora": ('federation.aggregator="trimmed-mean"',)}
    for name, overrides in allowed.items():
        for override in overrides:
            assert build_method(_cfg(name, override)).name == name
    text = method_help()
    for name, cls in METHODS.items():
        block = text.split(f"\n{name}: ")[-1] if not text.startswith(f"{name}: ") else text
        for label, problem in (("robust aggregators", robust_problem(cls)),
                               ("secure aggregation", secagg_problem(cls)),
                               ("client-level DP", client_dp_problem(cls))):
            assert f"    {label}: {'no: ' + problem if problem else 'yes'}" in block, (name, label)
    assert not robust_problem(METHODS["fed-sb"]) and client_dp_problem(METHODS["fed-sb"])
    assert not robust_problem(METHODS["fedex-lora"]) and not METHODS["fedex-lora"].mean_aggregate
    assert all(not client_dp_problem(METHODS[n]) for n in ("fedit", "ffa-lora", "rolora",
                                                           "fedsvd"))
