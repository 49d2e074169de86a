"""The server's side of one SecAgg+ instance: who survives each stage, what each client is sent,
and the final unmasking. Transport-free: ``requests()`` gives one record per live client for the
current stage, ``receive(replies)`` takes what came back (missing, malformed or off-instance
replies count as dropouts) and moves to the next stage, or raises :class:`RoundAborted` naming
the stage that fell short. After ``unmask`` the result is the weighted mean of the survivors'
uploads and nothing about any single one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import primitives as P
from .encoding import FixedPoint, decode_sum, unpack
from .graph import neighbour_graph
from .messages import (
    INSTANCE_BYTES,
    STAGES,
    Header,
    MaskedInputReply,
    MaskedInputRequest,
    Message,
    MessageError,
    SetupReply,
    SetupRequest,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
)


class RoundAborted(RuntimeError):
    """Too few clients survived a stage; no partial result exists."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"secagg stopped at stage {stage!r}: {reason}")
        self.stage = stage
        self.reason = reason


@dataclass(frozen=True)
class SecAggParams:
    """The ``[secagg]`` settings that shape an instance."""

    threshold: int = 0  # Shamir threshold t; 0 = a majority of each client's share holders
    neighbours: int = 0  # k: peers per client (even); 0 = all (plain SecAgg)
    clip: float = 1.0  # c: coordinates of the (weighted) upload clipped to [-c, c]
    bits: int = 40  # modulus 2^bits
    max_weight: int = 10_000  # a client's example count is capped here
    # client-level DP (dp.py): each client clips its update to L2 norm noise_clip and adds
    # N(0, noise_std^2) per coordinate; an instance with fewer than min_survivors masked inputs
    # is aborted (0 = off)
    noise_clip: float = 0.0
    noise_std: float = 0.0
    min_survivors: int = 0


@dataclass
class StageStats:
    stage: str
    sent: int = 0
    survivors: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    server_s: float = 0.0


@dataclass
class SecAggResult:
    mean: np.ndarray  # float64, the weighted mean of the survivors' clipped uploads
    total_weight: int  # sum of the survivors' (capped) weights
    survivors: int
    error_bound: float  # per coordinate, deterministic


@dataclass
class _Peer:
    enc_pk: bytes = b""
    mask_pk: bytes = b""
    commit: bytes = b""
    outgoing: dict[int, bytes] = field(default_factory=dict)  # recipient -> ciphertext
    masked: np.ndarray | None = None


def threshold_for(params: SecAggParams, n: int) -> int:
    holders = n if params.neighbours == 0 or params.neighbours >= n - 1 else params.neighbours + 1
    return params.threshold or holders // 2 + 1


class SecAggServer:
    def __init__(self, params: SecAggParams, run: int, round: int, nodes: Iterable[int],
                 length: int) -> None:
        self.nodes = sorted(nodes)
        self.params, self.length = params, length
        self.header = Header(run, round, os.urandom(INSTANCE_BYTES), "setup")
        self.fp = FixedPoint(params.bits, params.clip, params.max_weight, len(self.nodes),
                             params.noise_clip, params.noise_std)
        self.t = threshold_for(params, len(self.nodes))
        self.graph = neighbour_graph(self.nodes, params.neighbours)
        self.stage_index = 0
        self.live: set[int] = set(self.nodes)
        self.masked_set: set[int] = set()  # U2, the clients asked to mask
        self.u3: set[int] = set()  # the clients whose masked inputs were taken
        self.peers: dict[int, _Peer] = {u: _Peer() for u in self.nodes}
        self.shares: dict[str, dict[int, list[bytes]]] = {"self": {}, "key": {}}
        self.rejected: dict[int, str] = {}  # node -> why its last reply was not used
        self.stats = [StageStats(s) for s in STAGES]
        self.result: SecAggResult | None = None
        if self.t < 2:
            self.abort(f"threshold {self.t} < 2 ({len(self.nodes)} clients sampled)")
        self._prune()

    @property
    def stage(self) -> str:
        return STAGES[self.stage_index] if self.stage_index < len(STAGES) else "done"

    def abort(self, reason: str) -> None:
        raise RoundAborted(self.stage, reason)

    # ---- requests ------------------------------------------------------------------------
    def requests(self) -> dict[int, dict[str, Any]]:
        h = Header(self.header.run, self.header.round, self.header.instance, self.stage)
        build = {"setup": self._setup_req, "share_keys": self._share_keys_req,
                 "masked_input": self._masked_req, "unmask": self._unmask_req}[self.stage]
        msgs = {u: build(h, u) for u in sorted(self.live)}
        st = self.stats[self.stage_index]
        st.sent, st.bytes_down = len(msgs), sum(m.nbytes() for m in msgs.values())
        return {u: m.to_fields() for u, m in msgs.items()}

    def _nbrs(self, u: int, among: set[int]) -> list[int]:
        return sorted(self.graph[u] & among)

    def _setup_req(self, h: Header, u: int) -> Message:
        p = self.params
        return SetupRequest(h, tuple(self.nodes), tuple(sorted(self.graph[u])), self.t, p.bits,
                            float(p.clip), p.max_weight, self.length, float(p.noise_clip),
                            float(p.noise_std), p.min_survivors)

    def _share_keys_req(self, h: Header, u: int) -> Message:
        vs = self._nbrs(u, self.live)
        return ShareKeysRequest(h, tuple(vs), tuple(self.peers[v].enc_pk for v in vs),
                                tuple(self.peers[v].mask_pk for v in vs))

    def _masked_req(self, h: Header, v: int) -> Message:
        us = self._nbrs(v, self.live)
        return MaskedInputRequest(h, tuple(us), tuple(self.peers[u].outgoing[v] for u in us))

    def _unmask_req(self, h: Header, u: int) -> Message:
        return UnmaskRequest(h, tuple(self._nbrs(u, self.u3)),
                             tuple(self._nbrs(u, self.masked_set - self.u3)))

    # ---- replies -------------------------------------------------------------------------
    def receive(self, replies: dict[int, Any]) -> None:
        """Take the stage's replies (node -> fields; a missing node dropped out)."""
        stage, st = self.stage, self.stats[self.stage_index]
        cls, check = {"setup": (SetupReply, self._take_setup),
                      "share_keys": (ShareKeysReply, self._take_share_keys),
                      "masked_input": (MaskedInputReply, self._take_masked),
                      "unmask": (UnmaskReply, self._take_unmask)}[stage]
        survivors = set()
        limit = self.fp.width * (self.length + 1)
        for u in sorted(self.live):
            if u not in replies or replies[u] is None:
                continue
            try:
                msg = cls.from_fields(replies[u], len(self.nodes), limit)
                if (msg.header.run, msg.header.round, msg.header.instance) != (
                        self.header.run, self.header.round, self.header.instance):
                    raise MessageError("a reply for another run, round or instance")
                check(u, msg)
            except (MessageError, P.CryptoError, ValueError) as e:
                self.rejected[u] = f"{stage}: {e}"
                continue
            st.bytes_up += msg.nbytes()
            survivors.add(u)
        if stage == "share_keys":
            self.masked_set = set(survivors)
        self.live = survivors
        st.survivors = len(self.live)
        {"setup": self._prune, "share_keys": self._prune_shared,
         "masked_input": self._check_masked, "unmask": self._unmask}[stage]()
        st.survivors = len(self.live)
        self.stage_index += 1

    def _take_setup(self, u: int, msg: SetupReply) -> None:
        known = {k for p in self.peers.values() for k in (p.enc_pk, p.mask_pk) if k}
        if msg.enc_pk == msg.mask_pk or {msg.enc_pk, msg.mask_pk} & known:
            raise MessageError("public keys already in use")
        self.peers[u].enc_pk, self.peers[u].mask_pk = msg.enc_pk, msg.mask_pk

    def _take_share_keys(self, u: int, msg: ShareKeysReply) -> None:
        if list(msg.peers) != self._nbrs(u, self.live) or len(msg.ciphertexts) != len(msg.peers):
            raise MessageError("ciphertexts for other peers than the ones sent")
        self.peers[u].outgoing = dict(zip(msg.peers, msg.ciphertexts, strict=True))
        self.peers[u].commit = msg.commit

    def _take_masked(self, u: int, msg: MaskedInputReply) -> None:
        self.peers[u].masked = unpack(msg.masked, self.fp.width, self.length + 1)

    def _take_unmask(self, u: int, msg: UnmaskReply) -> None:
        alive = [*self._nbrs(u, self.u3), u]
        dropped = self._nbrs(u, self.masked_set - self.u3)
        if sorted(msg.self_peers) != sorted(alive) or list(msg.key_peers) != dropped:
            raise MessageError("shares of other nodes than the ones asked for")
        if len(msg.self_shares) != len(alive) or len(msg.key_shares) != len(dropped):
            raise MessageError("share lists and node lists differ in length")
        for v, s in zip(msg.self_peers, msg.self_shares, strict=True):
            self.shares["self"].setdefault(v, []).append(s)
        for v, s in zip(msg.key_peers, msg.key_shares, strict=True):
            self.shares["key"].setdefault(v, []).append(s)

    # ---- survivors -----------------------------------------------------------------------
    def _prune(self) -> None:
        """Before masking, a client with fewer than t live share holders is dropped (nothing
        depends on it yet); abort if fewer than t clients remain."""
        answered = len(self.live)
        while True:
            weak = {u for u in self.live if len(self.graph[u] & self.live) + 1 < self.t}
            if not weak:
                break
            self.live -= weak
        if len(self.live) < self.t:
            pruned = f" ({answered} answered)" if answered != len(self.live) else ""
            self.abort(f"{len(self.live)} clients left{pruned}, threshold {self.t}")

    def _prune_shared(self) -> None:
        self._prune()
        self.masked_set = set(self.live)

    def _check_masked(self) -> None:
        self.u3 = set(self.live)
        if len(self.live) < self.t:
            self.abort(f"{len(self.live)} masked inputs, threshold {self.t}")
        if len(self.live) < self.params.min_survivors:
            self.abort(f"{len(self.live)} masked inputs, fewer than the "
                       f"{self.params.min_survivors} (privacy.min_survivors) whose noise "
                       "client-level DP needs in the sum")
        for u in self.live:
            if len(self.graph[u] & self.live) + 1 < self.t:
                self.abort(f"node {u} has {len(self.graph[u] & self.live)} surviving neighbours; "
                           f"its self mask needs {self.t} shares")
        for v in self.masked_set - self.live:
            holders = self.graph[v] & self.live
            if holders and len(holders) < self.t:
                self.abort(f"dropped node {v} has {len(holders)} surviving neighbours; its "
                           f"mask key needs {self.t} shares")

    def _unmask(self) -> None:
        try:
            self._unmask_sum()
        except P.CryptoError as e:
            self.abort(str(e))

    def _unmask_sum(self) -> None:
        survivors = sorted(self.u3)
        total = np.zeros(self.length + 1, dtype=np.uint64)
        for u in survivors:
            total += self.peers[u].masked
            total -= P.prg(self._rebuild_seed(u), self.length + 1, self.fp.bits)
        for v in sorted(self.masked_set - set(survivors)):
            nbrs = self.graph[v] & set(survivors)
            if not nbrs:
                continue
            sk = self._rebuild_key(v)
            for u in nbrs:
                key = P.derive_key(sk, self.peers[u].mask_pk, self.header.context(), b"mask", u, v)
                mask = P.prg(key, self.length + 1, self.fp.bits)
                total = total - mask if u > v else total + mask
        total &= self.fp.modulus_mask
        try:
            mean, weight = decode_sum(self.fp, total, len(survivors))
        except ValueError as e:
            self.abort(str(e))
        self.result = SecAggResult(mean, weight, len(survivors),
                                   self.fp.error_bound(len(survivors), weight))
        self.peers = {}

    def _rebuild_seed(self, u: int) -> bytes:
        shares = self.shares["self"].get(u, [])
        if len(shares) < self.t:
            self.abort(f"{len(shares)} shares of node {u}'s self mask, threshold {self.t}")
        seed = P.rebuild_secret(shares[:self.t])
        if P.commitment(seed, self.header.context()) != self.peers[u].commit:
            self.abort(f"node {u}'s self-mask seed does not match its commitment (a bad share)")
        return seed

    def _rebuild_key(self, v: int) -> bytes:
        shares = self.shares["key"].get(v, [])
        if len(shares) < self.t:
            self.abort(f"{len(shares)} shares of dropped node {v}'s mask key, threshold {self.t}")
        sk = P.rebuild_secret(shares[:self.t])
        if P.public_of(sk) != self.peers[v].mask_pk:
            self.abort(f"dropped node {v}'s rebuilt mask key does not match its public key")
        return sk
