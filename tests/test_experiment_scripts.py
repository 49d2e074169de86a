"""The experiment scripts a sweep cannot express (simulations/*.py beside the sweep files)."""

from __future__ import annotations

import math

from simulations.ferret_timings import table, timings


def test_ferret_timings_measure_one_projection_and_reconstruction() -> None:
    row = timings(5000, 3, 1024)
    assert row["coefficients"] == math.ceil(5000 / 1024) * 3
    assert row["project_s"] > 0 and row["reconstruct_s"] > 0
    lines = table([row]).splitlines()
    assert len(lines) == 3 and lines[2].startswith("| 3 | 1024 | 15 |")


def test_round_mix_reads_each_rounds_sampled_clients_and_their_classes(tmp_path) -> None:
    """A real (tiny) run: the rounds and clients come from metrics.jsonl, each round's mix is
    the mean of its clients' own class shares, counted here from the partition directly."""
    import numpy as np

    from fedpeft.core.config import load_config
    from fedpeft.core.data import load_partition
    from server.inprocess import run_plain
    from simulations.round_mix import round_mix, table
    from tests.helpers import TINY

    sets = [*TINY, 'data.partitioner="dirichlet"', "data.dirichlet_alpha=0.5"]
    rows = run_plain(None, sets, out=tmp_path)
    mixes = round_mix(tmp_path)
    assert [m["round"] for m in mixes] == [r["round"] for r in rows[1:]]
    cfg = load_config(None, sets)
    for mix, row in zip(mixes, rows[1:], strict=True):
        assert mix["clients"] == [c["partition"] for c in row["client_bytes"]]
        shares = [np.bincount(load_partition(cfg.data, 6, i).labels, minlength=2) /
                  len(load_partition(cfg.data, 6, i).labels) for i in mix["clients"]]
        assert np.allclose(mix["mix"], np.mean(shares, axis=0))
        assert abs(mix["mix"].sum() - 1) < 1e-12
    assert table(mixes, ("a", "b")).count("\n") == len(mixes) + 1
