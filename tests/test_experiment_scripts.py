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
