"""Heterogeneous LoRA ranks: rank profiles, HetLoRA, FlexLoRA and FLoRA (math and end to end)."""

from __future__ import annotations

import collections
from types import SimpleNamespace

import pytest
import torch
from fedpeft.client.step import own_rank
from fedpeft.server.federation import assigned_rank, client_profile, reported_rank
from fedpeft.server.inprocess import run_plain
from fedpeft.strategies import RANK_KEY, ClientProfile, ClientState, Payload, Upload, build_method
from fedpeft.strategies.hetlora import HetLoRA
from fedpeft.strategies.lowrank import fit_rank

from fedpeft.core.config import ConfigError, load_config
from fedpeft.core.workspace import get_workspace
from tests.helpers import TINY

MIX = 'federation.rank_mix="2:0.3,8:0.5,16:0.2"'
LAYERS = {"m.l0.q": (96, 80), "m.l1.v": (72, 96)}  # name -> (d_out, d_in); d >> ranks
HEAD = "m.classifier.weight"


def _adapter(rank: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {HEAD: torch.randn(2, 80, generator=gen)}
    for name, (d_out, d_in) in LAYERS.items():
        out[f"{name}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen)
        out[f"{name}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen)
    return out


def _uploads(ranks: list[int], sizes: list[int], seed: int = 0) -> list[Upload]:
    gen = torch.Generator().manual_seed(seed)
    return [Upload(ClientProfile(i, r, node_id=100 + i), Payload(_adapter(r, gen)), n)
            for i, (r, n) in enumerate(zip(ranks, sizes, strict=True))]


def _method(name: str, *extra: str):
    return build_method(load_config(None, [f'method.name="{name}"', MIX, *extra]))


def _product(upload: Upload, layer: str, alpha: float = 16.0) -> torch.Tensor:
    a = upload.payload.tensors[f"{layer}.lora_A.weight"].double()
    b = upload.payload.tensors[f"{layer}.lora_B.weight"].double()
    return alpha / a.shape[0] * b @ a


def _weighted_sum(uploads: list[Upload], layer: str) -> torch.Tensor:
    total = sum(u.num_examples for u in uploads)
    return sum(u.num_examples / total * _product(u, layer) for u in uploads)


# ---- rank profiles ------------------------------------------------------------------------
@pytest.mark.parametrize(("mix", "message"), [
    ("2:0.5,8:0.4", "the fractions sum to 0.9, not 1"),
    ("0:0.5,8:0.5", "needs a rank >= 1"),
    ("2:0.5,2:0.5", "rank 2 is listed twice"),
    ("2-0.5,8:0.5", "is not rank:fraction"),
    ("2:0.5,8:abc", "is not rank:fraction"),
])
def test_rank_mix_is_validated(mix: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"federation\.rank_mix") as info:
        load_config(None, [f'federation.rank_mix="{mix}"'])
    assert message in str(info.value)


def test_rank_mix_assignment_is_deterministic_and_proportional() -> None:
    cfg = load_config(None, ["federation.clients=30", MIX])
    ranks = [assigned_rank(cfg, i) for i in range(30)]
    assert collections.Counter(ranks) == {2: 9, 8: 15, 16: 6}
    again = load_config(None, ["federation.clients=30", MIX])
    assert [client_profile(again, i).rank for i in range(30)] == ranks
    other = load_config(None, ["federation.clients=30", MIX, "federation.seed=1"])
    assert [assigned_rank(other, i) for i in range(30)] != ranks
    # Odd sizes still add up (largest remainder), and no mix means model.rank for everyone.
    seven = load_config(None, ["federation.clients=7", "federation.clients_per_round=5", MIX])
    assert len([assigned_rank(seven, i) for i in range(7)]) == 7
    assert collections.Counter(assigned_rank(seven, i) for i in range(7)) == {8: 4, 2: 2, 16: 1}
    plain = load_config(None, ["model.rank=4"])
    assert {client_profile(plain, i).rank for i in range(10)} == {4}
    # A rank the client reported (node config, pruning) wins over the mix.
    assert client_profile(cfg, 0, reported_rank=3).rank == 3


def test_homogeneous_method_refuses_mixed_ranks() -> None:
    with pytest.raises(ConfigError, match="needs every client at one LoRA rank") as info:
        build_method(load_config(None, ['method.name="fedit"', MIX]))
    assert "hetlora" in str(info.value) and "flexlora" in str(info.value)
    # A "mix" of the one configured rank is not mixed.
    build_method(load_config(None, ['method.name="fedit"', 'federation.rank_mix="8:1"']))
    with pytest.raises(ConfigError, match="ranks \\[4\\]"):
        build_method(load_config(None, ['method.name="fedit"', 'federation.rank_mix="4:1"']))
    for name in ("hetlora", "flexlora", "flora"):
        assert _method(name).mixed_ranks


def test_reported_ranks_and_node_config() -> None:
    assert reported_rank({"next_rank": 4.0}) == 4
    assert reported_rank({"next_rank": float("nan")}) is None
    assert reported_rank({"next_rank": 0}) is None
    assert reported_rank({"next_rank": 2.5}) is None
    assert reported_rank({}) is None
    assert own_rank(None, ClientState()) is None
    assert own_rank(4, ClientState()) == 4
    assert own_rank("4", ClientState(values={RANK_KEY: 3})) == 3  # pruned below the node's rank
    with pytest.raises(ValueError, match="--node-config rank"):
        own_rank("four", ClientState())


def test_server_learns_a_nodes_rank_from_its_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deployment: a node started with --node-config rank=4 answers a rank-8 message without
    training; the server sends it rank 4 from then on and does not count it as rejected."""
    from fedpeft.server.app import FedPeftStrategy
    from fedpeft.server.rounds import RoundLoop
    from flwr.app import MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedpeft.core.wire import unpack_record

    for attr in ("_task_id", "_run_id", "_node_id"):  # what a running ServerApp has set
        monkeypatch.setattr(TaskIdentity, attr, 1)

    cfg = load_config(None, ['method.name="hetlora"', "federation.clients=2",
                             "federation.clients_per_round=2"])
    method = build_method(cfg)
    strategy = FedPeftStrategy(RoundLoop(cfg, method, method.init(_adapter(8, torch.Generator()))))
    grid = SimpleNamespace(get_node_ids=lambda: [11, 22])
    first = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, None, None, grid)}
    assert unpack_record(first[11].content)[f"{'m.l0.q'}.lora_A.weight"].shape[0] == 8
    reply = SimpleNamespace(
        metadata=SimpleNamespace(src_node_id=11), has_error=lambda: False,
        content=RecordDict({"metrics": MetricRecord(
            {"num-examples": 0, "next_rank": 4, "rank_mismatch": 1})}),
    )
    _, stats = strategy.aggregate_train(1, [reply])
    assert (stats["clients_resized"], stats["clients_rejected"], stats["clients_ok"]) == (1, 0, 0)
    second = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, None, None, grid)}
    assert unpack_record(second[11].content)["m.l0.q.lora_A.weight"].shape[0] == 4
    assert unpack_record(second[22].content)["m.l0.q.lora_A.weight"].shape[0] == 8


def test_client_app_answers_a_wrong_rank_without_training(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A node with ``--node-config rank=4`` sent a rank-8 adapter: a mixed-rank method gets its
    rank back (no training); a one-rank method fails with a clear error."""
    from fedpeft.client import app as client_app
    from flwr.app import Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedpeft.core.wire import CONFIG_RECORD, config_record, payload_to_records

    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    for name in ("hetlora", "fedit"):
        cfg = load_config(None, [f'method.name="{name}"'])
        method = build_method(cfg)
        down = method.downlink(method.init(_adapter(8, torch.Generator())), ClientProfile(0, 8))
        content = payload_to_records(down, {"fedpeft.round": 1, "fedpeft.partition": 0,
                                            "fedpeft.rank": 8})
        content[CONFIG_RECORD] = config_record(cfg)
        msg = Message(content=content, dst_node_id=5, message_type=MessageType.TRAIN,
                      group_id="1")
        ctx = Context(run_id=1, node_id=5, node_config={"rank": 4}, state=RecordDict(),
                      run_config={})
        if name == "fedit":
            with pytest.raises(ValueError, match="holds LoRA rank 4 but method 'fedit'"):
                client_app.train(msg, ctx)
            continue
        metrics = client_app.train(msg, ctx).content["metrics"]
        assert (metrics["next_rank"], metrics["rank_mismatch"]) == (4, 1)
        assert metrics["num-examples"] == 0


# ---- HetLoRA ------------------------------------------------------------------------------
def test_pad_truncate_round_trip() -> None:
    gen = torch.Generator().manual_seed(1)
    b, a = torch.randn(12, 3, generator=gen), torch.randn(3, 10, generator=gen)
    b16, a16 = fit_rank(b, a, 16)
    assert b16.shape == (12, 16) and a16.shape == (16, 10)
    assert not b16[:, 3:].any() and not a16[3:].any()
    assert torch.equal(b16 @ a16, b @ a)  # zero padding adds nothing
    b3, a3 = fit_rank(b16, a16, 3)
    assert torch.equal(b3, b) and torch.equal(a3, a)


@pytest.mark.parametrize("rescale", [True, False])
def test_hetlora_aggregate_pads_weights_by_norm_and_truncates(rescale: bool) -> None:
    method = _method("hetlora", f"method.rescale={str(rescale).lower()}")
    assert isinstance(method, HetLoRA)
    state = method.init(_adapter(8, torch.Generator()))
    assert method.global_rank(state) == 16  # the largest rank of the mix
    # One client: the global factors truncated back to its rank are its own factors.
    (alone,) = _uploads([8], [5])
    new = method.aggregate(state, [alone]).state
    down = method.downlink(new, ClientProfile(0, 8)).tensors
    for key, value in alone.payload.tensors.items():
        assert torch.allclose(down[key], value, atol=1e-5), key
    # Rows no client covered keep their previous values (not zeroed: they would be dead).
    a_key = "m.l0.q.lora_A.weight"
    assert torch.allclose(new.tensors[a_key][8:], state.tensors[a_key][8:])
    # Several ranks: B_g = sum w_k pad(c_k B_k) with w_k proportional to ||s_k B_k A_k||_F.
    uploads = _uploads([2, 8, 16], [1, 1, 1], seed=3)
    agg = method.aggregate(state, uploads).state
    for layer in LAYERS:
        c = [(16 / u.profile.rank) ** 0.5 if rescale else 1.0 for u in uploads]  # alpha = 16
        norms = [float(torch.linalg.norm(ck**2 * _product(u, layer, u.profile.rank)))
                 for u, ck in zip(uploads, c, strict=True)]  # ||c_k^2 B_k A_k||_F
        w = [n / sum(norms) for n in norms]
        b_key = f"{layer}.lora_B.weight"
        expected = sum(wk * ck * fit_rank(u.payload.tensors[b_key].double(),
                                          u.payload.tensors[f"{layer}.lora_A.weight"].double(),
                                          16)[0]
                       for wk, ck, u in zip(w, c, uploads, strict=True))
        assert torch.allclose(agg.tensors[b_key].double(), expected, atol=1e-5)
    # Downlink shapes follow the client's rank.
    assert method.downlink(agg, ClientProfile(0, 2)).tensors[a_key].shape == (2, 80)


def test_hetlora_rank_pruning_on_the_client() -> None:
    cfg = load_config(None, [*TINY, 'method.name="hetlora"', 'federation.rank_mix="2:0.5,4:0.5"'])
    method = build_method(cfg)
    model = get_workspace(cfg).adapter_model(4)
    gen = torch.Generator().manual_seed(0)
    sent = {k: torch.randn(v.shape, generator=gen) for k, v in model.params.items()}
    model.load(sent)
    penalty = method.train_spec(model).extra_loss
    assert penalty is not None and float(penalty()) > 0
    # Tail (index 3 = floor(0.99 * 4)) shrinks during training -> the client drops to rank 3.
    with torch.no_grad():
        for pair in model.pairs.values():
            model.params[pair.b_key][:, 3:] *= 0.5
    state = ClientState()
    up = method.uplink(model, Payload(sent), state)
    assert state.values[RANK_KEY] == 3
    pair = next(iter(model.pairs.values()))
    assert not up.tensors[pair.b_key][:, 3:].any() and not up.tensors[pair.a_key][3:].any()
    # Tail grew -> no pruning; pruning off -> no regulariser.
    with torch.no_grad():
        for pair in model.pairs.values():
            model.params[pair.b_key][:, 3:] *= 10
    kept = ClientState()
    method.uplink(model, Payload(sent), kept)
    assert RANK_KEY not in kept.values
    off = build_method(load_config(None, [*TINY, 'method.name="hetlora"', "method.prune=false"]))
    assert off.train_spec(model).extra_loss is None


# ---- FlexLoRA -----------------------------------------------------------------------------
def test_flexlora_downlink_is_the_best_rank_r_approximation() -> None:
    method = _method("flexlora")
    state = method.init(_adapter(8, torch.Generator()))
    first = method.downlink(state, ClientProfile(0, 4)).tensors
    assert not first["m.l0.q.lora_B.weight"].any()  # like a fresh LoRA: B = 0, A seeded
    assert first["m.l0.q.lora_A.weight"].abs().sum() > 0
    uploads = _uploads([2, 8, 16], [10, 30, 5], seed=7)
    agg = method.aggregate(state, uploads).state
    for layer in LAYERS:
        w_g = _weighted_sum(uploads, layer)
        u, s, vh = torch.linalg.svd(w_g, full_matrices=False)
        for rank in (1, 2, 4, 8, 16):
            down = method.downlink(agg, ClientProfile(0, rank)).tensors
            b, a = down[f"{layer}.lora_B.weight"], down[f"{layer}.lora_A.weight"]
            assert b.shape[1] == a.shape[0] == rank
            approx = 16.0 / rank * b.double() @ a.double()
            best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
            assert torch.allclose(approx, best, atol=1e-4), (layer, rank)
            # Eckart-Young: the error is exactly the discarded singular values.
            err = torch.linalg.norm(w_g - approx) ** 2
            assert torch.isclose(err, (s[rank:] ** 2).sum(), rtol=1e-4, atol=1e-6)
            assert torch.allclose(a.double() @ a.double().T, torch.eye(rank, dtype=torch.float64),
                                  atol=1e-5)  # A = V_r^T has orthonormal rows
    spec = method.expected_upload(agg, ClientProfile(0, 2))
    assert spec.tensors["m.l1.v.lora_B.weight"] == (72, 2)
    # A rank above the aggregate's (2 + 8 + 16 = 26): B is zero-padded, the product is all of W_g.
    wide = method.downlink(agg, ClientProfile(0, 30)).tensors
    for layer in LAYERS:
        b, a = wide[f"{layer}.lora_B.weight"].double(), wide[f"{layer}.lora_A.weight"].double()
        assert torch.allclose(16.0 / 30 * b @ a, _weighted_sum(uploads, layer), atol=1e-4)


# ---- FLoRA --------------------------------------------------------------------------------
def test_flora_stacked_product_equals_weighted_sum_of_products() -> None:
    method = _method("flora")
    state = method.init(_adapter(8, torch.Generator()))
    uploads = _uploads([2, 8, 16], [10, 30, 5], seed=11)
    agg = method.aggregate(state, uploads).state
    for layer in LAYERS:
        b = agg.tensors[f"flora.hist.1.B::{layer}"].double()
        a = agg.tensors[f"flora.hist.1.A::{layer}"].double()
        assert b.shape[1] == a.shape[0] == 2 + 8 + 16
        assert torch.allclose(b @ a, _weighted_sum(uploads, layer), atol=1e-4)
        assert torch.allclose(agg.tensors[f"flora.delta::{layer}"].double(),
                              _weighted_sum(uploads, layer), atol=1e-4)
    # Two rounds accumulate; the head is averaged by examples.
    more = _uploads([4, 2], [1, 3], seed=12)
    agg2 = method.aggregate(agg, more).state
    for layer in LAYERS:
        total = _weighted_sum(uploads, layer) + _weighted_sum(more, layer)
        assert torch.allclose(agg2.tensors[f"flora.delta::{layer}"].double(), total, atol=1e-4)
    head = (1 * more[0].payload.tensors[HEAD] + 3 * more[1].payload.tensors[HEAD]) / 4
    assert torch.allclose(agg2.tensors[HEAD], head, atol=1e-6)
    # What a client is sent: factors for a short gap, the dense sum when it is behind too long.
    down = method.downlink(agg2, ClientProfile(7, 4)).tensors
    assert "flora.hist.1.A::m.l0.q" in down and "flora.delta::m.l0.q" not in down
    state3 = agg2
    for t in range(3, 8):
        state3 = method.aggregate(state3, _uploads([16, 16], [1, 1], seed=t)).state
    late = method.downlink(state3, ClientProfile(7, 4)).tensors
    assert "flora.delta::m.l0.q" in late and not any(k.startswith("flora.hist.") for k in late)


def test_flora_clients_rebuild_the_same_merged_base() -> None:
    """One shared model object, clients with different histories: each sees W0 + all merged
    updates after load, and the server evaluates exactly that."""
    cfg = load_config(None, [*TINY, 'method.name="flora"', 'federation.rank_mix="2:0.5,4:0.5"'])
    method = build_method(cfg)
    ws = get_workspace(cfg)
    model = ws.adapter_model(4)
    model.reset_base()
    template = model.state()
    layer = sorted(model.pairs)[0]
    w0 = model.base_weight(layer).detach().clone()
    state = method.init(template)
    gen = torch.Generator().manual_seed(5)
    early, late = ClientState(), ClientState()
    for rnd in range(1, 4):
        if rnd == 1:  # the early client takes part in round 1 only
            method.load(model, method.downlink(state, ClientProfile(0, 4)), early)
            up = method.uplink(model, Payload(), early)
            assert up.scalars["flora.synced"] == 0
        else:
            up = Payload({k: torch.randn(v.shape, generator=gen) for k, v in template.items()},
                         {"flora.synced": rnd - 1})
        up.tensors.update({k: torch.randn(v.shape, generator=gen) for k, v in template.items()})
        upload = Upload(ClientProfile(0 if rnd == 1 else 9, 4), up, 4)
        state = method.aggregate(state, [upload]).state
    for client, pid in ((early, 0), (late, 5)):
        model.reset_base()
        method.load(model, method.downlink(state, ClientProfile(pid, 4)), client)
        assert client.values["flora.synced"] == 3
        merged = model.base_weight(layer).detach() - w0
        assert torch.allclose(merged, state.tensors[f"flora.delta::{layer}"], atol=1e-5)
        pair = model.pairs[layer]
        assert not model.params[pair.b_key].any()  # a fresh adapter of the client's own rank
    model.reset_base()
    method.load_global(model, state)
    assert torch.allclose(model.base_weight(layer).detach() - w0,
                          state.tensors[f"flora.delta::{layer}"], atol=1e-6)
    model.reset_base()
    assert torch.equal(model.base_weight(layer).detach(), w0)


# ---- end to end ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["hetlora", "flexlora", "flora"])
def test_mixed_rank_run_end_to_end(name: str) -> None:
    rows = run_plain(None, [*TINY, f'method.name="{name}"', 'federation.rank_mix="2:0.5,4:0.5"',
                            "federation.rounds=2"])
    assert len(rows) == 3
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    assert rows[-1]["loss"] != pytest.approx(rows[0]["loss"])  # the global model changed
    assert all(r["bytes_down"] > 0 and r["bytes_up"] > 0 for r in rows[1:])


@pytest.mark.slow
def test_mixed_rank_flower_simulation_counts_bytes_per_client(tmp_path) -> None:
    """HetLoRA through the real Flower simulation (SuperLink + Ray): every sampled client's own
    downlink and uplink bytes in metrics.jsonl, larger for a larger rank, summing to the
    round's totals."""
    from fedpeft.server.reporting import MetricsLog

    from fedpeft.cli import main

    args = ["simulate", "--method", "hetlora", "--out", str(tmp_path)]
    for item in [*TINY, "federation.clients_per_round=6", 'federation.rank_mix="2:0.5,8:0.5"']:
        args += ["--set", item]
    assert main(args) == 0
    rows = MetricsLog.read(tmp_path / "metrics.jsonl")
    cfg = load_config(None, [*TINY, 'federation.rank_mix="2:0.5,8:0.5"'])
    for row in rows[1:]:
        clients = row["client_bytes"]
        assert [c["partition"] for c in clients] == list(range(6))
        assert [c["rank"] for c in clients] == [assigned_rank(cfg, p) for p in range(6)]
        assert sum(c["bytes_down"] for c in clients) == row["bytes_down"]
        assert sum(c["bytes_up"] for c in clients) == row["bytes_up"]
        by_rank = {r: {c["bytes_up"] for c in clients if c["rank"] == r} for r in (2, 8)}
        assert len(by_rank[2]) == len(by_rank[8]) == 1  # one size per rank
        assert by_rank[2].pop() < by_rank[8].pop()
