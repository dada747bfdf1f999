"""Reading speech: any WAV/FLAC (any rate, any channel count) as 16 kHz mono, and audiofolders.

Files are decoded with ``soundfile`` (libsndfile), mixed down to mono by averaging the channels,
and resampled with ``soxr`` (a band-limited resampler, "high quality" preset). An *audiofolder* is
the Hugging Face layout: a folder with ``metadata.csv`` whose ``file_name`` column names audio files
relative to the folder and whose ``transcription`` column holds the reference text.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import soxr

from kdforge.errors import KdforgeError

SAMPLE_RATE = 16_000
#: More channels than this are not one speaker's recording: refused rather than averaged.
MAX_CHANNELS = 2
#: Below 8 kHz (telephone band) speech has lost what a 16 kHz model listens to; above, no real
#: recording exists and the rate is a corrupted header.
MIN_RATE, MAX_RATE = 8_000, 384_000
REQUIRED_COLUMNS = ("file_name", "transcription")


@dataclass(frozen=True)
class AudioRecord:
    """One row of ``metadata.csv``: ``id`` is the file name as written there."""

    id: str
    path: Path
    transcription: str


@dataclass(frozen=True)
class AudioItem:
    """One utterance with its samples: ``audio`` is ``(samples,)`` float32 at 16 kHz."""

    id: str
    audio: np.ndarray
    transcription: str


def to_mono(frames: np.ndarray) -> np.ndarray:
    """``(samples,)`` or ``(samples, channels)`` -> ``(samples,)``: the mean of the channels."""
    return frames if frames.ndim == 1 else frames.mean(axis=1)


def resample(audio: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    """``(samples,)`` at ``from_rate`` -> ``(about samples * to_rate / from_rate,)`` float32."""
    audio = np.asarray(audio, dtype=np.float32)
    return audio if from_rate == to_rate else soxr.resample(audio, from_rate, to_rate, quality="HQ")


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read a WAV/FLAC (or any format libsndfile reads) as ``(samples,)`` float32 mono at ``sample_rate``.

    Raises:
        KdforgeError: the file is missing, cannot be decoded, or holds no samples.
    """
    path = Path(path)
    if not path.is_file():
        raise KdforgeError(f"audio file {path} does not exist")
    try:
        frames, file_rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        raise KdforgeError(f"cannot decode audio file {path}: {error}") from error
    if frames.size == 0:
        raise KdforgeError(f"audio file {path} holds no samples")
    if frames.shape[1] > MAX_CHANNELS:
        raise KdforgeError(f"audio file {path} has {frames.shape[1]} channels; kdforge reads mono or stereo "
                           "(mixed down to mono)")
    if not MIN_RATE <= file_rate <= MAX_RATE:
        raise KdforgeError(f"audio file {path} is sampled at {file_rate} Hz; kdforge resamples "
                           f"{MIN_RATE}-{MAX_RATE} Hz audio to {sample_rate} Hz")
    return resample(to_mono(frames), file_rate, sample_rate)


def _split_hint(data_dir: Path) -> str:
    """Name the sub-folders that do hold a ``metadata.csv`` (the splits of a corpus)."""
    splits = sorted(p.name for p in data_dir.iterdir() if (p / "metadata.csv").is_file()) if data_dir.is_dir() else []
    return f"; it has splits {', '.join(splits)}: pass e.g. {data_dir / splits[0]}" if splits else ""


def read_metadata(data_dir: str | Path) -> list[AudioRecord]:
    """The rows of ``data_dir/metadata.csv``, in file order, with paths resolved.

    Raises:
        KdforgeError: no ``metadata.csv`` (the message names the split folders if there are
            some), a missing column, an empty table, or a row naming a missing file.
    """
    data_dir = Path(data_dir)
    metadata = data_dir / "metadata.csv"
    if not metadata.is_file():
        raise KdforgeError(f"{data_dir} is not an audiofolder (no metadata.csv){_split_hint(data_dir)}")
    with open(metadata, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in REQUIRED_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise KdforgeError(f"{metadata} lacks the column(s) {', '.join(missing)}")
        records = [AudioRecord(row["file_name"], data_dir / row["file_name"], row["transcription"]) for row in reader]
    if not records:
        raise KdforgeError(f"{metadata} lists no audio")
    absent = [record.id for record in records if not record.path.is_file()]
    if absent:
        raise KdforgeError(f"{metadata} names {len(absent)} missing file(s), first {absent[0]}")
    return records


def read_audiofolder(data_dir: str | Path) -> Iterator[AudioItem]:
    """Every utterance of an audiofolder, loaded one at a time (16 kHz mono float32)."""
    for record in read_metadata(data_dir):
        yield AudioItem(record.id, load_audio(record.path), record.transcription)


def labelled_ids(records: list[AudioRecord], count: int | None) -> set[str]:
    """The ids of the ``count`` records whose transcripts a run may use (all of them for ``None``).

    The choice hashes each id, so it depends on neither the training seed nor the file order: every
    run on the same corpus and ``count`` sees the same labelled part, and a larger count adds to it.

    Raises:
        KdforgeError: ``count`` exceeds the number of records.
    """
    if count is None:
        return {record.id for record in records}
    if count > len(records):
        raise KdforgeError(f"data.labelled is {count} but the training set has {len(records)} utterances")
    ranked = sorted(records, key=lambda record: hashlib.sha256(record.id.encode()).hexdigest())
    return {record.id for record in ranked[:count]}
