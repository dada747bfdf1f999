"""Built-in tiny models and speech, named ``builtin:NAME`` in a config and made on first use.

The tiny configs (``configs/tiny-*.yaml``), tests and examples need teachers, students and data
that exist wherever kdforge is installed and train in seconds on a CPU. Each is a deterministic
function of its name (fixed seeds), built once into ``$KDFORGE_HOME/builtin/NAME``
(:func:`kdforge.home.built_once`) and reused after. The weights are random: these models exercise
every mechanism of a recipe, they are not meant to transcribe or write anything useful.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from kdforge.errors import KdforgeError
from kdforge.home import built_once

PREFIX = "builtin:"
#: Makes a built-in into ``out``; ``home`` is where the built-ins it starts from live.
Builder = Callable[[Path, "Path | None"], None]


def _tiny_lm_tokenizer(out: Path, home: Path | None) -> None:
    from kdforge.data.lm import builtin_records
    from kdforge.models.tiny import train_tokenizer

    texts = [r["text"] for r in builtin_records("web-text")]
    texts += [r["query"] + "\n" + r["response"] for r in builtin_records("arithmetic")[:5000]]
    train_tokenizer(texts, vocab_size=2048).save_pretrained(out)


def _tiny_lm(size: str, seed: int) -> Builder:
    def build(out: Path, home: Path | None) -> None:
        from transformers import AutoTokenizer

        from kdforge.models.tiny import build_tiny_lm

        tokenizer = AutoTokenizer.from_pretrained(builtin_folder("tiny-lm-tokenizer", home))
        build_tiny_lm(out, size, tokenizer, seed=seed)
    return build


def _tiny_whisper(**shape) -> Builder:
    def build(out: Path, home: Path | None) -> None:
        from kdforge.models.tiny import build_tiny_whisper

        build_tiny_whisper(out, window_seconds=8, **shape)
    return build


def _tiny_ctc(out: Path, home: Path | None) -> None:
    from kdforge.models.ctc import build_ctc_model

    build_ctc_model(out, size="tiny", frame_stack=4, seed=0)


def _tiny_speech(out: Path, home: Path | None) -> None:
    from kdforge.data.synth import synthesize_corpus

    synthesize_corpus(out / "corpus", 40, seed=3, test_fraction=0.2, workers=1)


#: Every built-in name and how it is made (LMs share the tokenizer; Whisper models tiny.en's).
BUILDERS: dict[str, Builder] = {
    "tiny-lm-tokenizer": _tiny_lm_tokenizer,
    "tiny-lm-teacher": _tiny_lm("teacher", seed=0),
    "tiny-lm-student": _tiny_lm("student", seed=1),
    "tiny-whisper": _tiny_whisper(d_model=16, encoder_layers=2, decoder_layers=2, ffn_dim=32, seed=0),
    "tiny-whisper-wide": _tiny_whisper(d_model=32, encoder_layers=3, decoder_layers=2, ffn_dim=64, seed=1),
    "tiny-ctc": _tiny_ctc,
    "tiny-speech": _tiny_speech,
}

#: Audiofolders inside a built-in corpus: ``builtin:tiny-speech`` trains, ``builtin:tiny-speech-test``
#: (voices never heard in training) evaluates.
AUDIOFOLDERS = {"tiny-speech": ("tiny-speech", "corpus/train"), "tiny-speech-test": ("tiny-speech", "corpus/test")}


def builtin_folder(name: str, home: Path | None = None) -> Path:
    """The folder of built-in ``name`` (a model directory, or the corpus) under kdforge's ``home``
    (default ``$KDFORGE_HOME``), built the first time.

    Raises:
        KdforgeError: an unknown name (the message lists the known ones).
    """
    if name not in BUILDERS:
        raise KdforgeError(f"unknown built-in model {PREFIX}{name} (known: {', '.join(BUILDERS)})")
    return built_once("builtin", name, lambda out: BUILDERS[name](out, home), home)


def builtin_audiofolder(name: str) -> Path:
    """The audiofolder ``builtin:NAME`` names (see :data:`AUDIOFOLDERS`), synthesised the first time."""
    if name not in AUDIOFOLDERS:
        raise KdforgeError(f"unknown built-in audio {PREFIX}{name} (known: {', '.join(AUDIOFOLDERS)})")
    corpus, folder = AUDIOFOLDERS[name]
    return builtin_folder(corpus) / folder


def resolve(location: str, audio: bool = False) -> str:
    """``location`` itself, or the folder a ``builtin:NAME`` stands for (an audiofolder with ``audio``)."""
    if not location.startswith(PREFIX):
        return location
    name = location.removeprefix(PREFIX)
    return str(builtin_audiofolder(name) if audio else builtin_folder(name))
