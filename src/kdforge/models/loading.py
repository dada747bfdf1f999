"""Loading Hugging Face model directories with kdforge's options (``audio_ctx`` for Whisper).

Whisper's encoder is built for 30 s windows (1500 positions after the stride-2 convolution).
``audio_ctx = N`` keeps the first N positions (N * 20 ms of audio): the position table is sliced,
``max_source_positions`` set to N, and the feature extractor pads or trims to 2 N mel frames, so
short utterances cost a fraction of the full window. The result saves and reloads as a plain
Whisper directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from kdforge.errors import KdforgeError


def apply_audio_ctx(model: WhisperForConditionalGeneration, processor: WhisperProcessor | None, audio_ctx: int) -> None:
    """Shrink ``model`` (in place) and ``processor`` to ``audio_ctx`` encoder positions."""
    encoder = model.get_encoder()
    available = encoder.embed_positions.num_embeddings
    if not 1 <= audio_ctx <= available:
        raise KdforgeError(f"audio_ctx must lie in 1..{available} for this model, got {audio_ctx}")
    if audio_ctx != available:
        kept = encoder.embed_positions.weight.detach()[:audio_ctx].clone()
        encoder.embed_positions = torch.nn.Embedding.from_pretrained(kept, freeze=True)
    encoder.max_source_positions = audio_ctx
    model.config.max_source_positions = audio_ctx
    if processor is not None:
        extractor = processor.feature_extractor
        frames = 2 * audio_ctx  # the encoder's two convolutions halve the mel frame rate once
        extractor.nb_max_frames = frames
        extractor.n_samples = frames * extractor.hop_length
        # Saved and reloaded, the extractor recomputes n_samples from chunk_length: keep it an int
        # where it can be (audio_ctx a multiple of 50), since numpy refuses float padding.
        seconds, rest = divmod(extractor.n_samples, extractor.sampling_rate)
        extractor.chunk_length = seconds if rest == 0 else extractor.n_samples / extractor.sampling_rate


def load_whisper(model_dir: str | Path, audio_ctx: int | None = None,
                 dtype: torch.dtype = torch.float32) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """Load a Whisper model directory and its processor, optionally cut to ``audio_ctx`` positions.

    Raises:
        KdforgeError: the directory is missing or holds no loadable Whisper model.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise KdforgeError(f"{model_dir} is not a model directory (no config.json)")
    model = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)
    processor = WhisperProcessor.from_pretrained(model_dir)
    # A model saved with a shorter window carries it in its config; the extractor is made to match.
    apply_audio_ctx(model, processor, audio_ctx or model.config.max_source_positions)
    model.eval()
    return model, processor


def model_type_of(model_dir: str | Path) -> str:
    """The ``model_type`` in ``model_dir/config.json`` (e.g. "whisper", "wav2vec2-bert", "llama").

    Raises:
        KdforgeError: the directory holds no ``config.json``.
    """
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise KdforgeError(f"{model_dir} is not a model directory (no config.json)")
    return json.loads(config_path.read_text(encoding="utf-8")).get("model_type", "")


def decoder_prompt_length(tokenizer) -> int:
    """Tokens before the text in a Whisper target: 2 for English-only models (start, no-timestamps),
    4 for multilingual ones (start, language, task, no-timestamps), as the tokenizer itself adds them."""
    return len(tokenizer("").input_ids) - 1  # minus the end token
