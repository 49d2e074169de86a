from __future__ import annotations

from pathlib import Path

import pytest
from fedpeft.strategies import build_method

from fedpeft.core.config import ConfigError, load_config, parse_override, to_toml


def test_defaults_are_valid() -> None:
    cfg = load_config()
    assert cfg.model.name == "minilm-l6"
    assert cfg.federation.clients == 100
    assert cfg.method.name == "fedit"


def test_toml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[federation]\nclients = 20\nrounds = 3\n[model]\nrank = 4\n')
    cfg = load_config(path, ["federation.rounds=7", "model.target_modules=query,key",
                             "train.lr=1e-3"])
    assert (cfg.federation.clients, cfg.federation.rounds, cfg.model.rank) == (20, 7, 4)
    assert cfg.model.target_modules == ["query", "key"]
    assert cfg.train.lr == pytest.approx(1e-3)


def test_round_trip_through_toml(tmp_path: Path) -> None:
    cfg = load_config(None, ["federation.clients=12", 'data.partitioner="dirichlet"'])
    path = tmp_path / "again.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.rnak=4", "unknown key model.rnak; allowed keys in [model]: name, target_modules"),
        ("modle.rank=4", "unknown section [modle]"),
        ("model.rank=0", "model.rank = 0 is out of range: int >= 1"),
        ("model.rank=2.5", "model.rank = 2.5: expected an integer"),
        ('data.partitioner="random"', "data.partitioner = 'random' is not allowed: one of 'iid'"),
        ("federation.clients_per_round=500", "clients_per_round = 500 exceeds federation.clients"),
        ('model.name="gpt9"',
         "model.name = 'gpt9' is not allowed: one of 'minilm-l6', 'tiny-bert'"),
        ("train.lr=-1", "train.lr = -1.0 is out of range"),
        ('train.device="tpu"', "train.device = 'tpu': expected 'cpu', 'cuda' or 'cuda:N'"),
        ("data.dirichlet_alpha=0", "data.dirichlet_alpha = 0.0 is out of range: float > 0"),
        ("simulation.gpus_per_client=0.25", "gpus_per_client = 0.25 needs train.device = 'cuda'"),
        ("simulation.gpus_per_client=nan", "gpus_per_client = nan is not a finite number"),
        ("simulation.gpus_per_client=1.5", "gpus_per_client = 1.5 is out of range"),
    ],
)
def test_bad_values_name_the_key_and_allowed_values(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_unknown_method_and_option() -> None:
    refusal = r"method.name = 'fedfoo' is not allowed: one of "
    with pytest.raises(ConfigError, match=refusal) as info:
        build_method(load_config(None, ['method.name="fedfoo"']))
    listed = str(info.value).split("one of ", 1)[1].split(", ")
    assert listed == sorted(listed) and {"fedit", "ffa-lora", "ferret"} <= set(listed)
    with pytest.raises(ConfigError, match=r"unknown key method.bogus"):
        build_method(load_config(None, ["method.bogus=1"]))


def test_override_syntax() -> None:
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a.b=hello") == (["a", "b"], "hello")
    with pytest.raises(ConfigError, match=r"expected section.key=value"):
        parse_override("nonsense")


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/x.toml")


def test_method_help_lists_every_method_with_real_defaults() -> None:
    """`fedpeft methods` shows each registered method and each option's actual default, also for
    options whose default is a factory (a list)."""
    from fedpeft.strategies import METHODS, method_help

    text = method_help()
    for name in METHODS:
        assert f"\n{name}: " in f"\n{text}"
    assert "MISSING" not in text
    assert "method.modules = ['query', 'key', 'value', 'dense']" in text


def test_gpu_share_reaches_flower_and_needs_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU share goes into Flower's federation config; without CUDA the device check of
    the preflight stops the run before any process starts."""
    import torch

    from fedpeft.run.launcher import federation_config
    from fedpeft.run.session import check_model_and_device

    cfg = load_config(None, ['train.device="cuda"', "simulation.gpus_per_client=0.25"])
    assert federation_config(100, 1, cfg.simulation.gpus_per_client) == (
        "num-supernodes=100 client-resources-num-cpus=1 client-resources-num-gpus=0.25")
    assert "gpus" not in federation_config(100, 1, 0.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"train\.device = 'cuda'.*CUDA is not available"):
        check_model_and_device(cfg)


def test_sections_are_frozen_and_changed_only_through_the_checks() -> None:
    """A section cannot be changed in place; ``with_values`` returns a checked copy and refuses
    what ``--set`` refuses (bounds, NaN, cross-key rules, unknown keys), naming its source."""
    import dataclasses
    import math

    from fedpeft.core.config import with_values

    cfg = load_config(None, ['model.name="tiny-bert"'])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 0.5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train = cfg.train  # type: ignore[misc]
    changed = with_values(cfg, {"train.lr": 0.5, "federation.clients": 12}, "a test")
    assert (changed.train.lr, changed.federation.clients) == (0.5, 12)
    assert cfg.train.lr != 0.5 and changed.model == cfg.model
    for values, match in (({"train.lr": math.nan}, "not a finite number"),
                          ({"train.batch_size": 0}, "out of range"),
                          ({"federation.clients_per_round": 10_000}, "exceeds federation.clients"),
                          ({"train.bogus": 1}, "unknown key train.bogus"),
                          ({"nosection": 1}, "is not a section.key")):
        with pytest.raises(ConfigError, match=match) as err:
            with_values(cfg, values, "a test")
        assert str(err.value).startswith("a test: ")


def test_a_client_process_parses_the_run_config_once(
        tmp_path: Path, in_process: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ClientApp and its fault/attack mods share one parse of the run's config: six clients
    over two rounds in one process (train and evaluation messages) parse it once."""
    from fedpeft.server import app as server_app

    from fedpeft.core import config
    from tests.helpers import TINY, FakeGrid

    cfg = load_config(None, [*TINY, "federation.clients_per_round=6", 'eval.where="both"'])
    parses = []
    real = config.from_dict
    monkeypatch.setattr(config, "from_dict", lambda raw: parses.append(1) or real(raw))
    config.from_json.cache_clear()
    server_app.run_server(FakeGrid(range(11, 17)), cfg, tmp_path / "run", simulation=True)
    info = config.from_json.cache_info()
    assert len(parses) == 1 and info.misses == 1
    assert info.hits >= 2 * 6 * cfg.federation.rounds  # both mods, each train message
    with pytest.raises(ConfigError, match="not valid JSON"):
        config.from_json("{nope")


def test_cross_key_rules_are_one_registered_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """``validate`` runs every rule registered with ``@rule`` (the built-in ones included), so a
    rule added next to its section needs no second edit to take effect."""
    from fedpeft.core import config

    names = [check.__name__ for check in config.RULES]
    assert {"validate_federation", "validate_train", "validate_privacy",
            "validate_secagg"} <= set(names) and len(names) == len(set(names))
    seen = []
    monkeypatch.setattr(config, "RULES", [])
    config.rule(seen.append)
    config.rule(lambda cfg: (_ for _ in ()).throw(ConfigError("x.y: a registered rule")))
    with pytest.raises(ConfigError, match="a registered rule"):
        load_config(None, ['model.name="tiny-bert"'])
    assert len(seen) == 1 and seen[0].model.name == "tiny-bert"
