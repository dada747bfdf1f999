"""Students initialised from a teacher's layers (as distil-whisper and distilled LLMs are).

``kdforge student init --from TEACHER_DIR --layers 0,5,10 --out DIR`` keeps the chosen decoder
layers (maximally spaced by default) with everything around them (embeddings, norms, head), so the
student starts from real weights and speaks the teacher's vocabulary.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kdforge.errors import KdforgeError
from kdforge.files import check_new_folder


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


def init_causal_lm_student(teacher_dir: str | Path, out_dir: str | Path, layers: list[int] | None = None,
                           num_layers: int | None = None) -> Path:
    """Save a causal LM made of the teacher's ``layers`` (default: ``num_layers`` maximally spaced).

    Raises:
        KdforgeError: a layer the teacher lacks, duplicate layers, no teacher directory, or an
            ``out_dir`` that already holds something.
    """
    teacher_dir, out_dir = Path(teacher_dir), check_new_folder(out_dir)
    if not (teacher_dir / "config.json").is_file():
        raise KdforgeError(f"{teacher_dir} is not a model directory (no config.json)")
    config = AutoConfig.from_pretrained(teacher_dir)
    total = config.num_hidden_layers
    if layers is None:
        layers = maximally_spaced(total, num_layers or max(1, total // 4))
    if len(set(layers)) != len(layers) or sorted(layers) != list(layers):
        raise KdforgeError(f"layers must be increasing and distinct, got {layers}")
    missing = [layer for layer in layers if not 0 <= layer < total]
    if missing:
        raise KdforgeError(f"the teacher has layers 0..{total - 1}; it lacks layer {missing[0]}")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    student = AutoModelForCausalLM.from_config(config)
    state = keep_layers(teacher.state_dict(), "model.layers.", layers)
    student.load_state_dict(state, strict=True)
    student.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out_dir)
    if teacher.generation_config is not None:
        teacher.generation_config.save_pretrained(out_dir)
    return out_dir
