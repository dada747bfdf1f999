"""LoRA adapters through ``peft``: frozen base weights, trainable low-rank updates, merged on export."""

from __future__ import annotations

import warnings

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from kdforge.config import LoraConfig
from kdforge.errors import KdforgeError


#: Attention and feed-forward projections per architecture, the default LoRA targets.
DEFAULT_TARGETS = {
    "whisper": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def add_lora(model: torch.nn.Module, lora: LoraConfig) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters on ``lora.target_modules``; only the adapters train."""
    targets = lora.target_modules or DEFAULT_TARGETS.get(model.config.model_type)
    if targets is None:
        raise KdforgeError(f"no default LoRA targets for a {model.config.model_type!r} model; set student.lora.target_modules")
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    absent = [name for name in targets if name not in present]
    if absent:
        raise KdforgeError(f"LoRA target module {absent[0]!r} does not exist in this model")
    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(targets))
    with warnings.catch_warnings():
        # peft reads an attribute transformers 5 deprecated; the warning is theirs, not the user's
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def exportable(model: torch.nn.Module, merge: bool) -> torch.nn.Module:
    """The plain Hugging Face model to save: LoRA merged into the weights (or the peft model as is)."""
    if hasattr(model, "merge_and_unload") and merge:
        return model.merge_and_unload()
    return model
