"""Smoke test on the real packaged model and data: a short training run beats chance."""

from __future__ import annotations

import pytest
from fedpeft.server.inprocess import run_plain


@pytest.mark.slow
def test_minilm_learns_rotten_tomatoes() -> None:
    rows = run_plain(
        None,
        ["federation.clients=1", "federation.clients_per_round=1", "federation.rounds=1",
         "train.local_steps=80", 'data.partitioner="iid"', "eval.subset=300"],
    )
    before, after = rows[0]["accuracy"], rows[-1]["accuracy"]
    majority = 0.575  # share of "fresh" in the fixed 1,000-snippet test split
    assert after > before
    assert after > majority + 0.05, f"accuracy {after:.3f} is not above chance"
