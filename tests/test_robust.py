"""Robust aggregation (federation.aggregator) and attack injection ([attacks])."""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.stats
import torch
from fedpeft.client.attacks import (
    attack_for,
    attack_upload,
    attacked_data,
    attackers,
    inject_attacks,
)
from fedpeft.strategies import METHODS, ClientProfile, Payload, Upload, build_method, weighted_mean
from fedpeft.strategies.aggregators import (
    Aggregator,
    clip_updates,
    robust_mean,
    update_norms,
)
from fedpeft.strategies.base import robust_problem

from fedpeft.core.config import ConfigError, DataConfig, ModelConfig, load_config
from fedpeft.core.training import Encoded

KEYS = {"l.lora_A.weight": (4, 16), "l.lora_B.weight": (16, 4), "head.weight": (2, 16)}


def _uploads(clients: list[dict[str, torch.Tensor]], sizes: list[int] | None = None) -> list:
    sizes = sizes or [10] * len(clients)
    return [Upload(ClientProfile(i, 4), Payload(c), n)
            for i, (c, n) in enumerate(zip(clients, sizes, strict=True))]


def _random_clients(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=gen) for k, s in KEYS.items()} for _ in range(n)]


def _np(clients: list[dict[str, torch.Tensor]], key: str) -> np.ndarray:
    return np.stack([c[key].double().numpy() for c in clients])


# ---- the maths ----------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 5, 10])
def test_median_is_numpys_coordinate_median(n: int) -> None:
    clients = _random_clients(n)
    got = robust_mean(Aggregator("median"), _uploads(clients), KEYS, {}).tensors
    for key in KEYS:
        assert np.allclose(got[key].numpy(), np.median(_np(clients, key), axis=0), atol=1e-7)
        assert got[key].dtype == torch.float32


@pytest.mark.parametrize(("n", "fraction"), [(10, 0.2), (10, 0.1), (7, 0.3), (5, 0.0), (3, 0.4)])
def test_trimmed_mean_is_scipys_trim_mean(n: int, fraction: float) -> None:
    clients = _random_clients(n, seed=n)
    got = robust_mean(Aggregator("trimmed-mean", trim_fraction=fraction), _uploads(clients),
                      KEYS, {}).tensors
    for key in KEYS:
        want = scipy.stats.trim_mean(_np(clients, key), fraction, axis=0)
        assert np.allclose(got[key].numpy(), want, atol=1e-7)


def test_mean_is_bit_identical_to_weighted_mean() -> None:
    clients, sizes = _random_clients(6), [3, 40, 7, 1, 12, 9]
    uploads = _uploads(clients, sizes)
    got = robust_mean(Aggregator("mean"), uploads, KEYS, {}).tensors
    want = weighted_mean(uploads, KEYS)
    assert all(torch.equal(got[k], want[k]) for k in KEYS)


@pytest.mark.parametrize("bound", [0.0, 0.5])
def test_norm_clip_bounds_every_update_then_takes_the_plain_mean(bound: float) -> None:
    reference = {k: torch.full(s, 3.0) for k, s in KEYS.items()}
    gen = torch.Generator().manual_seed(1)
    scales = [0.1, 0.5, 1.0, 2.0, 50.0]
    clients = [{k: reference[k] + s * torch.randn(shape, generator=gen)
                for k, shape in KEYS.items()} for s in scales]
    updates = {k: torch.stack([c[k].double() - reference[k].double() for c in clients])
               for k in KEYS}
    norms = update_norms(updates)
    limit = bound or float(np.median(norms.numpy()))
    clipped = clip_updates(updates, bound)
    clipped_norms = update_norms(clipped)
    assert bool((clipped_norms <= limit * (1 + 1e-12)).all())
    for i, norm in enumerate(norms.tolist()):  # below the bound: untouched; above: the bound
        want = norm if norm <= limit else limit
        assert clipped_norms[i].item() == pytest.approx(want, rel=1e-12)
    sizes = [1, 2, 3, 4, 10**15]  # claimed counts do not weigh (one client, one vote)
    got = robust_mean(Aggregator("norm-clip", clip_norm=bound), _uploads(clients, sizes), KEYS,
                      reference).tensors
    w = np.full(len(sizes), 1.0 / len(sizes))
    for key in KEYS:
        want = reference[key].double().numpy() + np.tensordot(w, clipped[key].numpy(), axes=1)
        assert np.allclose(got[key].numpy(), want, atol=1e-6)


def _agreeing_round(attack: str, honest: int = 8, bad: int = 2) -> tuple[list, dict, dict]:
    """Clients whose updates roughly agree (a shared direction plus 10% noise), then ``bad``
    attackers of ``attack``; returns (uploads, reference, the honest mean)."""
    gen = torch.Generator().manual_seed(7)
    reference = {k: torch.randn(s, generator=gen) for k, s in KEYS.items()}
    direction = {k: torch.randn(s, generator=gen) for k, s in KEYS.items()}
    clients = [{k: reference[k] + direction[k] + 0.1 * torch.randn(s, generator=gen)
                for k, s in KEYS.items()} for _ in range(honest + bad)]
    honest_mean = {k: torch.stack([c[k] for c in clients[:honest]]).mean(0) for k in KEYS}
    cfg = load_config(None, [f'attacks.kind="{attack}"', "attacks.fraction=0.2",
                             "federation.clients=10"])
    liars = sorted(attackers(cfg))
    honest_ids = [p for p in range(10) if p not in liars]
    ordered: list[dict] = [{}] * 10
    for pid, client in zip([*honest_ids, *liars], clients, strict=True):
        ordered[pid] = attack_upload(cfg, pid, 1, client, reference)
    return _uploads(ordered), reference, honest_mean


def _distance(got: dict, want: dict) -> float:
    return float(torch.sqrt(sum(((got[k] - want[k]).double() ** 2).sum() for k in KEYS)))


@pytest.mark.parametrize("attack", ["sign-flip", "scaled", "noise"])
def test_robust_aggregators_stay_near_the_honest_mean_under_20_percent_attackers(
        attack: str) -> None:
    """Eight clients agree, two attack. Median, trimmed and filtered median ignore them; norm
    clipping bounds their weight to a typical honest update's, which stops scaling but not
    sign flips or noise of the same norm (0.8 u - 0.2 u, as the mean)."""
    uploads, reference, honest = _agreeing_round(attack)
    spread = _distance(reference, honest)  # the size of one honest update
    def error(rule: str) -> float:
        return _distance(robust_mean(Aggregator(rule), uploads, KEYS, reference).tensors, honest)

    plain = error("mean")
    for rule in ("median", "trimmed-mean", "filtered-median"):
        assert error(rule) < 0.1 * spread, (rule, error(rule), spread)
    clipped = error("norm-clip")
    limit = {"sign-flip": 0.45, "scaled": 0.45, "noise": 0.3}[attack]
    assert clipped < limit * spread
    want_plain = {"sign-flip": 0.35, "scaled": 2.0, "noise": 0.0}[attack]
    assert plain > want_plain * spread  # the plain mean is pulled off (0.4 and 2.2 updates)
    if attack == "scaled":
        assert clipped < 0.25 * plain
    # the methods use them: FedIT's aggregate is the median of its uploads
    method = build_method(load_config(None, ['federation.aggregator="median"']))
    state = method.aggregate(Payload(reference), uploads).state
    assert _distance(state.tensors, honest) < 0.25 * spread


def _scaled_round(honest: int, bad: int, seed: int = 11) -> tuple[list, dict, list[dict]]:
    """Honest clients whose updates roughly agree (a shared direction plus 30% noise) and
    ``bad`` clients uploading ``sent - 10 * update``; returns (uploads, reference, honest)."""
    gen = torch.Generator().manual_seed(seed)
    reference = {k: torch.randn(s, generator=gen) for k, s in KEYS.items()}
    direction = {k: torch.randn(s, generator=gen) for k, s in KEYS.items()}
    clients = [{k: reference[k] + direction[k] + 0.3 * torch.randn(s, generator=gen)
                for k, s in KEYS.items()} for _ in range(honest + bad)]
    hostile = [{k: reference[k] - 10 * (c[k] - reference[k]) for k in KEYS}
               for c in clients[honest:]]
    return _uploads(clients[:honest] + hostile), reference, clients[:honest]


@pytest.mark.parametrize("bad", [0, 1, 3, 4])
def test_filtered_median_drops_far_uploads_and_is_the_median_of_the_rest(bad: int) -> None:
    """Up to 4 of 10 scaled attackers (a round's sample at 20% often holds 3+): all are
    dropped, no honest client is, and the aggregate is then exactly the honest median, where
    the plain median is pulled one rank per attacker."""
    uploads, reference, honest = _scaled_round(10 - bad, bad)
    got = robust_mean(Aggregator("filtered-median"), uploads, KEYS, reference)
    assert got.dropped == bad
    for key in KEYS:
        want = np.median(_np(honest, key), axis=0)
        assert np.allclose(got.tensors[key].numpy(), want, atol=1e-6)
    honest_median = {k: torch.from_numpy(np.median(_np(honest, k), axis=0)) for k in KEYS}
    median = robust_mean(Aggregator("median"), uploads, KEYS, reference).tensors
    if bad >= 3:
        assert _distance(median, honest_median) > 10 * _distance(got.tensors, honest_median)


def test_filtered_median_keeps_at_least_half_and_follows_its_factor() -> None:
    """Random (disagreeing) clients with one far out: a factor of 1 drops everything beyond the
    median distance, yet half remain; a huge factor drops nothing and is the plain median."""
    clients = _random_clients(9, seed=4)
    clients[0] = {k: 100 * v for k, v in clients[0].items()}
    uploads = _uploads(clients)
    tight = robust_mean(Aggregator("filtered-median", filter_factor=1.0), uploads, KEYS, {})
    assert 1 <= tight.dropped <= 4
    loose = robust_mean(Aggregator("filtered-median", filter_factor=1e6), uploads, KEYS, {})
    plain = robust_mean(Aggregator("median"), uploads, KEYS, {})
    assert loose.dropped == 0
    assert all(torch.equal(loose.tensors[k], plain.tensors[k]) for k in KEYS)
    assert robust_mean(Aggregator("filtered-median"), uploads, KEYS, {}).dropped == 1


def test_the_round_metrics_report_dropped_uploads() -> None:
    uploads, reference, _ = _scaled_round(7, 3)
    for name in ("fedit", "ffa-lora"):
        method = build_method(load_config(None, [f'method.name="{name}"',
                                                 'federation.aggregator="filtered-median"']))
        agg = method.aggregate(method.init(reference), uploads)
        assert agg.metrics == {"uploads_dropped": 3.0}
    plain = build_method(load_config(None, ['federation.aggregator="median"']))
    assert plain.aggregate(Payload(reference), uploads).metrics == {}


def test_ffa_lora_aggregates_its_sent_keys_robustly() -> None:
    cfg = load_config(None, ['method.name="ffa-lora"', 'federation.aggregator="trimmed-mean"'])
    method = build_method(cfg)
    state = method.init({k: torch.zeros(s) for k, s in KEYS.items()})
    sent = method.downlink(state, ClientProfile(0, 4)).tensors
    assert "l.lora_A.weight" not in sent
    gen = torch.Generator().manual_seed(3)
    clients = [{k: torch.randn(v.shape, generator=gen) for k, v in sent.items()}
               for _ in range(10)]
    new = method.aggregate(state, _uploads(clients)).state
    for key in sent:
        want = scipy.stats.trim_mean(_np(clients, key), 0.2, axis=0)
        assert np.allclose(new.tensors[key].numpy(), want, atol=1e-6)
    assert torch.equal(new.tensors["l.lora_A.weight"], state.tensors["l.lora_A.weight"])


# ---- refusals ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "norm-clip", "filtered-median"])
def test_methods_that_do_not_average_refuse_a_robust_aggregator(name: str, rule: str) -> None:
    cfg = load_config(None, [f'method.name="{name}"', f'federation.aggregator="{rule}"'])
    reason = robust_problem(METHODS[name])
    if not reason:  # a mean of the uploads, or a method that applies the rule itself
        assert build_method(cfg).ctx.aggregator == Aggregator(rule)
        return  # the method's own reason, or "aggregates otherwise"
    assert reason and (METHODS[name].robust_refusal or "aggregates otherwise" in reason)
    with pytest.raises(ConfigError, match=f"aggregator = '{rule}'.*{name}.*{re.escape(reason)}"):
        build_method(cfg)


def test_robust_methods_are_the_mean_methods() -> None:
    assert {n for n, c in METHODS.items() if c.mean_aggregate} == {
        "fedit", "ffa-lora", "rolora", "fedsvd", "fed-sb"}


@pytest.mark.parametrize(("overrides", "match"), [
    (['federation.aggregator="mode"'], "federation.aggregator = 'mode' is not allowed"),
    (["federation.trim_fraction=0.5"], "trim_fraction = 0.5 is out of range: below 0.5"),
    (["federation.clip_norm=nan"], "clip_norm = nan is not a finite number"),
    (["federation.clip_norm=-1"], "clip_norm = -1.0 is out of range"),
    (["federation.filter_factor=0.5"], "filter_factor = 0.5 is out of range"),
    (["federation.filter_factor=nan"], "filter_factor = nan is not a finite number"),
    (["federation.filter_factor=inf"], "filter_factor = inf is not a finite number"),
    (['federation.aggregator="median"', 'privacy.client_level="server-fixed"'],
     "client-level DP"),
    (['attacks.kind="scaled"'], "set both"),
    (["attacks.fraction=0.2"], "set both"),
    (['attacks.kind="noise"', "attacks.fraction=0.004"], r"\(0 of federation.clients = 100\)"),
    (['attacks.kind="flip"', "attacks.fraction=0.2"], "attacks.kind = 'flip' is not allowed"),
    (["attacks.scale=inf"], "attacks.scale = inf is not a finite number"),
])
def test_bad_robustness_settings_are_refused(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_fedpeft_server_refuses_attacks() -> None:
    from fedpeft.deploy.coordinator import refuse_simulation_only

    cfg = load_config(None, ['attacks.kind="sign-flip"', "attacks.fraction=0.1"])
    with pytest.raises(ConfigError,
                       match=r"attacks.kind, attacks.fraction: attack injection is for"):
        refuse_simulation_only(cfg)
    refuse_simulation_only(load_config(None, []))


# ---- attack assignment ---------------------------------------------------------------------

@pytest.mark.parametrize(("clients", "fraction"), [(100, 0.2), (100, 0.1), (10, 0.2), (7, 0.5)])
def test_attackers_are_exactly_the_fraction_and_seeded(clients: int, fraction: float) -> None:
    def chosen(seed: int) -> frozenset[int]:
        return attackers(load_config(None, [f"federation.clients={clients}",
                                            "federation.clients_per_round=1",
                                            f"federation.seed={seed}", 'attacks.kind="noise"',
                                            f"attacks.fraction={fraction}"]))

    first = chosen(0)
    assert len(first) == round(fraction * clients)
    assert first <= set(range(clients))
    assert chosen(0) == first  # the same run, the same attackers
    order = np.random.default_rng([0, 19]).permutation(clients)
    assert first == {int(p) for p in order[:round(fraction * clients)]}
    if 0 < len(first) < clients - 1:
        assert any(chosen(s) != first for s in (1, 2, 3))  # another seed, others
    assert attackers(load_config(None, [f"federation.clients={clients}",
                                        "federation.clients_per_round=1"])) == frozenset()


# ---- what each attack uploads ---------------------------------------------------------------

def _attack_cfg(kind: str, *extra: str):
    return load_config(None, [f'attacks.kind="{kind}"', "attacks.fraction=0.2",
                              "federation.clients=10", *extra])


def _one_upload() -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(11)
    sent = {k: torch.randn(s, generator=gen) for k, s in KEYS.items()}
    upload = {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in sent.items()}
    return sent, upload


@pytest.mark.parametrize(("kind", "extra", "factor"), [
    ("sign-flip", (), -1.0), ("scaled", (), -10.0), ("scaled", ("attacks.scale=3.5",), 3.5)])
def test_sign_flip_and_scaled_attackers_upload_the_scaled_update(kind: str, extra: tuple,
                                                                 factor: float) -> None:
    cfg = _attack_cfg(kind, *extra)
    sent, upload = _one_upload()
    bad, good = min(attackers(cfg)), min(set(range(10)) - attackers(cfg))
    got = attack_upload(cfg, bad, 1, upload, sent)
    for k in KEYS:
        assert torch.allclose(got[k] - sent[k], factor * (upload[k] - sent[k]), atol=1e-5)
        assert got[k].dtype == upload[k].dtype
    assert attack_upload(cfg, good, 1, upload, sent) is upload  # an honest client: untouched


def test_noise_attackers_upload_gaussian_noise_of_the_updates_norm() -> None:
    cfg = _attack_cfg("noise")
    sent, upload = _one_upload()
    bad = min(attackers(cfg))
    got = attack_upload(cfg, bad, 1, upload, sent)
    honest = {k: upload[k] - sent[k] for k in KEYS}
    noise = {k: got[k] - sent[k] for k in KEYS}

    def norm(t: dict) -> float:
        return float(torch.sqrt(sum((v.double() ** 2).sum() for v in t.values())))

    assert norm(noise) == pytest.approx(norm(honest), rel=1e-5)
    flat_noise = torch.cat([noise[k].flatten() for k in KEYS])
    flat_honest = torch.cat([honest[k].flatten() for k in KEYS])
    assert abs(float(torch.nn.functional.cosine_similarity(flat_noise, flat_honest, dim=0))) < 0.2
    assert abs(float(scipy.stats.skew(flat_noise.numpy()))) < 0.5  # zero-mean symmetric noise
    again = attack_upload(cfg, bad, 1, upload, sent)
    assert all(torch.equal(again[k], got[k]) for k in KEYS)  # seeded by run, round, client
    other = attack_upload(cfg, bad, 2, upload, sent)
    assert attack_upload(cfg, bad, 1, {}, sent) == {}  # no upload (DP budget spent): nothing
    assert not torch.equal(other["head.weight"], got["head.weight"])


def test_label_flip_attackers_train_on_flipped_labels() -> None:
    cfg = _attack_cfg("label-flip")
    data = Encoded(ids=((1, 2), (3,), (4, 5), (6,)), labels=np.array([0, 1, 2, 0]), pad_id=0)
    bad, good = min(attackers(cfg)), min(set(range(10)) - attackers(cfg))
    from fedpeft.core.tasks import Classification

    task = Classification(ModelConfig(), DataConfig(), None, ("a", "b", "c"))
    assert attacked_data(cfg, data, bad, task).labels.tolist() == [2, 1, 0, 2]
    assert attacked_data(cfg, data, good, task) is data
    sent, upload = _one_upload()
    assert attack_upload(cfg, bad, 1, upload, sent) is upload  # the upload itself is honest
    assert attack_for(cfg, bad) == "label-flip" and attack_for(cfg, good) is None


def test_the_client_mod_replaces_a_compressed_upload(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Flower mod decodes the (compressed) upload against the downlink and sends the
    attacked tensors; honest clients' replies pass untouched."""
    from flwr.app import Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedpeft.core.wire import CONFIG_RECORD, config_record, payload_to_records, unpack_record

    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    cfg = _attack_cfg("scaled", 'compression.up=["int8"]')
    sent, upload = _one_upload()
    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})

    def reply_of(partition: int) -> dict:
        content = payload_to_records(Payload(sent), {"fedpeft.round": 1,
                                                     "fedpeft.partition": partition})
        content[CONFIG_RECORD] = config_record(cfg)
        msg = Message(content=content, dst_node_id=5, message_type=MessageType.TRAIN,
                      group_id="1")

        def client(message: Message, _: Context) -> Message:
            reply = payload_to_records(Payload(upload), filters=cfg.compression.up,
                                       reference=unpack_record(message.content))
            return Message(content=reply, reply_to=message)

        return unpack_record(inject_attacks(msg, ctx, client).content, reference=sent)

    bad, good = min(attackers(cfg)), min(set(range(10)) - attackers(cfg))
    attacked, honest = reply_of(bad), reply_of(good)
    for k in KEYS:  # int8 quantises the honest update by < 1%; the attack is x -10 of it
        assert torch.allclose(attacked[k] - sent[k], -10 * (honest[k] - sent[k]), atol=1e-5)
        assert torch.allclose(honest[k], upload[k], atol=0.02)


def test_attacks_reach_the_plain_loop() -> None:
    """The in-process transport applies the update attacks: with every client a sign-flipper
    the run differs from the clean one, and label-flip changes training itself."""
    from fedpeft.server.inprocess import run_plain

    from tests.helpers import TINY

    clean = run_plain(None, [*TINY, "federation.rounds=1"])
    flipped = run_plain(None, [*TINY, "federation.rounds=1", 'attacks.kind="sign-flip"',
                               "attacks.fraction=1.0"])
    labels = run_plain(None, [*TINY, "federation.rounds=1", 'attacks.kind="label-flip"',
                              "attacks.fraction=1.0"])
    assert clean[0]["loss"] == flipped[0]["loss"] == labels[0]["loss"]  # round 0: the init
    assert len({clean[1]["loss"], flipped[1]["loss"], labels[1]["loss"]}) == 3
