"""The round loop, written once and free of Flower: sample, downlink, collect, validate,
aggregate, evaluate, checkpoint.

Two transports drive it: the Flower ServerApp (``server/app.py``: messages to SuperNodes, in
simulation and deployment) and the single-process loop of ``simulations/plain_loop.py`` (clients
called in this process). Both hand :class:`RoundLoop` the clients' replies as :class:`Reply`
objects, so validation, aggregation, metrics rows, checkpoints and the final export are the same
code whichever way the numbers travelled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any, Protocol

from fedpeft.strategies import ClientProfile, Method, Upload, build_method
from flwr.common.logger import log  # Flower's logger: its lines reach the run's log and the CLI

from fedpeft.core.adapters import build_adapter_model
from fedpeft.core.config import FedConfig, to_toml
from fedpeft.core.data import partition_indices
from fedpeft.core.keys import (
    BUDGET_SPENT,
    EPSILON,
    NUM_EXAMPLES,
    RANK_MISMATCH,
    TRAIN_S,
    TRAIN_TOKENS,
)
from fedpeft.core.payload import Payload
from fedpeft.core.precision import precisions
from fedpeft.core.runfiles import CONFIG_FILE, ERROR_FILE, METRICS_FILE, SUMMARY_FILE
from fedpeft.core.sampling import sample_clients
from fedpeft.core.wire import transmit
from fedpeft.core.workspace import Workspace

from .checkpoint import Checkpoint, check_resumable, load_checkpoint, save_checkpoint
from .federation import (
    append_samples,
    client_profile,
    eval_due,
    eval_subset,
    evaluate_global,
    reported_rank,
)
from .reporting import (
    MetricsLog,
    plot_report,
    results_table,
    round_line,
    summarize,
    write_json_atomic,
)
from .validation import (
    all_finite,
    check_examples,
    check_fingerprint,
    check_metrics,
    check_upload,
)

# Per-round counts that add up over the attempts of a retried round (so clients_sampled = ok +
# failed + rejected + timed_out + resized + budget_spent); other stats: the last attempt's.
SUMMED = ("bytes_down", "bytes_up", "clients_sampled", "clients_ok", "clients_failed",
          "clients_rejected", "clients_timed_out", "clients_resized", "clients_budget_spent",
          TRAIN_S, TRAIN_TOKENS)


@dataclass
class Reply:
    """One client's answer to a train message, whatever carried it. ``payload`` is None when
    the reply held no tensors or could not be decoded (then ``problem`` says why)."""

    profile: ClientProfile
    metrics: Mapping[str, Any] = field(default_factory=dict)
    payload: Payload | None = None
    error: str | None = None  # the client failed or vanished
    vanished: bool = False
    problem: str | None = None  # the reply could not be decoded
    fingerprint: object = None  # the client's base-model fingerprint as received; None: none


class RoundLoop:
    """The server's side of the federation: the method's global state and the bookkeeping
    that outlives a round (ranks clients reported, the largest DP epsilon seen)."""

    def __init__(self, cfg: FedConfig, method: Method, state: Payload,
                 example_cap: Callable[[int], int | None] | None = None,
                 fingerprint: str | None = None) -> None:
        self.cfg, self.method = cfg, method
        # What each profile is sent (and decodes) from the current state: the Flower message,
        # its decode reference and its validation all need it, and a downlink can cost an SVD
        # (FlexLoRA) or an encode/decode round trip (down filters). Cleared with every new state.
        self._sent: dict[ClientProfile, Payload] = {}
        self._received: dict[ClientProfile, Payload] = {}
        self.state = state
        self.pending: dict[int, ClientProfile] = {}  # node id -> profile, this attempt
        self.ranks: dict[int, int] = {}  # node -> the LoRA rank it reported (node config, pruning)
        self.epsilon = 0.0  # the largest DP-SGD epsilon any client reported so far
        self.example_cap = example_cap  # partition id -> its known size (simulation), or None
        # the server's own base-model fingerprint: a reply with another one is rejected (None:
        # no check); nodes that sent none were warned about once
        self.fingerprint = fingerprint
        self.unfingerprinted: set[int] = set()

    # ---- downlink -----------------------------------------------------------------------
    def sample(self, rnd: int, attempt: int, nodes: list[int]) -> list[ClientProfile]:
        """This attempt's clients (``nodes[i]`` holds partition ``i``)."""
        fed = self.cfg.federation
        self.pending = {}
        for index in sample_clients(len(nodes), fed.clients_per_round, fed.seed, rnd, attempt):
            node = nodes[index]
            profile = client_profile(self.cfg, index, node, self.ranks.get(node))
            self.pending[node] = profile
        return list(self.pending.values())

    @property
    def state(self) -> Payload:
        """The method's global state."""
        return self._state

    @state.setter
    def state(self, state: Payload) -> None:
        self._state = state
        self._sent.clear()
        self._received.clear()

    def downlink(self, profile: ClientProfile) -> Payload:
        if profile not in self._sent:
            self._sent[profile] = self.method.downlink(self.state, profile)
        return self._sent[profile]

    def received(self, profile: ClientProfile) -> Payload:
        """The downlink as the client decodes it (after the ``[compression] down`` filters):
        the reference an upload of updates is decoded against."""
        down = self.downlink(profile)
        if not self.cfg.compression.down:
            return down
        if profile not in self._received:
            self._received[profile] = transmit(down, filters=self.cfg.compression.down)[0]
        return self._received[profile]

    def global_tensors(self) -> dict:
        """The downlink every client gets under a one-downlink method (client-level DP's
        reference for the updates), as the clients decode it."""
        return self.received(ClientProfile(0, self.cfg.model.rank)).tensors

    def set_global(self, tensors: dict) -> None:
        """Overwrite those tensors of the state (client-level DP's noised mean)."""
        self.state = Payload({**self.state.tensors, **tensors}, dict(self.state.scalars))

    # ---- uplink -------------------------------------------------------------------------
    def collect(self, rnd: int, replies: Iterable[Reply]) -> dict:
        """Validate the replies, aggregate the good ones; the round's counts."""
        uploads: list[Upload] = []
        counts = {"clients_ok": 0, "clients_failed": 0, "clients_rejected": 0,
                  "clients_resized": 0, "clients_budget_spent": 0}
        client_eps: dict[int, float] = {}  # partition id -> that client's DP-SGD epsilon so far
        for reply in replies:
            outcome = self._take(rnd, reply, client_eps)
            if isinstance(outcome, Upload):
                uploads.append(outcome)
            else:
                counts[outcome] += 1
        uploads.sort(key=lambda u: u.profile.partition_id)  # arrival order must not matter
        counts["clients_ok"] = len(uploads)
        enough = len(uploads) >= self.cfg.federation.min_replies
        if not enough:
            log(WARNING, "round %d: %d good replies < federation.min_replies = %d; not "
                "aggregated", rnd, len(uploads), self.cfg.federation.min_replies)
        aggregated = enough and self._aggregate(rnd, uploads)
        stats: dict[str, Any] = {**counts, TRAIN_S: _sum(uploads, TRAIN_S),
                                 TRAIN_TOKENS: _sum(uploads, TRAIN_TOKENS),
                                 **{k: _sum(uploads, k) for k in self.method.timings},
                                 "aggregated": int(aggregated)}
        if self.cfg.privacy.enabled or client_eps:
            stats.update(self._privacy_stats(rnd, client_eps))
        if aggregated:
            stats.update(self.method.round_metrics(self.state))
        return stats

    def _take(self, rnd: int, reply: Reply, client_eps: dict[int, float]) -> Upload | str:
        """The reply as an upload, or the name of the count it falls under."""
        profile = reply.profile
        if reply.error is not None:
            log(WARNING, "round %d: client %d %s: %s", rnd, profile.partition_id,
                "vanished" if reply.vanished else "failed", reply.error)
            return "clients_failed"
        metrics, problem = check_metrics(reply.metrics)
        if problem is None:
            self._note_rank(profile, metrics)
            if metrics.get(RANK_MISMATCH):
                log(INFO, "round %d: client %d holds LoRA rank %s, not %d; it gets its own rank "
                    "from now on", rnd, profile.partition_id, self.ranks.get(profile.node_id),
                    profile.rank)
                return "clients_resized"
            if EPSILON in metrics:
                client_eps[profile.partition_id] = metrics[EPSILON]
                self.epsilon = max(self.epsilon, metrics[EPSILON])
            if metrics.get(BUDGET_SPENT):
                return "clients_budget_spent"
            problem = (self._base_problem(rnd, reply) or reply.problem
                       or self._check(profile, reply.payload, metrics))
        if problem is not None:
            log(WARNING, "round %d: rejected client %d: %s", rnd, profile.partition_id, problem)
            return "clients_rejected"
        assert reply.payload is not None  # _check refuses a reply without tensors
        return Upload(profile, reply.payload, self._weight(profile, metrics), metrics)

    def _check(self, profile: ClientProfile, payload: Payload | None,
               metrics: dict[str, float]) -> str | None:
        """Why an upload must not be aggregated (keys, shapes, dtypes, finite values, the norm
        bound, a usable example count), or None."""
        if payload is None:
            return "no tensors"
        sent = self.downlink(profile).tensors
        problem = check_upload(payload, self.method.expected_upload(self.state, profile),
                               self.cfg.federation.max_update_norm, sent)
        return (problem or self.method.check_upload(self.state, profile, payload)
                or check_examples(metrics))

    def _base_problem(self, rnd: int, reply: Reply) -> str | None:
        """Why the reply's base-model fingerprint refuses it, or None. A reply without one (a
        client older than the check) is accepted, with one warning per client."""
        if self.fingerprint is None:
            return None
        node = reply.profile.node_id
        if reply.fingerprint is None and node not in self.unfingerprinted:
            self.unfingerprinted.add(node)
            log(WARNING, "round %d: client %d sent no base model fingerprint (a fedpeft client "
                "older than the check): accepted, its frozen base cannot be compared with the "
                "server's %s", rnd, reply.profile.partition_id, self.fingerprint)
        return check_fingerprint(reply.fingerprint, self.fingerprint, self.cfg.model.name)

    def _weight(self, profile: ClientProfile, metrics: dict[str, float]) -> int:
        """The reply's aggregation weight: 1 under uniform weighting, else its example count
        bounded by ``federation.max_examples_per_client`` and, where the server knows it (in
        simulation), the size of the client's partition: a client cannot buy influence by
        claiming more data."""
        fed = self.cfg.federation
        if fed.weighting == "uniform":
            return 1
        count = int(metrics[NUM_EXAMPLES])
        if fed.max_examples_per_client > 0:
            count = min(count, fed.max_examples_per_client)
        known = self.example_cap(profile.partition_id) if self.example_cap else None
        return min(count, known) if known else count

    def _aggregate(self, rnd: int, uploads: list[Upload]) -> bool:
        """Aggregate, unless the result is not finite (valid but extreme uploads can overflow)
        or the method refuses: then the old state stays and the round counts as not
        aggregated."""
        try:
            state = self.method.aggregate(self.state, uploads)
        except (ValueError, RuntimeError) as exc:  # validated uploads that still do not fit
            log(ERROR, "round %d: aggregating %d valid uploads failed (%s); the global state is "
                "kept as it was", rnd, len(uploads), exc)
            return False
        if not all_finite(state.tensors):
            log(ERROR, "round %d: the aggregate of %d valid uploads is not finite; the global "
                "state is kept as it was", rnd, len(uploads))
            return False
        self.state = state
        return True

    def _note_rank(self, profile: ClientProfile, metrics: Mapping[str, float]) -> None:
        """Remember the rank a client reports for its next rounds."""
        rank = reported_rank(metrics)
        if rank is not None:
            self.ranks[profile.node_id] = rank

    def _privacy_stats(self, rnd: int, client_eps: dict[int, float]) -> dict:
        """``epsilon`` (the largest so far) and every participating client's own epsilon, as
        parallel lists ordered by partition id (a MetricRecord holds no mappings)."""
        ids = sorted(client_eps)
        if not ids:
            return {EPSILON: self.epsilon}
        log(INFO, "round %d: DP-SGD epsilon per client %s", rnd,
            ", ".join(f"{i}: {client_eps[i]:.2f}" for i in ids))
        return {EPSILON: self.epsilon, "epsilon_clients": ids,
                "epsilon_per_client": [client_eps[i] for i in ids]}

    # ---- checkpoint ---------------------------------------------------------------------
    def checkpoint_state(self, nodes: list[int]) -> dict:
        """The loop's bookkeeping for a checkpoint; ranks keyed by partition id (node ids
        change when the federation restarts)."""
        partition = {node: i for i, node in enumerate(nodes)}
        return {"ranks": {str(partition[n]): r for n, r in self.ranks.items() if n in partition},
                "epsilon": self.epsilon}

    def restore_state(self, data: dict, nodes: list[int]) -> None:
        self.ranks = {nodes[int(p)]: int(r) for p, r in data.get("ranks", {}).items()
                      if int(p) < len(nodes)}
        self.epsilon = float(data.get("epsilon", 0.0))


def new_loop(cfg: FedConfig, workspace: Workspace, simulation: bool) -> RoundLoop:
    """A run's round loop at round 0: the method's initial state from a freshly built adapter
    (not the workspace's model: it is shared with whatever else this process ran, clients and
    earlier runs, so its values may be trained). In a simulation the server knows every
    partition, and a client's claimed example count is capped at its partition's size."""
    method = build_method(cfg, num_labels=workspace.num_labels)
    pristine = build_adapter_model(cfg.model, workspace.num_labels, cfg.model.rank)
    cap = None
    if simulation:
        sizes = [len(part) for part in partition_indices(cfg.data, cfg.federation.clients)]
        cap = sizes.__getitem__
    fingerprint = workspace.base_fingerprint()
    log(INFO, "base model %s: fingerprint %s (every client's must match)", cfg.model.name,
        fingerprint)
    return RoundLoop(cfg, method, method.init(pristine.state()), example_cap=cap,
                     fingerprint=fingerprint)


def _sum(uploads: list[Upload], key: str) -> float:
    return float(sum(u.metrics.get(key, 0.0) for u in uploads))


class Transport(Protocol):
    """How one attempt of a round reaches the clients: ``train`` samples through the loop,
    delivers each client's downlink, and returns the loop's ``collect`` stats plus
    ``bytes_down``/``bytes_up``/``clients_sampled``/``clients_timed_out``/``client_bytes``."""

    def nodes(self) -> list[int]: ...

    def train(self, loop: RoundLoop, rnd: int, attempt: int) -> dict: ...

    def extra_state(self) -> dict: ...

    def restore_extra_state(self, data: dict) -> None: ...


def train_round(loop: RoundLoop, transport: Transport, rnd: int) -> dict:
    """One training round. A round with fewer than ``min_replies`` good replies is retried with
    a fresh sample of clients (``on_short_round = 'retry'``, at most ``max_retries`` times) or
    skipped."""
    fed = loop.cfg.federation
    tries = 1 + (fed.max_retries if fed.on_short_round == "retry" else 0)
    row: dict = {}
    for attempt in range(tries):
        stats = transport.train(loop, rnd, attempt)
        timed_out = stats.get("clients_timed_out", 0)
        if timed_out:
            log(WARNING, "round %d: %d of %d clients did not reply within "
                "federation.round_timeout_s = %g s", rnd, timed_out,
                stats.get("clients_sampled", 0), fed.round_timeout_s)
        summed = (*SUMMED, *loop.method.timings)
        for key, value in stats.items():
            if key == "client_bytes":
                row[key] = row.get(key, []) + value
            else:
                row[key] = row.get(key, 0) + value if key in summed else value
        row["retries"] = attempt
        row["clients_aggregated"] = int(stats.get("clients_ok", 0)) if stats.get("aggregated") \
            else 0
        if stats.get("aggregated"):
            break
        if attempt + 1 < tries:
            log(WARNING, "round %d: short round (%d good replies, federation.min_replies = %d); "
                "retry %d of %d with a fresh sample of clients", rnd, stats.get("clients_ok", 0),
                fed.min_replies, attempt + 1, tries - 1)
        else:
            log(WARNING, "round %d skipped: %d good replies < federation.min_replies = %d%s; "
                "the global adapter stays as it was", rnd, stats.get("clients_ok", 0),
                fed.min_replies, f" after {attempt} retries" if attempt else "")
    if loop.method.timings:
        row["method_timings"] = list(loop.method.timings)
    return row


def run_rounds(loop: RoundLoop, transport: Transport, workspace: Workspace, out: Path,
               resume: bool = False) -> dict:
    """The whole run: rounds, evaluation, metrics files, a checkpoint after every round, the
    final adapter and report. ``resume``: continue after the last round checkpointed in
    ``out``. Returns the summary."""
    cfg, method = loop.cfg, loop.method
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(out) if resume else None
    if ckpt is not None:
        check_resumable(ckpt, cfg, out)
    config_file, text = out / CONFIG_FILE, to_toml(cfg)
    if not config_file.is_file() or config_file.read_text() != text:  # the CLI wrote it already
        config_file.write_text(text)
    (out / ERROR_FILE).unlink(missing_ok=True)
    if ckpt is None:
        (out / "samples.md").unlink(missing_ok=True)  # appended to per round
    metrics = MetricsLog(out / METRICS_FILE, ckpt.metrics if ckpt else ())
    nodes = transport.nodes()
    fed = cfg.federation
    first = 0
    if ckpt is not None:
        loop.state = ckpt.state
        loop.restore_state(ckpt.strategy, nodes)
        transport.restore_extra_state(ckpt.strategy)
        first = ckpt.round + 1
        log(INFO, "resuming %s after round %d of %d", out, ckpt.round, fed.rounds)
    for rnd in range(first, fed.rounds + 1):
        start = time.perf_counter()
        row: dict = {"round": rnd, "bytes_up": 0, "bytes_down": 0, "clients_sampled": 0,
                     "clients_ok": 0, "clients_failed": 0, "clients_rejected": 0,
                     "clients_timed_out": 0}
        if rnd > 0:
            row.update(train_round(loop, transport, rnd))
        if eval_due(cfg, rnd):
            ev = evaluate_global(cfg, method, loop.state, workspace, eval_subset(cfg, rnd))
            row.update(accuracy=ev.accuracy, loss=ev.loss, eval_examples=ev.examples,
                       eval_s=ev.seconds, **ev.extra)
            append_samples(out / "samples.md", rnd, ev.samples)
        else:
            row.update(accuracy=None, loss=None)
        row["wall_s"] = time.perf_counter() - start
        metrics.append(row)
        log(INFO, "%s", round_line(row, fed.rounds))
        save_checkpoint(out, Checkpoint(rnd, loop.state, metrics.rows, cfg.to_dict(),
                                        {**loop.checkpoint_state(nodes),
                                         **transport.extra_state()}))
    return finish_run(loop, workspace, out, metrics.rows, started,
                      ckpt.round if ckpt is not None else None)


def finish_run(loop: RoundLoop, workspace: Workspace, out: Path, rows: list[dict],
               started: float, resumed_after: int | None) -> dict:
    """The adapter, summary.json, report.png and the results table of a finished run."""
    cfg, method = loop.cfg, loop.method
    template = workspace.adapter_model(cfg.model.rank)
    exported = method.export(loop.state)
    template.save_pretrained(out / "adapter", exported.tensors)
    export = _export_report(loop, workspace, rows, exported.note)
    fed = cfg.federation
    summary = summarize(rows, method=method.name, clients=fed.clients,
                        clients_per_round=fed.clients_per_round, model=cfg.model.name,
                        wall_s=time.perf_counter() - started,
                        adapter_floats=template.num_floats(),
                        clients_timed_out=sum(r.get("clients_timed_out", 0) for r in rows),
                        rounds_not_aggregated=sum(1 for r in rows if r.get("aggregated") == 0),
                        resumed_after=resumed_after, base_fingerprint=loop.fingerprint,
                        **precisions(cfg), **export)
    write_json_atomic(out / SUMMARY_FILE, summary)
    plot_report(rows, out / "report.png", f"{method.name} on {cfg.model.name}")
    log(INFO, "results\n%s", results_table(rows))
    return summary


def _export_report(loop: RoundLoop, workspace: Workspace, rows: list[dict],
                   note: str | None) -> dict:
    """``adapter_exact`` for summary.json; where the export is lossy, why, and its own accuracy
    next to the global model's (a user who evaluates adapter/ must not be surprised)."""
    if note is None:
        return {"adapter_exact": True}
    ev = evaluate_global(loop.cfg, loop.method, loop.state, workspace, subset=0, export=True)
    final = next((r["accuracy"] for r in reversed(rows) if r.get("accuracy") is not None), None)
    log(WARNING, "adapter/ is not the whole global model: %s. It scores %s on the held-out "
        "split; the global model %s", note,
        f"{ev.accuracy:.3f}" if ev.accuracy is not None else f"loss {ev.loss:.4f}",
        "scored -" if final is None else f"scored {final:.3f}")
    return {"adapter_exact": False, "adapter_note": note, "adapter_accuracy": ev.accuracy}
