"""The claims table's verdicts (simulations/claims.py) on paired seeds."""

from __future__ import annotations

import csv
from pathlib import Path

from simulations.claims import CLAIMS, Claim, describe, load, verdict

FIELDS = ("cell", "method", "seed", "final_accuracy", "initial_accuracy", "bytes_up")


def _write(folder: Path, rows: dict[str, tuple[list[float], float]]) -> None:
    folder.mkdir(parents=True)
    with (folder / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        for name, (accs, up) in rows.items():
            for seed, a in enumerate(accs):
                w.writerow({"cell": f"{name}_s{seed}", "method": name, "seed": seed,
                            "final_accuracy": a, "initial_accuracy": 0.3, "bytes_up": up})


BEATS = Claim("X", "p", "x beats y", "s", "x", "y", "beats")
MATCHES = Claim("X", "p", "x matches y", "s", "x", "y", "matches")


def test_beats_needs_a_consistent_paired_gain():
    assert verdict(BEATS, [0.02, 0.03, 0.025], False) == "holds"
    assert verdict(BEATS, [0.05, -0.04, 0.01], False) == "inconclusive"
    assert verdict(BEATS, [-0.01, 0.01, -0.003], False) == "does not hold (no gain)"
    assert verdict(BEATS, [-0.03, -0.02, -0.025], False) == "does not hold (reversed)"
    assert verdict(BEATS, [0.02, 0.03], False).startswith("not run")


def test_matches_needs_a_smaller_uplink_and_no_large_loss():
    assert verdict(MATCHES, [-0.005, 0.0, -0.01], True) == "holds"
    assert verdict(MATCHES, [-0.005, 0.0, -0.01], False) == "does not hold (uplink not smaller)"
    assert verdict(MATCHES, [-0.08, -0.1, -0.09], True) == "does not hold"


def test_pairs_by_seed_and_reads_the_zero_shot_row(tmp_path):
    # the seeds spread by 0.2 but x wins every paired seed by 0.02: the pairing must see it
    _write(tmp_path / "s", {"x": ([0.52, 0.62, 0.72], 1.0), "y": ([0.50, 0.60, 0.70], 2.0)})
    text, v = describe(BEATS, load(tmp_path, "s"))
    assert v == "holds" and "paired diff 0.020 ± 0.000" in text
    zero = Claim("X", "p", "x beats zero-shot", "s", "x", "zero-shot", "beats")
    assert describe(zero, load(tmp_path, "s"))[1] == "holds"
    assert describe(MATCHES, load(tmp_path, "s"))[1] == "holds"


def test_every_claim_names_a_known_scenario_and_kind():
    assert {c.scenario for c in CLAIMS} == {"bench_skew", "bench_skew_full", "bench_ranks",
                                            "bench_ranks_full", "bench_ranks_news",
                                            "bench_ranks_news_long", "bench_ranks_news_full",
                                            "bench_dp", "bench_dp_head"}
    sweeps = Path(__file__).parents[1] / "simulations" / "sweeps"
    assert all((sweeps / f"{c.scenario}.toml").exists() for c in CLAIMS)
    assert {c.kind for c in CLAIMS} == {"beats", "matches"}
    methods = {c.method for c in CLAIMS}
    assert len(methods) == 11  # FedIT and the ten methods issue 31 names
