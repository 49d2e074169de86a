"""``model.pooling = 'mean'``: a BERT-style classifier reads the mean of its last hidden states
over the real tokens instead of its pooler (tiny-bert); the mask reaches the pooler, padding
changes nothing, the process's base cache keeps the two poolings apart, and what cannot carry
mean pooling is refused."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedpeft.core.config import ConfigError, load_config
from fedpeft.core.models import CAUSAL_LM, MeanPooler, use_mean_pooling
from fedpeft.core.workspace import get_workspace
from fedpeft.run import export
from tests.helpers import TINY

MEAN = [*TINY, 'model.pooling="mean"']


def test_mean_pooler_is_the_mean_over_real_tokens_only() -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 4, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    pooler = MeanPooler()
    pooler.mask = mask
    out = pooler(hidden)
    assert torch.allclose(out[0], hidden[0].mean(0))
    assert torch.allclose(out[1], hidden[1, :2].mean(0))
    assert torch.allclose(out[2], hidden[2, 0])
    garbage = hidden.clone()
    garbage[mask == 0] = 1e6  # what padded positions hold does not matter
    assert torch.allclose(pooler(garbage), out)


def test_mean_pooling_gives_an_example_the_same_logits_alone_and_padded_in_a_batch() -> None:
    ws = get_workspace(load_config(None, MEAN))
    model = ws.adapter_model(8).model.eval()
    assert any(isinstance(m, MeanPooler) for m in model.modules())
    test = ws.test_set()
    lengths = np.array([len(x) for x in test.ids])
    short = int(np.argmin(lengths))
    others = np.argsort(lengths)[-7:]  # the longest examples: the short one gets padded
    alone = test.batch(np.array([short]))
    padded = test.batch(np.array([short, *others]))
    assert padded["input_ids"].shape[1] > alone["input_ids"].shape[1]
    with torch.no_grad():
        one = model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"]).logits
        many = model(input_ids=padded["input_ids"],
                     attention_mask=padded["attention_mask"]).logits
    assert torch.allclose(one[0], many[0], atol=1e-5)


def test_the_base_cache_keeps_the_two_poolings_apart() -> None:
    mean = get_workspace(load_config(None, MEAN)).adapter_model(8).model
    auto = get_workspace(load_config(None, TINY)).adapter_model(8).model
    assert any(isinstance(m, MeanPooler) for m in mean.modules())
    assert not any(isinstance(m, MeanPooler) for m in auto.modules())
    batch = get_workspace(load_config(None, TINY)).test_set().batch(np.arange(4))
    with torch.no_grad():
        a = auto.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        m = mean.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert not torch.allclose(a.logits, m.logits)


@pytest.mark.parametrize(("model", "task"), [
    (torch.nn.Linear(2, 2), "classification"),  # no encoder with a pooler
    (SimpleNamespace(base_model_prefix="bert", bert=SimpleNamespace(pooler=object())),
     CAUSAL_LM),
])
def test_models_without_a_pooler_are_refused(model: object, task: str) -> None:
    with pytest.raises(ConfigError, match=r"model\.pooling = 'mean' needs a BERT-style"):
        use_mean_pooling(model, task)  # type: ignore[arg-type]


def test_pooling_refuses_unknown_values() -> None:
    with pytest.raises(ConfigError, match=r"model\.pooling"):
        load_config(None, [*TINY, 'model.pooling="max"'])


def test_merged_export_of_a_mean_pooling_run_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: object) -> None:
    """A plain Hugging Face folder reloads with BERT's own pooler, so it would not score what
    the run scored: refused before anything is written."""
    cfg = load_config(None, MEAN)
    monkeypatch.setattr(export, "read_run", lambda _run: SimpleNamespace(cfg=cfg))
    monkeypatch.setattr(export, "_check_target", lambda _out: None)
    with pytest.raises(ConfigError, match=r"model\.pooling = 'mean' is not part of a plain"):
        export.export_merged(tmp_path, tmp_path)  # type: ignore[arg-type]
