"""A sweep's fair protocol (docs/sweeps.md): the ``[tune]`` stage, which picks one config value
per row (by default the learning rate) on a validation split carved from the training data and
never on the test split, and the ``[[reference]]`` rows (e.g. centralised training on the pooled
data) that stand next to the methods.

The pure parts live here: the parsed tables, the candidate values of a row, the pooled-data
overrides of a centralised reference, and the choice from the tuning cells' metrics. Expanding
and running the cells is ``fedpeft.run.sweep``'s."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fedpeft.core.config import DEFAULT_METHOD, ConfigError, FedConfig

MAX_VALUES = 3  # the protocol's grid: at most 3 values, one seed
DEFAULT_KEY = "train.lr"
DEFAULT_METRIC = "accuracy"
DEFAULT_VALIDATION = 1000
# Keys the tuning stage owns: the sweep file may not set them elsewhere.
VALIDATION_KEY, SPLIT_KEY = "data.validation_size", "eval.split"
CENTRALISED = "centralised"
REFERENCE_KINDS = ("", CENTRALISED)


LOWER_IS_BETTER = ("perplexity",)  # and every metric ending in "loss"


@dataclass(frozen=True)
class Tune:
    """The ``[tune]`` table: ``values`` (the same for every row) or ``factors`` (times each
    row's own value of ``key``); the value with the best ``metric`` (mean of its last 3
    evaluated rounds on the validation split: the highest, or the lowest for a loss or a
    perplexity) wins; ``seed`` None: the base config's seeds."""

    key: str = DEFAULT_KEY
    values: tuple[Any, ...] = ()
    factors: tuple[float, ...] = ()
    metric: str = DEFAULT_METRIC
    seed: int | None = None
    validation_size: int = DEFAULT_VALIDATION

    @property
    def lower_is_better(self) -> bool:
        return self.metric in LOWER_IS_BETTER or self.metric.endswith("loss")

    @property
    def owned(self) -> tuple[str, ...]:
        return (self.key, VALIDATION_KEY, SPLIT_KEY)


@dataclass(frozen=True)
class Reference:
    """A ``[[reference]]`` row: a name in the method column, its config keys (applied after the
    settings and the grid), ``kind = 'centralised'`` for the pooled-data run of each setting,
    whether the tuning stage tunes it, and ``tune_values``: its own grid in place of [tune]'s
    (a row whose steps differ from the methods', such as the pooled run, may need other
    values)."""

    name: str
    kind: str = ""
    tune: bool = True
    values: dict[str, Any] = field(default_factory=dict)
    tune_values: tuple[Any, ...] = ()


def centralised_overrides(cfg: FedConfig) -> dict[str, Any]:
    """The pooled-data run of the setting ``cfg`` with the default experiment's method (plain
    LoRA averaging, which for one client is plain LoRA fine-tuning): one client holding all the
    training data
    (iid with one partition), every client rank at ``model.rank``, and as many optimizer steps
    per round (at the same batch size) as the federation's round: ``train.local_steps x
    federation.clients_per_round``; no secure aggregation (client-level DP stays, noised by the
    server), no injected faults or attacks. Everything else (rounds, DP, evaluation) stays."""
    out: dict[str, Any] = {
        "method.name": DEFAULT_METHOD,
        "federation.clients": 1,
        "federation.clients_per_round": 1,
        "federation.min_replies": 1,
        "federation.rank_mix": "",
        "data.partitioner": "iid",
        "data.partition_by": "",
        "train.local_steps": cfg.train.local_steps * cfg.federation.clients_per_round,
    }
    if cfg.eval.clients_per_round > 1:
        out["eval.clients_per_round"] = 1
    if cfg.secagg.enabled:  # a sum over one client is its update: no secure aggregation
        out.update({"secagg.enabled": False, "privacy.min_survivors": 0,
                    "privacy.colluders": 0})
    defaults = FedConfig().to_dict()
    for section in ("faults", "attacks"):  # an upper bound has no faulty or hostile client
        current = cfg.to_dict()[section]
        out.update({f"{section}.{k}": v for k, v in defaults[section].items()
                    if current.get(k) != v})
    return out


def config_value(cfg: FedConfig, key: str) -> Any:
    section, _, name = key.partition(".")
    return cfg.to_dict()[section].get(name)


def effective_value(cfg: FedConfig, key: str) -> Any:
    """The value of ``key`` a run of ``cfg`` uses: the config's, or for ``train.lr`` left at 0
    the method's ``default_lr`` (what a run at lr 0 trains with)."""
    value = config_value(cfg, key)
    if key == "train.lr" and not value:
        from fedpeft.strategies import build_method  # torch: only when it is needed

        value = build_method(cfg).default_lr
    return value


def row_default(cfg: FedConfig, key: str) -> float:
    """The row's own value of ``key`` that ``factors`` multiply (:func:`effective_value`)."""
    value = effective_value(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value:
        raise ConfigError(f"[tune] factors multiply the row's value of {key}, which is "
                          f"{value!r} here: give [tune] values instead")
    return value


def candidates(tune: Tune, cfg: FedConfig) -> list[Any]:
    """The values a row is tuned over: ``tune.values``, or ``tune.factors`` times the row's
    own value (6 significant digits; rounded for an integer key; distinct)."""
    if tune.values:
        return list(tune.values)
    base = row_default(cfg, tune.key)
    out: list[Any] = []
    for factor in tune.factors:
        value = float(f"{factor * base:.6g}")
        if isinstance(base, int):
            value = max(1, round(value))
        if value in out:
            raise ConfigError(f"[tune] factors {list(tune.factors)} give {tune.key} = {value} "
                              f"twice for a row whose value is {base}: use values instead")
        out.append(value)
    return out


def choose(scores: list[tuple[Any, float | None]], lower: bool = False) -> Any:
    """The value with the best score: the highest, or the lowest when ``lower`` (the first
    listed among equals; a non-finite score, a diverged run, counts as the worst); None while a
    value has no score yet (its tuning cell has not finished)."""
    if not scores or any(s is None for _, s in scores):
        return None
    sign = -1.0 if lower else 1.0
    ranked = [(v, sign * s if s is not None and math.isfinite(s) else -math.inf)
              for v, s in scores]
    best = max(s for _, s in ranked)
    return next(v for v, s in ranked if s == best)
