"""Loading Hugging Face model directories with kdforge's options (``audio_ctx`` for Whisper).

Whisper's encoder is built for 30 s windows (1500 positions after the stride-2 convolution).
``audio_ctx = N`` keeps the first N positions (N * 20 ms of audio): the position table is sliced,
``max_source_positions`` set to N, and the feature extractor pads or trims to 2 N mel frames, so
short utterances cost a fraction of the full window. The result saves and reloads as a plain
Whisper directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
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


#: A dynamic window (``audio.dynamic_window``) grows in steps of this many positions (1 s), so a run
#: meets only a few distinct shapes.
WINDOW_STEP = 50


def window_positions(frames: Sequence[int], full: int) -> int:
    """Encoder positions a batch needs: its longest utterance's ``frames`` (mel frames, two per
    position) rounded up to :data:`WINDOW_STEP`, at most the model's ``full`` window."""
    needed = -(-int(max(frames)) // 2)
    return min(full, -(-needed // WINDOW_STEP) * WINDOW_STEP)


@contextmanager
def encoder_window(model: WhisperForConditionalGeneration, positions: int) -> Iterator[None]:
    """Inside the block, Whisper's encoder takes ``2 * positions`` mel frames: the first
    ``positions`` rows of its position table, as if :func:`apply_audio_ctx` had cut it (which a
    model trained with a dynamic window has learned to read). Restored on exit.

    The encoder reads its table through ``arange(num_embeddings)``: lowering that count reads the
    first rows of the table itself, whose weight may be sharded (FSDP) and only gathered during the
    forward, so no copy of it is taken here.
    """
    encoder = model.get_encoder()
    table, full = encoder.embed_positions, encoder.config.max_source_positions
    rows = table.num_embeddings
    if positions < full:
        table.num_embeddings = positions
        encoder.config.max_source_positions = positions  # transformers checks the input length against it
    try:
        yield
    finally:
        table.num_embeddings, encoder.config.max_source_positions = rows, full


def uses_dynamic_window(model: WhisperForConditionalGeneration) -> bool:
    """Whether the model was trained with ``audio.dynamic_window`` (kept in its saved config)."""
    return bool(getattr(model.config, "kdforge_dynamic_window", False))


def load_whisper(model_dir: str | Path, audio_ctx: int | None = None,
                 dtype: torch.dtype = torch.float32) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """Load a Whisper model directory and its processor, optionally cut to ``audio_ctx`` positions.

    Raises:
        KdforgeError: the directory is missing or holds no loadable Whisper model.
    """
    model_dir = Path(model_dir)
    model_type_of(model_dir)
    model = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, **SAFE_LOADING)
    processor = load_preprocessor(WhisperProcessor, model_dir)
    # A model saved with a shorter window carries it in its config; the extractor is made to match.
    apply_audio_ctx(model, processor, audio_ctx or model.config.max_source_positions)
    model.eval()
    return model, processor


def load_preprocessor(loader, model_dir: str | Path):
    """``loader.from_pretrained(model_dir)`` for a tokenizer, processor or feature extractor.

    Raises:
        KdforgeError: the folder lacks (or holds damaged) files of it; transformers' own error,
            several lines of advice about the Hub, is cut to its first line.
    """
    try:
        return loader.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise KdforgeError(f"cannot load the {loader.__name__} of {model_dir}: {reason}") from None


#: How kdforge loads every model folder: weights from safetensors only (a ``.bin`` file is a
#: pickle, which can run code), and never code shipped inside the folder.
SAFE_LOADING = {"use_safetensors": True, "trust_remote_code": False}


def model_type_of(model_dir: str | Path) -> str:
    """The ``model_type`` in ``model_dir/config.json`` (e.g. "whisper", "wav2vec2-bert", "llama"),
    after checking the folder is one kdforge loads (every model loader calls this first).

    Raises:
        KdforgeError: no ``config.json``, one that is not a JSON object naming the model type, no
            safetensors weights or one whose header cannot be read (a cut-off download or copy), or
            a model that needs its own code (``auto_map``).
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise KdforgeError(f"{model_dir} is not a model directory (no config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KdforgeError(f"cannot read {config_path}: {error}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise KdforgeError(f"{config_path} names no model_type: it is not the config of a Hugging Face model")
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise KdforgeError(f"{model_dir} holds no *.safetensors weights; kdforge never loads pickled (.bin) weights")
    for path in weights:
        try:
            with safe_open(path, framework="pt"):  # parses only the header, which must cover the file to its end
                pass
        except SafetensorError as error:
            raise KdforgeError(f"cannot read {path}: {error}") from None
    if "auto_map" in config:
        raise KdforgeError(f"{model_dir} needs code shipped with the model (auto_map in config.json); kdforge never "
                           "runs it")
    return config["model_type"]


def decoder_prompt_length(tokenizer) -> int:
    """Tokens before the text in a Whisper target: 2 for English-only models (start, no-timestamps),
    4 for multilingual ones (start, language, task, no-timestamps), as the tokenizer itself adds them."""
    return len(tokenizer("").input_ids) - 1  # minus the end token
