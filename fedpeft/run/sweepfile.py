"""A sweep file (docs/sweeps.md) read and checked: every mistake is one ConfigError naming the
file and the key, before any cell runs. The cells and running them: ``fedpeft.run.sweep``."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.core.config import SECTIONS, ConfigError, parse_override, read_toml
from fedpeft.run.sweeptune import (
    CENTRALISED,
    DEFAULT_KEY,
    DEFAULT_METRIC,
    DEFAULT_VALIDATION,
    MAX_VALUES,
    REFERENCE_KINDS,
    Reference,
    Tune,
)

TOP_KEYS = ("name", "description", "methods", "seeds", "seed_keys", "target_accuracy", "base",
            "grid", "settings", "tune", "reference")
SEED_KEYS = ("federation.seed", "data.seed")


@dataclass
class Sweep:
    """A parsed, checked sweep file; ``base_sets`` holds its inline [base] keys and ``set``."""

    path: Path
    name: str = ""
    description: str = ""
    base_config: Path | None = None
    base_sets: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    seed_keys: list[str] = field(default_factory=lambda: list(SEED_KEYS))
    target_accuracy: float | None = None
    grid: dict[str, list[Any]] = field(default_factory=dict)
    settings: dict[str, list[tuple[str, dict[str, Any]]]] = field(default_factory=dict)
    tune: Tune | None = None
    references: list[Reference] = field(default_factory=list)


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file; every mistake is one ConfigError naming the file and key."""
    path = Path(path)
    raw = read_toml(path, "sweep file")
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; allowed top-level keys: "
                          f"{', '.join(TOP_KEYS)} (config keys go under [base] or [grid])")
    sweep = Sweep(path, name=_text(raw, "name", path), description=_text(raw, "description", path))
    sweep.methods = _list(raw, "methods", str, path)
    sweep.seeds = _list(raw, "seeds", int, path)
    if "seed_keys" in raw:
        sweep.seed_keys = _list(raw, "seed_keys", str, path)
    sweep.target_accuracy = _target(raw.get("target_accuracy"), path)
    sweep.base_config, sweep.base_sets = _base(raw.get("base", {}), path)
    sweep.grid = _grid(raw.get("grid"), path)
    sweep.settings = _settings(raw.get("settings"), path)
    sweep.tune = _tune(raw.get("tune"), sweep.seeds, path)
    sweep.references = _references(raw.get("reference"), sweep.methods, path)
    _check_overlaps(sweep)
    _check_protocol(sweep)
    return sweep


def _text(raw: dict[str, Any], key: str, path: Path) -> str:
    value = raw.get(key, "")
    if not isinstance(value, str):
        raise ConfigError(f"{path}: {key} = {value!r}: expected a string")
    return value


def _list(raw: dict[str, Any], key: str, kind: type, path: Path) -> list[Any]:
    if key not in raw:
        return []
    value = raw[key]
    if (not isinstance(value, list) or not value
            or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value)):
        raise ConfigError(f"{path}: {key} = {value!r}: expected a non-empty list of "
                          f"{kind.__name__}s (or leave {key} out)")
    if len(set(value)) < len(value):
        raise ConfigError(f"{path}: {key} = {value!r} lists a value twice")
    return list(value)


def _target(value: Any, path: Path) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigError(f"{path}: target_accuracy = {value!r}: expected a number in (0, 1]")
    return float(value)


def _base(base: Any, path: Path) -> tuple[Path | None, list[str]]:
    """(the base config file, the --set overrides of [base]'s inline keys and ``set``)."""
    if not isinstance(base, dict):
        raise ConfigError(f"{path}: base must be a table ([base])")
    for key in base:
        if key not in ("config", "set", *SECTIONS):
            raise ConfigError(f"{path}: unknown key base.{key}; [base] holds config, set and "
                              f"the config sections ({', '.join(SECTIONS)})")
    config = base.get("config")
    if config is not None and not isinstance(config, str):
        raise ConfigError(f"{path}: base.config = {config!r}: expected a path")
    config_path = (path.parent / config).resolve() if config else None
    if config_path is not None and not config_path.is_file():
        raise ConfigError(f"{path}: base.config = {config!r}: {config_path} does not exist")
    sets = base.get("set", [])
    if not isinstance(sets, list) or not all(isinstance(s, str) for s in sets):
        raise ConfigError(f"{path}: base.set = {sets!r}: expected a list of "
                          "'section.key=value' strings")
    inline = flatten({k: v for k, v in base.items() if k not in ("config", "set")})
    for item in sets:
        key = ".".join(parse_override(item)[0])
        if key in inline:
            raise ConfigError(f"{path}: {key} is set both inline in [base] and in base.set; "
                              "set it in one place")
    return config_path, [override(k, v) for k, v in inline.items()] + list(sets)


def _grid(grid: Any, path: Path) -> dict[str, list[Any]]:
    if grid is None:
        return {}
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{path}: [grid] is empty: give it at least one config key with a "
                          "list of values, or leave it out")
    flat = flatten(grid)
    for key, values in flat.items():
        _check_key(key, f"grid key {key!r}", path)
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid key {key!r} = {values!r}: expected a non-empty "
                              "list of values")
    return flat


def _settings(settings: Any, path: Path) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """{axis: [(setting name, {config key: value})]}: ``[[settings]]`` is the axis "setting",
    ``[[settings.<axis>]]`` one axis each."""
    if settings is None:
        return {}
    axes = {"setting": settings} if isinstance(settings, list) else settings
    if not isinstance(axes, dict) or not axes:
        raise ConfigError(f"{path}: settings must be a list of tables ([[settings]]) or lists "
                          "of tables by axis ([[settings.<axis>]])")
    out = {}
    for axis, entries in axes.items():
        if axis in ("method", "seed", "cell") or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", axis):
            raise ConfigError(f"{path}: settings axis {axis!r}: use a plain name other than "
                              "method, seed and cell")
        out[axis] = _axis(entries, "settings" if axis == "setting" else f"settings.{axis}", path)
    return out


def _axis(entries: Any, what: str, path: Path) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(entries, list) or not entries or not all(
            isinstance(s, dict) for s in entries):
        raise ConfigError(f"{path}: {what} must be a non-empty list of tables ([[{what}]])")
    out: list[tuple[str, dict[str, Any]]] = []
    for i, entry in enumerate(entries, 1):
        values = flatten({k: v for k, v in entry.items() if k != "name"})
        if not values:
            raise ConfigError(f"{path}: {what} #{i} sets no config key")
        for key in values:
            _check_key(key, f"{what} #{i} key {key!r}", path)
        name = entry.get("name", ",".join(f"{k.split('.')[-1]}={label_text(v)}"
                                          for k, v in values.items()))
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{path}: {what} #{i}: name = {name!r}: expected a string")
        if name in dict(out):
            raise ConfigError(f"{path}: two of {what} are named {name!r}")
        out.append((name, values))
    return out


def _check_key(key: str, what: str, path: Path) -> None:
    if len(key.split(".")) < 2 or key.split(".")[0] not in SECTIONS:
        raise ConfigError(f"{path}: {what} is not a config key: expected section.key with a "
                          f"section among {', '.join(SECTIONS)} (see `fedpeft config`)")


def _check_overlaps(sweep: Sweep) -> None:
    """A key set by two parts of the sweep would depend on the order of overrides: refused."""
    owners: dict[str, str] = {k: "[grid]" for k in sweep.grid}
    if sweep.methods:
        owners.setdefault("method.name", "methods")
    for key in sweep.seed_keys if sweep.seeds else ():
        _check_key(key, f"seed_keys entry {key!r}", sweep.path)
        owners.setdefault(key, "seeds")
    for axis, entries in sweep.settings.items():
        axis_keys = {key for _, values in entries for key in values}
        for name, values in entries:
            for key in values:
                if key in owners:
                    raise ConfigError(f"{sweep.path}: {key} is set both by settings {name!r} "
                                      f"and by {owners[key]}; set it in one place")
        owners.update((k, f"settings axis {axis!r}") for k in axis_keys)
    if sweep.methods and "method.name" in sweep.grid:
        raise ConfigError(f"{sweep.path}: method.name is set both by [grid] and by methods")
    for key in sweep.seed_keys if sweep.seeds else ():
        if key in sweep.grid:
            raise ConfigError(f"{sweep.path}: {key} is set both by [grid] and by seeds")


TUNE_KEYS = ("key", "values", "factors", "metric", "seed", "validation_size")


def _tune(tune: Any, seeds: list[int], path: Path) -> Tune | None:
    """The ``[tune]`` table (None without one); docs/sweeps.md."""
    if tune is None:
        return None
    if not isinstance(tune, dict):
        raise ConfigError(f"{path}: tune must be a table ([tune])")
    unknown = [k for k in tune if k not in TUNE_KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown key tune.{unknown[0]}; [tune] holds "
                          f"{', '.join(TUNE_KEYS)}")
    key = tune.get("key", DEFAULT_KEY)
    if not isinstance(key, str):
        raise ConfigError(f"{path}: tune.key = {key!r}: expected a config key")
    _check_key(key, f"tune.key {key!r}", path)
    listed, items = _tune_items(tune, path)
    seed = tune.get("seed", seeds[0] if seeds else None)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"{path}: tune.seed = {seed!r}: expected an integer")
    size = tune.get("validation_size", DEFAULT_VALIDATION)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"{path}: tune.validation_size = {size!r}: expected a positive number "
                          "of examples")
    return Tune(key, tuple(items) if listed == "values" else (),
                tuple(items) if listed == "factors" else (), _tune_metric(tune, path), seed,
                size)


def _tune_items(tune: dict[str, Any], path: Path) -> tuple[str, list[Any]]:
    """("values" or "factors", its checked list)."""
    if ("values" in tune) == ("factors" in tune):
        raise ConfigError(f"{path}: [tune] needs values = [...] (the same for every row) or "
                          "factors = [...] (times each row's own value of the key), not both")
    listed = "values" if "values" in tune else "factors"
    return listed, _tune_grid(tune[listed], f"tune.{listed}", listed == "factors", path)


def _tune_grid(items: Any, what: str, factors: bool, path: Path) -> list[Any]:
    """A checked tuning grid: a non-empty list of distinct values (positive numbers for
    factors), at most MAX_VALUES of them."""
    kind = (int, float) if factors else (int, float, str, bool)
    if not isinstance(items, list) or not items or not all(
            isinstance(v, kind) and not (factors and isinstance(v, bool)) for v in items):
        raise ConfigError(f"{path}: {what} = {items!r}: expected a non-empty list of "
                          + ("positive numbers" if factors else "values"))
    if factors and not all(math.isfinite(v) and v > 0 for v in items):
        raise ConfigError(f"{path}: {what} = {items!r}: expected positive numbers")
    if len(items) > MAX_VALUES:
        raise ConfigError(f"{path}: {what} lists {len(items)} values; the protocol tunes "
                          f"over at most {MAX_VALUES} (a small grid on one seed), so pick "
                          f"{MAX_VALUES}")
    if len(set(items)) < len(items):
        raise ConfigError(f"{path}: {what} = {items!r} lists a value twice")
    return items


def _tune_metric(tune: dict[str, Any], path: Path) -> str:
    metric = tune.get("metric", DEFAULT_METRIC)
    if not isinstance(metric, str) or not metric:
        raise ConfigError(f"{path}: tune.metric = {metric!r}: expected the name of a per-round "
                          "metric of metrics.jsonl (e.g. accuracy)")
    return metric


def _references(entries: Any, methods: list[str], path: Path) -> list[Reference]:
    """The ``[[reference]]`` rows: name, kind, tune, tune_values and config keys."""
    if entries is None:
        return []
    if not isinstance(entries, list) or not entries or not all(
            isinstance(e, dict) for e in entries):
        raise ConfigError(f"{path}: reference must be a list of tables ([[reference]])")
    if not methods:
        raise ConfigError(f"{path}: [[reference]] rows stand next to the methods: give methods "
                          "= [...] (rows that a settings axis names cannot have references)")
    out: list[Reference] = []
    for i, entry in enumerate(entries, 1):
        name, kind, tune = entry.get("name"), entry.get("kind", ""), entry.get("tune", True)
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name):
            raise ConfigError(f"{path}: reference #{i}: name = {name!r}: expected a plain name "
                              "(letters, digits, . _ + -)")
        if name in methods or name in (r.name for r in out):
            raise ConfigError(f"{path}: reference #{i}: name {name!r} is already a method or "
                              "another reference")
        if kind not in REFERENCE_KINDS:
            raise ConfigError(f"{path}: reference {name!r}: kind = {kind!r}: expected "
                              f"{CENTRALISED!r}, or leave it out (only the keys given)")
        if not isinstance(tune, bool):
            raise ConfigError(f"{path}: reference {name!r}: tune = {tune!r}: expected true or "
                              "false")
        own: tuple[Any, ...] = ()
        if "tune_values" in entry:
            if not tune:
                raise ConfigError(f"{path}: reference {name!r} sets tune = false and "
                                  "tune_values: a row that is not tuned has no grid")
            own = tuple(_tune_grid(entry["tune_values"], f"reference {name!r} tune_values",
                                   False, path))
        values = flatten({k: v for k, v in entry.items()
                          if k not in ("name", "kind", "tune", "tune_values")})
        if not values and not kind:
            raise ConfigError(f"{path}: reference {name!r} sets no config key and no kind")
        for key in values:
            _check_key(key, f"reference {name!r} key {key!r}", path)
        out.append(Reference(name, kind, tune, values, own))
    return out


def _check_protocol(sweep: Sweep) -> None:
    """The keys [tune] owns (the tuned key, the validation split, the evaluated split) are set
    nowhere else, and no reference sets a seed key."""
    owners = [("[grid]", sweep.grid.keys()), ("base", _base_keys(sweep))]
    owners += [(f"settings {name!r}", values.keys())
               for entries in sweep.settings.values() for name, values in entries]
    owners += [(f"reference {r.name!r}", r.values.keys()) for r in sweep.references]
    for ref in sweep.references:
        for key in sweep.seed_keys if sweep.seeds else ():
            if key in ref.values:
                raise ConfigError(f"{sweep.path}: {key} is set both by reference {ref.name!r} "
                                  "and by seeds")
    if sweep.tune is None:
        for ref in sweep.references:
            if ref.tune_values:
                raise ConfigError(f"{sweep.path}: reference {ref.name!r} sets tune_values but "
                                  "the sweep has no [tune] table")
        return
    for owner, keys in owners:
        for key in sweep.tune.owned:
            if key in keys:
                raise ConfigError(f"{sweep.path}: {key} is set by {owner} and by [tune] (the "
                                  "tuned key, data.validation_size and eval.split are the "
                                  "tuning stage's): set it in one place")
    if sweep.tune.key in sweep.seed_keys and sweep.seeds:
        raise ConfigError(f"{sweep.path}: tune.key {sweep.tune.key} is a seed key")


def _base_keys(sweep: Sweep) -> list[str]:
    return [".".join(parse_override(item)[0]) for item in sweep.base_sets]


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables to dotted keys: {"data": {"seed": 1}} and {"data.seed": 1} both give
    {"data.seed": 1} (TOML writes ``data.seed = 1`` as the nested form)."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def toml_value(value: Any) -> str:
    """``value`` as a TOML literal (what ``--set key=...`` reads back unchanged)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise ConfigError(f"value {value!r}: only strings, numbers, booleans and lists are allowed")


def override(key: str, value: Any) -> str:
    return f"{key}={toml_value(value)}"


def label_text(value: Any) -> str:
    return value if isinstance(value, str) else toml_value(value)
