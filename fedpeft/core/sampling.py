"""Which clients take part in a round: a pure function of (seed, round, attempt), shared by the
server (which samples), the fault injector (which targets the sample) and the plain loop."""

from __future__ import annotations

import numpy as np


def sample_clients(num_clients: int, per_round: int, seed: int, server_round: int,
                   attempt: int = 0) -> list[int]:
    """Indices of the clients sampled in ``server_round`` (deterministic by seed and round;
    a retry of a short round, ``attempt`` > 0, draws a fresh sample)."""
    rng = np.random.default_rng([seed, server_round, 7, *([attempt] if attempt else [])])
    return sorted(rng.choice(num_clients, size=min(per_round, num_clients), replace=False).tolist())
