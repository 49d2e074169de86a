"""Issue 14's export criterion: after a short federated run on tiny random models saved to a
folder, ``adapter/`` reloaded with plain peft and the merged export (``fedpeft export RUN
--merged OUT``) reloaded with plain transformers score the held-out loss of the server's last
evaluation (to 1e-4). fedpeft builds the held-out examples only; the models are loaded, run and
scored here with transformers, peft and torch alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fedpeft.cli import main
from fedpeft.core.config import load_config
from fedpeft.core.workspace import get_workspace
from tests.helpers import tiny_run
from tests.tiny_models import write_tiny_run_files

IGNORE = -100


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    """One torch thread for these tiny models: on a shared 2-core machine, two threads of
    matrices this small spend their time waiting for each other (a run takes 3x longer)."""
    import fedpeft.server.inprocess

    import fedpeft.run.export

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        for module in (fedpeft.server.inprocess, fedpeft.run.export):
            patch.setattr(module, "default_threads", lambda: 1)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny model folders and data files."""
    root = tmp_path_factory.mktemp("export")
    return write_tiny_run_files(root)


RUNS = {  # name: (model, data, method, extra overrides)
    "llama-fedit": ("llama", "chats", "fedit", ()),
    "bert-fedit": ("bert", "labels", "fedit", ('model.task="classification"',)),
    # adapter/ lossy (rank 2 of a rank-8 update): the merged export comes from checkpoint/
    "llama-flora": ("llama", "chats", "flora", ("model.rank=2", "train.lr=0.05")),
}


@pytest.fixture(scope="module")
def runs(root: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One finished 2-round run (4 clients, 2 per round) per entry of RUNS, through the
    in-process round loop (the server code of every transport)."""
    from fedpeft.server.inprocess import run_plain

    out = {}
    for name, (model, data, method, extra) in RUNS.items():
        folder = tmp_path_factory.mktemp(name)
        # float32: these runs check that exports score exactly what the server scored, and
        # plain peft / transformers score in float32 (bfloat16 moves a loss by ~1e-4)
        run_plain(None, tiny_run(root[model], root[data], f'method.name="{method}"',
                                 "train.lr=0.01", 'train.precision="fp32"', *extra),
                  out=folder)
        out[name] = folder
    return out


def server_loss(run: Path) -> float:
    """The loss of the server's last evaluation (the last round: the whole held-out split)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r.get("loss") is not None][-1]
    assert last["round"] == 2 and last["eval_examples"] == 20  # data.test_size = 20: all of it
    return float(last["loss"])


def held_out(run: Path) -> object:
    """The run's held-out examples, encoded (token ids, targets / labels) as the server's
    final evaluation saw them (``eval_subset``: the final round uses the whole split)."""
    return get_workspace(load_config(run / "config.toml")).test_set(0)


@torch.no_grad()
def lm_loss(model: torch.nn.Module, data: object) -> float:
    """Mean next-token cross-entropy over every target token (-100: none), one example at a
    time: the task's definition, computed here without fedpeft."""
    model.eval()
    total, count = 0.0, 0
    for ids, targets in zip(data.ids, data.targets, strict=True):  # type: ignore[attr-defined]
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        target = torch.tensor(targets[1:])
        total += float(torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE,
                                                         reduction="sum"))
        count += int((target != IGNORE).sum())
    return total / count


@torch.no_grad()
def cls_loss(model: torch.nn.Module, data: object) -> float:
    """Mean cross-entropy of the label over the examples, one at a time."""
    model.eval()
    losses = [float(torch.nn.functional.cross_entropy(
        model(input_ids=torch.tensor([ids])).logits.float(), torch.tensor([int(label)])))
        for ids, label in zip(data.ids, data.labels, strict=True)]  # type: ignore[attr-defined]
    return float(np.mean(losses))


def plain_base(root: dict[str, Path], model: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if model == "llama":
        return AutoModelForCausalLM.from_pretrained(root["llama"])
    return AutoModelForSequenceClassification.from_pretrained(root["bert"], num_labels=2)


def export(run: Path, out: Path) -> None:
    assert main(["export", str(run), "--merged", str(out)]) == 0


@pytest.mark.parametrize("name", ["llama-fedit", "bert-fedit"])
def test_adapter_and_merged_export_score_the_servers_last_loss(
        root: dict[str, Path], runs: dict[str, Path], tmp_path: Path, name: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model, run = RUNS[name][0], runs[name]
    score = lm_loss if model == "llama" else cls_loss
    data, expected = held_out(run), server_loss(run)
    assert json.loads((run / "summary.json").read_text())["adapter_exact"] is True
    # (a) the adapter with plain peft
    with_adapter = PeftModel.from_pretrained(plain_base(root, model), str(run / "adapter"))
    assert score(with_adapter, data) == pytest.approx(expected, abs=1e-4)
    # (b) the merged export with plain transformers
    export(run, tmp_path / "merged")
    auto = AutoModelForCausalLM if model == "llama" else AutoModelForSequenceClassification
    merged = auto.from_pretrained(tmp_path / "merged")
    assert score(merged, data) == pytest.approx(expected, abs=1e-4)
    # ... which is one plain folder: no LoRA left, weights trained away from the base
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert "adapter_config.json" not in files
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert score(plain_base(root, model), data) != pytest.approx(expected, abs=1e-4)
    if model == "bert":  # the trained head, and the run's class names
        assert merged.config.id2label == {0: "neg", 1: "pos"}


def test_lossy_adapter_is_merged_from_the_checkpoint(root: dict[str, Path],
                                                     runs: dict[str, Path],
                                                     tmp_path: Path) -> None:
    """FLoRA's adapter/ is a truncated SVD of its dense update (plain peft scores it off the
    server's loss); the merged export is the exact global model the server scored, built from
    checkpoint/."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = runs["llama-flora"]
    data, expected = held_out(run), server_loss(run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["adapter_exact"] is False and "truncated SVD" in summary["adapter_note"]
    with_adapter = PeftModel.from_pretrained(plain_base(root, "llama"), str(run / "adapter"))
    assert abs(lm_loss(with_adapter, data) - expected) > 1e-3  # merging adapter/ would not do
    export(run, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert lm_loss(merged, data) == pytest.approx(expected, abs=1e-4)
    # without the checkpoint, it refuses (the adapter alone is not the global model)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoint"))
    assert main(["export", str(copy), "--merged", str(tmp_path / "m2")]) == 2
    assert not (tmp_path / "m2").exists()


def test_dtype_is_the_runs_model_dtype(runs: dict[str, Path], tmp_path: Path) -> None:
    """A run in bfloat16 exports bfloat16 weights (here: the float32 run's folder told so)."""
    run = tmp_path / "run"
    shutil.copytree(runs["llama-fedit"], run)
    config = (run / "config.toml").read_text()
    assert 'dtype = "float32"' in config
    (run / "config.toml").write_text(config.replace('dtype = "float32"', 'dtype = "bfloat16"'))
    export(run, tmp_path / "merged")
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), framework="pt") as fh:
        dtypes = {fh.get_tensor(k).dtype for k in fh.keys()}  # noqa: SIM118 (not a dict)
    assert dtypes == {torch.bfloat16}
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").dtype == torch.bfloat16


def test_refusals(runs: dict[str, Path], tmp_path: Path,
                  capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["llama-fedit"], run, ignore=shutil.ignore_patterns("checkpoint"))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("mine")
    cases = [
        (tmp_path / "nothing", tmp_path / "o1", "no such run folder"),
        (taken, tmp_path / "o2", "no config.toml"),
        (run, taken, "not an empty folder"),
    ]
    for source, target, message in cases:
        assert main(["export", str(source), "--merged", str(target)]) == 2
        assert message in capsys.readouterr().err
    assert (taken / "x").read_text() == "mine"
    summary = json.loads((run / "summary.json").read_text())
    del summary["adapter_exact"]
    (run / "summary.json").write_text(json.dumps(summary))
    assert main(["export", str(run), "--merged", str(tmp_path / "o3")]) == 2
    assert "adapter_exact" in capsys.readouterr().err
    shutil.rmtree(run / "adapter")
    assert main(["export", str(run), "--merged", str(tmp_path / "o4")]) == 2
    err = capsys.readouterr().err
    assert "adapter is missing" in err and "finish the run" in err
    assert not any(p.name.startswith(("o1", "o2", "o3", "o4", ".o")) for p in tmp_path.iterdir())
