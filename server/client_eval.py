"""The evaluate-on-clients phase, free of Flower: which clients score the global model, the
checks every evaluation reply passes, and the round's figures (``docs/evaluation.md``).

A reply carries figures only: the client's example count on its holdout, its mean loss, its
accuracy (label tasks) and nothing else that is used. Each one is checked like a train reply
(numbers only, finite, of sane size; a count that is a positive integer no larger than the
client can hold) before it counts; a bad, failed or missing reply is logged and left out, and
never stops the round.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import WARNING
from typing import Any, Protocol

import numpy as np
from fedpeft.strategies import ClientProfile
from flwr.common.logger import log

from fedpeft.core.config import FedConfig
from fedpeft.core.data import holdout_size
from fedpeft.core.keys import EVAL_ACCURACY, EVAL_LOSS, EVAL_SECONDS, NUM_EXAMPLES
from fedpeft.core.sampling import sample_clients

from .federation import client_profile
from .validation import check_examples, check_metrics

# A loss above this is not a held-out loss (cross-entropy of a uniform guess over a 150k-token
# vocabulary is 12): the reply is rejected rather than allowed to dominate the mean.
MAX_LOSS = 1e4
# exp() of a larger loss overflows a float; a causal LM's perplexity is capped there.
MAX_LOG_PERPLEXITY = 50.0


@dataclass
class EvalReply:
    """One client's answer to an evaluate message, whatever carried it."""

    profile: ClientProfile
    metrics: Mapping[str, object] | None = None
    error: str | None = None  # the client failed or vanished
    problem: str | None = None  # the reply could not be decoded


@dataclass(frozen=True)
class ClientFigures:
    """One client's validated figures."""

    partition_id: int
    examples: int
    loss: float
    accuracy: float | None = None
    seconds: float = 0.0


class EvalTransport(Protocol):
    """What the phase needs of a transport: the nodes, and one evaluate exchange that returns
    the replies and its byte counts (``eval_bytes_down``, ``eval_bytes_up``,
    ``clients_eval_timed_out``)."""

    def nodes(self) -> list[int]: ...

    def evaluate(self, loop: Any, rnd: int,
                 profiles: list[ClientProfile]) -> tuple[list[EvalReply], dict]: ...


def evaluate_on_clients(loop: Any, transport: EvalTransport, rnd: int) -> dict:
    """The evaluate-on-clients phase of round ``rnd`` (``loop``: the server's RoundLoop): send
    the current global model to the cohort, check every reply, and return the row's figures."""
    cfg = loop.cfg
    start = time.perf_counter()
    nodes = transport.nodes()
    if rnd > 0 and loop.pending:  # the clients of the round's (last) training attempt
        trained = [p.partition_id for p in loop.pending.values()]
    else:  # round 0: the sample round 1 draws
        fed = cfg.federation
        trained = sample_clients(len(nodes), fed.clients_per_round, fed.seed, 1)
    profiles = [client_profile(cfg, i, nodes[i], loop.ranks.get(nodes[i]))
                for i in eval_cohort(cfg, len(nodes), trained)]
    replies, traffic = transport.evaluate(loop, rnd, profiles)
    caps = {p.partition_id: holdout_cap(cfg, loop.partition_sizes, p.partition_id)
            for p in profiles}
    row = collect_eval(rnd, replies, caps, loop.labelled)
    return {**row, **traffic, "clients_eval_sampled": len(profiles),
            "clients_eval_wall_s": time.perf_counter() - start}


def eval_cohort(cfg: FedConfig, num_nodes: int, trained: list[int]) -> list[int]:
    """Indices of the nodes that evaluate this round: ``trained`` (the round's training sample)
    when ``eval.clients_per_round`` is 0, else a fixed seeded cohort of that many clients
    (the same in every round, so their figures form a curve)."""
    k = cfg.eval.clients_per_round
    if k == 0:
        return sorted(trained)
    rng = np.random.default_rng([cfg.federation.seed, 8])
    return sorted(rng.choice(num_nodes, size=min(k, num_nodes), replace=False).tolist())


@dataclass(frozen=True)
class CountBound:
    """What a client's claimed holdout size is held to: ``exact`` (simulation: its real holdout)
    rejects a larger claim; otherwise (``federation.max_examples_per_client``) a larger claim
    weighs as ``limit``, as a training reply's example count does."""

    limit: int
    exact: bool


def holdout_cap(cfg: FedConfig, partition_sizes: list[int] | None,
                partition_id: int) -> CountBound | None:
    """The bound on a client's claimed holdout size: its real holdout in simulation (the server
    knows every partition), else ``federation.max_examples_per_client`` (None: no cap)."""
    if partition_sizes is not None and 0 <= partition_id < len(partition_sizes):
        return CountBound(holdout_size(partition_sizes[partition_id], cfg.eval.client_holdout),
                          exact=True)
    cap = cfg.federation.max_examples_per_client
    return CountBound(cap, exact=False) if cap > 0 else None


# A claimed holdout larger than this is absurd, whatever the bound (a weight of ten million)
MAX_EVAL_EXAMPLES = 10**7


def check_eval_reply(reply: EvalReply, cap: CountBound | None,
                     labelled: bool) -> ClientFigures | str:
    """The reply's figures (its weight bounded by ``cap``), or the reason it is rejected."""
    if reply.problem is not None:
        return reply.problem
    metrics, problem = check_metrics(reply.metrics)
    if problem is not None:
        return problem
    problem = check_examples(metrics)
    if problem is not None:
        return problem
    count = int(metrics[NUM_EXAMPLES])
    if count > MAX_EVAL_EXAMPLES or (cap is not None and cap.exact and count > cap.limit):
        limit = cap.limit if cap is not None and cap.exact else MAX_EVAL_EXAMPLES
        return f"{NUM_EXAMPLES} = {count} exceeds the {limit} held-out examples it can have"
    loss = metrics.get(EVAL_LOSS)
    if loss is None or not 0 <= loss <= MAX_LOSS:
        return f"{EVAL_LOSS} = {loss!r}: expected a loss in [0, {MAX_LOSS:g}]"
    accuracy = metrics.get(EVAL_ACCURACY)
    if labelled:
        if accuracy is None or not 0 <= accuracy <= 1:
            return f"{EVAL_ACCURACY} = {accuracy!r}: expected a share in [0, 1]"
        if abs(accuracy * count - round(accuracy * count)) > 1e-6 * count:
            return (f"{EVAL_ACCURACY} = {accuracy!r} is no whole number of the {count} "
                    "examples it claims")
    weight = min(count, cap.limit) if cap is not None else count
    return ClientFigures(reply.profile.partition_id, weight, loss,
                         accuracy if labelled else None, max(0.0, metrics.get(EVAL_SECONDS, 0.0)))


def collect_eval(rnd: int, replies: Iterable[EvalReply],
                 caps: Mapping[int, CountBound | None], labelled: bool) -> dict:
    """Validate the round's evaluation replies (``caps``: partition id -> its count bound) and
    aggregate the good ones into the row's ``clients_*`` figures; counts of the others."""
    good: list[ClientFigures] = []
    counts = {"clients_eval_failed": 0, "clients_eval_rejected": 0}
    for reply in replies:
        pid = reply.profile.partition_id
        if reply.error is not None:
            log(WARNING, "round %d: client %d failed to evaluate: %s", rnd, pid, reply.error)
            counts["clients_eval_failed"] += 1
            continue
        outcome = check_eval_reply(reply, caps.get(pid), labelled)
        if isinstance(outcome, str):
            log(WARNING, "round %d: rejected the evaluation reply of client %d: %s", rnd, pid,
                outcome)
            counts["clients_eval_rejected"] += 1
        else:
            good.append(outcome)
    return {**counts, **client_figures(good)}


def client_figures(figures: list[ClientFigures]) -> dict:
    """The row's figures from validated per-client ones: the example-weighted mean loss (and
    accuracy) over the clients, the spread of accuracy across clients (10th percentile,
    minimum, standard deviation: every client counts once), for a causal LM the perplexity of
    the mean loss and the worst clients' (90th percentile, maximum); ``client_eval``: each
    client's own figures, by partition id."""
    figures = sorted(figures, key=lambda f: f.partition_id)
    usable = [f for f in figures if f.examples > 0]
    row: dict = {"clients_evaluated": len(usable)}
    if not usable:
        return {**row, "clients_loss": None}
    weights = np.array([f.examples for f in usable], dtype=np.float64)
    losses = np.array([f.loss for f in usable])
    row["clients_loss"] = float(np.average(losses, weights=weights))
    row["clients_eval_examples"] = int(weights.sum())
    row["clients_eval_s"] = float(sum(f.seconds for f in usable))
    if all(f.accuracy is not None for f in usable):
        acc = np.array([f.accuracy for f in usable], dtype=np.float64)
        row.update(clients_accuracy=float(np.average(acc, weights=weights)),
                   clients_accuracy_p10=float(np.percentile(acc, 10)),
                   clients_accuracy_min=float(acc.min()), clients_accuracy_std=float(acc.std()))
    else:
        ppl = np.exp(np.minimum(losses, MAX_LOG_PERPLEXITY))
        row.update(clients_perplexity=math.exp(min(row["clients_loss"], MAX_LOG_PERPLEXITY)),
                   clients_perplexity_p90=float(np.percentile(ppl, 90)),
                   clients_perplexity_max=float(ppl.max()))
    row["client_eval"] = [_own(f) for f in usable]
    return row


def _own(f: ClientFigures) -> dict:
    own: dict = {"partition": f.partition_id, "examples": f.examples, "loss": f.loss}
    if f.accuracy is not None:
        own["accuracy"] = f.accuracy
    return own
