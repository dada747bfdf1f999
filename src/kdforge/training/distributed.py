"""Data parallelism over the processes a launcher starts (torchrun, accelerate launch): torch.distributed.

Every rank builds the same task and takes its own slice of each global batch (and so reads only
those utterances' teacher-cache entries). Each micro-batch's loss is weighted by its share of the
*global* batch's target tokens, so summing the gradients over ranks gives exactly the one-process
gradient; every rank then steps the same optimizer on the same summed gradients and the weights
stay identical without being sent again. Rank 0 alone writes: the run folder, history,
checkpoints (with every rank's random state), the exported student.

Launchers set ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; without them (or with
one process) :func:`join` returns a world of one and nothing here communicates. Training runs on
the CPU, so the backend is gloo.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kdforge.errors import KdforgeError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes: ``rank`` of ``size``."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place (unchanged in a world of one)."""
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over the ranks, in one message."""
        grads = [p.grad for p in parameters if p.grad is not None]
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
        gathered = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(gathered, tensor.contiguous())
        return gathered

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


def join() -> World:
    """This process's :class:`World`, joining the launcher's process group when there is one.

    Raises:
        KdforgeError: the launcher's variables are incomplete.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise KdforgeError(f"WORLD_SIZE is {size} but {', '.join(missing)} is not set: start the processes "
                               "with torchrun or accelerate launch")
        dist.init_process_group(backend="gloo")
    return World(dist.get_rank(), dist.get_world_size())


def leave(world: World) -> None:
    """Leave the process group :func:`join` joined (every rank, once training is over)."""
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def current_rank() -> int:
    """This process's rank as its launcher set it (0 when there is none), before or after :func:`join`."""
    return int(os.environ.get("RANK", "0"))
