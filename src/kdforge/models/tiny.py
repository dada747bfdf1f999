"""Tiny causal LMs built from configs, with a byte-level BPE tokenizer trained on built-in text.

Tests, examples and the tiny-model benchmark need teachers and students that train in minutes on a
CPU: a ~5M-parameter teacher and a ~1M-parameter student (Llama architecture, tied embeddings)
sharing one tokenizer trained here (digits split one by one, so arithmetic stays learnable).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS, PAD = "<|endoftext|>", "<|pad|>"
TinySize = Literal["teacher", "student"]
SIZES: dict[str, dict] = {
    "teacher": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=688),
    "student": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=344),
}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of ``vocab_size`` ids trained on ``texts``; eos and pad are special."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD)


def tiny_config(size: TinySize, vocab_size: int, max_length: int = 512) -> LlamaConfig:
    """The Llama config of the tiny teacher or student."""
    return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=max_length, tie_word_embeddings=True,
                       num_key_value_heads=SIZES[size]["num_attention_heads"], **SIZES[size])


def build_tiny_lm(out_dir: str | Path, size: TinySize, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Path:
    """Save a randomly initialised tiny causal LM with ``tokenizer`` as a Hugging Face directory."""
    torch.manual_seed(seed)
    config = tiny_config(size, len(tokenizer))
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = None
    model = LlamaForCausalLM(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
