"""Typed SecAgg+ messages and their flat field form (what a Flower ``ConfigRecord`` carries).

Every message starts with the header (run, round, instance, stage). ``from_fields`` checks a
peer's fields against the message's spec (exact key set, types, byte sizes, list lengths bounded
by what the receiver expects) before anything is allocated or used; a failure raises
:class:`MessageError` with the field named.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from .primitives import GCM_NONCE_BYTES, GCM_TAG_BYTES, KEY_BYTES, SHARE_BYTES

MAX_ID = 2**64 - 1  # Flower node ids are uint64 (a ConfigRecord carries them as such)
INSTANCE_BYTES = 16
# The plaintext of one encrypted share pair: src, dst, instance, self-mask share, mask-key share.
SHARE_PLAINTEXT = 8 + 8 + INSTANCE_BYTES + 2 * SHARE_BYTES
CIPHERTEXT_BYTES = GCM_NONCE_BYTES + SHARE_PLAINTEXT + GCM_TAG_BYTES

STAGES = ("setup", "share_keys", "masked_input", "unmask")
SECAGG_RECORD = "fedpeft.secagg"  # the Flower ConfigRecord holding a message's fields
LAYOUT_KEY = "secagg_layout"  # masked-input request scalar: the digest of the vector layout


class MessageError(ValueError):
    """A message whose fields do not match its spec."""


@dataclass(frozen=True)
class Header:
    run: int
    round: int
    instance: bytes
    stage: str

    def context(self) -> bytes:
        """The bytes that bind keys, ciphertexts and commitments to this instance."""
        return self.run.to_bytes(8, "big") + self.round.to_bytes(8, "big") + self.instance


# Field kinds: "int", "float", "str", ("bytes", n) with n = exact size or None (any, bounded by
# the receiver's byte limit), "ints" (list of ids), ("bytes_list", n).
Kind = Any
M = TypeVar("M", bound="Message")


@dataclass(frozen=True)
class Message:
    STAGE: ClassVar[str] = ""
    SPEC: ClassVar[dict[str, Kind]] = {
       }
    header: Header

    def to_fields(self) -> dict[str, Any]:
        h = self.header
        out: dict[str, Any] = {"run": h.run, "round": h.round, "instance": h.instance,
                               "stage": h.stage}
        for f in dataclasses.fields(self):
            if f.name != "header":
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, (list, tuple)) else value
        return out

    def nbytes(self) -> int:
        """Payload bytes of the message's fields (ints count 8, strings their UTF-8 length)."""
        return sum(field_bytes(v) for v in self.to_fields().values())

    @classmethod
    def from_fields(cls: type[M], fields: Any, max_items: int, max_bytes: int = 0) -> M:
        if not isinstance(fields, dict):
            raise MessageError(f"{cls.__name__}: not a record")
        spec = {"run": "int", "round": "int", "instance": ("bytes", INSTANCE_BYTES),
                "stage": "str", **cls.SPEC}
        if set(fields) != set(spec):
            raise MessageError(f"{cls.__name__}: fields {sorted(fields)} != {sorted(spec)}")
        values = {k: check_field(cls.__name__, k, fields[k], kind, max_items, max_bytes)
                  for k, kind in spec.items()}
        if values["stage"] != cls.STAGE:
            raise MessageError(f"{cls.__name__}: stage {values['stage']!r} != {cls.STAGE!r}")
        header = Header(values.pop("run"), values.pop("round"), values.pop("instance"),
                        values.pop("stage"))
        return cls(header, **values)


def field_bytes(value: Any) -> int:
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        return sum(field_bytes(v) for v in value)
    return 8


def check_field(msg: str, name: str, value: Any, kind: Kind, max_items: int,
                max_bytes: int) -> Any:
    where = f"{msg}.{name}"
    if kind == "int":
        if type(value) is not int or not 0 <= value <= MAX_ID:
            raise MessageError(f"{where}: expected an id-sized int")
        return value
    if kind == "float":
        if type(value) is not float or not math.isfinite(value):
            raise MessageError(f"{where}: expected a finite float")
        return value
    if kind == "str":
        if type(value) is not str or len(value) > 32:
            raise MessageError(f"{where}: expected a short string")
        return value
    if kind == "ints":
        if type(value) is not list or len(value) > max_items:
            raise MessageError(f"{where}: expected a list of at most {max_items} ids")
        for v in value:
            check_field(msg, name, v, "int", max_items, max_bytes)
        if len(set(value)) != len(value):
            raise MessageError(f"{where}: repeated id")
        return tuple(value)
    tag, size = kind
    if tag == "bytes":
        limit = size if size is not None else max_bytes
        if type(value) is not bytes or (len(value) != size if size else len(value) > limit):
            raise MessageError(f"{where}: expected {size or f'at most {limit}'} bytes")
        return value
    if type(value) is not list or len(value) > max_items:
        raise MessageError(f"{where}: expected a list of at most {max_items} byte strings")
    for v in value:
        check_field(msg, name, v, ("bytes", size), max_items, max_bytes)
    return tuple(value)


@dataclass(frozen=True)
class SetupRequest(Message):
    STAGE = "setup"
    SPEC: ClassVar[dict[str, Kind]] = {
        "nodes": "ints", "neighbours": "ints", "threshold": "int", "bits": "int",
        "clip": "float", "max_weight": "int", "length": "int", "noise_clip": "float",
        "noise_std": "float", "min_survivors": "int"}
    nodes: tuple[int, ...]  # U, sorted
    neighbours: tuple[int, ...]  # N(u)
    threshold: int
    bits: int
    clip: float
    max_weight: int
    length: int  # m: the number of float values the client uploads
    noise_clip: float = 0.0  # client-level DP (dp.py): the L2 clip C; 0.0 = no noise
    noise_std: float = 0.0  # client-level DP: each client's per-coordinate noise std
    min_survivors: int = 0  # client-level DP: the server aborts below this many masked inputs


@dataclass(frozen=True)
class SetupReply(Message):
    STAGE = "setup"
    SPEC: ClassVar[dict[str, Kind]] = {
        "enc_pk": ("bytes", KEY_BYTES), "mask_pk": ("bytes", KEY_BYTES)}
    enc_pk: bytes
    mask_pk: bytes


@dataclass(frozen=True)
class ShareKeysRequest(Message):
    STAGE = "share_keys"
    SPEC: ClassVar[dict[str, Kind]] = {
        "peers": "ints", "enc_pks": ("bytes_list", KEY_BYTES),
        "mask_pks": ("bytes_list", KEY_BYTES)}
    peers: tuple[int, ...]  # N(u) ∩ U1
    enc_pks: tuple[bytes, ...]
    mask_pks: tuple[bytes, ...]


@dataclass(frozen=True)
class ShareKeysReply(Message):
    STAGE = "share_keys"
    SPEC: ClassVar[dict[str, Kind]] = {
        "peers": "ints", "ciphertexts": ("bytes_list", CIPHERTEXT_BYTES),
        "commit": ("bytes", 32)}
    peers: tuple[int, ...]
    ciphertexts: tuple[bytes, ...]
    commit: bytes  # SHA-256 commitment to the self-mask seed, checked after its rebuild


@dataclass(frozen=True)
class MaskedInputRequest(Message):
    STAGE = "masked_input"
    SPEC: ClassVar[dict[str, Kind]] = {
        "peers": "ints", "ciphertexts": ("bytes_list", CIPHERTEXT_BYTES)}
    peers: tuple[int, ...]  # senders u ∈ N(v) ∩ U2 of the ciphertexts for v
    ciphertexts: tuple[bytes, ...]


@dataclass(frozen=True)
class MaskedInputReply(Message):
    STAGE = "masked_input"
    SPEC: ClassVar[dict[str, Kind]] = {
        "masked": ("bytes", None)}
    masked: bytes  # (m + 1) values of width ceil(bits/8), little-endian


@dataclass(frozen=True)
class UnmaskRequest(Message):
    STAGE = "unmask"
    SPEC: ClassVar[dict[str, Kind]] = {
        "alive": "ints", "dropped": "ints"}
    alive: tuple[int, ...]  # N(u) ∩ U3
    dropped: tuple[int, ...]  # N(u) ∩ (U2 \ U3)


@dataclass(frozen=True)
class UnmaskReply(Message):
    STAGE = "unmask"
    SPEC: ClassVar[dict[str, Kind]] = {
        "self_peers": "ints", "self_shares": ("bytes_list", SHARE_BYTES),
        "key_peers": "ints", "key_shares": ("bytes_list", SHARE_BYTES)}
    self_peers: tuple[int, ...]  # whose self-mask shares these are (alive peers and u)
    self_shares: tuple[bytes, ...]
    key_peers: tuple[int, ...]  # whose mask-key shares these are (dropped peers)
    key_shares: tuple[bytes, ...]


REQUESTS: dict[str, type[Message]] = {"setup": SetupRequest, "share_keys": ShareKeysRequest,
                                      "masked_input": MaskedInputRequest, "unmask": UnmaskRequest}
REPLIES: dict[str, type[Message]] = {"setup": SetupReply, "share_keys": ShareKeysReply,
                                     "masked_input": MaskedInputReply, "unmask": UnmaskReply}
