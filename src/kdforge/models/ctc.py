"""A second ASR family, trained from scratch: a Conformer encoder with a CTC head over characters.

The model is ``transformers``' ``Wav2Vec2BertForCTC`` (a Conformer over log-mel features, no raw
waveform front end: ~10x cheaper on a CPU), built from a small config. Its input is Whisper's 80-bin
log-mel (10 ms hop) with ``frame_stack`` consecutive frames concatenated, so it runs at 100 /
frame_stack Hz (25 Hz by default: a different frame rate from Whisper's 50 Hz encoder). Characters:
a-z, apostrophe and the word delimiter ``|``; id 0 (``<pad>``) is the CTC blank. A model folder
holds the model, the tokenizer and the feature extractor's config; ``frame_stack`` is stored in
the model's config as ``kdforge_frame_stack``.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from transformers import Wav2Vec2BertConfig, Wav2Vec2BertForCTC, Wav2Vec2CTCTokenizer, WhisperFeatureExtractor

from kdforge.errors import KdforgeError
from kdforge.files import check_new_folder

CHARACTERS = "'" + string.ascii_lowercase
MEL_BINS = 80
SIZES = {
    "small": dict(hidden_size=144, num_hidden_layers=6, num_attention_heads=4, intermediate_size=576),
    "tiny": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
}


def character_tokenizer() -> Wav2Vec2CTCTokenizer:
    """``<pad>`` (the blank) 0, ``<unk>`` 1, ``|`` (space) 2, then apostrophe and a-z."""
    vocab = {"<pad>": 0, "<unk>": 1, "|": 2, **{c: i + 3 for i, c in enumerate(CHARACTERS)}}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "vocab.json"
        path.write_text(json.dumps(vocab))
        return Wav2Vec2CTCTokenizer(str(path), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|")


def build_ctc_model(out_dir: str | Path, size: str = "small", frame_stack: int = 4, seed: int = 0) -> Path:
    """Save a randomly initialised CTC Conformer with its tokenizer and feature extractor.

    Raises:
        KdforgeError: unknown size, or ``out_dir`` already holds something.
    """
    if size not in SIZES:
        raise KdforgeError(f"unknown size {size!r}; known: {', '.join(SIZES)}")
    out_dir = check_new_folder(out_dir)
    torch.manual_seed(seed)
    tokenizer = character_tokenizer()
    config = Wav2Vec2BertConfig(vocab_size=len(tokenizer), feature_projection_input_dim=MEL_BINS * frame_stack,
                                conv_depthwise_kernel_size=15, pad_token_id=tokenizer.pad_token_id, add_adapter=False,
                                position_embeddings_type="relative_key", max_source_positions=1024,
                                # kdforge's own SpecAugment is the augmentation; the model's built-in masking
                                # and layer drop on top of it kept training on the CTC plateau (all blank)
                                # much longer; hidden dropout curbs learning a small corpus by heart
                                apply_spec_augment=False, layerdrop=0.0, final_dropout=0.0, hidden_dropout=0.1,
                                **SIZES[size])
    config.kdforge_frame_stack = frame_stack
    Wav2Vec2BertForCTC(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    WhisperFeatureExtractor(feature_size=MEL_BINS).save_pretrained(out_dir)
    return out_dir


def frame_stack_of(model) -> int:
    """The frame stacking a kdforge CTC model was built with.

    Raises:
        KdforgeError: a Wav2Vec2-BERT model that kdforge did not build (no ``kdforge_frame_stack``).
    """
    stack = getattr(model.config, "kdforge_frame_stack", None)
    if stack is None:
        raise KdforgeError(f"{model.config.name_or_path or 'this model'} is not a kdforge CTC model "
                           "(no kdforge_frame_stack in its config): create one with `kdforge models init-ctc`")
    return stack


def log_mel(extractor: WhisperFeatureExtractor, audio: list[np.ndarray]) -> tuple[Tensor, Tensor]:
    """Whisper's normalised 80-bin log-mel of a batch, padded to the longest utterance.

    Returns:
        ``mel (B, 80, F)`` and ``mask (B, F)`` (True on the utterance's own frames).
    """
    encoded = extractor(audio, sampling_rate=extractor.sampling_rate, padding="longest", return_attention_mask=True,
                        return_tensors="pt")
    return encoded.input_features, encoded.attention_mask.bool()


def stack_frames(mel: Tensor, mask: Tensor, frame_stack: int) -> tuple[Tensor, Tensor]:
    """Concatenate ``frame_stack`` consecutive frames: ``(B, 80, F), (B, F) -> (B, T, 80 * stack), (B, T)``.

    ``T = F // frame_stack``; a model frame is real when all its mel frames are.
    """
    frames = mel.shape[-1] // frame_stack * frame_stack
    if frames == 0:
        raise KdforgeError(f"audio shorter than {frame_stack} mel frames cannot be recognised")
    batch = mel.shape[0]
    features = mel[..., :frames].transpose(1, 2).reshape(batch, frames // frame_stack, MEL_BINS * frame_stack)
    return features, mask[:, :frames].reshape(batch, -1, frame_stack).all(-1)


def stacked_log_mel(extractor: WhisperFeatureExtractor, audio: list[np.ndarray], frame_stack: int) -> tuple[Tensor, Tensor]:
    """:func:`log_mel` then :func:`stack_frames`: the model's input ``(B, T, 80 * stack)`` and mask ``(B, T)``."""
    return stack_frames(*log_mel(extractor, audio), frame_stack)


def greedy_ctc(logits: Tensor, mask: Tensor, tokenizer: Wav2Vec2CTCTokenizer) -> list[str]:
    """Best path per utterance: the argmax per frame, repeats merged, blanks dropped."""
    best = logits.argmax(-1)
    return [tokenizer.decode(best[row][mask[row]].tolist()).strip() for row in range(best.shape[0])]
