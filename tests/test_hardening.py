"""Hardening from the security review (issue 16, findings 3-7): non-finite config values, bounded
certificate lifetimes, damaged checkpoints, a gateway that caps and streams request bodies, a
finite round timeout for deployments, no remote code or fault injection on real devices, and
device-made key pairs."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fedpeft.core.config import SECTIONS, ConfigError, load_config

# ----------------------------------------------------------------- 3. non-finite config values


def _float_keys() -> list[str]:
    keys = []
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(cls) if hints[f.name] is float]
    return keys


FLOAT_KEYS = _float_keys()


def test_the_config_has_float_options() -> None:
    assert {"federation.max_update_norm", "federation.round_timeout_s", "privacy.epsilon",
            "faults.crash_fraction"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_option_refuses_non_finite_values(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key} = .*not a finite number"):
        load_config(None, [f"{key}={value}"])


def test_non_finite_values_from_a_toml_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[federation]\nmax_update_norm = nan\n")
    with pytest.raises(ConfigError, match=r"federation\.max_update_norm = nan"):
        load_config(path)


def test_infinite_epsilon_points_to_privacy_enabled() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.enabled = false"):
        load_config(None, ["privacy.epsilon=inf"])


def test_cli_reports_a_non_finite_value_without_a_traceback(capsys) -> None:
    from fedpeft.cli import main

    assert main(["simulate", "--set", "faults.crash_fraction=nan"]) == 2
    err = capsys.readouterr().err
    assert "faults.crash_fraction = nan" in err and "Traceback" not in err


@pytest.mark.parametrize("days", [0, 3651, 1_000_000])
def test_certs_days_out_of_range_is_one_clear_error(tmp_path: Path, days: int, capsys) -> None:
    from fedpeft.cli import main

    assert main(["certs", str(tmp_path / "pki"), "--days", str(days)]) == 2
    err = capsys.readouterr().err
    assert f"--days {days}" in err and "3650" in err
    assert not (tmp_path / "pki" / "ca.key").exists()


def test_certs_at_the_longest_validity(tmp_path: Path) -> None:
    from cryptography import x509

    from fedpeft.deploy.certs import MAX_DAYS, make_certs

    paths = make_certs(tmp_path, [], nodes=0, days=MAX_DAYS)
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    span = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert MAX_DAYS <= span.days <= MAX_DAYS + 1


def _checkpoint(tmp_path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
    from fedpeft.server.checkpoint import checkpoint_path

    path = checkpoint_path(tmp_path)
    path.parent.mkdir(parents=True)
    save_file(tensors, str(path), metadata={"fedpeft": json.dumps(meta)})
    return path


def _meta() -> dict:
    return {"format": 1, "round": 2, "scalars": {}, "metrics": [],
            "config": load_config().to_dict(), "strategy": {}, "keys": ["w"]}


@pytest.mark.parametrize("missing", ["keys", "round", "scalars", "metrics", "config"])
def test_checkpoint_without_a_metadata_key_names_file_and_key(tmp_path: Path,
                                                              missing: str) -> None:
    from fedpeft.server.checkpoint import CheckpointError, load_checkpoint

    meta = _meta()
    del meta[missing]
    path = _checkpoint(tmp_path, meta, {"w": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=rf"{path}.*'{missing}'"):
        load_checkpoint(tmp_path)


def test_checkpoint_without_a_listed_tensor_names_file_and_tensor(tmp_path: Path) -> None:
    from fedpeft.server.checkpoint import CheckpointError, load_checkpoint

    meta = {**_meta(), "keys": ["w", "lora_B"]}
    path = _checkpoint(tmp_path, meta, {"w": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=rf"{path}.*'lora_B'"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("bad", [{"round": "two"}, {"keys": "w"}, {"scalars": [1]}])
def test_checkpoint_with_mistyped_metadata_is_refused(tmp_path: Path, bad: dict) -> None:
    from fedpeft.server.checkpoint import CheckpointError, load_checkpoint

    path = _checkpoint(tmp_path, {**_meta(), **bad}, {"w": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(tmp_path)
