"""Mixed precision: the forward under ``torch.autocast``, everything that trains in float32.

``training.precision`` names the dtype the student's matrix products run in. The weights, their
gradients and the optimizer's moments stay float32 whatever it says, and the loss functions compute
in float32 from half-precision inputs (:mod:`kdforge.losses`, :func:`kdforge.alignment.lppm_loss`).
bfloat16 has float32's exponent range, so its gradients need no scaling; float16 has not, so its
loss is multiplied by a ``torch.amp.GradScaler`` before the backward, and a step whose gradients
overflowed is skipped while the scale is lowered, as float16 training on GPUs does.
"""

from __future__ import annotations

import contextlib

import torch

#: ``training.precision`` -> the dtype autocast runs matrix products in (None: autocast off).
AUTOCAST_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a forward and its loss run in: autocast to ``precision`` on ``device``'s type."""
    dtype = AUTOCAST_DTYPES[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """The loss scaler of ``precision``: active for float16, a pass-through otherwise (its ``scale``
    returns the loss, its ``step`` steps the optimizer, its ``state_dict`` is empty)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "float16")
