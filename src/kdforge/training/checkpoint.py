"""Run folders and checkpoints: safetensors + JSON, written atomically, the last few kept.

A run folder holds ``config.json`` (the validated config), ``checkpoints/step-NNNNNNN/`` and, once
finished, ``student/`` and ``result.json``. A checkpoint folder is built under a temporary name and
renamed into place, so a crash (or a full disk) at any moment leaves the previous checkpoint intact.
It holds the trainable weights, the optimizer's tensors (``*.safetensors``) and everything else
(step, scheduler, optimizer hyper-parameters, RNG state) in ``state.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kdforge.config import RunConfig
from kdforge.errors import KdforgeError

CHECKPOINTS = "checkpoints"


def claim_run_folder(out_dir: Path, config: RunConfig, resume: bool) -> None:
    """Make ``out_dir`` this run's folder, refusing to overwrite a finished or different run."""
    if (out_dir / "result.json").exists():
        raise KdforgeError(f"{out_dir} already holds a finished run; choose another --out")
    saved = out_dir / "config.json"
    if saved.exists():
        if not resume:
            raise KdforgeError(f"{out_dir} holds an unfinished run; pass --resume to continue it, or choose another --out")
        if json.loads(saved.read_text()) != config.model_dump(mode="json"):
            raise KdforgeError(f"{out_dir} was started with another config; resume with the same one")
        return
    if out_dir.exists() and any(out_dir.iterdir()):
        raise KdforgeError(f"{out_dir} is not empty and holds no kdforge run; choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(saved, config.model_dump(mode="json"))


def write_json_atomic(path: Path, payload: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(payload, indent=2) + "\n")
    temporary.replace(path)


def _optimizer_payload(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able rest."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *rest["scalars"].items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def save_checkpoint(out_dir: Path, step: int, trainable: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, keep: int) -> Path:
    """Write checkpoint ``step`` atomically and delete all but the newest ``keep``."""
    root = out_dir / CHECKPOINTS
    root.mkdir(exist_ok=True)
    final = root / f"step-{step:07d}"
    temporary = root / f".tmp-step-{step:07d}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        save_file({k: v.detach().contiguous() for k, v in trainable.items()}, temporary / "trainable.safetensors")
        optimizer_tensors, optimizer_rest = _optimizer_payload(optimizer)
        save_file(optimizer_tensors, temporary / "optimizer.safetensors")
        save_file({"torch": torch.get_rng_state()}, temporary / "rng.safetensors")
        write_json_atomic(temporary / "state.json", {"step": step, "optimizer": optimizer_rest,
                                                     "scheduler": scheduler.state_dict()})
        temporary.rename(final)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        raise KdforgeError(f"could not write checkpoint {final.name} ({error.strerror}); "
                           "the previous checkpoint is intact") from None
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    steps = sorted((out_dir / CHECKPOINTS).glob("step-*"))
    return steps[-1] if steps else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> int:
    """Restore weights, optimizer, scheduler and RNG from ``path``; return the step it was taken after."""
    state = json.loads((path / "state.json").read_text())
    trainable = load_file(path / "trainable.safetensors")
    missing = set(trainable) - {name for name, _ in model.named_parameters()}
    if missing:
        raise KdforgeError(f"checkpoint {path} does not fit this model (e.g. {sorted(missing)[0]})")
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in trainable.items():
            parameters[name].copy_(value)
    _restore_optimizer(optimizer, load_file(path / "optimizer.safetensors"), state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(load_file(path / "rng.safetensors")["torch"])
    return state["step"]
