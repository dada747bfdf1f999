"""A description of the machine a benchmark ran on, recorded with every result."""

from __future__ import annotations

import os
import platform

import torch


def describe_machine() -> dict:
    """CPU model, core count, accelerator and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def machine_line(machine: dict) -> str:
    """One line for a markdown report."""
    accelerator = machine["gpu"] or "no GPU"
    return f"{machine['cores']} cores ({machine['cpu']}), {accelerator}, torch {machine['torch']}"
