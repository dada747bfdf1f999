"""Students initialised from a teacher's layers (as distil-whisper and distilled LLMs are).

``kdforge student init --from TEACHER_DIR --layers 0,5,10 --out DIR`` keeps the chosen decoder
layers (maximally spaced by default) with everything around them (embeddings, norms, head, and for
Whisper the whole encoder unless ``--encoder-layers`` cuts it too), so the student starts from real
weights and speaks the teacher's vocabulary. Defaults: a quarter of a causal LM's layers; two decoder
layers of a Whisper model (distil-whisper's choice).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kdforge.errors import KdforgeError
from kdforge.files import check_new_folder
from kdforge.models.loading import SAFE_LOADING, load_preprocessor


def maximally_spaced(total: int, keep: int) -> list[int]:
    """``keep`` layer indices spread evenly over ``0..total-1``, first and last included."""
    if not 1 <= keep <= total:
        raise KdforgeError(f"cannot keep {keep} of {total} layers")
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def keep_layers(state_dict: dict[str, torch.Tensor], layers_prefix: str, kept: list[int]) -> dict[str, torch.Tensor]:
    """Renumber ``{layers_prefix}{i}.`` entries so kept layer ``kept[j]`` becomes layer ``j``; drop the rest."""
    pattern = re.compile(rf"^{re.escape(layers_prefix)}(\d+)\.(.*)$")
    new_index = {old: new for new, old in enumerate(kept)}
    result = {}
    for name, tensor in state_dict.items():
        match = pattern.match(name)
        if match is None:
            result[name] = tensor
        elif int(match.group(1)) in new_index:
            result[f"{layers_prefix}{new_index[int(match.group(1))]}.{match.group(2)}"] = tensor
    return result


def _chosen_layers(total: int, layers: list[int] | None, num_layers: int) -> list[int]:
    if layers is None:
        layers = maximally_spaced(total, num_layers)
    if len(set(layers)) != len(layers) or sorted(layers) != list(layers):
        raise KdforgeError(f"layers must be increasing and distinct, got {layers}")
    missing = [layer for layer in layers if not 0 <= layer < total]
    if missing:
        raise KdforgeError(f"the teacher has layers 0..{total - 1}; it lacks layer {missing[0]}")
    return layers


def init_student(teacher_dir: str | Path, out_dir: str | Path, layers: list[int] | None = None,
                 num_layers: int | None = None, encoder_layers: int | None = None) -> Path:
    """Save a student made of the teacher's ``layers`` (default: ``num_layers`` maximally spaced).

    Whisper teachers lose decoder layers and keep their encoder, or its ``encoder_layers`` maximally
    spaced layers when given; causal LMs lose layers.

    Raises:
        KdforgeError: a layer the teacher lacks, duplicate layers, ``encoder_layers`` for a model
            without an encoder, no teacher directory, or an ``out_dir`` that already holds something.
    """
    from kdforge.models.loading import model_type_of

    teacher_dir = Path(teacher_dir)
    is_whisper = model_type_of(teacher_dir) == "whisper"
    if encoder_layers is not None and not is_whisper:
        raise KdforgeError(f"encoder_layers cuts a Whisper encoder; {teacher_dir} is not a Whisper model")
    out_dir = check_new_folder(out_dir)
    if is_whisper:
        return _init_whisper_student(teacher_dir, out_dir, layers, num_layers or 2, encoder_layers)
    return _init_causal_lm_student(teacher_dir, out_dir, layers, num_layers)


def _init_whisper_student(teacher_dir: Path, out_dir: Path, layers: list[int] | None, num_layers: int,
                          encoder_layers: int | None) -> Path:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    teacher = WhisperForConditionalGeneration.from_pretrained(teacher_dir, dtype=torch.float32, **SAFE_LOADING)
    config = teacher.config
    layers = _chosen_layers(config.decoder_layers, layers, num_layers)
    encoder_kept = _chosen_layers(config.encoder_layers, None, encoder_layers or config.encoder_layers)
    config.decoder_layers, config.encoder_layers = len(layers), len(encoder_kept)
    student = WhisperForConditionalGeneration(config)
    state = keep_layers(teacher.state_dict(), "model.decoder.layers.", layers)
    student.load_state_dict(keep_layers(state, "model.encoder.layers.", encoder_kept), strict=True)
    student.generation_config = teacher.generation_config
    student.save_pretrained(out_dir)
    load_preprocessor(WhisperProcessor, teacher_dir).save_pretrained(out_dir)
    return out_dir


def _init_causal_lm_student(teacher_dir: Path, out_dir: Path, layers: list[int] | None,
                            num_layers: int | None) -> Path:
    config = AutoConfig.from_pretrained(teacher_dir)
    total = config.num_hidden_layers
    layers = _chosen_layers(total, layers, num_layers or max(1, total // 4))
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32, **SAFE_LOADING)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    student = AutoModelForCausalLM.from_config(config)
    state = keep_layers(teacher.state_dict(), "model.layers.", layers)
    student.load_state_dict(state, strict=True)
    student.save_pretrained(out_dir)
    load_preprocessor(AutoTokenizer, teacher_dir).save_pretrained(out_dir)
    if teacher.generation_config is not None:
        teacher.generation_config.save_pretrained(out_dir)
    return out_dir
