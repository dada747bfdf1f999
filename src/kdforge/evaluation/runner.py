"""Score a speech recognizer on an audiofolder: WER, CER and utterances per second.

Throughput is the number of utterances over the wall time of everything after the model is loaded:
reading and resampling the audio, feature extraction and decoding.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from kdforge.data.audio import AudioRecord, load_audio, read_metadata
from kdforge.errors import KdforgeError
from kdforge.evaluation.normalise import normalise_text
from kdforge.evaluation.recognizers import Recognizer, load_recognizer
from kdforge.evaluation.scoring import error_rates


#: Utterances are decoded in batches of similar length, sorted within groups of this many batches: a
#: batch then pads little (and a dynamic window shrinks), while only one group's audio is in memory.
SORT_GROUP_BATCHES = 32


def transcribe_all(recognizer: Recognizer, records: list[AudioRecord], batch_size: int,
                   progress: bool = True) -> tuple[list[str], float, float]:
    """Transcribe ``records`` in batches of ``batch_size`` utterances of similar length.

    Returns:
        ``(hypotheses, wall_seconds, audio_seconds)``; the hypotheses in the records' order.
    """
    if batch_size < 1:
        raise KdforgeError(f"batch size must be at least 1, got {batch_size}")
    hypotheses: list[str] = [""] * len(records)
    audio_seconds = 0.0
    start = time.perf_counter()
    group = batch_size * SORT_GROUP_BATCHES
    # disable=None: a bar on a terminal, silence in logs and pipes (it writes to stderr either way)
    with tqdm(total=len(records), unit="utt", desc="eval", disable=None if progress else True) as bar:
        for first in range(0, len(records), group):
            audio = {i: load_audio(records[i].path, recognizer.sampling_rate)
                     for i in range(first, min(first + group, len(records)))}
            audio_seconds += sum(len(samples) for samples in audio.values()) / recognizer.sampling_rate
            longest_first = sorted(audio, key=lambda i: len(audio[i]), reverse=True)
            for offset in range(0, len(longest_first), batch_size):
                batch = longest_first[offset:offset + batch_size]
                for index, text in zip(batch, recognizer.transcribe([audio[i] for i in batch]), strict=True):
                    hypotheses[index] = text
                bar.update(len(batch))
    return hypotheses, time.perf_counter() - start, audio_seconds


def write_hypotheses(out_jsonl: Path, records: list[AudioRecord], hypotheses: list[str],
                     members: dict[str, list[str]] | None = None) -> None:
    """One JSON object per utterance: id, reference, hypothesis and both normalised; with ``members``
    (an ensemble's, by model folder, each a hypothesis per record) also ``members``: each one's hypothesis
    of that utterance, so one decoding serves any later comparison of the members' words."""
    members = members or {}
    with open(out_jsonl, "w", encoding="utf-8") as handle:
        for index, (record, hypothesis) in enumerate(zip(records, hypotheses, strict=True)):
            row = {"id": record.id, "reference": record.transcription, "hypothesis": hypothesis,
                   "reference_normalised": normalise_text(record.transcription),
                   "hypothesis_normalised": normalise_text(hypothesis)}
            if members:
                row["members"] = {name: texts[index] for name, texts in members.items()}
            handle.write(json.dumps(row) + "\n")


def check_new_file(path: str | Path | None) -> Path | None:
    """``path`` as a Path, refusing a file that exists and is not empty."""
    if path is None:
        return None
    path = Path(path)
    if path.exists() and path.stat().st_size > 0:
        raise KdforgeError(f"{path} already exists: choose a new --out file")
    return path


def score_records(recognizer: Recognizer, records: list[AudioRecord], batch_size: int = 8,
                  out_jsonl: Path | None = None, progress: bool = True) -> dict:
    """Transcribe ``records``, score them, and keep the hypotheses in ``out_jsonl`` if given.

    Returns:
        ``{"wer", "cer", "n", "utterances_per_s", "seconds", "audio_seconds"}``.
    """
    hypotheses, seconds, audio_seconds = transcribe_all(recognizer, records, batch_size, progress)
    rates = error_rates([r.transcription for r in records], hypotheses, ids=[r.id for r in records])
    if out_jsonl is not None:
        write_hypotheses(out_jsonl, records, hypotheses)
    return {"wer": rates.wer, "cer": rates.cer, "n": len(records), "utterances_per_s": len(records) / seconds,
            "seconds": seconds, "audio_seconds": audio_seconds}


def evaluate_recognizer(recognizer: Recognizer, data_dir: str | Path, batch_size: int = 8,
                        out_jsonl: str | Path | None = None, progress: bool = True) -> dict:
    """WER/CER and throughput of ``recognizer`` on the audiofolder ``data_dir`` (see :func:`score_records`).

    Raises:
        KdforgeError: ``out_jsonl`` exists and is not empty, or a bad audiofolder.
    """
    out_jsonl = check_new_file(out_jsonl)
    return score_records(recognizer, read_metadata(data_dir), batch_size, out_jsonl, progress)


def evaluate(model_dir: str | Path, data_dir: str | Path, batch_size: int = 8, audio_ctx: int | None = None,
             out_jsonl: str | Path | None = None, progress: bool = True, no_repeat_ngram_size: int = 0) -> dict:
    """Load the model in ``model_dir`` (optionally cut to ``audio_ctx`` encoder positions, optionally
    with the loop guard of :class:`~kdforge.evaluation.recognizers.WhisperRecognizer`) and score it
    on the audiofolder ``data_dir``; see :func:`score_records` for the result.

    The data and ``out_jsonl`` are checked before the model is loaded, so mistakes fail fast.
    """
    out_jsonl = check_new_file(out_jsonl)
    records = read_metadata(data_dir)
    recognizer = load_recognizer(model_dir, audio_ctx=audio_ctx, no_repeat_ngram_size=no_repeat_ngram_size)
    return score_records(recognizer, records, batch_size, out_jsonl, progress)
