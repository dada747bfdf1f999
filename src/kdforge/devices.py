"""Moving what a step or an evaluation reads onto the model's device (the CPU, or a GPU)."""

from __future__ import annotations

import torch


def to_device(value, device: torch.device):
    """``value`` with every tensor in it on ``device``: tensors and anything with a ``to(device)``
    (:class:`~kdforge.losses.TopKTeacher`), inside dicts, lists and tuples; other values as they are."""
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        moved = [to_device(item, device) for item in value]
        return type(value)(*moved) if hasattr(value, "_fields") else type(value)(moved)  # named tuples too
    return value.to(device) if hasattr(value, "to") else value


def device_of(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s weights are."""
    return next(model.parameters()).device
