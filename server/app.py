"""The Flower ServerApp: one generic strategy that delegates the method-specific work to a
``Method``, server-side evaluation of the global adapter, and the run's output files.

Run config (``[tool.flwr.app.config]`` / ``--run-config``): ``config-file`` (a fedpeft TOML; empty =
defaults) and ``out-dir`` (where metrics, summary, plot and adapter go).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path

from fedpeft.strategies import ClientProfile, Method, Upload, build_method
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedpeft.config import FedConfig, load_config, to_toml
from fedpeft.payload import Payload
from fedpeft.reporting import (
    MetricsLog,
    plot_report,
    results_table,
    round_line,
    summarize,
    write_json_atomic,
)
from fedpeft.runtime import default_threads, get_workspace, set_torch_threads
from fedpeft.wire import (
    CONFIG_RECORD,
    METRICS_RECORD,
    config_record,
    payload_to_records,
    records_to_payload,
    serialized_nbytes,
)

from .federation import client_profile, eval_due, eval_subset, evaluate_global, sample_clients
from .validation import check_upload

app = ServerApp()


class FedPeftStrategy(Strategy):
    """The one Flower strategy: samples clients, builds each client's message from the method's
    downlink, validates replies and hands the good ones to the method's aggregate."""

    def __init__(self, cfg: FedConfig, method: Method, state: Payload) -> None:
        self.cfg, self.method, self.state = cfg, method, state
        self.pending: dict[int, ClientProfile] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        nodes = sorted(grid.get_node_ids())
        fed = self.cfg.federation
        self.pending = {}
        messages = []
        for index in sample_clients(len(nodes), fed.clients_per_round, fed.seed, server_round):
            profile = client_profile(self.cfg, index, nodes[index])
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
        uploads, failed, rejected = [], 0, 0
        for reply in replies:
            node = reply.metadata.src_node_id
            profile = self.pending.get(node)
            if profile is None:
                continue
            if reply.has_error():
                failed += 1
                log(WARNING, "round %d: client %d failed: %s", server_round, profile.partition_id,
                    reply.error.reason)
                continue
            payload = records_to_payload(reply.content)
            problem = check_upload(payload, self.method.expected_upload(self.state, profile))
            if problem:
                rejected += 1
                log(WARNING, "round %d: rejected client %d: %s", server_round,
                    profile.partition_id, problem)
                continue
            metrics = dict(reply.content[METRICS_RECORD])
            uploads.append(Upload(profile, payload, int(metrics.pop("num-examples")), metrics))
        ok = len(uploads)
        if ok >= self.cfg.federation.min_replies:
            self.state = self.method.aggregate(self.state, uploads)
        else:
            log(WARNING, "round %d: %d good replies < federation.min_replies = %d; round skipped",
                server_round, ok, self.cfg.federation.min_replies)
        train_s = sum(u.metrics.get("train_s", 0.0) for u in uploads)
        stats = MetricRecord({"clients_ok": ok, "clients_failed": failed,
                              "clients_rejected": rejected, "train_s": train_s,
                              "aggregated": int(ok >= self.cfg.federation.min_replies)})
        return None, stats

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


def _wait_for_nodes(grid: Grid, needed: int, timeout_s: float = 600.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= needed or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def run_server(grid: Grid, cfg: FedConfig, out: Path) -> dict:
    """The whole run: rounds, evaluation, metrics files, final adapter. Returns the summary."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(to_toml(cfg))
    set_torch_threads(default_threads())
    method = build_method(cfg)
    workspace = get_workspace(cfg)
    template = workspace.adapter_model(cfg.model.rank)
    strategy = FedPeftStrategy(cfg, method, method.init(template.state()))
    strategy.summary()
    metrics = MetricsLog(out / "metrics.jsonl")
    nodes = _wait_for_nodes(grid, cfg.federation.clients)
    if len(nodes) < cfg.federation.clients_per_round:
        raise RuntimeError(f"only {len(nodes)} clients connected; "
                           f"federation.clients_per_round = {cfg.federation.clients_per_round}")
    fed = cfg.federation
    for rnd in range(fed.rounds + 1):
        start = time.perf_counter()
        row: dict = {"round": rnd, "bytes_up": 0, "bytes_down": 0, "clients_sampled": 0,
                     "clients_ok": 0, "clients_failed": 0, "clients_rejected": 0}
        if rnd > 0:
            messages = list(strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid))
            row["bytes_down"] = sum(serialized_nbytes(m.content) for m in messages)
            replies = list(grid.send_and_receive(messages, timeout=fed.round_timeout_s or None))
            row["bytes_up"] = sum(serialized_nbytes(r.content) for r in replies if r.has_content())
            _, stats = strategy.aggregate_train(rnd, replies)
            row.update(stats)
            row["clients_sampled"] = len(messages)
            row["clients_failed"] += len(messages) - len(replies)  # vanished / timed out
        if eval_due(cfg, rnd):
            ev = evaluate_global(cfg, method, strategy.state, workspace, eval_subset(cfg, rnd))
            row.update(accuracy=ev.accuracy, loss=ev.loss, eval_examples=ev.examples,
                       eval_s=ev.seconds)
        else:
            row.update(accuracy=None, loss=None)
        row["wall_s"] = time.perf_counter() - start
        metrics.append(row)
        log(INFO, "%s", round_line(row, fed.rounds))
    template.save_pretrained(out / "adapter", method.global_adapter(strategy.state))
    summary = summarize(metrics.rows, method=method.name, clients=fed.clients,
                        clients_per_round=fed.clients_per_round, model=cfg.model.name,
                        wall_s=time.perf_counter() - started,
                        adapter_floats=template.num_floats())
    write_json_atomic(out / "summary.json", summary)
    plot_report(metrics.rows, out / "report.png", f"{method.name} on {cfg.model.name}")
    log(INFO, "results\n%s", results_table(metrics.rows))
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    cfg = load_config(str(run_config.get("config-file", "")) or None)
    run_server(grid, cfg, Path(str(run_config.get("out-dir", "runs/flwr"))))
