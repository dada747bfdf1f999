"""Data parallelism over the processes a launcher starts (torchrun, accelerate launch): torch.distributed.

Every rank builds the same task and takes its own slice of each global batch (and so reads only
those utterances' teacher-cache entries). Each micro-batch's loss is weighted by its share of the
*global* batch's target tokens, so summing the gradients over ranks gives exactly the one-process
gradient; every rank then steps the same optimizer on the same summed gradients and the weights
stay identical without being sent again. Rank 0 alone writes: the run folder, history,
checkpoints (with every rank's random state), the exported student.

Launchers set ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; without
them (or with one process) :func:`join` returns a world of one and nothing here communicates. Each
process trains on its own device (``training.device``): GPU number ``LOCAL_RANK`` with the NCCL
backend, or the CPU with gloo.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from kdforge.errors import KdforgeError


COLLECTIVE_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes: ``rank`` of ``size``."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place (unchanged in a world of one)."""
        if self.size > 1:
            on_device = tensor.to(self.device)  # NCCL reduces GPU tensors only
            dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
            if on_device is not tensor:
                tensor.copy_(on_device)
        return tensor

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Sum every replicated parameter's gradient over the ranks, in one message (a sharded one's
        gradient was summed into its shard during the backward)."""
        grads = [p.grad for p in parameters if p.grad is not None and not isinstance(p, DTensor)]
        if self.size == 1 or not grads:
            return
        flat = self.sum(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def broadcast_from_main(self, parameters: list[torch.nn.Parameter]) -> None:
        """Give every rank rank 0's values, so all start from one set of weights whatever their seeds did."""
        if self.size > 1:
            with torch.no_grad():
                for parameter in parameters:
                    dist.broadcast(parameter.data, src=0)

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape on each), in rank order."""
        if self.size == 1:
            return [tensor]
        on_device = tensor.to(self.device).contiguous()
        gathered = [torch.empty_like(on_device) for _ in range(self.size)]
        dist.all_gather(gathered, on_device)
        return [part.to(tensor.device) for part in gathered]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (building what the others then reuse: a student made from a
        teacher, a teacher cache, a built-in model), the other ranks after it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def training_device(setting: str = "auto") -> torch.device:
    """This process's device for ``training.device``: ``"cpu"``, ``"cuda"`` (GPU number ``LOCAL_RANK``),
    or ``"auto"`` (GPU number ``LOCAL_RANK`` when torch sees any GPU, else the CPU; one process per GPU
    either way, never some processes on GPUs and others on the CPU).

    Raises:
        KdforgeError: a GPU is asked for and torch sees none, or fewer than ``LOCAL_RANK + 1``.
    """
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.cuda.is_available():
        raise KdforgeError("training.device is 'cuda' but torch sees no GPU (this torch build or machine has "
                           "none); use 'cpu' or 'auto'")
    if local_rank >= torch.cuda.device_count():
        raise KdforgeError(f"process LOCAL_RANK={local_rank} needs GPU {local_rank}, but torch sees "
                           f"{torch.cuda.device_count()}: start at most one process per GPU")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def join(device: str = "auto") -> World:
    """This process's :class:`World` on its :func:`training_device`, joining the launcher's process group
    when there is one (NCCL between GPUs, gloo between CPU processes).

    Raises:
        KdforgeError: the launcher's variables are incomplete, or the device cannot be had.
    """
    placed = training_device(device)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(device=placed)
    if not dist.is_initialized():
        missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise KdforgeError(f"WORLD_SIZE is {size} but {', '.join(missing)} is not set: start the processes "
                               "with torchrun or accelerate launch")
        # the other ranks wait while rank 0 builds a teacher cache or evaluates: NCCL's 10-minute default is too short
        dist.init_process_group(backend="nccl" if placed.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return World(dist.get_rank(), dist.get_world_size(), placed)


def leave(world: World) -> None:
    """Leave the process group :func:`join` joined (every rank, once training is over)."""
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def current_rank() -> int:
    """This process's rank as its launcher set it (0 when there is none), before or after :func:`join`."""
    return int(os.environ.get("RANK", "0"))
