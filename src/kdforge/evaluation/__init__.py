"""Speech recognition evaluation: text normalisation, WER/CER, recognizers and :func:`evaluate`.

``evaluate`` and the recognizers pull in torch and transformers, so they load on first use: the
corpus generator imports :mod:`kdforge.evaluation.normalise` in every worker process and should not
pay for them.
"""

from __future__ import annotations

from importlib import import_module

from kdforge.evaluation.normalise import normalise_text
from kdforge.evaluation.scoring import ErrorRates, error_rates

_LAZY = {"evaluate": "runner", "evaluate_recognizer": "runner", "Recognizer": "recognizers",
         "WhisperRecognizer": "recognizers", "load_recognizer": "recognizers"}

__all__ = ["ErrorRates", "error_rates", "normalise_text", *_LAZY]


def __getattr__(name: str):
    """Import the torch-backed names of ``__all__`` when first asked for."""
    if name not in _LAZY:
        raise AttributeError(f"module 'kdforge.evaluation' has no attribute {name!r}")
    return getattr(import_module(f"kdforge.evaluation.{_LAZY[name]}"), name)
