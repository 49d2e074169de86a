"""Tiny random models saved as Hugging Face folders (built in memory, nothing downloaded): a
Llama-style and a GPT-2-style causal LM and a BERT encoder, with a small byte-level BPE
tokenizer trained on the spot (the Llama one has a ChatML chat template, the GPT-2 one none)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Review: a good film with a great cast\nSentiment: positive",
    "Review: a bad dull movie\nSentiment: negative",
    "User: hello there, how are you?\nAssistant: I am fine, thank you.",
    "What is AI? Artificial intelligence is the science of making machines think.",
    "the quick brown fox jumps over the lazy dog; positive negative neutral",
] * 20


def tiny_tokenizer(chat_template: bool) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = CHATML
    return fast


def save_tiny_llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(chat_template=True)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def save_tiny_gpt2(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer(chat_template=False)
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=512,
                        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def save_tiny_bert(folder: Path) -> Path:
    """A 2-layer BERT encoder (no head) with the MiniLM tokenizer."""
    from transformers import BertConfig, BertModel

    from fedpeft.core.models import load_tokenizer

    tok = load_tokenizer("minilm-l6")
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def write_tiny_run_files(root: Path) -> dict[str, Path]:
    """A tiny Llama and a tiny BERT folder, labelled texts and chats (JSONL) under ``root``."""
    words = {"pos": "good great fine", "neg": "bad dull awful"}
    labelled = [{"text": f"this film is {words[lab]} {i}", "label": lab}
                for i, lab in enumerate(["neg", "pos"] * 40)]
    chats = [{"messages": [{"role": "user", "content": f"What is {i} plus one?"},
                           {"role": "assistant", "content": f"It is {i + 1}."}]}
             for i in range(80)]
    paths = {"llama": save_tiny_llama(root / "llama"), "bert": save_tiny_bert(root / "bert"),
             "labels": root / "labels.jsonl", "chats": root / "chats.jsonl"}
    for key, rows in (("labels", labelled), ("chats", chats)):
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths
