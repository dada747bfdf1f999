"""A GGUF causal language model -> a plain safetensors Hugging Face directory.

``transformers`` reads GGUF files (``from_pretrained(dir, gguf_file=...)``) and dequantises every
tensor to float, but the model it returns still carries the GGUF quantizer and refuses
``save_pretrained`` ("quantized with gguf and is not serializable"). The dequantised weights are
therefore moved into a plain model built from the same configuration without its
``quantization_config``; that model saves as an ordinary float32 directory, with the tokenizer and
its chat template, and loads back with no GGUF code involved.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kdforge.errors import KdforgeError

GGUF_MAGIC = b"GGUF"


def check_gguf_file(gguf_file: Path) -> None:
    """Refuse a path that is not a readable GGUF file.

    Raises:
        KdforgeError: missing file or wrong magic bytes.
    """
    if not gguf_file.is_file():
        raise KdforgeError(f"{gguf_file} does not exist")
    with open(gguf_file, "rb") as handle:
        if handle.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise KdforgeError(f"{gguf_file} is not a GGUF file (it does not start with {GGUF_MAGIC!r})")


def load_gguf_causal_lm(gguf_file: Path,
                        dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The dequantised model and the tokenizer (with chat template) stored in ``gguf_file``.

    The model still carries the GGUF quantizer (it cannot be saved as it is): see :func:`plain_copy`.

    Raises:
        KdforgeError: not a GGUF file, or an architecture ``transformers`` cannot read from GGUF.
    """
    check_gguf_file(gguf_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=dtype)
    except ValueError as error:  # transformers' way of saying "this GGUF architecture is not supported"
        raise KdforgeError(f"{gguf_file} cannot be read as a causal LM: {error}") from error
    return model.eval(), tokenizer


def plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """An unquantised model of the same architecture holding ``model``'s (dequantised) weights.

    The copy is built on the CPU rather than the meta device: buffers that are not in the state
    dict (rotary frequencies) must be real for the copy to run. Tied embeddings stay tied.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def save_dequantised(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """Save a model loaded from GGUF (see :func:`load_gguf_causal_lm`) and its tokenizer as a plain directory.

    ``out_dir`` gets ``config.json``, ``generation_config.json``, ``model.safetensors`` (float
    weights, no quantization config) and the tokenizer files, the chat template included.
    """
    plain_copy(model).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)



def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Write ``gguf_file`` as a float32 safetensors Hugging Face directory ``out_dir`` (empty or new).

    Returns:
        ``out_dir``.

    Raises:
        KdforgeError: not a GGUF causal LM ``transformers`` can read.
    """
    model, tokenizer = load_gguf_causal_lm(Path(gguf_file))
    save_dequantised(model, tokenizer, Path(out_dir))
    return Path(out_dir)
