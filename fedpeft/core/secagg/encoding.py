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

Noisy mode (client-level DP, ``noise_clip`` C > 0; ``dp.py``): the client's release v (its
update clipped to L2 norm C, plus Gaussian noise of std s cut at +-TAIL s) has every coordinate
in [-B, B], B = C + TAIL s. Weight slot 1; slots 1..m = round_stoch(v * S) mod R (two's
complement), S = (floor((R/2 - 1) / n) - 1) / B, so a sum over K <= n clients lies in
(-R/2, R/2) and decodes centred: no wrap-around, deterministically (this implies the usual
K c_int + 6 s_int sqrt(K) < R/2 check). The step 1/S must be at most s / STEPS_PER_STD, else the
parameters are refused with the bits needed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

TAIL = 8.0  # noisy mode: a client's noise is cut at +-TAIL std (P ~ 1.2e-15 per coordinate)
STEPS_PER_STD = 16  # noisy mode: the fixed-point step is at most the noise std / 16


class EncodingError(ValueError):
    """A vector or parameter that cannot be encoded or decoded soundly."""


@dataclass(frozen=True)
class FixedPoint:
    """The fixed-point parameters of one instance (the server sends them, the client checks)."""

    bits: int  # modulus R = 2^bits
    clip: float  # c: every coordinate clipped to [-c, c]
    max_weight: int  # a client's weight n_k is capped here
    num_clients: int  # n: the most clients whose vectors can be summed
    noise_clip: float = 0.0  # noisy mode (client-level DP): C, each update's L2 clip; 0 = off
    noise_std: float = 0.0  # noisy mode: s, each client's per-coordinate noise std

    def __post_init__(self) -> None:
        if not 8 <= self.bits <= 62:
            raise EncodingError(f"bits = {self.bits}: must be in [8, 62]")
        if not (np.isfinite(self.clip) and self.clip > 0):
            raise EncodingError(f"clip_range = {self.clip}: must be a positive finite number")
        if self.num_clients < 1 or self.max_weight < 1:
            raise EncodingError("num_clients and max_weight must be >= 1")
        if self.noisy:
            self._check_noise()
            return
        if self.max_weight > self.target:
            raise EncodingError(
                f"bits = {self.bits} is too few for {self.num_clients} clients with max_weight "
                f"= {self.max_weight}: the weight slots could wrap around (need n * max_weight "
                "< 2^bits)")
        if self.target < 2:
            raise EncodingError(f"bits = {self.bits} leaves no precision for "
                                f"{self.num_clients} clients")

    @property
    def noisy(self) -> bool:
        return self.noise_clip != 0 or self.noise_std != 0

    def _check_noise(self) -> None:
        for name, v in (("noise_clip", self.noise_clip), ("noise_std", self.noise_std)):
            if not (math.isfinite(v) and v > 0):
                raise EncodingError(f"{name} = {v}: must be a positive finite number")
        if not (math.isfinite(self.bound) and math.isfinite(self.scale)):
            raise EncodingError(f"noise_clip = {self.noise_clip:.3g} with noise_std = "
                                f"{self.noise_std:.3g}: the fixed-point range or step would "
                                "not be finite")
        if self.scale * self.noise_std < STEPS_PER_STD:
            bits = math.log2((self.num_clients + 1) * (
                STEPS_PER_STD * self.bound / self.noise_std + 2))
            need = f">= {math.ceil(bits) + 1}" if bits <= 61 else "> 62, the most there are"
            step = f"{1 / self.scale:.3g}" if self.scale > 0 else "(none: no range left)"
            raise EncodingError(
                f"bits = {self.bits} is too few for the client-level DP noise of "
                f"{self.num_clients} clients: the fixed-point step {step} would be "
                f"coarser than 1/{STEPS_PER_STD} of the per-client noise std "
                f"{self.noise_std:.3g} (need bits {need})")

    @property
    def bound(self) -> float:
        """Noisy mode: B, the largest absolute value of one client's release."""
        return self.noise_clip + TAIL * self.noise_std

    @property
    def scale(self) -> float:
        """Noisy mode: S, integers per unit (n releases of |v| <= B sum inside (-R/2, R/2))."""
        return max(((1 << (self.bits - 1)) - 1) // self.num_clients - 1, 0) / self.bound

    @property
    def modulus_mask(self) -> np.uint64:
        return np.uint64((1 << self.bits) - 1)

    @property
    def target(self) -> int:
        """T: the integer range of one coordinate, the largest with n * T < R."""
        return ((1 << self.bits) - 1) // self.num_clients

    @property
    def step(self) -> float:
        return 1 / self.scale if self.noisy else 2 * self.clip / self.target

    def error_bound(self, survivors: int, total_weight: int) -> float:
        """A deterministic bound on each coordinate's error in the decoded weighted mean (noisy
        mode: of the mean of the releases, noise included)."""
        if self.noisy:
            return self.step
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
    rng = rng or np.random.default_rng(int.from_bytes(os.urandom(16), "little"))
    if fp.noisy:
        return _encode_noisy(fp, x, rng)
    w = min(round(weight), fp.max_weight) or 1
    scaled = (w / fp.max_weight) * np.clip(x, -fp.clip, fp.clip)
    q = (scaled + fp.clip) * (fp.target / (2 * fp.clip))
    low = np.floor(q)
    q = low + (rng.random(q.shape) < (q - low))
    q = np.clip(q, 0, fp.target).astype(np.uint64)
    return np.concatenate([np.array([w], dtype=np.uint64), q])


def _encode_noisy(fp: FixedPoint, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A release (already clipped and noised by the client, ``dp.clip_and_noise``) in two's
    complement: weight slot 1 (a fixed public weight), then round_stoch(v * S) mod R."""
    q = np.clip(x, -fp.bound, fp.bound) * fp.scale
    low = np.floor(q)
    q = (low + (rng.random(q.shape) < (q - low))).astype(np.int64)
    out = np.concatenate([np.ones(1, dtype=np.int64), q]).astype(np.uint64)
    return out & fp.modulus_mask


def decode_sum(fp: FixedPoint, total: np.ndarray, survivors: int) -> tuple[np.ndarray, int]:
    """(weighted mean over the survivors, sum of their weights) from the unmasked sum; in noisy
    mode the weights are all 1, so this is the noisy sum divided by the survivors."""
    if survivors < 1 or survivors > fp.num_clients:
        raise EncodingError(f"{survivors} survivors for an instance of {fp.num_clients}")
    weight = int(total[0])
    if fp.noisy:
        if weight != survivors:
            raise EncodingError(f"the summed weight {weight} is not the {survivors} survivors' "
                                "(each release carries weight 1)")
        signed = total[1:].astype(np.int64)
        signed = np.where(total[1:] >= (1 << (fp.bits - 1)), signed - (1 << fp.bits), signed)
        return signed.astype(np.float64) * (fp.step / survivors), weight
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
