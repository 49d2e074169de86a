"""The cryptographic building blocks of one SecAgg+ instance, all from vetted libraries.

- key agreement: X25519 (``cryptography``), two key pairs per client per instance;
- key derivation: HKDF-SHA256 bound to (run, round, instance, purpose, the two node ids);
- authenticated encryption of shares: AES-256-GCM with the message header as associated data;
- secret sharing: t-of-n Shamir over the prime field Z_p, p = 2^521 - 1 (a Mersenne prime), with
  Python's integers. Flower's helpers (PyCryptodome, GF(2^128) per 16-byte chunk in pure Python)
  give the same security but cost O(t^2) slow field operations per rebuild, which dominated the
  server's time; docs/secure-aggregation.md has the measurement;
- masks: AES-256-CTR keystream keyed by the full 32-byte seed (not Flower's ``pseudo_rand_gen``,
  which folds the seed to 32 bits and draws from a Mersenne Twister).
"""

from __future__ import annotations

import hashlib
import os
import secrets

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32  # X25519 public and private keys, seeds, derived keys
SEED_BYTES = 32
GCM_NONCE_BYTES = 12
GCM_TAG_BYTES = 16
FIELD_PRIME = 2**521 - 1
FIELD_BYTES = 66
SHARE_BYTES = 4 + FIELD_BYTES  # 4-byte share index x (1..n), then y = f(x) mod p
MAX_NODE_ID = 2**64 - 1


class CryptoError(ValueError):
    """A ciphertext, key or share that does not check out."""


def new_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw (private, public) bytes."""
    sk = X25519PrivateKey.generate()
    return sk.private_bytes_raw(), sk.public_key().public_bytes_raw()


def public_of(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def derive_key(private: bytes, peer_public: bytes, context: bytes, purpose: bytes,
               u: int, v: int) -> bytes:
    """HKDF-SHA256 of the X25519 secret; symmetric in (u, v), bound to the instance and purpose."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as e:  # a low-order point gives the all-zero secret
        raise CryptoError(f"key agreement failed: {e}") from None
    lo, hi = min(u, v), max(u, v)
    info = (b"fedpeft-secagg|" + context + b"|" + purpose + b"|"
            + lo.to_bytes(8, "big") + hi.to_bytes(8, "big"))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(GCM_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    if len(ciphertext) < GCM_NONCE_BYTES + GCM_TAG_BYTES:
        raise CryptoError("ciphertext too short")
    try:
        return AESGCM(key).decrypt(ciphertext[:GCM_NONCE_BYTES], ciphertext[GCM_NONCE_BYTES:], aad)
    except InvalidTag:
        raise CryptoError("ciphertext does not authenticate (tampered, or another key)") from None


def share_secret(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """``num`` Shamir shares of a 32-byte secret, any ``threshold`` of which rebuild it and fewer
    reveal nothing: f(x) = secret + a_1 x + ... + a_{t-1} x^{t-1} over Z_p, share i is f(i)."""
    if len(secret) != SEED_BYTES:
        raise CryptoError(f"secrets are {SEED_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= num < 2**32:
        raise CryptoError(f"threshold {threshold} of {num} shares")
    coeffs = [int.from_bytes(secret, "big")]
    coeffs += [secrets.randbelow(FIELD_PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, num + 1):
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % FIELD_PRIME
        shares.append(x.to_bytes(4, "big") + y.to_bytes(FIELD_BYTES, "big"))
    return shares


def rebuild_secret(shares: list[bytes]) -> bytes:
    """The secret from ``threshold`` shares (Lagrange interpolation at 0). A wrong share gives a
    wrong secret, not an error: callers check a commitment or the public key."""
    if not shares or any(len(s) != SHARE_BYTES for s in shares):
        raise CryptoError("malformed share")
    points = [(int.from_bytes(s[:4], "big"), int.from_bytes(s[4:], "big")) for s in shares]
    xs = [x for x, _ in points]
    if len(set(xs)) != len(xs) or 0 in xs or any(y >= FIELD_PRIME for _, y in points):
        raise CryptoError("shares with repeated or invalid indices")
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % FIELD_PRIME
                den = den * (xj - xi) % FIELD_PRIME
        secret = (secret + yi * num * pow(den, -1, FIELD_PRIME)) % FIELD_PRIME
    if secret >= 1 << (8 * SEED_BYTES):
        raise CryptoError("shares combine to a value that is no 32-byte secret")
    return secret.to_bytes(SEED_BYTES, "big")


def commitment(secret: bytes, context: bytes) -> bytes:
    """SHA-256 of a 32-byte random secret: hides it, and lets the server check a rebuild."""
    return hashlib.sha256(b"fedpeft-secagg-commit|" + context + b"|" + secret).digest()


def prg(seed: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` values uniform in Z_{2^bits} (uint64) from AES-256-CTR keyed by ``seed``.
    Each value takes 8 keystream bytes masked to ``bits`` bits, so the output is exactly uniform
    for a uniform keystream."""
    if len(seed) != SEED_BYTES:
        raise CryptoError(f"PRG seeds are {SEED_BYTES} bytes (got {len(seed)})")
    if not 1 <= bits <= 63:
        raise CryptoError("bits must be in [1, 63]")
    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\x00" * 16)).encryptor()
    raw = enc.update(bytes(8 * length)) + enc.finalize()
    out = np.frombuffer(raw, dtype="<u8").copy()
    out &= np.uint64((1 << bits) - 1)
    return out
