"""Fully sharded data parallelism for a student too large for one device: torch's FSDP2 (``fully_shard``).

With ``training.fsdp: true``, or under ``accelerate launch --use_fsdp`` (which sets
``ACCELERATE_USE_FSDP``), each of the student's transformer blocks (the classes its Hugging Face model
names in ``_no_split_modules``, as accelerate's transformer auto-wrap does) and then the whole student
become FSDP units: each process keeps a 1/world slice of every weight, gradient and optimizer moment,
and gathers a block's weights only while it runs it. Everything else of :mod:`.distributed` stays:
each process reads its own slice of the batch, and its loss is already weighted by its share of the
global batch, so gradients are *summed* over the processes (divide factor 1), not averaged.

What sharding changes around the loop, all here: gradients are clipped with one norm over sharded
and plain parameters; checkpoints and the best weights are written from full tensors (gathered by
every process, written by rank 0), so a checkpoint is the same file with or without sharding and
resumes under either; every process evaluates (a sharded forward needs them all), with the root's
own weights gathered for the whole evaluation (generation runs submodules directly); the student is
exported from a weightless copy taken before sharding, filled with the gathered weights.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from kdforge.errors import KdforgeError
from kdforge.training.distributed import World


def requested(setting: bool) -> bool:
    """Whether this run shards its student: ``training.fsdp``, or the launcher asked for FSDP.

    Raises:
        KdforgeError: the launcher asked for DeepSpeed, which kdforge does not drive.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise KdforgeError("kdforge does not run under DeepSpeed (its engine owns the step and pickles its "
                           "checkpoints); shard the student with accelerate launch --use_fsdp instead")
    return setting or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def block_classes(model: torch.nn.Module) -> set[str]:
    """The class names of ``model``'s transformer blocks: every ``_no_split_modules`` its submodules declare."""
    return {name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or ())}


def weightless_copy(model: torch.nn.Module) -> torch.nn.Module:
    """``model``'s structure with its parameters on the meta device (no memory), buffers copied.

    Sharding replaces a model's parameters in place; this copy is what the exported student is
    rebuilt in, once the trained weights are gathered (``load_state_dict(..., assign=True)``).
    Shared parameters (tied embeddings) stay shared: the copy is one ``deepcopy`` memo.
    """
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def shard(model: torch.nn.Module, world: World) -> torch.nn.Module:
    """Shard ``model`` over ``world`` in place (blocks first, then the root); return its :func:`weightless_copy`.

    Call it after the processes agree on the weights: each keeps its slice of what it holds now.
    """
    shell = weightless_copy(model)
    mesh = init_device_mesh(world.device.type, (world.size,))
    blocks = block_classes(model)
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # each process's loss is already its share of the batch
            module.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    return shell


@contextmanager
def root_gathered(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block, the sharded root's own weights (those outside every block) stay whole.

    Generation calls parts of a model directly (an encoder-decoder's encoder, before any root
    forward), which would meet those weights sharded. A model that is not sharded is left as it is.
    """
    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole (a norm of one completed over the processes; every process must
    call it), any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every sharded one gathered :func:`whole`; every process must call it, in the same order."""
    return {name: whole(t) for name, t in tensors.items()}


def sharded_like(value: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """A full ``value`` sliced the way ``parameter`` is sharded (``value`` itself for a plain parameter)."""
    if isinstance(parameter, DTensor):
        return distribute_tensor(value.to(parameter.device), parameter.device_mesh, parameter.placements)
    return value


def gathered_student(model: torch.nn.Module, shell: torch.nn.Module, world: World) -> torch.nn.Module | None:
    """On rank 0, ``shell`` holding the sharded ``model``'s trained weights, whole and on the CPU (None
    elsewhere). Every process must call it."""
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.is_main:
        return None
    shell.load_state_dict(weights, assign=True)
    if hasattr(shell, "tie_weights"):  # assigning gives tied names separate tensors: share them again
        shell.tie_weights()
    return shell


def clip_gradients(parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients to a total norm of at most ``max_norm``; return the norm before scaling.

    :func:`torch.nn.utils.clip_grad_norm_` over sharded and plain parameters at once, which it cannot
    mix: the norm of each kind, then one scale for all.
    """
    with_grad = [p for p in parameters if p.grad is not None]
    kinds = [[p for p in with_grad if isinstance(p, DTensor)], [p for p in with_grad if not isinstance(p, DTensor)]]
    norms = []
    for kind in filter(None, kinds):
        norms.append(whole(torch.nn.utils.get_total_norm([p.grad for p in kind])))
    if not norms:
        return torch.tensor(0.0)
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    for kind in filter(None, kinds):
        torch.nn.utils.clip_grads_with_norm_(kind, max_norm, total)
    return total
