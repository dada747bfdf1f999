"""Run folders and checkpoints: safetensors + JSON, written atomically, the last few kept.

A run folder holds ``config.json`` (the validated config), ``checkpoints/step-NNNNNNN/`` (the last
few), ``checkpoints/best-step-NNNNNNN/`` (the weights of the best evaluation) and, once finished,
``student/``, ``curves.png`` and ``result.json``. A checkpoint folder is built under a temporary name and
renamed into place, so a crash (or a full disk) at any moment leaves the previous checkpoint intact.
It holds the trainable weights, the optimizer's tensors (``*.safetensors``) and everything else
(step, scheduler, optimizer hyper-parameters, float16's loss scaler) in ``state.json``, every rank's
RNG state in ``rng.safetensors``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kdforge.config import RunConfig
from kdforge.errors import KdforgeError
from kdforge.files import write_json_atomic
from kdforge.training.distributed import World
from kdforge.training.sharding import full_tensors, sharded_like

CHECKPOINTS = "checkpoints"


def claim_run_folder(out_dir: Path, config: RunConfig, resume: bool) -> bool:
    """Make ``out_dir`` this run's folder, refusing to overwrite a finished or different run.

    Returns:
        True when this is a new run (the folder was missing or empty), False when resuming.
    """
    if (out_dir / "result.json").exists():
        raise KdforgeError(f"{out_dir} already holds a finished run; choose another --out")
    saved = out_dir / "config.json"
    if saved.exists():
        if not resume:
            raise KdforgeError(f"{out_dir} holds an unfinished run; pass --resume to continue it, or choose another --out")
        try:
            # read back through the schema: a run saved before a setting existed has that setting's default
            started = RunConfig.model_validate(json.loads(saved.read_text())).model_dump(mode="json")
            same = _resumable_settings(started) == _resumable_settings(config.model_dump(mode="json"))
        except (OSError, json.JSONDecodeError, ValidationError):
            raise KdforgeError(f"{saved} is unreadable; this run cannot be resumed") from None
        if not same:
            raise KdforgeError(f"{out_dir} was started with another config; resume with the same one")
        return False
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise KdforgeError(f"{out_dir} is not an empty folder and holds no kdforge run; choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(saved, config.model_dump(mode="json"))
    return True


def _resumable_settings(config: dict) -> dict:
    """What a resumed run must share with the run it continues: everything but the device it trains on,
    whether its weights are sharded (checkpoints hold them whole either way) and what it logs
    (``term_grad_norms_every``)."""
    return {**config, "training": {k: v for k, v in config.get("training", {}).items()
                                   if k not in ("device", "fsdp", "term_grad_norms_every")}}


def empty_run_folder(out_dir: Path) -> None:
    """Remove what a new run wrote before it failed to start, so the same command can be retried."""
    for child in out_dir.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def rng_states(world: World) -> dict[str, torch.Tensor]:
    """Every random generator training uses: torch's CPU one of every rank and, on GPUs, each rank's own GPU's."""
    states = {f"torch.rank{rank}": state for rank, state in enumerate(world.gather(torch.get_rng_state()))}
    if world.device.type == "cuda":
        gpu_states = world.gather(torch.cuda.get_rng_state(world.device))
        states |= {f"cuda.rank{rank}": state for rank, state in enumerate(gpu_states)}
    return states


def _restore_rng_states(states: dict[str, torch.Tensor], world: World, path: Path) -> None:
    saved_ranks = sum(name.startswith("torch.rank") for name in states)
    if saved_ranks != world.size:
        raise KdforgeError(f"checkpoint {path} was written by {saved_ranks} training processes; resume it with "
                           f"{saved_ranks}, not {world.size}, to continue exactly")
    torch.set_rng_state(states[f"torch.rank{world.rank}"])
    gpu_state = states.get(f"cuda.rank{world.rank}")
    if gpu_state is not None and world.device.type == "cuda":  # a GPU run resumed on the CPU has no GPU draws
        torch.cuda.set_rng_state(gpu_state, world.device)


def _flush_folder(folder: Path) -> None:
    """fsync every file of ``folder`` and the folder itself, so a rename after it survives a power cut."""
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def optimizer_payload(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors; a sharded moment gathered whole, so
    every process must call it) and the JSON-able rest."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    tensors = {name: value.detach().cpu().contiguous() for name, value in full_tensors(tensors).items()}
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict) -> None:
    parameters = [p for group in optimizer.param_groups for p in group["params"]]  # the state dict's numbering
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *rest["scalars"].items()]:
        index, key = name.split(".", 1)
        if torch.is_tensor(value) and value.dim():  # a moment, sharded as its parameter is
            value = sharded_like(value, parameters[int(index)])
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def _write_checkpoint_folder(out_dir: Path, name: str, write: Callable[[Path], None]) -> Path:
    """Build ``checkpoints/<name>`` under a temporary name with ``write(folder)``, flush it, rename it.

    Raises:
        KdforgeError: the disk refused (full, read-only...): the earlier checkpoints are untouched.
    """
    root = out_dir / CHECKPOINTS
    final, temporary = root / name, root / f".tmp-{name}"
    try:
        root.mkdir(exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        write(temporary)
        _flush_folder(temporary)
        temporary.rename(final)
    except (OSError, SafetensorError) as error:
        shutil.rmtree(temporary, ignore_errors=True)
        raise KdforgeError(f"could not write checkpoint {name} ({disk_error_reason(error)}); "
                           "the earlier ones are intact") from None
    return final


def disk_error_reason(error: Exception) -> str:
    """The operating system's words for a failed write: an OSError's own, or the ones safetensors
    wraps in its ``SafetensorError`` ("Error while serializing: I/O error: No space left on device
    (os error 28)" -> "No space left on device")."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return re.sub(r" \(os error \d+\)$", "", str(error).splitlines()[0].rsplit(": ", 1)[-1])


def _save_weights(folder: Path, weights: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, folder / "trainable.safetensors")


def save_checkpoint(out_dir: Path, step: int, weights: dict[str, torch.Tensor],
                    optimizer: tuple[dict[str, torch.Tensor], dict], scheduler: torch.optim.lr_scheduler.LRScheduler,
                    keep: int, rng: dict[str, torch.Tensor], grad_scaler: dict | None = None) -> Path:
    """Write checkpoint ``step`` atomically and delete all but the newest ``keep``.

    ``weights`` (the trainable ones, :func:`~kdforge.training.sharding.full_tensors`), ``optimizer``
    (:func:`optimizer_payload`) and ``rng`` (:func:`rng_states`) are taken on every rank; the main one writes.
    ``grad_scaler``: a ``torch.amp.GradScaler``'s state dict (numbers only; empty when it is disabled).
    """

    def write(folder: Path) -> None:
        _save_weights(folder, weights)
        optimizer_tensors, optimizer_rest = optimizer
        save_file(optimizer_tensors, folder / "optimizer.safetensors")
        save_file(rng, folder / "rng.safetensors")
        write_json_atomic(folder / "state.json", {"step": step, "optimizer": optimizer_rest,
                                                  "scheduler": scheduler.state_dict(),
                                                  "grad_scaler": grad_scaler or {}})

    final = _write_checkpoint_folder(out_dir, f"step-{step:07d}", write)
    for old in sorted(final.parent.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def save_best(out_dir: Path, step: int, weights: dict[str, torch.Tensor], metric: str, value: float) -> Path:
    """Keep the trainable ``weights`` (full tensors) of the best evaluation so far as ``checkpoints/best-step-N``.

    The new folder is complete before the previous best is removed, so one always exists.
    """

    def write(folder: Path) -> None:
        _save_weights(folder, weights)
        write_json_atomic(folder / "state.json", {"step": step, "metric": metric, "value": value})

    final = _write_checkpoint_folder(out_dir, f"best-step-{step:07d}", write)
    for old in final.parent.glob("best-step-*"):
        if old != final:
            shutil.rmtree(old)
    return final


def _damaged(path: Path, what: str) -> KdforgeError:
    return KdforgeError(f"checkpoint {path} is damaged ({what}); delete it to resume from the one before")


def _read_state(path: Path, keys: tuple[str, ...]) -> dict:
    """A checkpoint's ``state.json``, checked to hold ``keys``.

    Raises:
        KdforgeError: the file is missing, not JSON, or lacks a key.
    """
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise _damaged(path, f"state.json: {error}") from None
    missing = [key for key in keys if not isinstance(state, dict) or key not in state]
    if missing:
        raise _damaged(path, f"state.json lacks {missing[0]!r}")
    return state


def best_value(out_dir: Path) -> float | None:
    """The metric value of the kept best checkpoint, if any."""
    kept = sorted((out_dir / CHECKPOINTS).glob("best-step-*"))
    return _read_state(kept[-1], ("value",))["value"] if kept else None


def latest_checkpoint(out_dir: Path) -> Path | None:
    steps = sorted((out_dir / CHECKPOINTS).glob("step-*"))
    return steps[-1] if steps else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, world: World = World(),
                    grad_scaler: torch.amp.GradScaler | None = None) -> int:
    """Restore weights, optimizer, scheduler, this rank's RNG and the loss scaler (an enabled
    ``grad_scaler``) from ``path``; return the step it was taken after."""
    state = _read_state(path, ("step", "optimizer", "scheduler"))
    try:
        trainable = load_file(path / "trainable.safetensors")
        optimizer_tensors = load_file(path / "optimizer.safetensors")
        rng = load_file(path / "rng.safetensors")
    except (OSError, ValueError, SafetensorError) as error:
        raise _damaged(path, str(error)) from None
    missing = set(trainable) - {name for name, _ in model.named_parameters()}
    if missing:
        raise KdforgeError(f"checkpoint {path} does not fit this model (e.g. {sorted(missing)[0]})")
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in trainable.items():
            parameters[name].copy_(sharded_like(value, parameters[name]))
    _restore_optimizer(optimizer, optimizer_tensors, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if grad_scaler is not None and grad_scaler.is_enabled():
        if not state.get("grad_scaler"):  # the config check makes this a damaged folder, not another precision
            raise _damaged(path, "state.json lacks the float16 loss scaler")
        grad_scaler.load_state_dict(state["grad_scaler"])
    _restore_rng_states(rng, world, path)
    return state["step"]
