"""Client-level DP composed with SecAgg+ (fedpeft/core/secagg/dp.py): each client clips its own
update and adds its share of the Gaussian noise before masking, so the coordinator unmasks only a
noised sum. The protocol tests run the real client and server state machines in process; the
engine tests run the in-process round loop on the tiny model.

Inputs look like one round of LoRA training: a shared direction plus a smaller client-specific
part, with norms around the clipping bound (some clients are clipped, some are not).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fedpeft.server.inprocess import run_inprocess
from fedpeft.server.reporting import MetricsLog
from safetensors.torch import load_file
from scipy import stats

from fedpeft.core.config import ConfigError, load_config
from fedpeft.core.secagg import (
    ClientPolicy,
    FixedPoint,
    SecAggClient,
    SecAggParams,
    SecAggRefusal,
    SecAggServer,
    respond,
    run_instance,
)
from fedpeft.core.secagg import client as core_client
from fedpeft.core.secagg.dp import DistributedNoise, clip_and_noise, noise_for
from fedpeft.core.secagg.encoding import decode_sum, encode
from tests.helpers import TINY

RUN = 7
SIZE = 4000  # coordinates: each instance yields SIZE samples of the sum's noise
CLIP = 0.05  # C: typical one-round LoRA deltas have norms of this order
Uploads = dict[int, np.ndarray]


def lora_deltas(n: int, seed: int = 0) -> Uploads:
    """n clients' deltas; L2 norms spread around CLIP (about half get clipped)."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(0, 1, SIZE)
    shared *= 0.8 * CLIP / np.linalg.norm(shared)
    ids = rng.choice(2**40, size=n, replace=False) + 1
    out = {}
    for u in ids:
        own = rng.normal(0, 1, SIZE)
        out[int(u)] = shared + own * (rng.uniform(0.2, 0.8) * CLIP / np.linalg.norm(own))
    return out


def clipped(x: np.ndarray, c: float = CLIP) -> np.ndarray:
    return x * min(1.0, c / np.linalg.norm(x))


def dp_params(noise: DistributedNoise, threshold: int = 0) -> SecAggParams:
    return SecAggParams(threshold=threshold, noise_clip=noise.clip, noise_std=noise.std,
                        min_survivors=noise.min_survivors)


def instance(uploads: Uploads, params: SecAggParams, drop: dict[str, set[int]] | None = None,
             policy: ClientPolicy | None = None, server_cls: type = SecAggServer) -> tuple:
    """One instance; nodes in ``drop[stage]`` stop answering from that stage on."""
    clients = {u: SecAggClient(u, RUN, policy) for u in uploads}
    server = server_cls(params, RUN, 1, list(uploads), SIZE)
    drop, gone = drop or {}, set()

    def exchange(stage: str, requests: dict[int, dict]) -> dict[int, dict]:
        gone.update(drop.get(stage, set()))
        replies = {}
        for u, fields in requests.items():
            if u in gone:
                continue
            try:  # weight 37: DP must ignore it (a fixed public weight of 1)
                replies[u] = respond(clients[u], stage, fields, lambda u=u: (uploads[u], 37.0))
            except SecAggRefusal:
                continue
        return replies

    return run_instance(server, exchange), server


# ---- the protocol -------------------------------------------------------------------------
@pytest.mark.parametrize("drop, survivors", [
    ({}, 6), ({"masked_input": 1}, 5), ({"setup": 1, "masked_input": 1}, 4)])
def test_unmasked_result_is_the_clipped_mean_plus_noise_of_the_stated_std(
        drop: dict[str, int], survivors: int) -> None:
    """K survivors of n = 6, K_min = 4: the decoded mean minus the mean of the survivors' clipped
    updates is Gaussian with std z C sqrt(K / K_min) / K (SIZE samples per instance)."""
    ups = lora_deltas(6, seed=survivors)
    noise = DistributedNoise(CLIP, 1.0, min_survivors=4)
    nodes = sorted(ups)
    out, server = instance(ups, dp_params(noise), {
        stage: set(nodes[:k]) if stage == "setup" else set(nodes[-k:])
        for stage, k in drop.items()})
    assert out.result is not None and out.result.survivors == survivors == len(server.u3)
    clean = np.mean([clipped(ups[u]) for u in sorted(server.u3)], axis=0)
    residual = out.result.mean - clean
    expected = 1.0 * CLIP * math.sqrt(survivors / 4) / survivors
    assert abs(residual.std() / expected - 1) < 0.06  # the sample std's SE is ~1.1 %
    assert abs(residual.mean()) < 5 * expected / math.sqrt(SIZE)
    assert stats.kstest(residual / expected, "norm").pvalue > 1e-4
    assert out.result.total_weight == survivors  # unit weights, whatever the clients claimed


def test_the_server_adds_no_noise_all_of_it_comes_from_the_clients(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With the clients' noise removed (clip only), the decoded sum is the clean clipped sum
    within the fixed-point error: the server's path adds nothing. With it, they differ by the
    clients' noise."""
    ups = lora_deltas(5, seed=3)
    params = dp_params(DistributedNoise(CLIP, 0.8, min_survivors=3))
    clean = np.sum([clipped(ups[u]) for u in ups], axis=0)
    noisy, _ = instance(ups, params)
    monkeypatch.setattr(core_client, "clip_and_noise",
                        lambda v, c, s: clip_and_noise(v, c, 0.0))
    quiet, _ = instance(ups, params)
    assert quiet.result is not None and noisy.result is not None
    bound = 5 * quiet.result.error_bound  # the sum's fixed-point error: K steps at most
    assert np.abs(quiet.result.mean * 5 - clean).max() <= bound
    diff = noisy.result.mean * 5 - clean
    assert abs(diff.std() / (params.noise_std * math.sqrt(5)) - 1) < 0.06
    assert diff.std() > 1e4 * bound


@pytest.mark.parametrize("dropped, aborted", [(1, False), (2, True)])
def test_fewer_than_k_min_masked_inputs_abort_at_the_masked_input_stage(
        dropped: int, aborted: bool) -> None:
    ups = lora_deltas(6, seed=5)
    params = dp_params(DistributedNoise(CLIP, 1.0, min_survivors=5), threshold=3)
    out, _ = instance(ups, params, {"masked_input": set(sorted(ups)[:dropped])})
    if not aborted:
        assert out.result is not None and out.result.survivors == 5
        return
    assert out.result is None and out.aborted.stage == "masked_input"
    assert "4 masked inputs, fewer than the 5 (privacy.min_survivors)" in str(out.aborted)


@pytest.mark.parametrize("change", [
    {"noise_std": 0.0, "noise_clip": 0.0, "min_survivors": 0},  # no noise at all
    {"noise_std": 0.5},  # half the noise the clients' config demands
    {"min_survivors": 2},  # an abort below fewer survivors than calibrated for
    {"noise_clip": 2 * CLIP},  # a looser clip than the clients' config
])
def test_a_client_refuses_a_server_that_asks_for_less_privacy(change: dict) -> None:
    ups = lora_deltas(4, seed=6)
    noise = DistributedNoise(CLIP, 1.0, min_survivors=4)
    policy = ClientPolicy(noise_clip=noise.clip, noise_std=noise.std, min_survivors=4)
    base = dp_params(noise)
    if change.get("noise_std"):
        change = {"noise_std": base.noise_std * change["noise_std"]}
    out, _ = instance(ups, dataclasses.replace(base, **change), policy=policy)
    assert out.result is None and out.aborted.stage == "setup"
    assert instance(ups, base, policy=policy)[0].result is not None  # the honest server passes


@pytest.mark.parametrize("hostile", [
    {"noise_std": 1e308},  # finite, but its fixed-point range is not
    {"noise_clip": 1e-300, "noise_std": 1e-301},  # a step that is not finite
    {"min_survivors": 7},  # more survivors than the 6 clients sampled
    {"min_survivors": -1},
])
def test_a_client_without_dp_refuses_an_unsound_noisy_setup(hostile: dict) -> None:
    """A client whose own config asks for no noise still checks what the server's setup asks
    for before it encodes anything: a refusal at setup, never a crash."""

    class Hostile(SecAggServer):
        def _setup_req(self, h: Any, u: int) -> Any:
            return dataclasses.replace(super()._setup_req(h, u), **hostile)

    ups = lora_deltas(6, seed=9)
    params = dp_params(DistributedNoise(CLIP, 1.0, min_survivors=4))
    out, _ = instance(ups, params, server_cls=Hostile)
    assert out.result is None and out.aborted.stage == "setup"
    assert instance(ups, params)[0].result is not None  # the same setup, honest, passes


class BelowKMinServer(SecAggServer):
    """A server that announces K_min, then unmasks with fewer masked inputs anyway."""

    def _check_masked(self) -> None:
        keep = self.params
        self.params = dataclasses.replace(keep, min_survivors=0)
        try:
            super()._check_masked()
        finally:
            self.params = keep


def test_clients_refuse_to_unmask_below_k_min_on_a_complete_graph() -> None:
    ups = lora_deltas(5, seed=8)
    params = dp_params(DistributedNoise(CLIP, 1.0, min_survivors=5), threshold=3)
    out, _ = instance(ups, params, {"masked_input": {sorted(ups)[0]}},
                      server_cls=BelowKMinServer)
    assert out.result is None and out.aborted.stage == "unmask"


# ---- the field ----------------------------------------------------------------------------
def test_noisy_encoding_cannot_wrap_around() -> None:
    """n releases at the extreme +-B of every coordinate sum back to +-n B within n steps."""
    n = 7
    fp = FixedPoint(24, 1.0, 1, n, noise_clip=1.0, noise_std=0.05)
    rng = np.random.default_rng(0)
    for sign in (1.0, -1.0):
        vector = np.full(64, sign * fp.bound)
        total = np.zeros(65, dtype=np.uint64)
        for _ in range(n):
            total = (total + encode(fp, vector, 1.0, rng)) & fp.modulus_mask
        mean, weight = decode_sum(fp, total, n)
        assert weight == n and np.abs(mean - sign * fp.bound).max() <= fp.step


def test_noisy_rounding_is_unbiased() -> None:
    fp = FixedPoint(20, 1.0, 1, 4, noise_clip=1.0, noise_std=0.1)
    x = np.full(20_000, 0.3 * fp.step + 0.1)  # between two grid points
    got = decode_sum(fp, encode(fp, x, 1.0, np.random.default_rng(1)), 1)[0]
    assert abs(got.mean() - x[0]) < 5 * fp.step / 2 / math.sqrt(x.size)


# ---- the config ---------------------------------------------------------------------------
DP = ["secagg.enabled=true", 'privacy.client_level="client-fixed"']


@pytest.mark.parametrize("overrides, why", [
    (["secagg.bits=11"], r"too few for the client-level DP noise .* \(need bits >= 12\)"),
    (["secagg.bits=8", "federation.clients_per_round=200", "federation.clients=200"],
     r"step \(none: no range left\) .* \(need bits >= 17\)"),
    (["privacy.min_survivors=11"], "exceeds the 10 clients sampled per round"),
    (["privacy.min_survivors=4", "privacy.colluders=4"], "at least one honest survivor"),
    (["privacy.client_noise=1e308"], "range or step would not be finite"),
    (["privacy.client_noise=1e-40"], r"need bits > 62, the most there are"),
])
def test_config_refuses_distributed_noise_it_cannot_honour(overrides: list[str],
                                                           why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        load_config(None, [*DP, *overrides])


def test_the_bits_the_refusal_names_are_enough() -> None:
    cfg = load_config(None, [*DP, "secagg.bits=12"])
    noise = noise_for(cfg)
    assert noise is not None and noise.min_survivors == 6  # 0 = SecAgg's threshold (a majority)
    fp = FixedPoint(12, 1.0, 1, 10, noise.clip, noise.std)
    assert fp.step <= noise.std / 16


def test_noise_keys_need_secagg_and_client_level_dp() -> None:
    for sets in (["privacy.min_survivors=3"], ["secagg.enabled=true", "privacy.colluders=1"]):
        with pytest.raises(ConfigError, match=r"need secagg\.enabled = true and privacy"):
            load_config(None, sets)


def test_colluders_are_calibrated_with_k_min_minus_c() -> None:
    cfg = load_config(None, [*DP, "privacy.min_survivors=8", "privacy.colluders=3",
                             "privacy.client_noise=1.5", "privacy.client_clip=0.2"])
    noise = noise_for(cfg)
    assert noise is not None and math.isclose(noise.std, 1.5 * 0.2 / math.sqrt(5))
    assert math.isclose(noise.sum_std(5), 1.5 * 0.2)  # K_min - c honest noises: z C exactly


# ---- the in-process engine (tiny model) ---------------------------------------------------
def _run(tmp_path: Path, name: str, sets: list[str]) -> tuple[dict, list[dict], dict]:
    out = tmp_path / name
    run_inprocess(load_config(None, [*TINY, *sets]), out)
    return (json.loads((out / "summary.json").read_text()), MetricsLog.read(out / "metrics.jsonl"),
            load_file(str(out / "adapter" / "adapter_model.safetensors")))


def _no_server_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedpeft.server import client_dp

    def refuse(*args: object) -> None:
        raise AssertionError("the server added noise")

    monkeypatch.setattr(client_dp.flower_dp(), "add_gaussian_noise_inplace", refuse)


def test_engine_round_is_the_secure_mean_with_only_client_noise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """With the clients' noise removed, SecAgg + client-level DP (default example weighting,
    a clip that binds nobody) gives the uniform-weighted SecAgg run's adapter: the server adds
    no noise, divides by the sampled count, and forces unit weights (saying so)."""
    sets = ["federation.rounds=1", "privacy.client_clip=100"]
    _, _, plain = _run(tmp_path, "plain", ["secagg.enabled=true",
                                            'federation.weighting="uniform"', *sets])
    _no_server_noise(monkeypatch)
    monkeypatch.setattr(core_client, "clip_and_noise",
                        lambda v, c, s: clip_and_noise(v, c, 0.0))
    summary, rows, quiet = _run(tmp_path, "quiet", [*DP, *sets])
    assert plain.keys() == quiet.keys()
    assert all(torch.allclose(plain[k], quiet[k], atol=1e-6) for k in plain)
    assert any(v.abs().max() > 1e-4 for k, v in quiet.items() if "lora_B" in k)  # it trained
    assert "client-level DP ignores federation.weighting" in caplog.text
    assert "no un-noised sum" in summary["server_saw"]
    assert rows[1]["aggregated"] == 1 and rows[1]["client_epsilon"] > 0


def test_engine_epsilon_is_the_one_without_secagg(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The accounting of privacy.client_level is unchanged: the same client_epsilon per round
    with and without SecAgg, and the secure run's adapter carries the clients' noise."""
    dp = ['privacy.client_level="client-fixed"', "privacy.client_noise=0.7",
          "privacy.client_clip=0.5"]
    _, central, _ = _run(tmp_path, "central", dp)
    _no_server_noise(monkeypatch)
    _, secure, _ = _run(tmp_path, "secure", ["secagg.enabled=true", *dp])
    eps = [r["client_epsilon"] for r in secure[1:]]
    assert eps == [r["client_epsilon"] for r in central[1:]]
    assert eps[0] < eps[1] and all(r["aggregated"] == 1 for r in secure[1:])


def test_engine_skips_a_round_below_k_min_naming_the_stage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """One of 3 clients fails while training with K_min = 3: every round stops at the masked
    input stage, nothing is aggregated and no release is counted."""
    from fedpeft.server import secagg as server_secagg

    honest = server_secagg.masked_upload
    calls = {"n": 0}

    def first_fails(*args: object) -> tuple:
        calls["n"] += 1
        if calls["n"] % 3 == 1:
            raise SecAggRefusal("masked_input", "the device lost power")
        return honest(*args)

    monkeypatch.setattr(server_secagg, "masked_upload", first_fails)
    summary, rows, _ = _run(tmp_path, "short", [*DP, "privacy.min_survivors=3"])
    assert all(r["aggregated"] == 0 and r["secagg_aborted_stage"] == "masked_input"
               and r["client_epsilon"] == 0 for r in rows[1:])
    assert summary["rounds_not_aggregated"] == 2
    assert ("secagg stopped at stage 'masked_input': 2 masked inputs, fewer than the 3 "
            "(privacy.min_survivors)") in caplog.text



def test_flower_transport_runs_the_noised_protocol(tmp_path: Path, in_process: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The real ServerApp round loop and ClientApp (tests/helpers.FakeGrid): the setup record
    carries the noise, each ClientApp checks it against its config and noises its update, and
    the server reports the client-level epsilon of two releases."""
    from fedpeft.server import app as server_app

    from fedpeft.core.privacy import client_level_epsilon
    from tests.helpers import FakeGrid

    _no_server_noise(monkeypatch)
    calls: list[float] = []
    real = core_client.clip_and_noise

    def counted(v: np.ndarray, c: float, s: float) -> np.ndarray:
        calls.append(s)
        return real(v, c, s)

    monkeypatch.setattr(core_client, "clip_and_noise", counted)
    cfg = load_config(None, [*TINY, *DP, "privacy.client_noise=0.8", "privacy.client_clip=0.3"])
    out = tmp_path / "flower"
    summary = server_app.run_server(FakeGrid(range(11, 17)), cfg, out)
    rows = MetricsLog.read(out / "metrics.jsonl")
    assert [r["aggregated"] for r in rows[1:]] == [1, 1]
    assert calls == [0.8 * 0.3 / math.sqrt(2)] * 6  # 3 clients x 2 rounds; K_min = t = 2 of 3
    assert math.isclose(rows[2]["client_epsilon"], client_level_epsilon(0.8, 2, 1e-5))
    assert "no un-noised sum" in summary["server_saw"]
