"""Recognizers: anything that turns a batch of 16 kHz audio into text.

The evaluator only needs :class:`Recognizer` (``transcribe(batch) -> texts``), so CTC students and
ensembles can be scored the same way once they exist. :class:`WhisperRecognizer` runs batched greedy
decoding with the KV cache through ``model.generate``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from kdforge.errors import KdforgeError
from kdforge.models.loading import (SAFE_LOADING, decoder_prompt_length, encoder_window, load_preprocessor, load_whisper,
                                    model_type_of, uses_dynamic_window, window_positions)

# Token budget of one utterance: 8 tokens per second of its audio (as much as the window holds) plus
# 8. English speech runs at about 3 words/s and Whisper's BPE uses about 1.3 tokens a word, so the
# budget never cuts a real transcript; it stops a decoder stuck in a repetition loop after a length
# proportional to the audio (a loop would otherwise run to 448 tokens and dominate the WER). Each
# row is cut to its own budget, so every batch size gives the same transcripts.
TOKENS_PER_SECOND = 8
EXTRA_TOKENS = 8


class Recognizer(Protocol):
    """Speech to text, a batch at a time."""

    sampling_rate: int

    def transcribe(self, batch: list[np.ndarray]) -> list[str]:
        """``batch``: utterances, each ``(samples,)`` float32 mono at ``sampling_rate``; one text each."""
        ...


class WhisperRecognizer:
    """Greedy Whisper decoding (``num_beams=1``, no sampling, KV cache) of a batch.

    The processor pads or trims every utterance to the model's window (30 s, or ``audio_ctx`` x
    20 ms after :func:`kdforge.models.loading.apply_audio_ctx`), so a batch needs no attention mask;
    a model trained with ``audio.dynamic_window`` reads only as much of it as the batch's longest
    utterance needs.
    Multilingual checkpoints are told the language and task ("en", "transcribe") instead of
    detecting the language. ``no_repeat_ngram_size`` > 0 forbids any token n-gram of that size
    twice in a transcript: a guard against decoding loops ("of his name of his name ..."), which
    plain greedy decoding (0, the default: the checkpoint's generation config decides) lets run to
    the token budget.
    """

    def __init__(self, model: WhisperForConditionalGeneration, processor: WhisperProcessor, language: str = "en",
                 no_repeat_ngram_size: int = 0):
        self.model = model
        self.processor = processor
        self.extractor = processor.feature_extractor
        self.sampling_rate = self.extractor.sampling_rate
        generation = model.generation_config
        languages = getattr(generation, "lang_to_id", {})
        multilingual = getattr(generation, "is_multilingual", False) and f"<|{language}|>" in languages
        self.prompt_options = {"language": language, "task": "transcribe"} if multilingual else {}
        self.prompt_tokens = decoder_prompt_length(processor.tokenizer)
        # a private copy: greedy with the KV cache
        self.generation_config = copy.deepcopy(generation)
        self.generation_config.update(do_sample=False, num_beams=1, use_cache=True)
        if no_repeat_ngram_size:  # otherwise the checkpoint's own generation setting stands
            self.generation_config.no_repeat_ngram_size = no_repeat_ngram_size

    @property
    def window_seconds(self) -> float:
        """Audio the encoder sees; longer utterances are cut to it."""
        return self.extractor.n_samples / self.sampling_rate

    def token_budget(self, samples: int) -> int:
        """New tokens allowed for an utterance of ``samples`` samples (see :data:`TOKENS_PER_SECOND`)."""
        seconds = min(samples / self.sampling_rate, self.window_seconds)
        budget = math.ceil(TOKENS_PER_SECOND * seconds) + EXTRA_TOKENS
        return min(budget, self.model.config.max_target_positions - self.prompt_tokens)

    def token_ids(self, batch: list[np.ndarray]) -> list[list[int]]:
        """Greedy token ids of each utterance, prompt included, cut to its own :meth:`token_budget`."""
        budgets = [self.token_budget(len(audio)) for audio in batch]
        # max_length rather than max_new_tokens: the latter clashes with the checkpoint's max_length
        # and warns on every batch
        config = copy.copy(self.generation_config)
        config.max_length = self.prompt_tokens + max(budgets)
        features = self.extractor(batch, sampling_rate=self.sampling_rate, return_tensors="pt").input_features
        positions = features.shape[-1] // 2
        if uses_dynamic_window(self.model):
            positions = window_positions([-(-len(a) // self.extractor.hop_length) for a in batch], positions)
        with torch.inference_mode(), encoder_window(self.model, positions):
            rows = self.model.generate(features[..., : 2 * positions].to(self.model.device, self.model.dtype),
                                       generation_config=config,
                                       **self.prompt_options)
        return [row[:self.prompt_tokens + budget].tolist() for row, budget in zip(rows, budgets, strict=True)]

    def transcribe(self, batch: list[np.ndarray]) -> list[str]:
        """Texts of ``batch`` (each ``(samples,)`` float32 at 16 kHz), special tokens removed."""
        texts = self.processor.batch_decode(self.token_ids(batch), skip_special_tokens=True)
        return [text.strip() for text in texts]


class CTCRecognizer:
    """Greedy (best-path) decoding of a CTC model over characters (:mod:`kdforge.models.ctc`)."""

    def __init__(self, model, tokenizer, extractor):
        self.model = model
        self.tokenizer = tokenizer
        self.extractor = extractor
        self.sampling_rate = extractor.sampling_rate
        from kdforge.models.ctc import frame_stack_of

        self.frame_stack = frame_stack_of(model)

    def transcribe(self, batch: list[np.ndarray]) -> list[str]:
        """Texts of ``batch`` (each ``(samples,)`` float32 at 16 kHz)."""
        from kdforge.models.ctc import greedy_ctc, stacked_log_mel

        features, mask = stacked_log_mel(self.extractor, batch, self.frame_stack)
        with torch.inference_mode():
            logits = self.model(input_features=features.to(self.model.device),
                                attention_mask=mask.long().to(self.model.device)).logits.cpu()
        return greedy_ctc(logits, mask, self.tokenizer)


def load_recognizer(model_dir: str | Path, audio_ctx: int | None = None, no_repeat_ngram_size: int = 0) -> Recognizer:
    """The recognizer for a Hugging Face model directory: Whisper (``no_repeat_ngram_size``: see
    :class:`WhisperRecognizer`), or a kdforge CTC model.

    Raises:
        KdforgeError: no ``config.json``, or a model type kdforge cannot decode.
    """
    model_type = model_type_of(model_dir)
    if model_type == "wav2vec2-bert":
        from transformers import Wav2Vec2BertForCTC, Wav2Vec2CTCTokenizer, WhisperFeatureExtractor

        model = Wav2Vec2BertForCTC.from_pretrained(model_dir, **SAFE_LOADING).eval()
        return CTCRecognizer(model, load_preprocessor(Wav2Vec2CTCTokenizer, model_dir),
                             load_preprocessor(WhisperFeatureExtractor, model_dir))
    if model_type != "whisper":
        raise KdforgeError(f"{model_dir} holds a {model_type!r} model; `kdforge eval` decodes Whisper and "
                           "kdforge's CTC models")
    model, processor = load_whisper(model_dir, audio_ctx=audio_ctx)
    return WhisperRecognizer(model, processor, no_repeat_ngram_size=no_repeat_ngram_size)
