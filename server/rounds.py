"""The round loop, written once and free of Flower: sample, downlink, collect, validate,
aggregate, evaluate, checkpoint.

Two transports drive it: the Flower ServerApp (``server/app.py``: messages to SuperNodes, in
simulation and deployment) and the in-process transport (``server/inprocess.py``: clients called
in this process). Both hand :class:`RoundLoop` the clients' replies as :class:`Reply` objects, so
validation, aggregation, metrics rows, checkpoints and the final export are the same code
whichever way the numbers travelled. A reply is decided once (:meth:`RoundLoop.decide`: accepted,
rejected, resized, budget spent or failed) and only then applied (:meth:`RoundLoop.apply`, the
one place that changes what the server remembers of a client).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any, Protocol

from fedpeft.strategies import ClientProfile, Method, Upload, build_method
from fedpeft.strategies.base import Aggregate
from flwr.common.logger import log  # Flower's logger: its lines reach the run's log and the CLI

from fedpeft.core.adapters import build_adapter_model
from fedpeft.core.config import FedConfig, clients_evaluate, to_toml
from fedpeft.core.data import partition_indices
from fedpeft.core.keys import (
    BUDGET_SPENT,
    EPSILON,
    NEXT_RANK,
    NUM_EXAMPLES,
    RANK_MISMATCH,
    TRAIN_S,
    TRAIN_TOKENS,
)
from fedpeft.core.payload import Payload
from fedpeft.core.precision import precisions
from fedpeft.core.runfiles import CONFIG_FILE, ERROR_FILE, METRICS_FILE, SUMMARY_FILE
from fedpeft.core.sampling import sample_clients
from fedpeft.core.secagg.report import secagg_summary
from fedpeft.core.wire import transmit
from fedpeft.core.workspace import Workspace

from .checkpoint import (
    Checkpoint,
    check_resumable,
    check_state,
    load_checkpoint,
    save_checkpoint,
)
from .client_dp import CLIENT_EPSILON, DP_RELEASES, ClientLevelDP
from .client_eval import EvalReply, evaluate_on_clients
from .federation import (
    MAX_REPORTED_RANK,
    append_samples,
    client_profile,
    eval_due,
    eval_subset,
    evaluate_global,
    rank_limit,
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
    check_scalars,
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


# A decided reply's count in the round's row (the outcomes of :meth:`RoundLoop.decide`)
ACCEPTED, FAILED, REJECTED = "clients_ok", "clients_failed", "clients_rejected"
RESIZED, BUDGET = "clients_resized", "clients_budget_spent"
COUNTS = (ACCEPTED, FAILED, REJECTED, RESIZED, BUDGET)


@dataclass(frozen=True)
class Outcome:
    """The server's decision on one reply: the count it falls under, the upload to aggregate
    (accepted only), why it was refused, and what it tells the server about its client (the
    rank it holds from now on, its DP-SGD epsilon so far), which :meth:`RoundLoop.apply`
    records."""

    count: str
    upload: Upload | None = None
    reason: str = ""
    rank: int | None = None
    epsilon: float | None = None


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
        self.rank_limit = MAX_REPORTED_RANK  # a reported next_rank above it is ignored
        # privacy.client_level: clip every accepted update, noise their mean
        self.client_dp = ClientLevelDP(cfg) if cfg.privacy.client_level != "off" else None
        # client-side evaluation (server/client_eval.py): every partition's size where the
        # server knows them (simulation; bounds a client's claimed holdout), whether the task
        # has classes (a reply must then carry an accuracy)
        self.partition_sizes: list[int] | None = None
        self.labelled = True

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

    # ---- uplink -------------------------------------------------------------------------
    def collect(self, rnd: int, replies: Iterable[Reply]) -> dict:
        """Decide on every reply, apply the accepted ones, aggregate the uploads; the round's
        counts."""
        counts = dict.fromkeys(COUNTS, 0)
        uploads: list[Upload] = []
        client_eps: dict[int, float] = {}  # partition id -> that client's DP-SGD epsilon so far
        for reply in replies:
            outcome = self.decide(rnd, reply)
            counts[outcome.count] += 1
            self.apply(rnd, reply, outcome, client_eps)
            if outcome.upload is not None:
                uploads.append(outcome.upload)
        uploads.sort(key=lambda u: u.profile.partition_id)  # arrival order must not matter
        enough = len(uploads) >= self.cfg.federation.min_replies
        if not enough:
            log(WARNING, "round %d: %d good replies < federation.min_replies = %d; not "
                "aggregated", rnd, len(uploads), self.cfg.federation.min_replies)
        agg = self._aggregate(rnd, uploads) if enough else None
        stats: dict[str, Any] = {**counts, TRAIN_S: _sum(uploads, TRAIN_S),
                                 TRAIN_TOKENS: _sum(uploads, TRAIN_TOKENS),
                                 **{k: _sum(uploads, k) for k in self.method.timings},
                                 "aggregated": int(agg is not None)}
        if self.cfg.privacy.enabled or client_eps:
            stats.update(self._privacy_stats(rnd, client_eps))
        if self.client_dp is not None:
            stats[CLIENT_EPSILON] = self.client_dp.epsilon()
        if agg is not None:
            stats.update(agg.metrics)
        return stats

    def decide(self, rnd: int, reply: Reply) -> Outcome:
        """The one decision on a reply: accepted (its upload), rejected (why), resized (the
        client holds another rank), budget spent, or failed. Changes nothing: only
        :meth:`apply` writes what the server remembers of a client. Any error while judging one
        reply rejects that reply, never the round."""
        if reply.error is not None:
            return Outcome(FAILED, reason=("vanished: " if reply.vanished else "failed: ")
                           + reply.error)
        try:
            return self._judge(reply)
        except Exception as exc:  # a hostile reply must not end the run
            return Outcome(REJECTED, reason=f"{type(exc).__name__}: {str(exc)[:200]}")

    def _judge(self, reply: Reply) -> Outcome:
        profile = reply.profile
        problem = self._base_problem(reply)
        metrics, bad = check_metrics(reply.metrics)
        problem = problem or bad
        if problem is not None:
            return Outcome(REJECTED, reason=problem)
        rank = reported_rank(metrics, self.rank_limit)
        if metrics.get(RANK_MISMATCH):
            if rank is None:
                return Outcome(REJECTED, reason=f"{RANK_MISMATCH} without a usable {NEXT_RANK}")
            return Outcome(RESIZED, rank=rank)
        epsilon = metrics.get(EPSILON)
        if metrics.get(BUDGET_SPENT):
            return Outcome(BUDGET, epsilon=epsilon)
        spec = self.method.expected_upload(self.state, profile)
        payload = reply.payload
        if payload is None and reply.problem is None and not spec.tensors:
            payload = Payload()  # a method that uploads no tensors (local training)
        if reply.problem is not None or payload is None:
            return Outcome(REJECTED, reason=reply.problem or "no tensors")
        sent = self.downlink(profile).tensors
        problem = (check_upload(payload, spec.tensors, self.cfg.federation.max_update_norm, sent)
                   or check_examples(metrics))
        scalars, bad = check_scalars(payload.scalars, spec.scalars)
        problem = problem or bad
        if problem is None and self.client_dp is not None:
            problem = self.client_dp.problem(payload.tensors, self.global_tensors())
        if problem is not None:
            return Outcome(REJECTED, reason=problem)
        upload = Upload(profile, Payload(payload.tensors, scalars), self._weight(profile, metrics),
                        metrics)
        return Outcome(ACCEPTED, upload=upload, rank=rank, epsilon=epsilon)

    def apply(self, rnd: int, reply: Reply, outcome: Outcome, client_eps: dict[int, float]) -> None:
        """Remember what a decided reply tells the server about its client: its rank (accepted
        or resized), its DP-SGD epsilon (accepted or budget spent). A rejected or failed reply
        changes nothing but the log."""
        profile = reply.profile
        if outcome.count == FAILED:
            log(WARNING, "round %d: client %d %s", rnd, profile.partition_id, outcome.reason)
        elif outcome.count == REJECTED:
            log(WARNING, "round %d: rejected client %d: %s", rnd, profile.partition_id,
                outcome.reason)
        if outcome.rank is not None:
            self.ranks[profile.node_id] = outcome.rank
        if outcome.count == RESIZED:
            log(INFO, "round %d: client %d holds LoRA rank %d, not %d; it gets its own rank "
                "from now on", rnd, profile.partition_id, outcome.rank, profile.rank)
        if outcome.epsilon is not None:
            client_eps[profile.partition_id] = outcome.epsilon
            self.epsilon = max(self.epsilon, outcome.epsilon)
        if (outcome.count == ACCEPTED and self.fingerprint is not None
                and reply.fingerprint is None and profile.node_id not in self.unfingerprinted):
            self.unfingerprinted.add(profile.node_id)
            log(WARNING, "round %d: client %d sent no base model fingerprint (a fedpeft client "
                "older than the check): accepted, its frozen base cannot be compared with the "
                "server's %s", rnd, profile.partition_id, self.fingerprint)

    def _base_problem(self, reply: Reply) -> str | None:
        """Why the reply's base-model fingerprint refuses it, or None. A reply without one (a
        client older than the check) is accepted, with one warning per client."""
        if self.fingerprint is None:
            return None
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

    def _aggregate(self, rnd: int, uploads: list[Upload]) -> Aggregate | None:
        """Aggregate (through client-level DP's clip and noise where it is on) and take the
        new state, unless the result is not finite (valid but extreme uploads can overflow) or
        the method refuses: then the old state stays and the round counts as not aggregated."""
        try:
            if self.client_dp is not None:
                agg = self.client_dp.aggregate(self.method, self.state, uploads,
                                               self.global_tensors())
            else:
                agg = self.method.aggregate(self.state, uploads)
        except Exception as exc:  # the method failed on accepted uploads: said as such
            log(ERROR, "round %d: the method failed on %d accepted uploads (%s: %s); the global "
                "state is kept as it was", rnd, len(uploads), type(exc).__name__, exc)
            return None
        if not all_finite(agg.state.tensors):
            log(ERROR, "round %d: the aggregate of %d valid uploads is not finite; the global "
                "state is kept as it was", rnd, len(uploads))
            return None
        self.state = agg.state
        return agg

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
        out = {"ranks": {str(partition[n]): r for n, r in self.ranks.items() if n in partition},
               EPSILON: self.epsilon}
        if self.client_dp is not None:
            out[DP_RELEASES] = self.client_dp.releases
        return out

    def restore_state(self, data: dict, nodes: list[int]) -> None:
        self.ranks = {nodes[int(p)]: int(r) for p, r in data.get("ranks", {}).items()
                      if int(p) < len(nodes)}
        self.epsilon = float(data.get(EPSILON, 0.0))
        if self.client_dp is not None:
            self.client_dp.releases = int(data.get(DP_RELEASES, 0))


def new_loop(cfg: FedConfig, workspace: Workspace, simulation: bool) -> RoundLoop:
    """A run's round loop at round 0: the method's initial state from a freshly built adapter
    (not the workspace's model: it is shared with whatever else this process ran, clients and
    earlier runs, so its values may be trained). In a simulation the server knows every
    partition, and a client's claimed example count is capped at its partition's size."""
    method = build_method(cfg, num_labels=workspace.num_labels)
    pristine = build_adapter_model(cfg.model, workspace.num_labels, cfg.model.rank)
    cap, sizes = None, []
    if simulation:
        sizes = [len(part) for part in partition_indices(cfg.data, cfg.federation.clients)]
        cap = sizes.__getitem__
    fingerprint = workspace.base_fingerprint()
    log(INFO, "base model %s: fingerprint %s (every client's must match)", cfg.model.name,
        fingerprint)
    loop = RoundLoop(cfg, method, method.init(pristine.state()), example_cap=cap,
                     fingerprint=fingerprint)
    loop.partition_sizes = sizes if simulation else None
    loop.rank_limit = rank_limit(pristine.state())
    loop.labelled = workspace.num_labels > 0
    return loop


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

    def evaluate(self, loop: RoundLoop, rnd: int,
                 profiles: list[ClientProfile]) -> tuple[list[EvalReply], dict]:
        """Send ``profiles`` the global model for client-side evaluation; their replies and
        the exchange's bytes (``server/client_eval.py``)."""
        ...


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
        check_state(ckpt.state, loop.state, method, cfg.model.rank, out,
                    workspace.adapter_model(cfg.model.rank) if cfg.eval.where != "clients"
                    else None)
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
        row.update(accuracy=None, loss=None)
        if eval_due(cfg, rnd) and cfg.eval.where != "clients":
            ev = evaluate_global(cfg, method, loop.state, workspace, eval_subset(cfg, rnd))
            row.update(accuracy=ev.accuracy, loss=ev.loss, eval_examples=ev.examples,
                       eval_s=ev.seconds, **ev.extra)
            append_samples(out / "samples.md", rnd, ev.samples)
        if eval_due(cfg, rnd) and clients_evaluate(cfg):
            row.update(evaluate_on_clients(loop, transport, rnd))
        row["wall_s"] = time.perf_counter() - start
        # Checkpoint first: a round that metrics.jsonl shows is always one a resume keeps.
        save_checkpoint(out, Checkpoint(rnd, loop.state, [*metrics.rows, row], cfg.to_dict(),
                                        {**loop.checkpoint_state(nodes),
                                         **transport.extra_state()}))
        metrics.append(row)
        log(INFO, "%s", round_line(row, fed.rounds))
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
                        **secagg_summary(cfg.secagg, cfg.privacy),
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
    if loop.cfg.eval.where == "clients":  # the server holds no held-out split to score it on
        log(WARNING, "adapter/ is not the whole global model: %s", note)
        return {"adapter_exact": False, "adapter_note": note}
    ev = evaluate_global(loop.cfg, loop.method, loop.state, workspace, subset=0, export=True)
    final = next((r["accuracy"] for r in reversed(rows) if r.get("accuracy") is not None), None)
    log(WARNING, "adapter/ is not the whole global model: %s. It scores %s on the held-out "
        "split; the global model %s", note,
        f"{ev.accuracy:.3f}" if ev.accuracy is not None else f"loss {ev.loss:.4f}",
        "scored -" if final is None else f"scored {final:.3f}")
    return {"adapter_exact": False, "adapter_note": note, "adapter_accuracy": ev.accuracy}
