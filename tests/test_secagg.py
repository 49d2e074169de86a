"""SecAgg+ (fedpeft/core/secagg): the primitives, the encoding, and the protocol run in process
with simulated clients that drop out, misbehave, or face a lying server.

Inputs look like one round of LoRA training: every client's update is a shared direction plus a
smaller client-specific part (clients that roughly agree), with unequal example counts.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable

import numpy as np
import pytest
from scipy import stats

from fedpeft.core.secagg import (
    STAGES,
    ClientPolicy,
    EncodingError,
    FixedPoint,
    SecAggClient,
    SecAggParams,
    SecAggRefusal,
    SecAggServer,
    respond,
    run_instance,
)
from fedpeft.core.secagg import primitives as P
from fedpeft.core.secagg.encoding import decode_sum, encode
from fedpeft.core.secagg.graph import neighbour_graph

RUN = 42
Uploads = dict[int, tuple[np.ndarray, float]]
SIZE = 2 * 4 * 48 + 2 * 48  # lora_uploads' vector length at its defaults


def lora_uploads(n: int, seed: int = 0, rank: int = 4, dim: int = 48) -> Uploads:
    """n clients' flattened LoRA deltas (A: rank x dim, B: dim x rank, a classifier head) and
    example counts; node ids are large and unordered like Flower's."""
    rng = np.random.default_rng(seed)
    size = 2 * rank * dim + 2 * dim
    shared = rng.normal(0, 0.01, size)
    ids = rng.choice(2**40, size=n, replace=False) + 1
    return {int(u): (shared + rng.normal(0, 0.004, size), float(rng.integers(20, 800)))
            for u in ids}


def plain_mean(uploads: Uploads, nodes: set[int], p: SecAggParams) -> np.ndarray:
    """The plain weighted mean of the clipped uploads of ``nodes`` (weights capped)."""
    w = np.array([min(uploads[u][1], p.max_weight) for u in sorted(nodes)])
    x = np.stack([np.clip(uploads[u][0], -p.clip, p.clip) for u in sorted(nodes)])
    return (w[:, None] * x).sum(0) / w.sum()


def exchange_for(clients: dict[int, SecAggClient], uploads: Uploads,
                 drop: dict[str, set[int]] | None = None,
                 log: list[tuple[str, int, dict]] | None = None) -> Callable:
    """The in-process transport; nodes in ``drop[stage]`` stop answering from that stage on."""
    drop = drop or {}
    gone: set[int] = set()

    def exchange(stage: str, requests: dict[int, dict]) -> dict[int, dict]:
        gone.update(drop.get(stage, set()))
        replies = {}
        for u, fields in requests.items():
            if u in gone:
                continue
            try:
                replies[u] = respond(clients[u], stage, fields, lambda u=u: uploads[u])
            except SecAggRefusal:  # a transport's error reply: the server sees no record
                continue
            if log is not None:
                log.append((stage, u, replies[u]))
        return replies

    return exchange


def run(uploads: Uploads, params: SecAggParams, drop: dict[str, set[int]] | None = None,
        round_: int = 1, clients: dict[int, SecAggClient] | None = None, log: list | None = None):
    clients = clients or {u: SecAggClient(u, RUN) for u in uploads}
    length = next(iter(uploads.values()))[0].size
    server = SecAggServer(params, RUN, round_, list(uploads), length)
    return run_instance(server, exchange_for(clients, uploads, drop, log)), server


# ---- primitives ---------------------------------------------------------------------------
def test_shamir_any_t_rebuild_and_fewer_do_not() -> None:
    secret = os.urandom(32)
    shares = P.share_secret(secret, 3, 6)
    for subset in itertools.combinations(shares, 3):
        assert P.rebuild_secret(list(subset)) == secret
    for subset in itertools.combinations(shares, 2):
        with contextlib.suppress(P.CryptoError):  # a wrong secret or an error, never the secret
            assert P.rebuild_secret(list(subset)) != secret
    sk, _ = P.new_keypair()
    assert P.rebuild_secret(P.share_secret(sk, 2, 3)[1:]) == sk


def test_key_agreement_is_symmetric_and_bound_to_context() -> None:
    (a_sk, a_pk), (b_sk, b_pk) = P.new_keypair(), P.new_keypair()
    k_ab = P.derive_key(a_sk, b_pk, b"ctx", b"mask", 5, 9)
    assert k_ab == P.derive_key(b_sk, a_pk, b"ctx", b"mask", 9, 5)
    assert k_ab != P.derive_key(a_sk, b_pk, b"ctx2", b"mask", 5, 9)
    assert k_ab != P.derive_key(a_sk, b_pk, b"ctx", b"enc", 5, 9)


def test_authenticated_encryption_rejects_tampering_and_wrong_key() -> None:
    key, other = os.urandom(32), os.urandom(32)
    ct = P.seal(key, b"share bytes", b"aad")
    assert P.open_sealed(key, ct, b"aad") == b"share bytes"
    flipped = ct[:-1] + bytes([ct[-1] ^ 1])
    for bad in (lambda: P.open_sealed(key, flipped, b"aad"),
                lambda: P.open_sealed(other, ct, b"aad"),
                lambda: P.open_sealed(key, ct, b"other aad")):
        with pytest.raises(P.CryptoError):
            bad()


def test_prg_is_deterministic_uniform_and_needs_a_full_seed() -> None:
    seed = os.urandom(32)
    a = P.prg(seed, 200_000, 40)
    assert np.array_equal(a, P.prg(seed, 200_000, 40))
    assert not np.array_equal(a, P.prg(os.urandom(32), 200_000, 40))
    assert a.max() < 2**40
    top = (a >> np.uint64(36)).astype(int)  # 16 buckets of the top 4 bits
    assert stats.chisquare(np.bincount(top, minlength=16)).pvalue > 1e-4
    with pytest.raises(P.CryptoError):
        P.prg(seed[:16], 10, 40)


def test_encoding_round_trip_within_the_stated_bound() -> None:
    fp = FixedPoint(bits=32, clip=0.05, max_weight=1000, num_clients=8)
    ups = lora_uploads(8, seed=3)
    total = sum(encode(fp, x, w) for x, w in ups.values())
    mean, weight = decode_sum(fp, total & fp.modulus_mask, 8)
    p = SecAggParams(clip=0.05, bits=32, max_weight=1000)
    expected = plain_mean(ups, set(ups), p)
    assert weight == sum(min(w, 1000) for _, w in ups.values())
    assert np.abs(mean - expected).max() <= fp.error_bound(8, weight)
    assert fp.error_bound(8, weight) < 1e-4 * np.abs(expected).max()


def test_overflow_and_bad_parameters_are_refused() -> None:
    with pytest.raises(EncodingError, match="wrap around"):
        FixedPoint(bits=16, clip=1.0, max_weight=10_000, num_clients=100)
    for clip in (float("nan"), float("inf"), 0.0):
        with pytest.raises(EncodingError):
            FixedPoint(bits=32, clip=clip, max_weight=10, num_clients=4)
    fp = FixedPoint(bits=32, clip=1.0, max_weight=10, num_clients=4)
    with pytest.raises(EncodingError, match="non-finite"):
        encode(fp, np.array([0.1, np.nan]), 3)


def test_harary_graph_is_regular_symmetric_and_fresh() -> None:
    nodes = list(range(100, 130))
    g = neighbour_graph(nodes, 6)
    assert all(len(v) == 6 and u not in v for u, v in g.items())
    assert all(u in g[v] for u in g for v in g[u])
    assert any(neighbour_graph(nodes, 6) != g for _ in range(3))
    assert all(len(v) == 29 for v in neighbour_graph(nodes, 0).values())


# ---- the protocol -------------------------------------------------------------------------
@pytest.mark.parametrize("neighbours", [0, 6])
def test_unmasked_mean_equals_plain_weighted_mean(neighbours: int) -> None:
    ups = lora_uploads(12, seed=1)
    p = SecAggParams(neighbours=neighbours, clip=0.02)  # clips some coordinates
    assert any(np.abs(x).max() > 0.02 for x, _ in ups.values())
    out, _ = run(ups, p)
    assert out.aborted is None and out.result is not None
    expected = plain_mean(ups, set(ups), p)
    assert out.result.survivors == 12
    assert np.abs(out.result.mean - expected).max() <= out.result.error_bound
    assert out.result.error_bound < 1e-6
    row = out.row()
    assert row["secagg"] is True and row["secagg_unmask_survivors"] == 12
    header = 8 + 8 + 16 + len("masked_input")  # run, round, instance, stage
    assert row["secagg_masked_input_bytes_up"] == 12 * (5 * (expected.size + 1) + header)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("count", [1, 2, 4])  # n - threshold = 4
def test_dropouts_at_each_stage_still_give_the_survivors_mean(stage: str, count: int) -> None:
    ups = lora_uploads(10, seed=2)
    p = SecAggParams(threshold=6)
    dropped = set(sorted(ups)[3:3 + count])
    out, _ = run(ups, p, drop={stage: dropped})
    assert out.aborted is None, out.aborted
    summed = set(ups) - dropped if stage != "unmask" else set(ups)  # U3
    assert out.result.survivors == len(summed)
    assert out.row()[f"secagg_{stage}_survivors"] == 10 - count
    expected = plain_mean(ups, summed, p)
    assert np.abs(out.result.mean - expected).max() <= out.result.error_bound


def test_dropouts_spread_over_stages_on_a_sparse_graph() -> None:
    ups = lora_uploads(16, seed=4)
    p = SecAggParams(neighbours=8, threshold=5)
    nodes = sorted(ups)
    drop = {"setup": {nodes[0]}, "share_keys": {nodes[5]}, "masked_input": {nodes[9]},
            "unmask": {nodes[12]}}
    out, server = run(ups, p, drop=drop)
    assert out.aborted is None, out.aborted
    summed = set(ups) - {nodes[0], nodes[5], nodes[9]}
    assert server.u3 == summed
    expected = plain_mean(ups, summed, p)
    assert np.abs(out.result.mean - expected).max() <= out.result.error_bound


@pytest.mark.parametrize("stage", STAGES)
def test_below_threshold_the_round_is_skipped_naming_the_stage(stage: str) -> None:
    ups = lora_uploads(10, seed=5)
    out, server = run(ups, SecAggParams(threshold=6), drop={stage: set(sorted(ups)[:5])})
    assert out.result is None and server.result is None
    assert out.aborted is not None and out.aborted.stage == stage
    assert out.row()["secagg_aborted_stage"] == stage
    assert "threshold 6" in str(out.aborted)


def test_a_masked_vector_is_uniform_and_independent_of_the_input() -> None:
    """One client's masked vector, for a LoRA update and for zeros: both pass a uniformity test
    over Z_2^bits and a two-sample test against each other; the unmasked encoding fails it."""
    size = 20_000
    rng = np.random.default_rng(7)
    masked = {}
    for name, x in (("lora", rng.normal(0, 0.01, size)), ("zeros", np.zeros(size))):
        ups = {u: (x if u == 1 else rng.normal(0, 0.01, size), 100.0) for u in (1, 2, 3)}
        log: list = []
        run(ups, SecAggParams(bits=32), log=log)
        fields = next(f for stage, u, f in log if stage == "masked_input" and u == 1)
        masked[name] = np.frombuffer(fields["masked"], dtype="<u4")[1:].astype(np.int64)
    top = {k: np.bincount(v >> 26, minlength=64) for k, v in masked.items()}  # top 6 bits
    for counts in top.values():
        assert stats.chisquare(counts).pvalue > 1e-4
    assert stats.ks_2samp(masked["lora"], masked["zeros"]).pvalue > 1e-4
    fp = FixedPoint(bits=32, clip=1.0, max_weight=10_000, num_clients=3)
    plain = encode(fp, rng.normal(0, 0.01, size), 100.0)[1:].astype(np.int64)
    assert stats.chisquare(np.bincount(plain >> 26, minlength=64)).pvalue < 1e-6


def _at_unmask(n: int = 6) -> tuple[dict[int, SecAggClient], SecAggServer, list[int]]:
    """Clients 1..n after they sent their masked inputs, the server just past that stage, and
    client 1's peers."""
    ups = lora_uploads(n, seed=8)
    ups = {i + 1: v for i, v in enumerate(ups.values())}
    clients = {u: SecAggClient(u, RUN) for u in ups}
    server = SecAggServer(SecAggParams(threshold=3), RUN, 1, list(ups), SIZE)
    exchange = exchange_for(clients, ups)
    for stage in STAGES[:3]:
        server.receive(exchange(stage, server.requests()))
    return clients, server, sorted(ups)[1:]


def test_a_server_asking_for_both_shares_of_a_peer_is_refused() -> None:
    clients, server, peers = _at_unmask()
    client = clients[1]
    h = server.requests()[1]
    ask = dict(h, alive=peers[:4], dropped=[peers[4]])
    assert client.unmask(ask)["key_peers"] == [peers[4]]
    flip = dict(h, alive=peers[1:], dropped=[peers[0]])  # peers[0] was alive a moment ago
    with pytest.raises(SecAggRefusal, match="both a self-mask share and a mask-key share"):
        client.unmask(flip)
    with pytest.raises(SecAggRefusal, match="no instance"):  # and it stays silent afterwards
        client.unmask(ask)


def test_inconsistent_unmask_lists_are_refused() -> None:
    for alive, dropped, why in (([2, 3, 4], [4], "both alive and dropped"),
                                ([2, 3, 4], [99], "does not hold"),
                                ([2], [], "below threshold")):
        clients, server, _ = _at_unmask()
        client = clients[1]
        h = server.requests()[1]
        with pytest.raises(SecAggRefusal, match=why):
            client.unmask(dict(h, alive=alive, dropped=dropped))


def test_replayed_and_foreign_messages_are_refused() -> None:
    ups = lora_uploads(4, seed=9)
    clients = {u: SecAggClient(u, RUN) for u in ups}
    u = next(iter(ups))
    log: list = []
    old = SecAggServer(SecAggParams(threshold=3), RUN, 1, list(ups), SIZE)
    old_setup = old.requests()
    old.receive(exchange_for(clients, ups, log=log)("setup", old_setup))
    old_share_keys = old.requests()
    out, _ = run(ups, SecAggParams(threshold=3), round_=2, clients=clients)
    assert out.result is not None
    with pytest.raises(SecAggRefusal, match="earlier round"):
        clients[u].setup(old_setup[u])
    with pytest.raises(SecAggRefusal):
        clients[u].share_keys(old_share_keys[u])
    new = SecAggServer(SecAggParams(threshold=3), RUN, 3, list(ups), SIZE)
    setup = new.requests()
    clients[u].setup(setup[u])
    with pytest.raises(SecAggRefusal, match="already taken part"):
        clients[u].setup(setup[u])
    with pytest.raises(SecAggRefusal, match="run 43"):
        SecAggClient(u, RUN).setup(dict(setup[u], run=43))


def test_hostile_replies_count_as_dropouts_and_never_reach_the_sum() -> None:
    ups = lora_uploads(8, seed=10)
    nodes = sorted(ups)
    clients = {u: SecAggClient(u, RUN) for u in ups}
    server = SecAggServer(SecAggParams(threshold=4), RUN, 1, nodes, SIZE)
    honest = exchange_for(clients, ups)

    def hostile(stage: str, requests: dict) -> dict:
        replies = honest(stage, requests)
        if stage == "masked_input":
            replies[nodes[0]] = dict(replies[nodes[0]], masked=b"\0" * 10**6)  # oversized
            replies[nodes[1]] = dict(replies[nodes[1]], extra=1)  # unknown field
            replies[nodes[2]] = dict(replies[nodes[2]], round=7)  # another round
        return replies

    out = run_instance(server, hostile)
    assert out.aborted is None
    assert set(out.rejected) == set(nodes[:3])
    expected = plain_mean(ups, set(nodes[3:]), SecAggParams())
    assert np.abs(out.result.mean - expected).max() <= out.result.error_bound


def test_a_late_masked_input_is_ignored() -> None:
    """A masked input that arrives once the stage has closed is dropped, not summed: the round
    ends with the others' unmask replies and node 1 counted as silent at that stage."""
    clients, server, peers = _at_unmask()
    requests = server.requests()
    replies = {u: c.unmask(requests[u]) for u, c in clients.items() if u != 1}
    replies[1] = dict(requests[1], stage="masked_input", masked=b"\0" * 5 * (SIZE + 1))
    server.receive(replies)
    assert server.rejected[1].startswith("unmask")
    assert server.result is not None and server.result.survivors == len(peers) + 1


def test_a_client_refuses_too_small_a_federation() -> None:
    ups = lora_uploads(3, seed=11)
    clients = {u: SecAggClient(u, RUN, ClientPolicy(min_clients=5)) for u in ups}
    out, _ = run(ups, SecAggParams(threshold=2), clients=clients)
    assert out.result is None and out.aborted.stage == "setup"


# ---- the [secagg] switch ------------------------------------------------------------------
@pytest.mark.parametrize("overrides, why", [
    (["secagg.clip_range=nan"], "not a finite number"),
    (["secagg.neighbours=3"], "must be even"),
    (["secagg.threshold=1"], "use 0"),
    (["secagg.threshold=11"], "exceeds the 10 holders"),
    (["secagg.bits=16"], "wrap around"),
    (['federation.aggregator="median"'], "sees only their sum"),
    (['compression.up=["int8"]'], "conflict with fixed-point masking"),
    (['privacy.client_level="server-fixed"', "privacy.min_survivors=11"],
     "exceeds the 10 clients sampled"),
    (["federation.clients_per_round=1"], "a sum over one client"),
])
def test_config_refuses_what_secagg_cannot_honour(overrides: list[str], why: str) -> None:
    from fedpeft.core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=why):
        load_config(None, ["secagg.enabled=true", *overrides])


def test_methods_that_need_individual_uploads_refuse_secagg() -> None:
    from fedpeft.strategies import METHODS, build_method
    from fedpeft.strategies.base import method_help

    from fedpeft.core.config import ConfigError, load_config

    cfg = load_config(None, ["secagg.enabled=true", 'method.name="fedit"'])
    assert build_method(cfg).name == "fedit"
    for name in ("flora", "lora-fair"):
        cfg = load_config(None, ["secagg.enabled=true", f'method.name="{name}"'])
        with pytest.raises(ConfigError, match=f"secagg.enabled = true is not supported with "
                                              f"method.name = '{name}'"):
            build_method(cfg)
    text = method_help()
    assert text.count("secure aggregation: yes") == sum(
        1 for c in METHODS.values() if c.mean_aggregate and not c.secagg_refusal)
    assert "secure aggregation: no: stacking concatenates" in text


def test_client_state_survives_a_config_record_between_stages() -> None:
    """Flower keeps a node's state in Context.state between messages: rebuild every client from
    its ConfigRecord before each stage and the round still sums right (and the rule holds)."""
    from flwr.app import ConfigRecord

    ups = lora_uploads(6, seed=12)
    clients = {u: SecAggClient(u, RUN) for u in ups}
    inner = exchange_for(clients, ups)

    def through_records(stage: str, requests: dict) -> dict:
        for u in list(clients):
            clients[u] = SecAggClient.from_record(dict(ConfigRecord(clients[u].to_record())))
        return inner(stage, requests)

    server = SecAggServer(SecAggParams(threshold=4), RUN, 1, list(ups), SIZE)
    out = run_instance(server, exchange_for_stage_drop(through_records, "unmask", sorted(ups)[0]))
    assert out.result is not None
    expected = plain_mean(ups, set(ups), SecAggParams())
    assert np.abs(out.result.mean - expected).max() <= out.result.error_bound
    u = sorted(ups)[1]
    client = SecAggClient.from_record(dict(ConfigRecord(clients[u].to_record())))
    assert client.inst is not None and client.inst.revealed  # the log came back too


def exchange_for_stage_drop(exchange: Callable, stage: str, node: int) -> Callable:
    """``exchange`` with ``node`` silent at ``stage``."""
    def wrapped(s: str, requests: dict) -> dict:
        replies = exchange(s, requests)
        if s == stage:
            replies.pop(node, None)
        return replies
    return wrapped
