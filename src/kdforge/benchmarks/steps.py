"""Timing training steps of several tasks against each other, as the training loop takes them.

A step is what :func:`kdforge.training.loop.train` does per optimizer step with one micro-batch:
build the batch (features, teacher signals), forward and backward
(:func:`kdforge.training.loop.accumulate_gradients`), then AdamW. Tasks compared in one call
take turns step by step, so a load that comes and goes on the machine slows them alike instead
of whichever happened to run during it.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from kdforge.training.loop import accumulate_gradients, adamw, target_tokens


class StepTimer:
    """One task's training step on a fixed batch, repeatable: each call takes one step and returns its seconds."""

    def __init__(self, task, indices: list[int], scratch: Path):
        self.task, self.indices, self.scratch = task, indices, scratch
        heads = getattr(task, "heads", None)  # training-only modules the loop trains beside the student
        modules = [task.student] + ([heads] if heads is not None else [])
        self.optimizer = adamw([p for m in modules for p in m.parameters() if p.requires_grad], lr=1e-5)

    def __call__(self) -> float:
        started = time.perf_counter()
        batch = self.task.batch(self.indices)
        self.optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(self.task, [batch], target_tokens([batch]), self.scratch, 0)
        self.optimizer.step()
        return time.perf_counter() - started


def median_step_seconds(timers: dict[str, StepTimer], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Each timer's median seconds over ``repeats`` steps after ``warmup`` untimed ones, the timers taking turns."""
    seconds: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(warmup + repeats):
        for name, timer in timers.items():
            seconds[name].append(timer())
    return {name: statistics.median(values[warmup:]) for name, values in seconds.items()}
