"""Tiny models built from configs: causal LMs with a BPE tokenizer trained on built-in text, and Whisper.

Tests, examples and the tiny-model benchmark need teachers and students that train in minutes on a
CPU: a ~5M-parameter teacher and a ~1M-parameter student (Llama architecture, tied embeddings)
sharing one tokenizer trained here (digits split one by one, so arithmetic stays learnable), and
random Whisper models of a few hundred thousand parameters with the real tiny.en tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, WhisperConfig,
                          WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer)

from kdforge.models.registry import get_checkpoint

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


def build_tiny_whisper(out_dir: str | Path, d_model: int = 8, encoder_layers: int = 1, decoder_layers: int = 1,
                       ffn_dim: int = 16, window_seconds: int = 2, seed: int = 0) -> Path:
    """Save a random English-only Whisper with the real tiny.en tokenizer and a ``window_seconds`` window.

    Raises:
        KdforgeError: whisper-tiny.en's package (which carries the tokenizer) is not installed.
    """
    _, assets = get_checkpoint("whisper-tiny.en").source_paths()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_bytes((assets / "tokenizer.json").read_bytes())
    tokenizer = WhisperTokenizer.from_pretrained(out_dir)
    eot, sot, no_timestamps = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|startoftranscript|>",
                                                               "<|notimestamps|>"])
    torch.manual_seed(seed)
    config = WhisperConfig(vocab_size=len(tokenizer), num_mel_bins=80, d_model=d_model, encoder_layers=encoder_layers,
                           decoder_layers=decoder_layers, encoder_attention_heads=2, decoder_attention_heads=2,
                           encoder_ffn_dim=ffn_dim, decoder_ffn_dim=ffn_dim, max_source_positions=50 * window_seconds,
                           max_target_positions=64, decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot,
                           bos_token_id=eot)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot,
                                               bos_token_id=eot, no_timestamps_token_id=no_timestamps,
                                               is_multilingual=False, max_length=64)
    model.save_pretrained(out_dir)
    extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=window_seconds)
    WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir
