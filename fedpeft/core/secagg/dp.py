"""Client-level DP inside SecAgg+ (distributed Gaussian noise; docs/secure-aggregation.md,
"Composition with client-level DP").

Each client clips its own update to L2 norm C and adds N(0, s^2) per coordinate with
s = z C / sqrt(K_min - c) before it encodes and masks it; the server aborts an instance with fewer
than K_min masked inputs. The unmasked sum of K >= K_min survivors then holds noise of variance
K s^2 >= z^2 C^2 per coordinate: at least the central Gaussian mechanism's with noise multiplier z
on a sum of updates of norm <= C, so the accounting of ``privacy.client_level`` holds unchanged.
K > K_min costs utility (more noise than needed), not privacy. c: clients assumed to collude with
the server (each knows, and can subtract, its own noise), so K_min - c honest noises remain.

Not exact: each client rounds its noisy value into the field (post-processing of its own
release), and a sum of rounded Gaussians is not a Gaussian, so the central accounting is
approximate (the fixed-point step is kept at most 1/16 of s). The distributed discrete Gaussian
(Kairouz, Liu, Steinke 2021) or the Skellam mechanism (Agarwal, Kairouz, Liu 2021) would make it
exact; neither is implemented. The noise comes from numpy's floating-point Gaussian sampler, not
a sampler hardened against floating-point attacks (Mironov 2012).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .encoding import TAIL
from .server import SecAggParams, threshold_for


class NoiseError(ValueError):
    """Distributed-noise settings that cannot hold their guarantee."""


@dataclass(frozen=True)
class DistributedNoise:
    """Each client's share of the noise of one SecAgg+ sum."""

    clip: float  # C: L2 norm of one client's update
    multiplier: float  # z: noise multiplier of the sum (the accounting's)
    min_survivors: int  # K_min: fewer masked inputs abort the instance
    colluders: int = 0  # c: clients assumed to collude with the server

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise NoiseError(f"clip {self.clip}: must be a positive finite number")
        if not (math.isfinite(self.multiplier) and self.multiplier > 0):
            raise NoiseError(f"noise multiplier {self.multiplier}: must be positive and finite")
        if self.colluders < 0 or self.min_survivors - self.colluders < 1:
            raise NoiseError(f"min_survivors = {self.min_survivors} with colluders = "
                             f"{self.colluders}: at least one honest survivor's noise must remain")

    @property
    def std(self) -> float:
        """s: the per-coordinate std each client adds."""
        return self.multiplier * self.clip / math.sqrt(self.min_survivors - self.colluders)

    def sum_std(self, survivors: int) -> float:
        """The per-coordinate noise std of the sum of ``survivors`` clients' uploads."""
        return self.std * math.sqrt(survivors)


def noise_for(cfg: Any) -> DistributedNoise | None:
    """The run's distributed noise (None without ``[secagg]`` and ``privacy.client_level``);
    K_min = ``privacy.min_survivors``, or 0 for SecAgg's threshold t (no instance completes with
    fewer masked inputs than t anyway). Raises :class:`NoiseError` for impossible settings."""
    priv, sa = cfg.privacy, cfg.secagg
    if not sa.enabled or priv.client_level == "off":
        return None
    n = min(cfg.federation.clients_per_round, cfg.federation.clients)
    params = SecAggParams(threshold=sa.threshold, neighbours=sa.neighbours)
    k_min = priv.min_survivors or threshold_for(params, n)
    if k_min > n:
        raise NoiseError(f"privacy.min_survivors = {k_min} exceeds the {n} clients sampled per "
                         "round: every round would be skipped")
    return DistributedNoise(priv.client_clip, priv.client_noise, k_min, priv.colluders)


def clip_and_noise(vector: np.ndarray, clip: float, std: float,
                   rng: np.random.Generator | None = None) -> np.ndarray:
    """The client's release: ``vector`` clipped to L2 norm ``clip``, plus N(0, std^2) per
    coordinate cut at +-TAIL std (a post-processing that changes it with probability ~1e-15
    per coordinate and bounds the field's range)."""
    x = np.asarray(vector, dtype=np.float64).ravel()
    norm = float(np.linalg.norm(x))
    if norm > clip:
        x = x * (clip / norm)
    rng = rng or np.random.default_rng(int.from_bytes(os.urandom(16), "little"))
    return x + np.clip(rng.normal(0.0, std, x.shape), -TAIL * std, TAIL * std)
