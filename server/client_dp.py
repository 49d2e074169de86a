"""Client-level DP (``[privacy] client_level``) with Flower's own fixed-clipping wrappers.

``DifferentialPrivacyServerSideFixedClipping`` (the server clips every client's update) or
``DifferentialPrivacyClientSideFixedClipping`` (each client clips its own update with Flower's
``compute_clip_model_update``, see ``fedpeft.core.privacy.clip_update``) wraps a small bridge around
``FedPeftStrategy``: the wrapper hands the bridge the clipped replies, the bridge lets the method
aggregate them and returns the new mean as an ``ArrayRecord``, the wrapper adds Gaussian noise of
std ``z * C / m`` (m = clients per round) and the noised mean becomes the method's state. The
clipping and the noise are Flower's code; what is ours:

- The reference for clipping is the round's downlink (the same for every client: only methods
  with ``client_dp`` qualify), and replies are put into its key order first, because Flower's
  helpers pair arrays by position. A reply of the wrong keys or shapes is not clipped; the
  strategy rejects it as usual.
- The mean is unweighted and over the m sampled clients (a missing or rejected client counts as
  a zero update): new = G + (1/m) sum_k clip(U_k - G). Then one client moves the mean by at most
  C / m, the sensitivity Flower's noise is calibrated to. An example-weighted mean, or one over
  the k < m replies that arrived, would break that bound.
- Client-level epsilon per round, by Opacus's RDP accountant with no amplification by client
  sampling (as Flower's own accountant requires), reported as ``client_epsilon``.
- In ``client-fixed`` mode the server still checks each update's norm and rejects one above C.
- Flower's wrapper skips the whole round's aggregation when any client replied with an error;
  error replies are therefore taken out first and count as zero updates, as a missing client
  does (the round goes on with the rest; they are counted in ``clients_failed``).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedpeft.core.config import FedConfig
from fedpeft.core.keys import NUM_EXAMPLES
from fedpeft.core.payload import Expected, Payload, update_norm
from fedpeft.core.privacy import client_level_epsilon
from fedpeft.core.wire import (
    MANIFEST,
    METRICS_RECORD,
    PACKED,
    TENSORS,
    from_array_record,
    has_tensors,
    to_array_record,
    unpack_in_place,
)

from .rounds import RoundLoop
from .validation import check_upload

_NORM_SLACK = 1e-4  # float32 round-off when checking a client-clipped norm


def _np(tensors: dict) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in tensors.items()}


class MeanBridge(Strategy):
    """What Flower's DP wrapper wraps: the fedpeft strategy, with the new mean returned as
    arrays from ``aggregate_train`` (the wrapper noises them)."""

    def __init__(self, inner: Strategy, loop: RoundLoop, sampled: int) -> None:
        self.inner, self.loop, self.sampled = inner, loop, sampled

    def global_tensors(self) -> dict:
        """The downlink every client gets (the reference the updates are measured from), as
        the clients decode it."""
        return self.loop.global_tensors()

    def set_global(self, tensors: dict) -> None:
        self.loop.set_global(tensors)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord]:
        replies = list(replies)
        for reply in replies:  # unweighted mean: every client counts once
            metrics = reply.content.get(METRICS_RECORD) if reply.has_content() else None
            if metrics is not None and float(metrics.get(NUM_EXAMPLES, 0)) > 0:
                metrics[NUM_EXAMPLES] = 1
        before = {k: v.clone() for k, v in self.global_tensors().items()}
        _, stats = self.inner.aggregate_train(server_round, replies)
        if not stats.get("aggregated"):
            return None, stats
        share = float(stats["clients_ok"]) / self.sampled  # k of m: the rest count as zero
        after = self.global_tensors()
        mean = {k: before[k] + share * (after[k] - before[k]) for k in before}
        return to_array_record(mean), stats

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()


class ClientLevelDP(Strategy):
    """The fedpeft strategy under one of Flower's fixed-clipping DP wrappers (see the module
    doc)."""

    def __init__(self, inner: Strategy, loop: RoundLoop, cfg: FedConfig) -> None:
        priv = cfg.privacy
        self.cfg, self.mode = cfg, priv.client_level
        self.sampled = min(cfg.federation.clients_per_round, cfg.federation.clients)
        self.bridge = MeanBridge(inner, loop, self.sampled)
        wrapper = (DifferentialPrivacyServerSideFixedClipping if self.mode == "server-fixed"
                   else DifferentialPrivacyClientSideFixedClipping)
        self.dp = wrapper(self.bridge, noise_multiplier=priv.client_noise,
                          clipping_norm=priv.client_clip, num_sampled_clients=self.sampled)
        self.releases = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        current = to_array_record(self.bridge.global_tensors())
        config = config if config is not None else ConfigRecord()
        return self.dp.configure_train(server_round, current, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord]:
        replies = list(replies)
        failed = [r for r in replies if r.has_error()]
        for reply in failed:
            log(WARNING, "round %d: client-level DP: node %d failed (%s); it counts as a zero "
                "update", server_round, reply.metadata.src_node_id, reply.error.reason)
        replies = [r for r in replies if not r.has_error()]
        reference = _np(self.bridge.global_tensors())
        for reply in replies:
            self._canonical(server_round, reply, reference)
        arrays, stats = self.dp.aggregate_train(server_round, replies)
        if arrays is not None:
            self.bridge.set_global(from_array_record(arrays))
            self.releases += 1
        if stats is None:  # the wrapper refused the round
            stats = MetricRecord({"clients_ok": 0, "clients_failed": 0, "clients_rejected": 0,
                                  "train_s": 0.0, "aggregated": 0})
        out = dict(stats)
        out["clients_failed"] = int(out.get("clients_failed", 0)) + len(failed)
        out["client_epsilon"] = client_level_epsilon(self.cfg.privacy.client_noise,
                                                     self.releases, self.cfg.privacy.delta)
        return None, MetricRecord(out)

    def _canonical(self, server_round: int, reply: Message,
                   reference: dict[str, np.ndarray]) -> None:
        """Put a reply's tensors in the reference's key order (Flower pairs arrays by position);
        drop them when malformed, or over the bound in client-fixed mode (then rejected)."""
        if reply.has_error() or not reply.has_content() or not has_tensors(reply.content):
            return
        sent = {k: torch.from_numpy(v) for k, v in reference.items()}
        try:  # packed (and maybe compressed) tensors -> one Array per key, as Flower's helpers need
            tensors = unpack_in_place(reply.content, reference=sent, expected=Expected.like(sent))
            problem = check_upload(Payload(tensors), {k: tuple(v.shape) for k, v in sent.items()})
        except Exception as exc:  # whatever one reply holds, it drops that reply only
            problem = f"undecodable payload: {exc}"
        record = reply.content.get(TENSORS)
        if problem is None:
            norm = update_norm(tensors, sent)
            if self.mode == "client-fixed" and norm > self.cfg.privacy.client_clip * (
                    1 + _NORM_SLACK):
                problem = f"update norm {norm:.4g} above privacy.client_clip"
            elif norm == 0:  # Flower's clipping divides by the norm; zero adds 0 to the sum
                problem = "a zero update (counts as zero, as a missing client does)"
        if problem is not None:
            log(WARNING, "round %d: client-level DP: reply from node %d not used: %s",
                server_round, reply.metadata.src_node_id, problem)
            for name in (TENSORS, PACKED, MANIFEST):
                if name in reply.content:
                    del reply.content[name]
            return
        reply.content[TENSORS] = ArrayRecord({k: record[k] for k in reference})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.dp.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        return self.dp.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.dp.summary()


def with_client_dp(strategy: Strategy, loop: RoundLoop, cfg: FedConfig) -> Strategy:
    """``strategy`` itself, or wrapped for client-level DP when ``privacy.client_level`` is on."""
    if cfg.privacy.client_level == "off":
        return strategy
    return ClientLevelDP(strategy, loop, cfg)
