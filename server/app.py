"""The Flower ServerApp: a thin adapter from Flower messages to the round loop of
``server/rounds.py`` (which samples, validates, aggregates, evaluates and checkpoints).

Run config (``[tool.flwr.app.config]`` / ``--run-config``): ``config-file`` (a fedpeft TOML; empty =
defaults) and ``out-dir`` (where metrics, summary, plot and adapter go).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable
from logging import ERROR, INFO
from pathlib import Path

from fedpeft.strategies import ClientProfile
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedpeft.core.config import ConfigError, FedConfig, from_dict, load_config
from fedpeft.core.keys import (
    BASE_FINGERPRINT,
    CLIENT_RANK,
    PARTITION,
    RANK,
    REPLY_INFO,
    ROUND,
    SIMULATION_KEY,
)
from fedpeft.core.payload import Expected
from fedpeft.core.runfiles import ERROR_FILE
from fedpeft.core.wire import (
    CONFIG_RECORD,
    METRICS_RECORD,
    RUN_CONFIG_KEY,
    config_record,
    has_tensors,
    payload_to_records,
    records_to_payload,
    serialized_nbytes,
)
from fedpeft.core.workspace import (
    data_free_workspace,
    default_threads,
    get_workspace,
    set_torch_threads,
)

from .client_eval import EvalReply
from .reporting import write_json_atomic
from .rounds import Reply, RoundLoop, new_loop, run_rounds
from .secagg import SecAggPhase

app = ServerApp()


class FedPeftStrategy(Strategy):
    """The one Flower strategy: each sampled client's message carries the method's downlink;
    replies become :class:`Reply` objects for the round loop."""

    def __init__(self, loop: RoundLoop, config_in_run: bool = False) -> None:
        self.loop = loop
        self.attempt = 0  # retries of a short round sample afresh (train_round)
        # True when the clients get the config from Flower's run config (once per run);
        # otherwise (plain ``flwr run .``) every train message carries it
        self.config_in_run = config_in_run
        self.evaluating: dict[int, ClientProfile] = {}  # node -> profile, this evaluation

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        nodes = sorted(grid.get_node_ids())
        messages = []
        for profile in self.loop.sample(server_round, self.attempt, nodes):
            extra = {ROUND: server_round, PARTITION: profile.partition_id, RANK: profile.rank}
            content = payload_to_records(self.loop.downlink(profile), extra,
                                         filters=self.loop.cfg.compression.down)
            if not self.config_in_run:
                content[CONFIG_RECORD] = config_record(self.loop.cfg)
            messages.append(Message(content=content, dst_node_id=profile.node_id,
                                    message_type=MessageType.TRAIN, group_id=str(server_round)))
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord]:
        stats = self.loop.collect(server_round, self.to_replies(replies))
        return None, MetricRecord(stats)

    def to_replies(self, messages: Iterable[Message]) -> list[Reply]:
        """Flower replies as the loop's :class:`Reply`; one per sampled node (a duplicate or
        an unsolicited reply is ignored)."""
        out: dict[int, Reply] = {}
        for message in messages:
            node = message.metadata.src_node_id
            profile = self.loop.pending.get(node)
            if profile is None or node in out:
                continue
            if message.has_error():
                out[node] = Reply(profile, error=str(message.error.reason),
                                  vanished=message.error.code == ErrorCode.NODE_UNAVAILABLE)
                continue
            out[node] = _decode(self.loop, profile, message)
        return list(out.values())

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Evaluate messages (the global model, as each client is sent it) to the clients the
        round loop chose (``self.evaluating``; none unless eval.where includes the clients)."""
        messages = []
        for profile in self.evaluating.values():
            extra = {ROUND: server_round, PARTITION: profile.partition_id, RANK: profile.rank}
            content = payload_to_records(self.loop.downlink(profile), extra,
                                         filters=self.loop.cfg.compression.down)
            if not self.config_in_run:
                content[CONFIG_RECORD] = config_record(self.loop.cfg)
            messages.append(Message(content=content, dst_node_id=profile.node_id,
                                    message_type=MessageType.EVALUATE,
                                    group_id=f"{server_round}-eval"))
        return messages

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        """The round loop checks and aggregates the figures (``server/client_eval.py``)."""
        return None

    def to_eval_replies(self, messages: Iterable[Message]) -> list[EvalReply]:
        """Evaluate replies as the loop's :class:`EvalReply`: one per evaluating node; metrics
        only (anything else in a reply is ignored), unchecked here."""
        out: dict[int, EvalReply] = {}
        for message in messages:
            node = message.metadata.src_node_id
            profile = self.evaluating.get(node)
            if profile is None or node in out:
                continue
            if message.has_error():
                out[node] = EvalReply(profile, error=str(message.error.reason))
                continue
            content = message.content
            record = content.get(METRICS_RECORD) if METRICS_RECORD in content else None
            out[node] = EvalReply(profile, dict(record) if record is not None else None)
        return list(out.values())

    def summary(self) -> None:
        cfg = self.loop.cfg
        log(INFO, "fedpeft strategy: method %s, %d rounds, %d of %d clients per round",
            self.loop.method.name, cfg.federation.rounds, cfg.federation.clients_per_round,
            cfg.federation.clients)


def _decode(loop: RoundLoop, profile: ClientProfile, message: Message) -> Reply:
    """A reply's metrics and tensors, decoded against what the client was sent (compression
    filters that send updates need it); an undecodable one is kept with the reason (it is
    rejected)."""
    content = message.content
    metrics = content.get(METRICS_RECORD) if METRICS_RECORD in content else None
    fingerprint = reply_fingerprint(content)
    try:
        reference = loop.received(profile).tensors
        payload = (records_to_payload(content, reference=reference,
                                      expected=expected_upload(loop, profile, reference))
                   if has_tensors(content) else None)
    except Exception as exc:  # whatever one reply holds, it rejects that reply only
        return Reply(profile, metrics=dict(metrics or {}), problem=f"undecodable payload: {exc}",
                     fingerprint=fingerprint)
    return Reply(profile, metrics=dict(metrics) if metrics is not None else None,
                 payload=payload, fingerprint=fingerprint)


def expected_upload(loop: RoundLoop, profile: ClientProfile, reference: dict) -> Expected:
    """What the unpacker accepts from ``profile``: the method's expected keys and shapes, in the
    dtype it was sent where it was sent that tensor (checked before anything is inflated)."""
    spec = loop.method.expected_upload(loop.state, profile)
    shapes = dict(spec.tensors)
    return Expected(shapes, {k: reference[k].dtype for k in shapes if k in reference})


def reply_fingerprint(content: RecordDict) -> object:
    """The base-model fingerprint a reply carries, unchecked (None: the reply has none; the
    round loop rejects anything but the server's own)."""
    if REPLY_INFO not in content:
        return None
    record = content[REPLY_INFO]
    if not isinstance(record, ConfigRecord):
        return record  # malformed: not a string, so the loop rejects it
    return record.get(BASE_FINGERPRINT)


class FlowerTransport:
    """Delivers a round through the Flower Grid: the strategy builds the messages, the grid
    carries them, the strategy collects."""

    def __init__(self, grid: Grid, strategy: FedPeftStrategy, timeout_s: float | None) -> None:
        self.grid, self.strategy, self.timeout_s = grid, strategy, timeout_s

    def nodes(self) -> list[int]:
        return sorted(self.grid.get_node_ids())

    def train(self, loop: RoundLoop, rnd: int, attempt: int) -> dict:
        if loop.cfg.secagg.enabled:  # four stages instead of one train message (server/secagg.py)
            config = None if self.strategy.config_in_run else config_record(loop.cfg)
            return SecAggPhase(self.grid, send_and_receive, self.timeout_s,
                               config).train(loop, rnd, attempt)
        self.strategy.attempt = attempt
        messages = list(self.strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(),
                                                      self.grid))
        replies = send_and_receive(self.grid, messages, self.timeout_s)
        _, stats = self.strategy.aggregate_train(rnd, replies)
        clients = _client_bytes(loop, messages, replies)
        return {"bytes_down": sum(c["bytes_down"] for c in clients),
                "bytes_up": sum(c["bytes_up"] for c in clients),
                "clients_sampled": len(messages),
                "clients_timed_out": len(messages) - len(replies), **dict(stats),
                "client_bytes": clients}

    def evaluate(self, loop: RoundLoop, rnd: int,
                 profiles: list[ClientProfile]) -> tuple[list[EvalReply], dict]:
        self.strategy.evaluating = {p.node_id: p for p in profiles}
        messages = list(self.strategy.configure_evaluate(rnd, ArrayRecord(), ConfigRecord(),
                                                         self.grid))
        replies = send_and_receive(self.grid, messages, self.timeout_s)
        self.strategy.aggregate_evaluate(rnd, replies)
        traffic = {"eval_bytes_down": sum(serialized_nbytes(m.content) for m in messages),
                   "eval_bytes_up": sum(serialized_nbytes(r.content) for r in replies
                                        if r.has_content()),
                   "clients_eval_timed_out": len(messages) - len(replies)}
        return self.strategy.to_eval_replies(replies), traffic

    def extra_state(self) -> dict:
        return {}

    def restore_extra_state(self, data: dict) -> None:
        return None


def _client_bytes(loop: RoundLoop, messages: list[Message], replies: list[Message]) -> list[dict]:
    """Serialised bytes of each sampled client's own messages, with its partition and rank
    (the downlink differs per client under the rank methods and Ferret's catch-up)."""
    up = {r.metadata.src_node_id: serialized_nbytes(r.content) for r in replies
          if r.has_content()}
    out = []
    for message in messages:
        node = message.metadata.dst_node_id
        profile = loop.pending.get(node)
        out.append({"partition": profile.partition_id if profile else None,
                    CLIENT_RANK: profile.rank if profile else None,
                    "bytes_down": serialized_nbytes(message.content),
                    "bytes_up": up.get(node, 0)})
    return sorted(out, key=lambda c: (c["partition"] is None, c["partition"] or 0))


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


def wait_for_nodes(grid: Grid, needed: int, timeout_s: float = 600.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= needed or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def run_server(grid: Grid, cfg: FedConfig, out: Path, resume: bool = False,
               config_in_run: bool = False, simulation: bool = False) -> dict:
    """The whole run over a Flower Grid; ``resume``: continue after the last round
    checkpointed in ``out``; ``config_in_run``: the clients read the config from Flower's run
    config; ``simulation``: the clients are virtual ones holding the config's partitions.
    Returns the summary."""
    set_torch_threads(default_threads())
    # a coordinator whose clients do all the evaluating reads no data (docs/evaluation.md)
    data_free = cfg.eval.where == "clients" and not simulation
    workspace = data_free_workspace(cfg) if data_free else get_workspace(cfg)
    loop = new_loop(cfg, workspace, simulation)
    strategy = FedPeftStrategy(loop, config_in_run)
    strategy.summary()
    nodes = wait_for_nodes(grid, cfg.federation.clients)
    if len(nodes) < cfg.federation.clients_per_round:
        raise RuntimeError(f"only {len(nodes)} of {cfg.federation.clients} clients connected; "
                           f"federation.clients_per_round = {cfg.federation.clients_per_round}. "
                           "With `flwr run .` in simulation, pass --federation-config "
                           f"'num-supernodes={cfg.federation.clients}'")
    transport = FlowerTransport(grid, strategy, cfg.federation.round_timeout_s or None)
    return run_rounds(loop, transport, workspace, out, resume=resume)


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
        in_run = bool(str(run_config.get(RUN_CONFIG_KEY, "") or ""))
        if in_run and from_dict(json.loads(str(run_config[RUN_CONFIG_KEY]))) != cfg:
            raise ConfigError(f"run config {RUN_CONFIG_KEY!r} and config-file disagree")
        simulation = str(run_config.get(SIMULATION_KEY, "")) == "1"
        run_server(grid, cfg, out, resume=resume, config_in_run=in_run, simulation=simulation)
    except ConfigError as exc:  # a user error: one clear message (no traceback), no work done
        report_error(out, exc)
    except Exception as exc:
        report_error(out, exc)
        raise
