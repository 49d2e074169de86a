"""Ferret: random-projection maths, unbiasedness, bit-identical global state on every party
(including catch-up after missed rounds and the dense fallback), uplink bytes, and a short run."""

from __future__ import annotations

import math

import pytest
import torch
from fedpeft.client.trainer import client_round
from fedpeft.server.inprocess import run_plain
from fedpeft.server.validation import check_scalars
from fedpeft.strategies import ClientProfile, Upload, build_method
from fedpeft.strategies import ferret as fr
from fedpeft.strategies.ferret import (
    COEF,
    DELTA,
    basis_chunks,
    block_slices,
    coef_scale,
    project,
    reconstruct,
    select_targets,
    uplink_nbytes,
)

from fedpeft.core.config import ConfigError, load_config
from fedpeft.core.payload import ClientState, Payload
from fedpeft.core.wire import payload_to_records, serialized_nbytes
from fedpeft.core.workspace import get_workspace
from tests.helpers import TINY

FERRET = [*TINY, 'method.name="ferret"', 'method.target="full"', "method.block_size=4096",
          "method.k=3", "train.lr=0.001"]


def _explicit_basis(seed: int, rnd: int, block: int, d: int, k: int) -> torch.Tensor:
    return torch.cat([chunk for _, chunk in basis_chunks(seed, rnd, block, d, k)])


@pytest.mark.parametrize("scaling", ["unbiased", "reference"])
def test_projection_and_reconstruction_match_the_explicit_basis(
        scaling: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fr, "CHUNK_FLOATS", 40)  # blocks of 20: 2 basis rows per chunk
    update = torch.randn(50, dtype=torch.float32)
    k, block_size = 5, 20
    coefs = project(update, seed=3, rnd=2, k=k, block_size=block_size, scaling=scaling)
    assert coefs.shape == (3, k) and coefs.dtype == torch.float32
    expected = torch.empty(50, dtype=torch.float64)
    for g, sl in block_slices(50, block_size):
        basis = _explicit_basis(3, 2, g, sl.stop - sl.start, k).double()
        assert basis.shape == (k, sl.stop - sl.start)
        assert float(basis.abs().max()) <= 1.0
        gamma = coef_scale(scaling, k) * basis @ update[sl].double()
        torch.testing.assert_close(coefs[g].double(), gamma, rtol=1e-5, atol=1e-5)
        expected[sl] = basis.T @ coefs[g].double()
    torch.testing.assert_close(reconstruct(coefs, 3, 2, 50, block_size).double(), expected,
                               rtol=1e-5, atol=1e-5)
    # other rounds and blocks use other bases
    assert not torch.equal(_explicit_basis(3, 2, 0, 20, k), _explicit_basis(3, 3, 0, 20, k))
    assert not torch.equal(_explicit_basis(3, 2, 0, 20, k), _explicit_basis(3, 2, 1, 20, k))


@pytest.mark.parametrize(("scaling", "factor"), [("unbiased", 1.0), ("reference", 1 / 3)])
def test_mean_reconstruction_over_seeds_approaches_the_update(scaling: str,
                                                             factor: float) -> None:
    """E[reconstruction] = factor * update. The squared error of the mean of N independent
    reconstructions has expectation sum_i Var_i / N; a chi-square with 24 degrees of freedom
    exceeds 3x its mean with probability < 1e-6, so the bound is 3 sum_i s_i^2 / N."""
    torch.manual_seed(0)
    d, k, n = 24, 2, 3000
    update = torch.randn(d, dtype=torch.float32)
    samples = torch.stack([reconstruct(project(update, s, 1, k, d, scaling), s, 1, d, d)
                           for s in range(n)]).double()
    error = float(((samples.mean(0) - factor * update.double()) ** 2).sum())
    bound = 3 * float(samples.var(0).sum()) / n
    assert error < bound
    # and it is a real test: the wrong factor is far outside the bound
    wrong = 1 / 3 if factor == 1.0 else 1.0
    assert float(((samples.mean(0) - wrong * update.double()) ** 2).sum()) > 10 * bound


def _round(method, state: Payload, rnd: int, clients: list[int], states: dict[int, ClientState],
           cfg, loaded: dict[str, torch.Tensor], server_before: torch.Tensor) -> Payload:
    """One round in which every client reconstructs on its own (the per-process cache cleared)
    and must train from exactly the server's previous global parameters."""
    ws = get_workspace(cfg)
    uploads = []
    for pid in clients:
        method.clear_cache()
        profile = ClientProfile(pid, cfg.model.rank)
        down = method.downlink(state, profile)
        result = client_round(cfg, method, ws, down, partition_id=pid, rank=cfg.model.rank,
                              server_round=rnd, client_state=states.setdefault(pid, ClientState()))
        assert torch.equal(states[pid].tensors[DELTA], state.tensors[DELTA])
        assert torch.equal(loaded["values"], server_before)
        assert result.metrics["project_s"] > 0 and result.metrics["reconstruct_s"] > 0
        uploads.append(Upload(profile, result.payload, result.num_examples, result.metrics))
    return method.aggregate(state, uploads).state


def _global_values(method, state: Payload, cfg) -> torch.Tensor:
    """The targets' values in a model after the server's evaluation load."""
    model = get_workspace(cfg).adapter_model(cfg.model.rank)
    model.reset_base()
    method.load_global(model, state)
    values = fr.flatten(select_targets(model, method.options.target, method.options.modules))
    model.reset_base()
    return values


@pytest.mark.parametrize(("history", "seeds"), [(8, "client"), (1, "client"), (8, "shared")])
def test_every_party_ends_a_round_with_bit_identical_parameters(
        history: int, seeds: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(None, [*FERRET, f"method.history={history}", f'method.seeds="{seeds}"'])
    method = build_method(cfg, num_labels=get_workspace(cfg).num_labels)
    loaded: dict[str, torch.Tensor] = {}
    original_load = method.load

    def spy(model, payload, client_state) -> None:  # the targets' values right after load
        original_load(model, payload, client_state)
        loaded["values"] = fr.flatten(select_targets(model, "full", method.options.modules))

    monkeypatch.setattr(method, "load", spy)
    ws = get_workspace(cfg)
    state = method.init(ws.adapter_model(cfg.model.rank).state())
    states: dict[int, ClientState] = {}
    values = _global_values(method, state, cfg)
    schedule = {1: [0, 1], 2: [1, 2], 3: [2, 3], 4: [0, 3]}  # client 0 misses rounds 2 and 3
    for rnd, clients in schedule.items():
        if rnd == 4:  # client 0 is synced to round 0: it catches up on rounds 1..3
            down = method.downlink(state, ClientProfile(0, cfg.model.rank))
            catch_up = {k(r) for r in (1, 2, 3) for k in (fr.hist_key, fr.ids_key)}
            assert set(down.tensors) == ({DELTA} if history == 1 else catch_up)
            if history > 1:  # per-client seeds: a row per client of each round, with its id
                rows = [2, 2, 2] if seeds == "client" else [1, 1, 1]
                assert [len(down.tensors[fr.ids_key(r)]) for r in (1, 2, 3)] == rows
        state = _round(method, state, rnd, clients, states, cfg, loaded, values)
        new_values = _global_values(method, state, cfg)
        assert not torch.equal(new_values, values)
        values = new_values
    # one more client load at the final state: bit-identical to the server's evaluation model
    method.clear_cache()
    spare = ClientState()
    model = ws.adapter_model(cfg.model.rank)
    model.reset_base()
    method.load(model, method.downlink(state, ClientProfile(5, cfg.model.rank)), spare)
    assert torch.equal(loaded["values"], values)
    assert torch.equal(spare.tensors[DELTA], state.tensors[DELTA])
    # reset_base makes the shared model's base pristine and frozen again (other methods use it)
    model.reset_base()
    fresh = fr.pristine_model(cfg.model, ws.num_labels, cfg.model.rank)
    for name, param in select_targets(model, "full", method.options.modules).items():
        if name.startswith(fr.BASE):
            other = fresh.model.get_parameter(name[len(fr.BASE):])
            assert torch.equal(param.detach(), other.detach()) and not param.requires_grad
    assert set(model.trainable_params()) <= set(model.params.values())


def test_full_target_covers_all_linear_layers_and_lora_target_the_adapter() -> None:
    cfg = load_config(None, FERRET)
    model = get_workspace(cfg).adapter_model(cfg.model.rank)
    full = select_targets(model, "full", ["query", "key", "value", "dense"])
    linears = [n for n, m in model.model.named_modules() if isinstance(m, torch.nn.Linear)
               and "lora_" not in n and "classifier" not in n]
    assert len([k for k in full if k.startswith(fr.BASE)]) == 2 * len(linears)  # weight + bias
    assert set(model.head_keys) <= set(full)
    assert set(select_targets(model, "lora", [])) == set(model.params)


def test_lora_target_round_trip_and_dp_refused() -> None:
    cfg = load_config(None, [*FERRET, 'method.target="lora"', "federation.rounds=1"])
    rows = run_plain(None, [*FERRET, 'method.target="lora"', "federation.rounds=1"])
    assert rows[-1]["accuracy"] is not None and rows[-1]["project_s"] > 0
    method = build_method(cfg, num_labels=get_workspace(cfg).num_labels)
    assert method.expected_upload(method.init({}), ClientProfile(0, 8)).tensors[COEF][1] == 3
    with pytest.raises(ConfigError, match="ferret trains base-model weights"):
        build_method(load_config(None, [*FERRET, "privacy.enabled=true"]))


def test_uplink_bytes_are_the_coefficients_plus_a_constant_header() -> None:
    """4 bytes per coefficient plus Flower's record overhead (~0.84 KB; its varints and shape
    string grow by a few bytes with the array's size)."""
    sizes = {}
    for g, k in [(83, 4), (83, 8), (5, 3)]:
        payload = Payload({COEF: torch.randn(g, k)}, {fr.BASIS: 12, fr.SYNCED: 11})
        sizes[(g, k)] = serialized_nbytes(payload_to_records(payload))
    header = sizes[(5, 3)] - 4 * 15
    assert 900 < header < 1000  # packed: one array plus its manifest
    for (g, k), nbytes in sizes.items():
        assert 0 <= nbytes - uplink_nbytes(g * k, header) <= 8


def test_short_run_through_the_plain_loop_counts_coefficient_bytes() -> None:
    rows = run_plain(None, FERRET)
    assert [r["round"] for r in rows] == [0, 1, 2]
    cfg = load_config(None, FERRET)
    model = get_workspace(cfg).adapter_model(cfg.model.rank)
    total = fr.layout(select_targets(model, "full", ["query", "key", "value", "dense"]))[1]
    coefs = math.ceil(total / 4096) * 3
    for row in rows[1:]:
        assert row["project_s"] > 0 and row["reconstruct_s"] >= 0 and row["train_s"] > 0
        for client in row["client_bytes"]:
            assert 4 * coefs + 900 < client["bytes_up"] < 4 * coefs + 1000  # packed header
            assert client["bytes_up"] < 4 * total / 10  # far below the targets' own size
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_an_upload_on_another_rounds_bases_is_rejected_not_fatal() -> None:
    """A reply projected on the wrong round's bases is a per-client rejection (the server keeps
    going), and ``aggregate`` itself still refuses such an upload if one ever reached it."""
    cfg = load_config(None, FERRET)
    method = build_method(cfg, num_labels=get_workspace(cfg).num_labels)
    state = method.init(get_workspace(cfg).adapter_model(cfg.model.rank).state())
    shape = method.expected_upload(state, ClientProfile(0, cfg.model.rank)).tensors[COEF]
    good = Payload({COEF: torch.zeros(shape)}, {fr.BASIS: 1, fr.SYNCED: 0})
    stale = Payload({COEF: torch.zeros(shape)}, {fr.BASIS: 0, fr.SYNCED: 0})
    profile = ClientProfile(0, cfg.model.rank)
    spec = method.expected_upload(state, profile).scalars
    assert check_scalars(good.scalars, spec) == ({fr.BASIS: 1, fr.SYNCED: 0}, None)
    assert "outside [1, 1]" in str(check_scalars(stale.scalars, spec)[1])
    with pytest.raises(ValueError, match="bases of round 0"):
        method.aggregate(state, [Upload(profile, stale, 10, {})])


def test_progress_and_results_show_projection_time_next_to_training() -> None:
    from fedpeft.server.reporting import results_table, round_line

    row = {"round": 1, "accuracy": 0.6, "loss": 0.7, "clients_ok": 2, "clients_sampled": 2,
           "bytes_up": 100, "bytes_down": 200, "train_s": 9.5, "project_s": 1.25,
           "reconstruct_s": 0.5, "wall_s": 6.0, "method_timings": list(fr.Ferret.timings)}
    assert "train 9.5s project 1.2s reconstruct 0.5s" in round_line(row, 3)
    table = results_table([row]).splitlines()
    assert "| train s | project s | reconstruct s | wall s |" in table[0]  # Ferret.timings
    assert table[2].endswith("| 9.5 | 1.2 | 0.5 | 6.0 |")
    plain = {k: v for k, v in row.items()
             if k not in ("project_s", "reconstruct_s", "method_timings")}
    assert "project" not in results_table([plain]) and "project" not in round_line(plain, 3)


def test_each_client_projects_on_its_own_bases_and_apply_round_sums_them() -> None:
    """Per-client seeds: other bases per client (and none equal the shared ones), and a round
    of M weighted coefficient rows applies the sum of their reconstructions."""
    d, k = 30, 4
    shared = _explicit_basis(3, 2, 0, d, k)
    own = {c: torch.cat([ch for _, ch in basis_chunks(3, 2, 0, d, k, c)]) for c in (0, 7)}
    assert not torch.equal(own[0], own[7]) and not torch.equal(own[0], shared)
    torch.manual_seed(1)
    updates = {c: torch.randn(2 * d) for c in (0, 7)}
    coefs = torch.stack([0.25 * project(updates[0], 3, 2, k, d, basis=0),
                         0.75 * project(updates[7], 3, 2, k, d, basis=7)])
    expected = (0.25 * reconstruct(coefs[0] / 0.25, 3, 2, 2 * d, d, basis=0).double()
                + 0.75 * reconstruct(coefs[1] / 0.75, 3, 2, 2 * d, d, basis=7).double())
    got = fr.apply_round(torch.ones(2 * d), coefs, 3, 2, d, 0.5, torch.tensor([0, 7]))
    torch.testing.assert_close(got.double(), 1 + 0.5 * expected, rtol=1e-5, atol=1e-5)
    # a (G, K) tensor is the round's shared bases
    torch.testing.assert_close(fr.apply_round(torch.zeros(2 * d), coefs[0], 3, 2, d, 1.0),
                               reconstruct(coefs[0], 3, 2, 2 * d, d))


def test_per_client_seeds_cut_the_reconstruction_error_of_the_mean_about_n_times() -> None:
    """N clients with the same update: shared bases reconstruct the mean with one draw's error,
    per-client bases average N independent errors (expected N times smaller)."""
    d, k, n, trials = 64, 2, 8, 200
    torch.manual_seed(0)
    update = torch.randn(d)
    errors = {"shared": 0.0, "client": 0.0}
    for t in range(trials):
        uploads = [Upload(ClientProfile(c, 8), Payload({COEF: project(
            update, t, 1, k, d, basis=c)}), 1) for c in range(n)]
        for seeds in errors:
            if seeds == "shared":
                uploads_s = [Upload(u.profile, Payload({COEF: project(update, t, 1, k, d)}), 1)
                             for u in uploads]
                coefs, bases = fr.round_coefficients(uploads_s, seeds)
            else:
                coefs, bases = fr.round_coefficients(uploads, seeds)
            rec = fr.apply_round(torch.zeros(d), coefs, t, 1, d, 1.0, bases)
            errors[seeds] += float(((rec - update) ** 2).sum()) / trials
    assert errors["shared"] / errors["client"] > n / 2  # expected n; 200 trials: within 2x


def test_the_downlink_holds_the_missed_rounds_or_the_dense_state_whichever_is_smaller() -> None:
    cfg = load_config(None, [*FERRET, "method.k=400"])  # a few rounds outweigh the dense state
    method = build_method(cfg, num_labels=get_workspace(cfg).num_labels)
    state = method.init(get_workspace(cfg).adapter_model(cfg.model.rank).state())
    total = state.tensors[DELTA].numel()
    shape = method.expected_upload(state, ClientProfile(0, cfg.model.rank)).tensors[COEF]
    per_round = 3 * shape[0] * shape[1]  # three clients a round, each its own coefficients
    rounds = total // per_round  # this many rounds of history fit in the dense state's size
    assert 2 <= rounds < method.options.history
    for rnd in range(1, rounds + 2):
        uploads = [Upload(ClientProfile(c, 8), Payload(
            {COEF: torch.full(shape, 1e-3)}, {fr.BASIS: rnd, fr.SYNCED: rnd - 1}), 5)
            for c in range(1, 4)]
        state = method.aggregate(state, uploads).state
        down = method.downlink(state, ClientProfile(0, 8))  # client 0 never took part
        held = sum(v.numel() for k, v in down.tensors.items() if k.startswith(COEF))
        if rnd <= rounds:
            assert DELTA not in down.tensors and held == rnd * per_round <= total
        else:
            assert set(down.tensors) == {DELTA} and down.scalars[fr.FROM] == rnd
    kept = [k for k in state.tensors if fr.hist_round(k) is not None and k.startswith(COEF)]
    assert 0 < len(kept) <= rounds  # the server keeps no round it would never send


def test_defaults_upload_50x_less_than_fedit_and_each_target_has_its_own_lr() -> None:
    """The default (LoRA target, 54 coefficients per 4096-float block, per-client seeds) sends
    1,026 coefficients from MiniLM: about 5 KB, >= 50x less than FedIT's 312,007 B message."""
    from fedpeft.strategies.base import learning_rate

    opts = fr.FerretOptions()
    assert (opts.target, opts.k, opts.block_size, opts.seeds) == ("lora", 54, 4096, "client")
    minilm_lora = 74498  # LoRA r=8 on query/value of MiniLM-L6 plus its head
    assert uplink_nbytes(fr.num_blocks(minilm_lora, opts.block_size) * opts.k, 1000) * 50 \
        <= 312007
    for target, lr in [("lora", 0.002), ("full", 5e-5)]:
        cfg = load_config(None, [*TINY, 'method.name="ferret"', f'method.target="{target}"'])
        assert learning_rate(cfg.train.lr, build_method(cfg)) == lr


@pytest.mark.parametrize("seeds", ["client", "shared"])
def test_the_server_reconstructs_a_clients_update_on_the_bases_it_projected_on(
        seeds: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end through load/train/uplink/aggregate: with as many coefficients as floats the
    server's reconstruction of one client's update points its way (cosine ~0.7; a client and a
    server on different bases would give ~0)."""
    cfg = load_config(None, [*TINY, 'method.name="ferret"', 'method.target="lora"',
                             f'method.seeds="{seeds}"', "method.block_size=512", "method.k=512"])
    ws = get_workspace(cfg)
    method = build_method(cfg, num_labels=ws.num_labels)
    state = method.init(ws.adapter_model(cfg.model.rank).state())
    updates: list[torch.Tensor] = []
    real_project = fr.project

    def spy(update: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        updates.append(update.clone())
        return real_project(update, *args, **kwargs)

    monkeypatch.setattr(fr, "project", spy)
    profile = ClientProfile(4, cfg.model.rank)
    res = client_round(cfg, method, ws, method.downlink(state, profile), partition_id=4,
                       rank=cfg.model.rank, server_round=1, client_state=ClientState())
    new = method.aggregate(state, [Upload(profile, res.payload, res.num_examples)]).state
    assert new.tensors[fr.ids_key(1)].tolist() == [4 if seeds == "client" else fr.SHARED]
    rec, true = new.tensors[DELTA].double(), updates[0].double()
    assert float(rec @ true / (rec.norm() * true.norm())) > 0.5
