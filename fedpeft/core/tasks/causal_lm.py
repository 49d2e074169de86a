"""Causal language modelling: instruction and chat tuning, and label tasks through a prompt.

Every example becomes token ids plus a target per token: a response token carries its own id
(the model learns to produce it), every prompt and padding token carries -100 (no loss). So
``model(**batch).loss`` is the mean cross-entropy over response tokens only.

* **Chats** (``TextData.chats``: instruction, prompt/completion and multi-turn data): the
  tokenizer's chat template renders the turns where it has one (``data.chat_template = 'auto'``);
  every assistant turn is a response. Without a template, or with ``data.chat_template =
  'plain'``, the documented plain template :data:`PLAIN_TEMPLATE` is used (logged once).
* **Label tasks** (labelled texts on a causal LM): the prompt ``data.prompt`` (e.g.
  ``Review: {text}\\nSentiment:``) followed by the class's verbaliser (e.g. `` positive``) as the
  response; no chat template. Accuracy compares the model's log-likelihood of each class's
  verbaliser after the prompt (exact, no sampling); verbalisers whose first tokens are the same
  are refused.

Truncation (``model.max_length``): the prompt is the tokens before the first response token, the
tail everything from there. An over-long example keeps the last tokens of its prompt (at least
half the budget, more when the tail is short) and the first tokens of its tail; such examples are
counted and logged.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedpeft.core.config import ConfigError
from fedpeft.core.data import Chat, TextData

from .base import EvalMetrics, Task

log = logging.getLogger(__name__)

IGNORE = -100  # the target of a token that carries no loss (Hugging Face's convention)
RT_PROMPT = "Review: {text}\nSentiment:"
RT_VERBALIZERS = (" negative", " positive")  # rotten, fresh
TWEETS_PROMPT = "Tweet: {text}\nSentiment:"  # verbalisers: " " + class name
FILE_PROMPT = "{text}\nLabel:"
DEFAULT_PROMPTS = {"rotten-tomatoes": RT_PROMPT, "tweets": TWEETS_PROMPT}  # else FILE_PROMPT
# The plain chat template (no chat template in the tokenizer, or data.chat_template = 'plain'):
# a system turn is its text and a blank line, a user turn "User: <text>\n", an assistant turn
# "Assistant:" (the prompt) then " <text><eos>\n" (the response).
PLAIN_TEMPLATE = {"system": "{content}\n\n", "user": "User: {content}\n",
                  "assistant_prompt": "Assistant:", "assistant": " {content}{eos}\n"}
EVAL_ROWS = 16  # rows per forward pass in evaluation: a full-vocabulary logit per token is large
SAMPLE_PROMPTS = 3  # fixed held-out prompts completed greedily at every evaluation
SAMPLE_TOKENS = 32

Segment = tuple[str, bool]  # (text, carries the loss)


@dataclass(frozen=True)
class LMEncoded:
    """Token ids and per-token targets (-100: no loss) per example, unpadded. A label task also
    keeps each example's class, its prompt ids and the verbalisers' ids (for accuracy)."""

    ids: tuple[tuple[int, ...], ...]
    targets: tuple[tuple[int, ...], ...]
    pad_id: int
    labels: np.ndarray
    prompts: tuple[tuple[int, ...], ...] = ()
    verbalizers: tuple[tuple[int, ...], ...] = ()
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self, indices: np.ndarray) -> np.ndarray:
        return np.fromiter((len(self.ids[i]) for i in indices), dtype=np.int64,
                           count=len(indices))

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """Right-padded inputs; ``labels`` are the targets (padding: -100)."""
        return collate([self.ids[i] for i in indices], [self.targets[i] for i in indices],
                       self.pad_id)


def collate(ids: list[tuple[int, ...]], targets: list[tuple[int, ...]],
            pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    labels = torch.full((len(ids), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for j, (row, target) in enumerate(zip(ids, targets, strict=True)):
        input_ids[j, : len(row)] = torch.tensor(row)
        labels[j, : len(row)] = torch.tensor(target)
        mask[j, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def truncate(ids: list[int], targets: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """The module docstring's rule: the prompt (before the first response token) keeps its last
    tokens, at least half of ``max_length`` or all the tail leaves; the tail keeps its first."""
    if len(ids) <= max_length:
        return ids, targets
    first = next((i for i, t in enumerate(targets) if t != IGNORE), len(ids))
    tail = len(ids) - first
    keep_prompt = min(first, max(max_length // 2, max_length - tail))
    keep_tail = max_length - keep_prompt
    start = first - keep_prompt
    return ids[start : first + keep_tail], targets[start : first + keep_tail]


class CausalLM(Task):
    """A causal LM without a head; the loss covers response tokens only."""

    name = "causal-lm"
    peft_task_type = "CAUSAL_LM"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.prefix: list[int] = list(tok("")["input_ids"])  # e.g. a BOS the tokenizer adds
        self.use_template = bool(getattr(tok, "chat_template", None)) and \
            self.data_cfg.chat_template == "auto"
        self._plain_said = False
        self.prompt = ""
        self.words: list[str] = []  # the verbalisers as text, per class
        self.verbalizers: tuple[tuple[int, ...], ...] = ()  # ... and as token ids
        if self.label_names:
            self.prompt, self.words, self.verbalizers = self._label_task()

    # ---- label tasks -------------------------------------------------------------------------
    def _label_task(self) -> tuple[str, list[str], tuple[tuple[int, ...], ...]]:
        """The prompt and each class's verbaliser ids; refuses colliding first tokens."""
        data = self.data_cfg
        rt = data.dataset == "rotten-tomatoes"
        prompt = data.prompt or DEFAULT_PROMPTS.get(data.dataset, FILE_PROMPT)
        if "{text}" not in prompt:
            raise ConfigError(f"data.prompt = {prompt!r} has no {{text}} placeholder")
        words = list(data.verbalizers) or (list(RT_VERBALIZERS) if rt
                                           else [f" {n}" for n in self.label_names])
        if len(words) != len(self.label_names):
            raise ConfigError(f"data.verbalizers has {len(words)} entries for "
                              f"{len(self.label_names)} classes {list(self.label_names)}")
        ids = [tuple(self.tokenizer(w, add_special_tokens=False)["input_ids"]) for w in words]
        firsts: dict[int, str] = {}
        for word, tokens in zip(words, ids, strict=True):
            if not tokens:
                raise ConfigError(f"data.verbalizers: {word!r} tokenises to nothing")
            if tokens[0] in firsts:
                raise ConfigError(f"data.verbalizers {firsts[tokens[0]]!r} and {word!r} start with "
                                  f"the same token ({tokens[0]}): their log-likelihoods could not "
                                  "tell the classes apart at the first token; choose verbalisers "
                                  "that differ in their first word")
            firsts[tokens[0]] = word
        return prompt, words, tuple(ids)

    # ---- rendering ---------------------------------------------------------------------------
    def segments(self, chat: Chat) -> list[Segment]:
        """The chat as text pieces, each trained on or not (assistant turns are)."""
        if self.use_template:
            return self._template_segments(chat)
        if not self._plain_said:
            log.warning("causal-lm: %s; using the plain template (User: ... / Assistant: ...)",
                        "data.chat_template = 'plain'" if self.data_cfg.chat_template == "plain"
                        else "the tokenizer has no chat template")
            self._plain_said = True
        eos = self.tokenizer.eos_token or ""
        out: list[Segment] = []
        for role, content in chat:
            if role == "assistant":
                out.append((PLAIN_TEMPLATE["assistant_prompt"], False))
                out.append((PLAIN_TEMPLATE["assistant"].format(content=content, eos=eos), True))
            else:
                out.append((PLAIN_TEMPLATE[role].format(content=content), False))
        return out

    def _render(self, turns: Chat, generation_prompt: bool) -> str:
        messages = [{"role": r, "content": c} for r, c in turns]
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def _template_segments(self, chat: Chat) -> list[Segment]:
        out: list[Segment] = []
        done = ""
        for i, (role, _) in enumerate(chat):
            if role != "assistant":
                continue
            prompt = self._render(chat[:i], True)
            full = self._render(chat[: i + 1], False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ConfigError("the tokenizer's chat template renders earlier turns "
                                  "differently once later ones follow, so responses cannot be "
                                  "masked turn by turn; set data.chat_template = 'plain'")
            out += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        return out

    def prompt_text(self, data: TextData, i: int) -> str:
        """Example ``i``'s prompt as text (up to its first response)."""
        if data.chats is None:
            return self.prompt.replace("{text}", data.texts[i])
        chat = data.chats[i]
        first = next(j for j, (r, _) in enumerate(chat) if r == "assistant")
        if self.use_template:
            return self._render(chat[:first], True)
        pieces = self.segments(chat[: first + 1])
        return "".join(text for text, _ in pieces[:-1])

    # ---- encoding ----------------------------------------------------------------------------
    def start(self, data: TextData) -> list[int]:
        """The tokens an example starts with: the tokenizer's own (e.g. BOS) for a plain prompt;
        none for a chat template, which writes its own."""
        return [] if data.chats is not None and self.use_template else list(self.prefix)

    def tokens(self, segments: list[Segment], start: list[int]) -> tuple[list[int], list[int]]:
        ids, targets = list(start), [IGNORE] * len(start)
        for text, trains in segments:
            piece = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            targets += list(piece) if trains else [IGNORE] * len(piece)
        return ids, targets

    def encode(self, data: TextData) -> LMEncoded:
        max_length = self.model_cfg.max_length
        rows, targets, prompts, cut = [], [], [], 0
        for i in range(len(data)):
            if data.chats is not None:
                segs = self.segments(data.chats[i])
            else:
                segs = [(self.prompt.replace("{text}", data.texts[i]), False),
                        (self.words[int(data.labels[i])], True)]
            ids, tgt = self.tokens(segs, self.start(data))
            if len(ids) > max_length:
                cut += 1
                ids, tgt = truncate(ids, tgt, max_length)
            rows.append(tuple(ids))
            targets.append(tuple(tgt))
            if data.chats is None:
                first = next(j for j, t in enumerate(tgt) if t != IGNORE)
                prompts.append(tuple(ids[:first]))
        if cut:
            log.warning("causal-lm: %d of %d examples exceed model.max_length = %d tokens: the "
                        "prompt keeps its end, the response its start", cut, len(data),
                        max_length)
        return LMEncoded(tuple(rows), tuple(targets), self.pad_id, data.labels, tuple(prompts),
                         self.verbalizers if data.chats is None else (), cut)

    def relabel(self, data: LMEncoded, labels: np.ndarray) -> LMEncoded:
        """A label task's examples answered with another class's verbaliser: each example's
        (already truncated) prompt followed by the verbaliser of its new label, the loss on the
        verbaliser. Chats have no classes: refused."""
        if not data.verbalizers:
            raise ValueError("model.task = 'causal-lm' on chat or instruction data: there are no "
                             "classes to relabel (label-flip needs a label task)")
        rows, targets = [], []
        for prompt, label in zip(data.prompts, np.asarray(labels), strict=True):
            answer = data.verbalizers[int(label)]
            ids, tgt = truncate([*prompt, *answer], [IGNORE] * len(prompt) + list(answer),
                                self.model_cfg.max_length)
            rows.append(tuple(ids))
            targets.append(tuple(tgt))
        return dataclasses.replace(data, ids=tuple(rows), targets=tuple(targets),
                                   labels=np.asarray(labels))

    # ---- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, data: LMEncoded, batch_size: int,
                 device: torch.device) -> EvalMetrics:
        """Mean cross-entropy per response token and its perplexity; for a label task also
        the accuracy of the most likely verbaliser."""
        model.eval()
        rows = max(1, min(batch_size, EVAL_ROWS))
        order = np.argsort([len(x) for x in data.ids], kind="stable")
        # One-token verbalisers: the class scores come from the same forward pass as the loss
        # (the logits where the gold verbaliser is predicted); longer ones need their own.
        single = bool(data.verbalizers) and all(len(v) == 1 for v in data.verbalizers)
        firsts = torch.tensor([v[0] for v in data.verbalizers], dtype=torch.long)
        predicted = np.zeros(len(data), dtype=np.int64)
        loss_sum, tokens = 0.0, 0
        for start in range(0, len(order), rows):
            chosen = order[start : start + rows]
            batch = {k: v.to(device) for k, v in data.batch(chosen).items()}
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            total, count = token_loss(logits, batch["labels"])
            loss_sum, tokens = loss_sum + total, tokens + count
            if single:
                at = torch.tensor([len(data.prompts[i]) - 1 for i in chosen], device=device)
                scores = logits[torch.arange(len(chosen), device=device), at][:, firsts.to(device)]
                predicted[chosen] = scores.argmax(-1).cpu().numpy()
        loss = loss_sum / max(tokens, 1)
        extra = {"perplexity": math.exp(min(loss, 50.0)), "eval_tokens": float(tokens)}
        accuracy = None
        if data.verbalizers:
            if not single:
                predicted = self.predict(model, data, rows, device)
            accuracy = float(np.mean(predicted == data.labels))
        return EvalMetrics(accuracy, loss, len(data), extra)

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, data: LMEncoded, rows: int,
                device: torch.device) -> np.ndarray:
        """The class whose verbaliser is most likely after each prompt (summed log-probs)."""
        scores = np.zeros((len(data), len(data.verbalizers)))
        for c, verbalizer in enumerate(data.verbalizers):
            seqs = [p + verbalizer for p in data.prompts]
            tgts = [(IGNORE,) * len(p) + verbalizer for p in data.prompts]
            for start in range(0, len(seqs), rows):
                batch = {k: v.to(device) for k, v in
                         collate(seqs[start : start + rows], tgts[start : start + rows],
                                 data.pad_id).items()}
                logits = model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
                scores[start : start + rows, c] = -token_loss(logits, batch["labels"],
                                                              per_row=True)[0]
        return scores.argmax(axis=1)

    @torch.no_grad()
    def samples(self, model: torch.nn.Module, data: TextData,
                device: torch.device) -> list[tuple[str, str]]:
        """Greedy completions of the first held-out prompts (the same every round), generated
        together (left-padded)."""
        model.eval()
        prompts = [self.prompt_text(data, i) for i in range(min(SAMPLE_PROMPTS, len(data)))]
        if not prompts:
            return []
        rows = [(self.start(data) + self.tokenizer(p, add_special_tokens=False)["input_ids"])
                [-self.model_cfg.max_length:] for p in prompts]
        width = max(len(r) for r in rows)
        inputs = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, row in enumerate(rows):
            inputs[j, width - len(row):] = torch.tensor(row)
            mask[j, width - len(row):] = 1
        generated = model.generate(input_ids=inputs.to(device), attention_mask=mask.to(device),
                                   max_new_tokens=SAMPLE_TOKENS, do_sample=False,
                                   pad_token_id=self.pad_id)
        return [(prompt, self.tokenizer.decode(generated[j, width:], skip_special_tokens=True))
                for j, prompt in enumerate(prompts)]


def token_loss(logits: torch.Tensor, labels: torch.Tensor,
               per_row: bool = False) -> tuple[Any, int]:
    """Summed cross-entropy of the target tokens (next-token prediction) and their count; with
    ``per_row`` the sums per row as an array."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets,
                                               ignore_index=IGNORE, reduction="none")
    count = int((targets != IGNORE).sum())
    if per_row:
        return losses.detach().sum(dim=1).cpu().numpy(), count
    return float(losses.detach().sum()), count
