"""The client's side of one SecAgg+ instance: a state machine over the four stages.

Every request is parsed against its spec, then checked against the instance (run, round,
instance nonce, stage order) and against what this client already knows (its neighbours, the
peers whose keys and shares it holds). Any failure raises :class:`SecAggRefusal` naming the
stage, and the instance's secrets are dropped: the client answers nothing more in it. The rule
that protects an input when the server lies about who dropped: for any one peer the client reveals
either its self-mask share or its mask-key share, never both, across all requests of an instance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import primitives as P
from .dp import clip_and_noise
from .encoding import EncodingError, FixedPoint, encode, pack
from .messages import (
    INSTANCE_BYTES,
    Header,
    MaskedInputReply,
    MaskedInputRequest,
    MessageError,
    SetupReply,
    SetupRequest,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
)


class SecAggRefusal(RuntimeError):
    """A client refuses a request; ``stage`` says where."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"secagg {stage}: refused: {reason}")
        self.stage = stage
        self.reason = reason


@dataclass(frozen=True)
class ClientPolicy:
    """What a client accepts from a server, set locally (not by the server)."""

    min_clients: int = 2  # refuse instances over fewer sampled clients (a sum of one is an input)
    min_threshold: int = 2
    max_clients: int = 100_000
    max_length: int = 1 << 31
    # client-level DP (dp.py), from the client's own config: the noise it insists on adding
    # (at least noise_std, with updates clipped to at most noise_clip) and the fewest masked
    # inputs the server must abort below; 0 = no demand (it adds what the server asks for)
    noise_clip: float = 0.0
    noise_std: float = 0.0
    min_survivors: int = 0


@dataclass
class _Instance:
    header: Header
    setup: SetupRequest
    fp: FixedPoint
    enc_sk: bytes
    mask_sk: bytes
    stage: str = "setup"
    seed: bytes = b""
    peer_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # enc_pk, mask_pk
    own_shares: tuple[bytes, bytes] = (b"", b"")
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # peer -> (b, sk) shares
    revealed: dict[int, str] = field(default_factory=dict)  # peer -> "self" | "key"
    stage_header: Header | None = None  # the masked-input request's, for the reply


class SecAggClient:
    """One client's protocol state across rounds (``Context.state`` holds it in Flower)."""

    def __init__(self, node_id: int, run: int, policy: ClientPolicy | None = None) -> None:
        self.node_id = node_id
        self.run = run
        self.policy = policy or ClientPolicy()
        self.last_round = -1
        self.seen: set[bytes] = set()
        self.inst: _Instance | None = None

    # ---- stages --------------------------------------------------------------------------
    def setup(self, fields: Any) -> dict[str, Any]:
        req = self._parse(SetupRequest, fields, self.policy.max_clients, "setup")
        h = req.header
        with self._refusing("setup"):
            self._check_new_instance(h)
            fp = self._check_setup(req)
        enc_sk, enc_pk = P.new_keypair()
        mask_sk, mask_pk = P.new_keypair()
        self.last_round, self.inst = h.round, _Instance(h, req, fp, enc_sk, mask_sk)
        self.seen.add(h.instance)
        return SetupReply(h, enc_pk, mask_pk).to_fields()

    def share_keys(self, fields: Any) -> dict[str, Any]:
        inst = self._expect("share_keys", "setup")
        req = self._parse(ShareKeysRequest, fields, len(inst.setup.neighbours), "share_keys")
        with self._refusing("share_keys"):
            self._check_header(req.header)
            self._check_peer_keys(inst, req)
            inst.seed = os.urandom(P.SEED_BYTES)
            holders = sorted([*req.peers, self.node_id])
            t = inst.setup.threshold
            b_shares = dict(zip(holders, P.share_secret(inst.seed, t, len(holders)), strict=True))
            k_shares = dict(zip(holders, P.share_secret(inst.mask_sk, t, len(holders)),
                                strict=True))
            inst.peer_keys = dict(zip(req.peers, zip(req.enc_pks, req.mask_pks, strict=True),
                                      strict=True))
            inst.own_shares = (b_shares[self.node_id], k_shares[self.node_id])
            cts = [self._seal_shares(inst, v, b_shares[v], k_shares[v]) for v in req.peers]
        inst.stage = "share_keys"
        commit = P.commitment(inst.seed, inst.header.context())
        return ShareKeysReply(req.header, req.peers, tuple(cts), commit).to_fields()

    def receive_shares(self, fields: Any) -> None:
        """First half of the masked-input stage: open the shares sent to this client. Done before
        local training, so that a bad request costs no training."""
        inst = self._expect("masked_input", "share_keys")
        req = self._parse(MaskedInputRequest, fields, len(inst.peer_keys), "masked_input")
        with self._refusing("masked_input"):
            self._check_header(req.header)
            if len(req.peers) != len(req.ciphertexts):
                raise MessageError("peers and ciphertexts differ in length")
            if not set(req.peers) <= set(inst.peer_keys):
                raise MessageError("shares from a node whose keys this client never received")
            if len(req.peers) + 1 < inst.setup.threshold:
                raise MessageError(f"{len(req.peers)} peers left, threshold "
                                   f"{inst.setup.threshold} cannot be met")
            inst.stage_header = req.header
            inst.held = {u: self._open_shares(inst, u, ct)
                         for u, ct in zip(req.peers, req.ciphertexts, strict=True)}
        inst.stage = "shares_received"

    def masked_input(self, vector: np.ndarray, weight: float) -> dict[str, Any]:
        """Second half: encode the upload, add the self mask and the pairwise masks."""
        inst = self._expect("masked_input", "shares_received")
        with self._refusing("masked_input"):
            if np.asarray(vector).size != inst.setup.length:
                raise EncodingError(f"the upload has {np.asarray(vector).size} values, the "
                                    f"instance expects {inst.setup.length}")
            if inst.fp.noisy:  # the release: clipped and noised here, never the raw update
                vector = clip_and_noise(vector, inst.fp.noise_clip, inst.fp.noise_std)
            y = encode(inst.fp, vector, weight)
            y += P.prg(inst.seed, y.size, inst.fp.bits)
            for u in inst.held:
                key = P.derive_key(inst.mask_sk, inst.peer_keys[u][1], inst.header.context(),
                                   b"mask", self.node_id, u)
                mask = P.prg(key, y.size, inst.fp.bits)
                y = y + mask if self.node_id > u else y - mask
            y &= inst.fp.modulus_mask
        inst.stage = "masked_input"
        assert inst.stage_header is not None
        return MaskedInputReply(inst.stage_header, pack(y, inst.fp.width)).to_fields()

    def unmask(self, fields: Any) -> dict[str, Any]:
        inst = self._expect("unmask", "masked_input", "unmask")
        req = self._parse(UnmaskRequest, fields, len(inst.held), "unmask")
        with self._refusing("unmask"):
            self._check_header(req.header)
            self._check_unmask(inst, req)
            for u in req.alive:
                inst.revealed[u] = "self"
            for u in req.dropped:
                inst.revealed[u] = "key"
        inst.stage = "unmask"
        self_peers = (*req.alive, self.node_id)
        self_shares = (*(inst.held[u][0] for u in req.alive), inst.own_shares[0])
        key_shares = tuple(inst.held[u][1] for u in req.dropped)
        return UnmaskReply(req.header, self_peers, self_shares, req.dropped,
                           key_shares).to_fields()

    def close(self) -> None:
        """End of the instance: forget its secrets."""
        self.inst = None

    # ---- persistence (Flower keeps a node's state in ``Context.state`` between messages) -----
    def to_record(self) -> dict[str, Any]:
        """Flat ConfigRecord-style values (ints, bytes, str and lists of them); secrets included:
        this stays on the client, never in a reply."""
        rec: dict[str, Any] = {"node_id": self.node_id, "run": self.run,
                               "last_round": self.last_round, "seen": sorted(self.seen)}
        inst = self.inst
        if inst is None:
            return rec
        rec.update({f"setup.{k}": v for k, v in inst.setup.to_fields().items()})
        rec.update({
            "enc_sk": inst.enc_sk, "mask_sk": inst.mask_sk, "stage": inst.stage,
            "seed": inst.seed, "peers": list(inst.peer_keys),
            "peer_enc": [k[0] for k in inst.peer_keys.values()],
            "peer_mask": [k[1] for k in inst.peer_keys.values()],
            "own_b": inst.own_shares[0], "own_k": inst.own_shares[1],
            "held": list(inst.held), "held_b": [v[0] for v in inst.held.values()],
            "held_k": [v[1] for v in inst.held.values()],
            "revealed": list(inst.revealed), "revealed_kind": list(inst.revealed.values())})
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any], policy: ClientPolicy | None = None) -> SecAggClient:
        client = cls(int(rec["node_id"]), int(rec["run"]), policy)
        client.last_round = int(rec["last_round"])
        client.seen = set(rec["seen"])
        if "stage" not in rec:
            return client
        fields = {k[6:]: v for k, v in rec.items() if k.startswith("setup.")}
        setup = SetupRequest.from_fields(fields, client.policy.max_clients)
        fp = FixedPoint(setup.bits, setup.clip, setup.max_weight, len(setup.nodes),
                        setup.noise_clip, setup.noise_std)
        inst = _Instance(setup.header, setup, fp, rec["enc_sk"], rec["mask_sk"], rec["stage"],
                         rec["seed"])
        inst.peer_keys = dict(zip(rec["peers"], zip(rec["peer_enc"], rec["peer_mask"],
                                                    strict=True), strict=True))
        inst.own_shares = (rec["own_b"], rec["own_k"])
        inst.held = dict(zip(rec["held"], zip(rec["held_b"], rec["held_k"], strict=True),
                             strict=True))
        inst.revealed = dict(zip(rec["revealed"], rec["revealed_kind"], strict=True))
        if inst.stage in ("shares_received", "masked_input", "unmask"):
            h = setup.header
            inst.stage_header = Header(h.run, h.round, h.instance, "masked_input")
        client.inst = inst
        return client

    # ---- checks --------------------------------------------------------------------------
    def _check_new_instance(self, h: Header) -> None:
        if h.run != self.run:
            raise MessageError(f"message for run {h.run}, this client is in run {self.run}")
        if h.round < self.last_round:
            raise MessageError(f"message for round {h.round}, an earlier round than "
                               f"{self.last_round} (a replay)")
        if h.instance in self.seen:
            raise MessageError("an instance this client has already taken part in (a replay)")
        if len(h.instance) != INSTANCE_BYTES:
            raise MessageError("malformed instance nonce")

    def _check_setup(self, req: SetupRequest) -> FixedPoint:
        nodes, nbrs, pol = set(req.nodes), set(req.neighbours), self.policy
        if self.node_id not in nodes or self.node_id in nbrs or not nbrs <= nodes:
            raise MessageError("the node list or the neighbour list is inconsistent")
        if len(nodes) < pol.min_clients:
            raise MessageError(f"{len(nodes)} clients sampled, this client needs at least "
                               f"{pol.min_clients}")
        if not max(2, pol.min_threshold) <= req.threshold <= len(nbrs) + 1:
            raise MessageError(f"threshold {req.threshold} outside [{max(2, pol.min_threshold)}, "
                               f"{len(nbrs) + 1}] for {len(nbrs)} neighbours")
        if not 1 <= req.length <= pol.max_length:
            raise MessageError(f"vector length {req.length} out of range")
        if not 0 <= req.min_survivors <= len(nodes):
            raise MessageError(f"min_survivors {req.min_survivors} outside [0, {len(nodes)}] "
                               f"for {len(nodes)} clients")
        self._check_noise(req)
        return FixedPoint(req.bits, req.clip, req.max_weight, len(nodes), req.noise_clip,
                          req.noise_std)

    def _check_noise(self, req: SetupRequest) -> None:
        """A server may ask for more noise than this client's config, never less."""
        pol, slack = self.policy, 1e-9
        if pol.noise_std == 0 and pol.min_survivors == 0:
            return
        if req.noise_std < pol.noise_std * (1 - slack) or req.min_survivors < pol.min_survivors:
            raise MessageError(
                f"the server asks for noise std {req.noise_std:.4g} with an abort below "
                f"{req.min_survivors} survivors; this client's client-level DP needs std >= "
                f"{pol.noise_std:.4g} and an abort below {pol.min_survivors}")
        if not 0 < req.noise_clip <= pol.noise_clip * (1 + slack):
            raise MessageError(f"the server asks for a clip of {req.noise_clip:.4g}, this "
                               f"client's client-level DP clips to {pol.noise_clip:.4g}")

    def _check_header(self, h: Header) -> None:
        assert self.inst is not None
        mine = self.inst.header
        if (h.run, h.round, h.instance) != (mine.run, mine.round, mine.instance):
            raise MessageError(f"message for run {h.run} round {h.round} of another instance "
                               f"(this client is in run {mine.run} round {mine.round})")

    def _check_peer_keys(self, inst: _Instance, req: ShareKeysRequest) -> None:
        if not (len(req.peers) == len(req.enc_pks) == len(req.mask_pks)):
            raise MessageError("peers and keys differ in length")
        if not set(req.peers) <= set(inst.setup.neighbours):
            raise MessageError("keys of a node that is not a neighbour")
        if len(req.peers) + 1 < inst.setup.threshold:
            raise MessageError(f"{len(req.peers)} neighbours left, threshold "
                               f"{inst.setup.threshold} cannot be met")
        keys = [*req.enc_pks, *req.mask_pks, P.public_of(inst.enc_sk), P.public_of(inst.mask_sk)]
        if len(set(keys)) != len(keys):
            raise MessageError("public keys are not distinct")

    def _check_unmask(self, inst: _Instance, req: UnmaskRequest) -> None:
        alive, dropped = set(req.alive), set(req.dropped)
        if alive & dropped:
            raise MessageError(f"nodes {sorted(alive & dropped)} listed both alive and dropped")
        if not (alive | dropped) <= set(inst.held):
            raise MessageError("a node whose shares this client does not hold")
        if len(alive) + 1 < inst.setup.threshold:
            raise MessageError(f"{len(alive) + 1} survivors named, below threshold "
                               f"{inst.setup.threshold}")
        complete = len(inst.setup.neighbours) + 1 == len(inst.setup.nodes)
        if complete and len(alive) + 1 < inst.setup.min_survivors:  # all it can check
            raise MessageError(f"{len(alive) + 1} survivors named, fewer than the "
                               f"{inst.setup.min_survivors} whose noise the sum must hold")
        both = ([u for u in alive if inst.revealed.get(u) == "key"]
                + [u for u in dropped if inst.revealed.get(u) == "self"])
        if both:
            raise MessageError(
                f"the server asks for the other share of node(s) {sorted(both)} (it already has "
                "one kind): revealing both a self-mask share and a mask-key share of one node "
                "would let it unmask that node's input")

    # ---- helpers -------------------------------------------------------------------------
    def _seal_shares(self, inst: _Instance, v: int, b_share: bytes, k_share: bytes) -> bytes:
        ctx = inst.header.context()
        key = P.derive_key(inst.enc_sk, inst.peer_keys[v][0], ctx, b"enc", self.node_id, v)
        ids = self.node_id.to_bytes(8, "big") + v.to_bytes(8, "big")
        return P.seal(key, ids + inst.header.instance + b_share + k_share, ctx + ids)

    def _open_shares(self, inst: _Instance, u: int, ct: bytes) -> tuple[bytes, bytes]:
        ctx = inst.header.context()
        key = P.derive_key(inst.enc_sk, inst.peer_keys[u][0], ctx, b"enc", u, self.node_id)
        ids = u.to_bytes(8, "big") + self.node_id.to_bytes(8, "big")
        pt = P.open_sealed(key, ct, ctx + ids)
        if pt[:16] != ids or pt[16:16 + INSTANCE_BYTES] != inst.header.instance:
            raise MessageError(f"the shares from node {u} name another sender, recipient or "
                               "instance")
        body = pt[16 + INSTANCE_BYTES:]
        return body[:P.SHARE_BYTES], body[P.SHARE_BYTES:]

    def _expect(self, stage: str, *after: str) -> _Instance:
        if self.inst is None:
            raise SecAggRefusal(stage, "no instance in progress (never set up, finished, or "
                                       "aborted after a refusal)")
        if self.inst.stage not in after:
            raise SecAggRefusal(stage, f"out of order: this client is past stage "
                                       f"{self.inst.stage!r}")
        return self.inst

    def _parse(self, cls: Any, fields: Any, max_items: int, stage: str) -> Any:
        with self._refusing(stage):
            return cls.from_fields(fields, max_items)

    def _refusing(self, stage: str) -> _Refusing:
        return _Refusing(self, stage)


class _Refusing:
    """Turns a check's failure into a refusal and ends the instance."""

    def __init__(self, client: SecAggClient, stage: str) -> None:
        self.client, self.stage = client, stage

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: Any, exc: Any, tb: Any) -> bool:
        if exc is None:
            return False
        if isinstance(exc, (MessageError, P.CryptoError, EncodingError)):
            self.client.inst = None
            raise SecAggRefusal(self.stage, str(exc)) from exc
        return False


def respond(client: SecAggClient, stage: str, fields: Any,
            upload: Any) -> dict[str, Any]:
    """One client's reply to one stage's request, whatever carries it. ``upload()`` returns the
    (float vector, weight) to mask; it runs (local training) only after the shares open."""
    if stage == "setup":
        return client.setup(fields)
    if stage == "share_keys":
        return client.share_keys(fields)
    if stage == "masked_input":
        client.receive_shares(fields)
        vector, weight = upload()
        return client.masked_input(vector, weight)
    if stage == "unmask":
        reply = client.unmask(fields)
        return reply
    raise SecAggRefusal(stage, "unknown stage")
