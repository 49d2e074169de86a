"""Fixed-point encoding of a client's clipped, weighted upload into Z_R, R = 2^bits, and back.

Layout of one encoded vector (length m + 1):
    slot 0       the weight w = min(n_k, max_weight), an exact integer
    slots 1..m   q = round_stoch((w/max_weight * clip(X, -c, c) + c) * T / (2c)), in [0, T]

Summed over K <= n clients the slots stay below K * max(T, max_weight) < R (no wrap-around), with
T = (R - 1) // n the largest range that n clients can sum. Decoding:
    sum_k (w_k/max_weight) X_k  ~=  (2c/T) * Z - K c,   mean = that * max_weight / sum_k w_k
Error bound: stochastic rounding moves each client's integer by less than one step, so each
coordinate of the weighted sum is off by less than K * 2c/T (unbiased, standard deviation at most
sqrt(K) * c/T); the mean's error is that times max_weight / sum_k w_k.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


class EncodingError(ValueError):
    """A vector or parameter that cannot be encoded or decoded soundly."""


@dataclass(frozen=True)
class FixedPoint:
    """The fixed-point parameters of one instance (the server sends them, the client checks)."""

    bits: int  # modulus R = 2^bits
    clip: float  # c: every coordinate clipped to [-c, c]
    max_weight: int  # a client's weight n_k is capped here
    num_clients: int  # n: the most clients whose vectors can be summed

    def __post_init__(self) -> None:
        if not 8 <= self.bits <= 62:
            raise EncodingError(f"bits = {self.bits}: must be in [8, 62]")
        if not (np.isfinite(self.clip) and self.clip > 0):
            raise EncodingError(f"clip_range = {self.clip}: must be a positive finite number")
        if self.num_clients < 1 or self.max_weight < 1:
            raise EncodingError("num_clients and max_weight must be >= 1")
        if self.max_weight > self.target:
            raise EncodingError(
                f"bits = {self.bits} is too few for {self.num_clients} clients with max_weight "
                f"= {self.max_weight}: the weight slots could wrap around (need n * max_weight "
                "< 2^bits)")
        if self.target < 2:
            raise EncodingError(f"bits = {self.bits} leaves no precision for "
                                f"{self.num_clients} clients")

    @property
    def modulus_mask(self) -> np.uint64:
        return np.uint64((1 << self.bits) - 1)

    @property
    def target(self) -> int:
        """T: the integer range of one coordinate, the largest with n * T < R."""
        return ((1 << self.bits) - 1) // self.num_clients

    @property
    def step(self) -> float:
        return 2 * self.clip / self.target

    def error_bound(self, survivors: int, total_weight: int) -> float:
        """A deterministic bound on each coordinate's error in the decoded weighted mean."""
        return survivors * self.step * self.max_weight / total_weight

    @property
    def width(self) -> int:
        """Bytes per value on the wire."""
        return (self.bits + 7) // 8


def encode(fp: FixedPoint, vector: np.ndarray, weight: float,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """The client's vector in Z_R (uint64, weight slot first). Non-finite input is refused."""
    x = np.asarray(vector, dtype=np.float64).ravel()
    if not np.all(np.isfinite(x)):
        raise EncodingError("the upload has non-finite values")
    if not (np.isfinite(weight) and weight > 0):
        raise EncodingError(f"weight {weight}: must be a positive finite number")
    w = min(round(weight), fp.max_weight) or 1
    rng = rng or np.random.default_rng(int.from_bytes(os.urandom(16), "little"))
    scaled = (w / fp.max_weight) * np.clip(x, -fp.clip, fp.clip)
    q = (scaled + fp.clip) * (fp.target / (2 * fp.clip))
    low = np.floor(q)
    q = low + (rng.random(q.shape) < (q - low))
    q = np.clip(q, 0, fp.target).astype(np.uint64)
    return np.concatenate([np.array([w], dtype=np.uint64), q])


def decode_sum(fp: FixedPoint, total: np.ndarray, survivors: int) -> tuple[np.ndarray, int]:
    """(weighted mean over the survivors, sum of their weights) from the unmasked sum."""
    if survivors < 1 or survivors > fp.num_clients:
        raise EncodingError(f"{survivors} survivors for an instance of {fp.num_clients}")
    weight = int(total[0])
    if not 1 <= weight <= survivors * fp.max_weight:
        raise EncodingError(f"the summed weight {weight} is impossible for {survivors} clients")
    weighted = total[1:].astype(np.float64) * fp.step - survivors * fp.clip
    return weighted * (fp.max_weight / weight), weight


def pack(values: np.ndarray, width: int) -> bytes:
    """Little-endian, ``width`` bytes per value (values already reduced mod R)."""
    raw = np.ascontiguousarray(values.astype("<u8")).view(np.uint8).reshape(-1, 8)
    return raw[:, :width].tobytes()


def unpack(data: bytes, width: int, length: int) -> np.ndarray:
    """The inverse of :func:`pack`; the caller has checked ``len(data) == width * length``."""
    if len(data) != width * length:
        raise EncodingError(f"expected {width * length} bytes, got {len(data)}")
    out = np.zeros((length, 8), dtype=np.uint8)
    out[:, :width] = np.frombuffer(data, dtype=np.uint8).reshape(length, width)
    return out.view("<u8").ravel().astype(np.uint64)
