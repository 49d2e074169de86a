"""Tasks and models: which task a model gets, which modules get LoRA, how model names resolve,
which data schemas load, and that the classification path behaves as before the task split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedpeft.core.adapters import build_adapter_model, target_modules
from fedpeft.core.config import ConfigError, DataConfig, ModelConfig, load_config
from fedpeft.core.data import load_task_data, load_user_file, partition_indices
from fedpeft.core.models import default_target_modules, infer_task, model_folder
from fedpeft.core.tasks import CausalLM, Classification, task_class
from tests.tiny_models import save_tiny_bert, save_tiny_gpt2, save_tiny_llama


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"llama": save_tiny_llama(root / "llama"), "gpt2": save_tiny_gpt2(root / "gpt2"),
            "bert": save_tiny_bert(root / "bert")}


# ---- task and model resolution ------------------------------------------------------------------
def test_task_inferred_from_registry_and_folder(folders: dict[str, Path]) -> None:
    assert task_class(ModelConfig(name="minilm-l6")) is Classification
    assert task_class(ModelConfig(name="tiny-bert")) is Classification
    assert infer_task(ModelConfig(name="smollm2-135m")) == "causal-lm"  # the entry says so
    assert task_class(ModelConfig(name=str(folders["llama"]))) is CausalLM
    assert task_class(ModelConfig(name=str(folders["gpt2"]))) is CausalLM
    assert task_class(ModelConfig(name=str(folders["bert"]))) is Classification
    forced = ModelConfig(name=str(folders["llama"]), task="classification")
    assert task_class(forced) is Classification


def test_unknown_architecture_asks_for_the_task(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["WeirdThing"]}))
    with pytest.raises(ConfigError, match=r"cannot tell the task.*set model.task"):
        infer_task(ModelConfig(name=str(tmp_path)))


def test_model_name_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"folder without config.json"):
        model_folder(str(tmp_path))
    with pytest.raises(ConfigError, match="no such folder"):
        load_config(None, [f'model.name="{tmp_path / "absent"}"'])
    with pytest.raises(ConfigError, match=r"not in the local Hugging Face cache.*never"):
        model_folder("no-such-org/no-such-model-xyz")
    with pytest.raises(ConfigError, match="'gpt9' is not allowed: one of 'minilm-l6'"):
        load_config(None, ['model.name="gpt9"'])


def test_hub_id_found_in_the_local_cache(folders: dict[str, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached hub id resolves to its snapshot folder, offline."""
    import shutil

    snapshot = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(folders["llama"], snapshot)
    refs = tmp_path / "hub" / "models--acme--tiny-llama" / "refs"
    refs.mkdir()
    (refs / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert Path(model_folder("acme/tiny-llama")) == snapshot
    assert task_class(ModelConfig(name="acme/tiny-llama")) is CausalLM


def test_auto_target_modules_follow_the_architecture(folders: dict[str, Path]) -> None:
    def auto(name: str, num_labels: int = 2) -> list[str]:
        adapter = build_adapter_model(ModelConfig(name=name), num_labels)
        return sorted({key.split(".")[-3] for key in adapter.params if "lora_A" in key})

    assert auto("tiny-bert") == ["query", "value"]  # what the default was before "auto"
    assert auto(str(folders["llama"])) == ["q_proj", "v_proj"]
    assert auto(str(folders["gpt2"])) == ["c_attn"]
    assert auto(str(folders["bert"])) == ["query", "value"]


def test_architecture_without_default_targets_names_the_key() -> None:
    model = torch.nn.Linear(2, 2)
    model.config = type("Config", (), {"model_type": "my-own-net"})()  # type: ignore[assignment]
    with pytest.raises(ConfigError, match=r"model.target_modules = 'auto'.*'my-own-net'"):
        default_target_modules(model)
    cfg = ModelConfig(target_modules=["auto", "fc"])
    with pytest.raises(ConfigError, match=r"model.target_modules"):
        target_modules(cfg, model)


def test_dtype_of_the_base(folders: dict[str, Path]) -> None:
    adapter = build_adapter_model(ModelConfig(name=str(folders["llama"]), dtype="bfloat16"), 0)
    base = adapter.model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert base.base_layer.weight.dtype == torch.bfloat16


def test_classification_refuses_chat_data(folders: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="needs labelled data"):
        build_adapter_model(ModelConfig(name="tiny-bert"), 0)


# ---- the classification path is today's -------------------------------------------------------
def test_default_plain_loop_curve_is_unchanged() -> None:
    """tiny-bert through the plain loop gives the curve the code gave before tasks existed
    (measured on the commit before the task split, same settings)."""
    from fedpeft.server.inprocess import run_plain

    from tests.helpers import TINY

    rows = run_plain(None, [*TINY, 'train.precision="fp32"'])  # bf16 (auto) is a new path
    assert [r["accuracy"] for r in rows] == [0.64, 0.64, 0.64]
    assert [r["loss"] for r in rows] == pytest.approx(
        [0.6902404022216797, 0.6881192779541015, 0.6887162971496582], abs=1e-5)
    assert all("perplexity" not in r for r in rows)


# ---- data schemas --------------------------------------------------------------------------------
CHATS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
     "user": "a"},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}], "user": "b"},
]


def test_chat_schemas_load(tmp_path: Path) -> None:
    jsonl = tmp_path / "chats.jsonl"
    jsonl.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    data = load_user_file(DataConfig(dataset="file", path=str(jsonl)))
    assert data.chats == ((("user", "hi"), ("assistant", "hello")),
                          (("system", "be brief"), ("user", "2+2?"), ("assistant", "4")))
    assert data.label_names == ()
    alpaca = tmp_path / "alpaca.csv"
    pd.DataFrame({"instruction": ["Add", "Greet"], "input": ["2 and 2", None],
                  "output": ["4", "hello"]}).to_csv(alpaca, index=False)
    data = load_user_file(DataConfig(dataset="file", path=str(alpaca)))
    assert data.chats == ((("user", "Add\n\n2 and 2"), ("assistant", "4")),
                          (("user", "Greet"), ("assistant", "hello")))
    parquet = tmp_path / "pc.parquet"
    pd.DataFrame({"prompt": ["Q1", "Q2"], "completion": ["A1", "A2"]}).to_parquet(parquet)
    data = load_user_file(DataConfig(dataset="file", path=str(parquet)))
    assert data.chats == ((("user", "Q1"), ("assistant", "A1")),
                          (("user", "Q2"), ("assistant", "A2")))
    csv = tmp_path / "messages.csv"
    pd.DataFrame({"messages": [json.dumps(c["messages"]) for c in CHATS]}).to_csv(csv, index=False)
    assert load_user_file(DataConfig(dataset="file", path=str(csv))).chats == \
        load_user_file(DataConfig(dataset="file", path=str(jsonl))).chats


def test_datasets_folder_loads(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_dict({"prompt": ["Q"], "completion": ["A"]})}) \
        .save_to_disk(str(folder))
    data = load_user_file(DataConfig(dataset="file", path=str(folder)))
    assert data.chats == ((("user", "Q"), ("assistant", "A")),)


def test_unknown_schema_lists_the_accepted_ones(tmp_path: Path) -> None:
    path = tmp_path / "odd.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(ConfigError, match=r"accepted schemas: .*messages.*instruction \+ output"
                                          r".*prompt \+ completion.*columns found: question"):
        load_user_file(DataConfig(dataset="file", path=str(path)))
    path.write_text('{"messages": [{"role": "user", "content": "only a question"}]}\n')
    with pytest.raises(ConfigError, match="at least one assistant turn"):
        load_user_file(DataConfig(dataset="file", path=str(path)))


def test_natural_split_by_any_column(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "user": f"u{i % 7}"} for i in range(70)]
    path = tmp_path / "users.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(dataset="file", path=str(path), partitioner="natural", partition_by="user",
                     test_size=10)
    train, _ = load_task_data(cfg)
    parts = partition_indices(cfg, 3)
    owner: dict[str, int] = {}
    for client, part in enumerate(parts):
        for i in part:
            assert owner.setdefault(train.groups[i], client) == client  # users stay whole
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(train)))
    with pytest.raises(ConfigError, match="has no such column"):
        load_task_data(DataConfig(dataset="file", path=str(path), partitioner="natural",
                                  partition_by="country", test_size=10))
    with pytest.raises(ConfigError, match=r"needs data.partition_by"):
        load_config(None, ['data.dataset="file"', f'data.path="{path}"',
                           'data.partitioner="natural"'])
    with pytest.raises(ConfigError, match="splits by label, and this data has no labels"):
        partition_indices(DataConfig(dataset="file", path=str(path), partitioner="dirichlet",
                                     test_size=10), 3)


def test_chatterbot_by_topic() -> None:
    cfg = DataConfig(dataset="chatterbot", partitioner="natural", test_size=100)
    train, test = load_task_data(cfg)
    assert len(train) + len(test) > 1500
    assert all(chat[-1][0] == "assistant" and chat[0][0] == "user" for chat in train.chats)
    topics = set(train.groups)
    assert {"ai", "food", "sports"} <= topics
    parts = partition_indices(cfg, 10)
    owner: dict[str, int] = {}
    for client, part in enumerate(parts):
        for i in part:
            assert owner.setdefault(train.groups[i], client) == client  # topics stay whole
    assert set(owner) == topics


def test_report_panels_follow_the_task(tmp_path: Path) -> None:
    from fedpeft.server.reporting import plot_report

    chat = [{"round": r, "accuracy": None, "loss": 3.0 - r, "perplexity": 20.0 / (r + 1),
             "bytes_up": 10, "bytes_down": 20} for r in range(3)]
    assert plot_report(chat, tmp_path / "chat.png") == ["loss", "bytes"]
    labels = [{**row, "accuracy": 0.5 + 0.1 * row["round"]} for row in chat]
    assert plot_report(labels, tmp_path / "labels.png") == ["accuracy", "loss", "bytes"]
    assert plot_report([{"round": 0}], tmp_path / "bare.png") == ["accuracy", "bytes"]
    assert all((tmp_path / f).stat().st_size > 10_000 for f in ("chat.png", "labels.png"))


def test_progress_line_and_table_show_loss_and_perplexity_without_labels() -> None:
    from fedpeft.server.reporting import results_table, round_line

    chat = {"round": 2, "accuracy": None, "loss": 2.5, "perplexity": 12.18, "clients_ok": 5,
            "clients_sampled": 5, "wall_s": 3.0}
    assert "loss 2.500 ppl 12.18" in round_line(chat, 8) and "acc" not in round_line(chat, 8)
    labelled = {**chat, "accuracy": 0.8}
    assert "acc 0.800" in round_line(labelled, 8) and "ppl" not in round_line(labelled, 8)
    table = results_table([{**chat, "round": 0}, chat]).splitlines()
    assert "| perplexity |" in table[0] and "| 2.500 | 12.18 |" in table[2]
    assert table[0].count("|") == table[1].count("|") == table[2].count("|")
    assert "perplexity" not in results_table([labelled | {"perplexity": None}])
