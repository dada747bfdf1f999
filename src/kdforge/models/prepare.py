"""Putting converted checkpoints in place: the known ones once under ``$KDFORGE_HOME``, others anywhere.

``prepare(name)`` converts a known checkpoint (see :mod:`kdforge.models.registry`) into
``$KDFORGE_HOME/models/NAME`` (default ``~/.cache/kdforge``), a plain Hugging Face directory
that ``from_pretrained`` loads with no kdforge code. Every output directory is built in a
temporary folder beside its target and renamed into place only when complete, so an interrupted
run never leaves a half-written model behind; a prepared one carries ``manifest.json`` with the
sha256 of every file, and preparing it again does nothing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kdforge.errors import KdforgeError
from kdforge.files import check_new_folder, sha256_file
from kdforge.home import kdforge_home
from kdforge.models.ct2_whisper import convert_ct2_whisper, find_model_files
from kdforge.models.gguf_import import check_gguf_file, convert_gguf
from kdforge.models.registry import CHECKPOINTS, Checkpoint, get_checkpoint

MANIFEST = "manifest.json"


def model_dir(name: str, home: str | Path | None = None) -> Path:
    """Where the known checkpoint ``name`` is (or would be) prepared."""
    return kdforge_home(home) / "models" / get_checkpoint(name).name


# ---------------------------------------------------------------------------------------------
# Manifest and atomic directories
# ---------------------------------------------------------------------------------------------

def write_manifest(directory: Path, source: dict) -> None:
    """Write ``manifest.json``: ``source`` (what it was made from) and every file's sha256 and size."""
    files = {path.relative_to(directory).as_posix(): {"sha256": sha256_file(path), "bytes": path.stat().st_size}
             for path in sorted(directory.rglob("*")) if path.is_file() and path.name != MANIFEST}
    manifest = {"source": source, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def is_complete(directory: Path, verify_checksums: bool = False) -> bool:
    """Whether ``directory`` holds its manifest and every file listed there, of the listed size.

    Args:
        verify_checksums: also recompute every sha256 (reads the whole model).
    """
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (json.JSONDecodeError, KeyError):
        return False
    for relative, record in files.items():
        path = directory / relative
        if not path.is_file() or path.stat().st_size != record["bytes"]:
            return False
        if verify_checksums and sha256_file(path) != record["sha256"]:
            return False
    return True


def build_atomically(target: Path, build: Callable[[Path], None], source: dict) -> None:
    """Run ``build(staging_dir)``, add the manifest, then rename the staging folder to ``target``.

    The staging folder lies beside ``target`` (same file system, so the rename is atomic) and is
    removed if anything fails. An empty ``target`` directory is replaced.

    Raises:
        KdforgeError: ``target`` is not empty (also when another process finished it first).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would make a shared model folder private
    try:
        build(staging)
        write_manifest(staging, source)
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        try:
            staging.rename(target)
        except OSError as error:
            raise KdforgeError(f"{target} appeared while it was being built: {error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Known checkpoints
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrepareResult:
    """What ``prepare`` did for one checkpoint: ``created`` is False when it was already there."""

    name: str
    path: Path
    created: bool


def _convert(checkpoint: Checkpoint, out_dir: Path) -> None:
    """Convert an installed checkpoint into the empty directory ``out_dir``."""
    model_files, assets_dir = checkpoint.source_paths()
    if checkpoint.format == "ct2-whisper":
        convert_ct2_whisper(model_files, assets_dir, out_dir)
    else:
        convert_gguf(model_files[0], out_dir)


def prepare_checkpoint(checkpoint: Checkpoint, home: str | Path | None = None) -> PrepareResult:
    """Convert one known checkpoint into its folder under ``home`` unless it is already complete.

    A folder left incomplete (no manifest, or missing or truncated files) is rebuilt.

    Raises:
        KdforgeError: its packages are not installed.
    """
    target = model_dir(checkpoint.name, home)
    if is_complete(target):
        return PrepareResult(checkpoint.name, target, created=False)
    checkpoint.source_paths()  # fail with the install hint before touching the cache
    if target.exists():
        shutil.rmtree(target)
    source = {"name": checkpoint.name, "format": checkpoint.format, "packages": checkpoint.distributions}
    build_atomically(target, lambda staging: _convert(checkpoint, staging), source)
    return PrepareResult(checkpoint.name, target, created=True)


def prepare(name: str, home: str | Path | None = None) -> list[PrepareResult]:
    """Prepare the known checkpoint ``name``, or every one for ``"all"``.

    Returns:
        One result per checkpoint, in registry order.

    Raises:
        KdforgeError: unknown name, or a package not installed.
    """
    names = list(CHECKPOINTS) if name == "all" else [get_checkpoint(name).name]
    return [prepare_checkpoint(CHECKPOINTS[each], home) for each in names]


@dataclass(frozen=True)
class ModelRow:
    """One line of ``kdforge models list``."""

    name: str
    installed: bool
    prepared: bool
    size_mb: int
    licence: str
    parameters: int
    path: Path


def list_models(home: str | Path | None = None) -> list[ModelRow]:
    """Every known checkpoint: installed (its packages present) and prepared (a complete folder)."""
    rows = []
    for checkpoint in CHECKPOINTS.values():
        target = model_dir(checkpoint.name, home)
        rows.append(ModelRow(checkpoint.name, checkpoint.is_installed(), is_complete(target), checkpoint.size_mb,
                             checkpoint.licence, checkpoint.parameters, target))
    return rows


# ---------------------------------------------------------------------------------------------
# Any checkpoint, into a directory of the user's choice
# ---------------------------------------------------------------------------------------------

def import_ct2_whisper(src_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert a CTranslate2 Whisper directory (``model.bin`` or its parts) into ``out_dir``.

    Raises:
        KdforgeError: ``out_dir`` not empty, or a checkpoint the converter refuses.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    check_new_folder(out_dir)
    if not src_dir.is_dir():
        raise KdforgeError(f"{src_dir} is not a directory")
    model_files = find_model_files(src_dir)
    source = {"format": "ct2-whisper", "files": [str(path) for path in model_files]}
    build_atomically(out_dir, lambda staging: convert_ct2_whisper(model_files, src_dir, staging), source)
    return out_dir


def import_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Convert a GGUF causal LM into the safetensors Hugging Face directory ``out_dir``.

    Raises:
        KdforgeError: ``out_dir`` not empty, or not a GGUF causal LM.
    """
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    check_new_folder(out_dir)
    check_gguf_file(gguf_file)
    source = {"format": "gguf", "files": [str(gguf_file)]}
    build_atomically(out_dir, lambda staging: convert_gguf(gguf_file, staging), source)
    return out_dir
