"""The Flower ServerApp: one generic strategy that delegates the method-specific work to a
``Method``, server-side evaluation of the global adapter, and the run's output files.

Run config (``[tool.flwr.app.config]`` / ``--run-config``): ``config-file`` (a fedpeft TOML; empty =
defaults) and ``out-dir`` (where metrics, summary, plot and adapter go).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from logging import ERROR, INFO, WARNING
from pathlib import Path

from fedpeft.strategies import ClientProfile, Method, Upload, build_method
from fedpeft.strategies.base import CLIENT_TIMINGS
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedpeft.core.adapters import build_adapter_model
from fedpeft.core.config import ConfigError, FedConfig, load_config, to_toml
from fedpeft.core.payload import Payload
from fedpeft.core.privacy import BUDGET_SPENT
from fedpeft.core.runfiles import ERROR_FILE
from fedpeft.core.sampling import sample_clients
from fedpeft.core.wire import (
    CONFIG_RECORD,
    METRICS_RECORD,
    config_record,
    payload_to_records,
    records_to_payload,
    serialized_nbytes,
)
from fedpeft.core.workspace import Workspace, default_threads, get_workspace, set_torch_threads
from fedpeft.run.reporting import (
    MetricsLog,
    plot_report,
    results_table,
    round_line,
    summarize,
    write_json_atomic,
)

from .checkpoint import Checkpoint, check_resumable, load_checkpoint, save_checkpoint
from .client_dp import with_client_dp
from .federation import (
    client_profile,
    eval_due,
    eval_subset,
    evaluate_global,
    reported_rank,
)
from .validation import all_finite, check_examples, check_upload

app = ServerApp()


class FedPeftStrategy(Strategy):
    """The one Flower strategy: samples clients, builds each client's message from the method's
    downlink, validates replies and hands the good ones to the method's aggregate."""

    def __init__(self, cfg: FedConfig, method: Method, state: Payload) -> None:
        self.cfg, self.method, self.state = cfg, method, state
        self.pending: dict[int, ClientProfile] = {}
        self.ranks: dict[int, int] = {}  # node -> the LoRA rank it reported (node config, pruning)
        self.epsilon = 0.0  # the largest DP-SGD epsilon any client reported so far
        self.attempt = 0  # retries of a short round sample afresh (run loop, on_short_round)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        nodes = sorted(grid.get_node_ids())
        fed = self.cfg.federation
        self.pending = {}
        messages = []
        for index in sample_clients(len(nodes), fed.clients_per_round, fed.seed, server_round,
                                    self.attempt):
            profile = client_profile(self.cfg, index, nodes[index], self.ranks.get(nodes[index]))
            extra = {"fedpeft.round": server_round, "fedpeft.partition": index,
                     "fedpeft.rank": profile.rank}
            content = payload_to_records(self.method.downlink(self.state, profile), extra)
            content[CONFIG_RECORD] = config_record(self.cfg)
            self.pending[profile.node_id] = profile
            messages.append(Message(content=content, dst_node_id=profile.node_id,
                                    message_type=MessageType.TRAIN, group_id=str(server_round)))
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord]:
        uploads, failed, rejected, resized, spent = [], 0, 0, 0, 0
        client_eps: dict[int, float] = {}  # partition id -> that client's DP-SGD epsilon so far
        for reply in replies:
            node = reply.metadata.src_node_id
            profile = self.pending.get(node)
            if profile is None:
                continue
            if reply.has_error():
                failed += 1
                gone = reply.error.code == ErrorCode.NODE_UNAVAILABLE
                log(WARNING, "round %d: client %d %s: %s", server_round, profile.partition_id,
                    "vanished" if gone else "failed", reply.error.reason)
                continue
            if self._note_rank(server_round, node, profile, reply):
                resized += 1
                continue
            if self._note_privacy(reply, profile, client_eps):
                spent += 1
                continue
            payload = records_to_payload(reply.content)
            problem = self._check(profile, reply, payload)
            if problem:
                rejected += 1
                log(WARNING, "round %d: rejected client %d: %s", server_round,
                    profile.partition_id, problem)
                continue
            metrics = dict(reply.content[METRICS_RECORD])
            uploads.append(Upload(profile, payload, int(metrics.pop("num-examples")), metrics))
        uploads.sort(key=lambda u: u.profile.partition_id)  # arrival order must not matter
        ok = len(uploads)
        aggregated = ok >= self.cfg.federation.min_replies and self._aggregate(server_round,
                                                                               uploads)
        if ok < self.cfg.federation.min_replies:
            log(WARNING, "round %d: %d good replies < federation.min_replies = %d; not "
                "aggregated", server_round, ok, self.cfg.federation.min_replies)
        train_s = sum(u.metrics.get("train_s", 0.0) for u in uploads)
        stats = MetricRecord({"clients_ok": ok, "clients_failed": failed,
                              "clients_rejected": rejected, "clients_resized": resized,
                              "clients_budget_spent": spent,
                              **(self._privacy_stats(server_round, client_eps)
                                 if self.cfg.privacy.enabled or client_eps else {}),
                              "train_s": train_s,
                              **{k: sum(u.metrics.get(k, 0.0) for u in uploads)
                                 for k in CLIENT_TIMINGS if any(k in u.metrics for u in uploads)},
                              "aggregated": int(aggregated)})
        return None, stats

    def _check(self, profile: ClientProfile, reply: Message, payload: Payload) -> str | None:
        """Why a reply must not be aggregated (keys, shapes, dtypes, finite values, the norm
        bound, a usable example count), or None."""
        sent = self.method.downlink(self.state, profile).tensors
        problem = check_upload(payload, self.method.expected_upload(self.state, profile),
                               self.cfg.federation.max_update_norm, sent)
        return (problem or self.method.check_upload(self.state, profile, payload)
                or check_examples(reply.content.get(METRICS_RECORD)))

    def _aggregate(self, server_round: int, uploads: list[Upload]) -> bool:
        """Aggregate, unless the result is not finite (valid but extreme uploads can overflow):
        then the old state stays and the round counts as not aggregated."""
        try:
            state = self.method.aggregate(self.state, uploads)
        except (ValueError, RuntimeError) as exc:  # validated uploads that still do not fit
            log(ERROR, "round %d: aggregating %d valid uploads failed (%s); the global state is "
                "kept as it was", server_round, len(uploads), exc)
            return False
        if not all_finite(state.tensors):
            log(ERROR, "round %d: the aggregate of %d valid uploads is not finite; the global "
                "state is kept as it was", server_round, len(uploads))
            return False
        self.state = state
        return True

    def checkpoint_state(self, nodes: list[int]) -> dict:
        """The strategy's own bookkeeping for a checkpoint; ranks keyed by partition id (node ids
        change when the federation restarts)."""
        partition = {node: i for i, node in enumerate(nodes)}
        return {"ranks": {str(partition[n]): r for n, r in self.ranks.items() if n in partition},
                "epsilon": self.epsilon}

    def restore_state(self, data: dict, nodes: list[int]) -> None:
        self.ranks = {nodes[int(p)]: int(r) for p, r in data.get("ranks", {}).items()
                      if int(p) < len(nodes)}
        self.epsilon = float(data.get("epsilon", 0.0))

    def _note_rank(self, server_round: int, node: int, profile: ClientProfile,
                   reply: Message) -> bool:
        """Remember the rank a client reports for its next rounds; True when it did not train
        because it holds another rank than the one it was sent (it gets its own next time)."""
        metrics = reply.content.get(METRICS_RECORD, {})
        rank = reported_rank(metrics)
        if rank is not None:
            self.ranks[node] = rank
        if not metrics.get("rank_mismatch"):
            return False
        log(INFO, "round %d: client %d holds LoRA rank %s, not %d; it gets its own rank from "
            "now on", server_round, profile.partition_id, rank, profile.rank)
        return True

    def _note_privacy(self, reply: Message, profile: ClientProfile,
                      client_eps: dict[int, float]) -> bool:
        """Record the client's epsilon and keep the largest; True when the client's privacy
        budget is spent (it did not train and sent no tensors)."""
        metrics = reply.content.get(METRICS_RECORD, {})
        if "epsilon" in metrics:
            client_eps[profile.partition_id] = float(metrics["epsilon"])
            self.epsilon = max(self.epsilon, client_eps[profile.partition_id])
        return bool(metrics.get(BUDGET_SPENT))

    def _privacy_stats(self, server_round: int, client_eps: dict[int, float]) -> dict:
        """``epsilon`` (the largest so far) and every participating client's own epsilon, as
        parallel lists ordered by partition id (a MetricRecord holds no mappings)."""
        ids = sorted(client_eps)
        if not ids:
            return {"epsilon": self.epsilon}
        log(INFO, "round %d: DP-SGD epsilon per client %s", server_round,
            ", ".join(f"{i}: {client_eps[i]:.2f}" for i in ids))
        return {"epsilon": self.epsilon, "epsilon_clients": ids,
                "epsilon_per_client": [client_eps[i] for i in ids]}

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # evaluation runs on the server, on the held-out split

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log(INFO, "fedpeft strategy: method %s, %d rounds, %d of %d clients per round",
            self.method.name, self.cfg.federation.rounds, self.cfg.federation.clients_per_round,
            self.cfg.federation.clients)


def send_and_receive(grid: Grid, messages: list[Message], timeout_s: float | None,
                     poll_s: float = 0.1) -> list[Message]:
    """``grid.send_and_receive`` with a short poll: Flower's deployment grid checks for replies
    every 3 s, which adds 0-3 s to every round; this asks the SuperLink every ``poll_s`` (as the
    simulation's in-memory grid does)."""
    pending = set(grid.push_messages(messages))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(poll_s)
    return replies


def _wait_for_nodes(grid: Grid, needed: int, timeout_s: float = 600.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= needed or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def run_server(grid: Grid, cfg: FedConfig, out: Path, resume: bool = False) -> dict:
    """The whole run: rounds, evaluation, metrics files, a checkpoint after every round, final
    adapter. ``resume``: continue after the last round checkpointed in ``out``. Returns the
    summary."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(out) if resume else None
    if ckpt is not None:
        check_resumable(ckpt, cfg, out)
    (out / "config.toml").write_text(to_toml(cfg))
    (out / ERROR_FILE).unlink(missing_ok=True)
    set_torch_threads(default_threads())
    method = build_method(cfg)
    workspace = get_workspace(cfg)
    template = workspace.adapter_model(cfg.model.rank)
    # A freshly built adapter, not ``template``: the workspace's model is shared with anything
    # else this process ran (in-process tests, clients), so its current values may be trained.
    pristine = build_adapter_model(cfg.model, workspace.num_labels, cfg.model.rank)
    strategy = FedPeftStrategy(cfg, method, method.init(pristine.state()))
    del pristine
    driver = with_client_dp(strategy, cfg)  # Flower's DP wrapper when privacy.client_level
    driver.summary()
    metrics = MetricsLog(out / "metrics.jsonl", ckpt.metrics if ckpt else ())
    nodes = _wait_for_nodes(grid, cfg.federation.clients)
    if len(nodes) < cfg.federation.clients_per_round:
        raise RuntimeError(f"only {len(nodes)} of {cfg.federation.clients} clients connected; "
                           f"federation.clients_per_round = {cfg.federation.clients_per_round}. "
                           "With `flwr run .` in simulation, pass --federation-config "
                           f"'num-supernodes={cfg.federation.clients}'")
    fed = cfg.federation
    first = 0
    if ckpt is not None:
        _restore(ckpt, strategy, driver, nodes)
        first = ckpt.round + 1
        log(INFO, "resuming %s after round %d of %d", out, ckpt.round, fed.rounds)
    for rnd in range(first, fed.rounds + 1):
        start = time.perf_counter()
        row: dict = {"round": rnd, "bytes_up": 0, "bytes_down": 0, "clients_sampled": 0,
                     "clients_ok": 0, "clients_failed": 0, "clients_rejected": 0,
                     "clients_timed_out": 0}
        if rnd > 0:
            row.update(_train_round(driver, strategy, grid, rnd))
        if eval_due(cfg, rnd):
            ev = evaluate_global(cfg, method, strategy.state, workspace, eval_subset(cfg, rnd))
            row.update(accuracy=ev.accuracy, loss=ev.loss, eval_examples=ev.examples,
                       eval_s=ev.seconds)
        else:
            row.update(accuracy=None, loss=None)
        row["wall_s"] = time.perf_counter() - start
        metrics.append(row)
        log(INFO, "%s", round_line(row, fed.rounds))
        save_checkpoint(out, Checkpoint(rnd, strategy.state, metrics.rows, cfg.to_dict(),
                                        _server_state(strategy, driver, grid)))
    template.save_pretrained(out / "adapter", method.global_adapter(strategy.state))
    export = _export_report(cfg, method, strategy.state, workspace, metrics.rows)
    rows = metrics.rows
    summary = summarize(rows, method=method.name, clients=fed.clients,
                        clients_per_round=fed.clients_per_round, model=cfg.model.name,
                        wall_s=time.perf_counter() - started,
                        adapter_floats=template.num_floats(),
                        clients_timed_out=sum(r.get("clients_timed_out", 0) for r in rows),
                        rounds_not_aggregated=sum(1 for r in rows if r.get("aggregated") == 0),
                        resumed_after=ckpt.round if ckpt is not None else None, **export)
    write_json_atomic(out / "summary.json", summary)
    plot_report(metrics.rows, out / "report.png", f"{method.name} on {cfg.model.name}")
    log(INFO, "results\n%s", results_table(metrics.rows))
    return summary


def _export_report(cfg: FedConfig, method: Method, state: Payload, workspace: Workspace,
                   rows: list[dict]) -> dict:
    """``adapter_exact`` for summary.json; where the export is lossy, why, and its own accuracy
    next to the global model's (a user who evaluates adapter/ must not be surprised)."""
    loss = method.export_loss(state)
    if loss is None:
        return {"adapter_exact": True}
    ev = evaluate_global(cfg, method, state, workspace, subset=0, export=True)
    final = next((r["accuracy"] for r in reversed(rows) if r.get("accuracy") is not None), None)
    log(WARNING, "adapter/ is not the whole global model: %s. It scores %.3f on the held-out "
        "split; the global model %s", loss, ev.accuracy,
        "scored -" if final is None else f"scored {final:.3f}")
    return {"adapter_exact": False, "adapter_note": loss, "adapter_accuracy": ev.accuracy}


# Per-round counts that add up over the attempts of a retried round (so clients_sampled = ok +
# failed + rejected + timed_out + resized + budget_spent); other stats: the last attempt's.
_SUMMED = ("bytes_down", "bytes_up", "clients_sampled", "clients_ok", "clients_failed",
           "clients_rejected", "clients_timed_out", "clients_resized", "clients_budget_spent",
           "train_s", *CLIENT_TIMINGS)


def _client_bytes(strategy: FedPeftStrategy, messages: list[Message],
                  replies: list[Message]) -> list[dict]:
    """Serialised bytes of each sampled client's own messages, with its partition and rank
    (the downlink differs per client under the rank methods and Ferret's catch-up)."""
    up = {r.metadata.src_node_id: serialized_nbytes(r.content) for r in replies
          if r.has_content()}
    out = []
    for message in messages:
        node = message.metadata.dst_node_id
        profile = strategy.pending.get(node)
        out.append({"partition": profile.partition_id if profile else None,
                    "rank": profile.rank if profile else None,
                    "bytes_down": serialized_nbytes(message.content),
                    "bytes_up": up.get(node, 0)})
    return sorted(out, key=lambda c: (c["partition"] is None, c["partition"] or 0))


def _train_round(driver: Strategy, strategy: FedPeftStrategy, grid: Grid, rnd: int) -> dict:
    """One training round: send, wait (``round_timeout_s``), validate, aggregate. A round with
    fewer than ``min_replies`` good replies is retried with a fresh sample of clients
    (``on_short_round = 'retry'``, at most ``max_retries`` times) or skipped."""
    fed = strategy.cfg.federation
    tries = 1 + (fed.max_retries if fed.on_short_round == "retry" else 0)
    row: dict = {}
    for attempt in range(tries):
        strategy.attempt = attempt
        messages = list(driver.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid))
        replies = send_and_receive(grid, messages, fed.round_timeout_s or None)
        _, stats = driver.aggregate_train(rnd, replies)
        clients = _client_bytes(strategy, messages, replies)
        counts = {"bytes_down": sum(c["bytes_down"] for c in clients),
                  "bytes_up": sum(c["bytes_up"] for c in clients),
                  "clients_sampled": len(messages),
                  "clients_timed_out": len(messages) - len(replies), **dict(stats)}
        if counts["clients_timed_out"]:
            log(WARNING, "round %d: %d of %d clients did not reply within "
                "federation.round_timeout_s = %g s", rnd, counts["clients_timed_out"],
                len(messages), fed.round_timeout_s)
        for key, value in counts.items():
            row[key] = row.get(key, 0) + value if key in _SUMMED else value
        row["client_bytes"] = row.get("client_bytes", []) + clients
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
    strategy.attempt = 0
    return row


def _server_state(strategy: FedPeftStrategy, driver: Strategy, grid: Grid) -> dict:
    state = strategy.checkpoint_state(sorted(grid.get_node_ids()))
    if hasattr(driver, "releases"):  # client-level DP: noised releases so far (its epsilon)
        state["dp_releases"] = int(driver.releases)
    return state


def _restore(ckpt: Checkpoint, strategy: FedPeftStrategy, driver: Strategy,
             nodes: list[int]) -> None:
    strategy.state = ckpt.state
    strategy.restore_state(ckpt.strategy, nodes)
    if hasattr(driver, "releases"):
        driver.releases = int(ckpt.strategy.get("dp_releases", 0))


def report_error(out: Path, exc: BaseException) -> None:
    """Leave the reason a run stopped in ``OUT/error.json`` (the CLI shows it) and in the log."""
    kind = "config" if isinstance(exc, ConfigError) else "crash"
    log(ERROR, "fedpeft: %s", exc)
    with contextlib.suppress(OSError):
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / ERROR_FILE, {"kind": kind, "type": type(exc).__name__,
                                             "message": str(exc)})


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    out = Path(str(run_config.get("out-dir", "runs/flwr")))
    resume = str(run_config.get("resume", "")).strip().lower() in ("1", "true", "yes")
    try:
        cfg = load_config(str(run_config.get("config-file", "")) or None)
        run_server(grid, cfg, out, resume=resume)
    except ConfigError as exc:  # a user error: one clear message (no traceback), no work done
        report_error(out, exc)
    except Exception as exc:
        report_error(out, exc)
        raise
