"""A speech corpus any machine can make: eSpeak NG (through ``espeakng-loader``) reading real sentences.

The ``espeakng-loader`` wheel ships ``libespeak-ng`` and its voice data but no Python API, so the
library is driven through ``ctypes``: ``espeak_Initialize`` in synchronous mode, a synth callback
that collects the int16 chunks (22050 Hz), ``espeak_SetVoiceByName("en-us+f3")`` and
``espeak_SetParameter`` for the rate (words/min) and pitch (0-100). The library keeps its state per
process, so every worker process holds its own engine.

A *speaker* is a voice (an English accent: ``en-us``, ``en-gb-x-rp``, ...) plus a variant (``+m3``,
``+f2``, or none): eSpeak's variants change pitch, formants and voice quality. Each utterance draws a
speaker, a sentence, a rate and a pitch; optionally white noise at a signal-to-noise ratio.

The split rule does not depend on the seed: speakers and sentences are ranked by the SHA-256 of their
names and the first ``test_fraction`` of each ranking is the test split. Test speakers therefore
never speak in any training split made from the same voices, and test sentences are never trained
on, whatever seeds two corpora were made with. The seed decides everything else (who says what,
rate, pitch, noise), and the same seed gives byte-identical files.

Output (the Hugging Face "audiofolder" layout, one folder per split)::

    OUT/train/metadata.csv   file_name,transcription,speaker,rate_wpm,pitch,snr_db
    OUT/train/000000.wav     16 kHz mono PCM-16
    OUT/test/...
    OUT/corpus.json          parameters, speakers per split, durations, synthesis rate
"""

from __future__ import annotations

import csv
import ctypes
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile
import soxr

from kdforge.data.sentences import SOURCE, load_sentences
from kdforge.errors import KdforgeError
from kdforge.files import check_new_folder

SAMPLE_RATE = 16_000
DEFAULT_VOICES = ("en-us", "en-us-nyc", "en", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan",
                  "en-gb-x-gbcwmd", "en-029")
DEFAULT_VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
DEFAULT_SPEED = (140, 200)  # words per minute; eSpeak's own default is 175
DEFAULT_PITCH = (30, 70)    # eSpeak's 0-100 scale; 50 is the voice's normal pitch
METADATA_COLUMNS = ("file_name", "transcription", "speaker", "rate_wpm", "pitch", "snr_db")
# eSpeak keeps hidden state across utterances (its pitch-flutter phase, for one: not reset even by
# espeak_Terminate + espeak_Initialize), so a file depends on what its process made before. Each
# fixed run of this many utterances is made by a fresh process: the bytes then depend on the seed
# alone, not on the number of workers or on scheduling.
UTTERANCES_PER_PROCESS = 200

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # report a missing data folder instead of calling exit()
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_PARAMETER_RATE, _PARAMETER_PITCH = 1, 3
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


@dataclass(frozen=True)
class Speaker:
    """One eSpeak voice with one variant; ``name`` is what ``espeak_SetVoiceByName`` takes."""

    voice: str
    variant: str = ""

    @property
    def name(self) -> str:
        return f"{self.voice}+{self.variant}" if self.variant else self.voice


@dataclass(frozen=True)
class Utterance:
    """Everything needed to synthesise one file, decided in advance so workers need no randomness
    of their own (``noise_seed`` seeds eSpeak's noise generator and the additive noise)."""

    index: int
    split: str
    speaker: str
    text: str
    rate_wpm: int
    pitch: int
    snr_db: float | None
    noise_seed: int

    @property
    def file_name(self) -> str:
        return f"{self.index:06d}.wav"


@dataclass
class CorpusSummary:
    """What :func:`synthesize_corpus` made, also written to ``corpus.json``."""

    out: str
    seed: int
    sentence_source: str
    utterances: dict[str, int]
    speakers: dict[str, list[str]]
    audio_seconds: float
    wall_seconds: float
    realtime_factor: float  # seconds of audio made per second of wall time
    workers: int
    speed_wpm: tuple[float, float]
    pitch: tuple[float, float]
    noise_snr_db: tuple[float, float] | None


class Espeak:
    """The eSpeak NG library of this process, initialised once (its state is global to the process)."""

    _instance: Espeak | None = None

    def __init__(self) -> None:
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.data_dir = Path(espeakng_loader.get_data_path())
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                          ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        # espeak_Initialize wants the folder that *contains* espeak-ng-data
        self.sample_rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, str(self.data_dir.parent).encode(),
                                                      _INITIALIZE_DONT_EXIT)
        if self.sample_rate <= 0:
            raise KdforgeError(f"eSpeak NG failed to initialise with data in {self.data_dir}")
        self._chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._collect)  # kept on self: ctypes must not free it
        self.lib.espeak_SetSynthCallback(self._callback)

    @classmethod
    def get(cls) -> Espeak:
        """This process' engine, created on first use."""
        if cls._instance is None:
            cls._instance = Espeak()
        return cls._instance

    def _collect(self, wav, num_samples: int, events) -> int:
        """Synth callback: keep a copy of each int16 chunk; 0 = continue synthesis."""
        if wav and num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0

    def has_variant(self, variant: str) -> bool:
        """Whether the variant file exists (eSpeak silently ignores an unknown ``+variant``)."""
        return not variant or (self.data_dir / "voices" / "!v" / variant).is_file()

    def set_voice(self, speaker_name: str) -> bool:
        """Select a voice such as ``en-us+f3``; False when eSpeak does not know the voice."""
        return self.lib.espeak_SetVoiceByName(speaker_name.encode()) == 0

    def speak(self, text: str, speaker_name: str, rate_wpm: int, pitch: int, seed: int) -> np.ndarray:
        """Synthesise ``text``; returns ``(samples,)`` int16 at :attr:`sample_rate`.

        ``seed`` (0 <= seed < 2**31) reseeds eSpeak's noise generator, which ``espeak_Initialize``
        seeds from the clock. The output still depends on what this process synthesised before
        (see :data:`UTTERANCES_PER_PROCESS`).
        """
        if not self.set_voice(speaker_name):
            raise KdforgeError(f"eSpeak NG has no voice {speaker_name!r}")
        self.lib.espeak_ng_SetRandSeed(seed)
        self.lib.espeak_SetParameter(_PARAMETER_RATE, rate_wpm, 0)
        self.lib.espeak_SetParameter(_PARAMETER_PITCH, pitch, 0)
        self._chunks = []
        encoded = text.encode()
        status = self.lib.espeak_Synth(encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if status != 0 or not self._chunks:
            raise KdforgeError(f"eSpeak NG produced no audio for {text!r} (status {status})")
        return np.concatenate(self._chunks)


def add_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """White Gaussian noise at ``snr_db`` dB below the mean power of the whole of ``audio``.

    Args:
        audio: ``(samples,)`` float.
    Returns:
        ``(samples,)`` float64, ``audio`` plus the noise.
    """
    signal_power = float(np.mean(np.square(audio, dtype=np.float64)))
    noise_power = signal_power / 10 ** (snr_db / 10)
    return audio + rng.normal(0.0, np.sqrt(noise_power), size=audio.shape)


def measured_snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    """10 log10 of clean power over the power of ``noisy - clean``; both ``(samples,)``."""
    clean = clean.astype(np.float64)
    noise = noisy.astype(np.float64) - clean
    return float(10 * np.log10(np.mean(clean**2) / np.mean(noise**2)))


def render(utterance: Utterance) -> np.ndarray:
    """Synthesise, resample to 16 kHz and add the planned noise: ``(samples,)`` float32 in [-1, 1]."""
    engine = Espeak.get()
    speech = engine.speak(utterance.text, utterance.speaker, utterance.rate_wpm, utterance.pitch,
                          utterance.noise_seed % 2**31)
    audio = soxr.resample(speech.astype(np.float32) / 32768.0, engine.sample_rate, SAMPLE_RATE)
    if utterance.snr_db is not None:
        audio = add_noise(audio, utterance.snr_db, np.random.default_rng(utterance.noise_seed))
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def write_utterance(utterance: Utterance, split_dir: Path) -> float:
    """Render one utterance into ``split_dir``; returns its duration in seconds."""
    audio = render(utterance)
    soundfile.write(split_dir / utterance.file_name, audio, SAMPLE_RATE, subtype="PCM_16")
    return len(audio) / SAMPLE_RATE


def stable_rank(names: list[str]) -> list[str]:
    """``names`` ordered by SHA-256: a pseudo-random order that no seed changes."""
    return sorted(names, key=lambda name: hashlib.sha256(name.encode()).hexdigest())


def split_by_rank(names: list[str], test_fraction: float) -> tuple[list[str], list[str]]:
    """``(train, test)``: the first ``round(len * test_fraction)`` names of :func:`stable_rank` are
    test (at least one when ``test_fraction > 0``, and at least one left for training)."""
    ranked = stable_rank(names)
    n_test = round(len(ranked) * test_fraction)
    if test_fraction > 0:
        n_test = min(max(n_test, 1), len(ranked) - 1)
    return ranked[n_test:], ranked[:n_test]


def make_speakers(voices: list[str], variants: list[str]) -> list[Speaker]:
    """Every voice with every variant, checked against the installed eSpeak data.

    Raises:
        KdforgeError: an unknown voice or variant (``en-gb`` is not a voice name: use ``en`` or
            ``en-gb-x-rp``).
    """
    engine = Espeak.get()
    for variant in variants:
        if not engine.has_variant(variant):
            known = sorted(path.name for path in (engine.data_dir / "voices" / "!v").iterdir())
            raise KdforgeError(f"unknown eSpeak variant {variant!r}; known: {', '.join(known)}")
    for voice in voices:
        if not engine.set_voice(voice):
            raise KdforgeError(f"unknown eSpeak voice {voice!r}; English voices: {', '.join(DEFAULT_VOICES)}")
    return [Speaker(voice, variant) for voice in voices for variant in variants]


def plan_split(split: str, n: int, speakers: list[str], sentences: list[str], first_index: int,
               rng: np.random.Generator, speed: tuple[int, int], pitch: tuple[int, int],
               noise_snr: tuple[float, float] | None) -> list[Utterance]:
    """Draw ``n`` utterances of one split: speakers uniformly, sentences without replacement while
    they last (then again from the full list), rate and pitch uniform integers, SNR uniform."""
    sentence_order = np.concatenate([rng.permutation(len(sentences)) for _ in range(-(-n // len(sentences)))])
    plan = []
    for offset in range(n):
        snr_draw = rng.uniform()  # drawn even without noise, so adding noise changes nothing else
        snr = None if noise_snr is None else round(noise_snr[0] + snr_draw * (noise_snr[1] - noise_snr[0]), 2)
        plan.append(Utterance(
            index=first_index + offset, split=split, speaker=speakers[rng.integers(len(speakers))],
            text=sentences[sentence_order[offset]], rate_wpm=int(rng.integers(speed[0], speed[1] + 1)),
            pitch=int(rng.integers(pitch[0], pitch[1] + 1)), snr_db=snr,
            noise_seed=int(rng.integers(2**63))))
    return plan


def checked_range(value: float | tuple[float, float] | None, name: str, lowest: float,
                  highest: float) -> tuple[float, float] | None:
    """A fixed value ``x`` becomes ``(x, x)``; a range must be ordered and lie in ``lowest..highest``."""
    if value is None:
        return None
    low, high = (value, value) if isinstance(value, (int, float)) else value
    if not lowest <= low <= high <= highest:
        raise KdforgeError(f"{name} must be an ordered range within {lowest}..{highest}, got {low}:{high}")
    return low, high


def write_metadata(split_dir: Path, utterances: list[Utterance]) -> None:
    """``metadata.csv`` of one split (audiofolder layout; the extra columns become features)."""
    with open(split_dir / "metadata.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(METADATA_COLUMNS)
        for u in utterances:
            writer.writerow([u.file_name, u.text, u.speaker, u.rate_wpm, u.pitch, "" if u.snr_db is None else u.snr_db])


def plan_corpus(n: int, seed: int, speakers: list[str], sentences: list[str], test_fraction: float,
                speed: tuple[int, int], pitch: tuple[int, int],
                noise_snr: tuple[float, float] | None) -> tuple[dict[str, list[Utterance]], dict[str, list[str]]]:
    """Split speakers and sentences (:func:`split_by_rank`) and draw every utterance from ``seed``.

    Returns:
        ``({split: utterances}, {split: speakers})``; ``test`` only when it gets utterances.
    """
    train_speakers, test_speakers = split_by_rank(speakers, test_fraction)
    train_sentences, test_sentences = split_by_rank(sentences, test_fraction)
    rng = np.random.default_rng(seed)
    n_test = round(n * test_fraction)
    plans = {"train": plan_split("train", n - n_test, train_speakers, train_sentences, 0, rng, speed, pitch, noise_snr)}
    split_speakers = {"train": sorted(train_speakers)}
    if n_test:
        plans["test"] = plan_split("test", n_test, test_speakers, test_sentences, n - n_test, rng, speed, pitch,
                                   noise_snr)
        split_speakers["test"] = sorted(test_speakers)
    return plans, split_speakers


def write_corpus(staging: Path, plans: dict[str, list[Utterance]], workers: int) -> tuple[float, float]:
    """Write every split's ``metadata.csv`` and audio under ``staging``; ``(audio_seconds, wall_seconds)``."""
    tasks = []
    for split, plan in plans.items():
        (staging / split).mkdir()
        write_metadata(staging / split, plan)
        tasks += [(utterance, str(staging / split)) for utterance in plan]
    start = time.perf_counter()
    durations = _run_tasks(tasks, workers)
    return sum(durations), time.perf_counter() - start


def synthesize_corpus(out: str | Path, n: int, seed: int, voices: list[str] | None = None,
                      variants: list[str] | None = None,
                      noise_snr: float | tuple[float, float] | None = None,
                      speed: tuple[int, int] | None = None, pitch: tuple[int, int] | None = None,
                      sentences_file: str | Path | None = None, test_fraction: float = 0.2,
                      workers: int = 2) -> CorpusSummary:
    """Synthesise ``n`` utterances into ``out`` (``train/`` and ``test/`` audiofolders).

    The corpus is written to a hidden sibling folder and renamed to ``out`` once complete.

    Args:
        out: new or empty folder.
        n: utterances in all; ``round(n * test_fraction)`` of them go to ``test/``.
        seed: decides speakers, sentences, rates, pitches and noise; same seed, same bytes.
        voices: eSpeak voices (accents); default :data:`DEFAULT_VOICES`.
        variants: eSpeak variants ("" = the plain voice); default :data:`DEFAULT_VARIANTS`.
        noise_snr: None (clean), a SNR in dB, or a ``(low, high)`` range drawn per utterance.
        speed: ``(low, high)`` words per minute; default :data:`DEFAULT_SPEED`.
        pitch: ``(low, high)`` on eSpeak's 0-100 scale; default :data:`DEFAULT_PITCH`.
        sentences_file: one sentence per line instead of the built-in World English Bible ones.
        test_fraction: share of speakers, sentences and utterances held out for ``test/``.
        workers: synthesis processes at a time.

    Raises:
        KdforgeError: ``out`` is not empty, or a bad voice, variant, range or count.
    """
    out = Path(out)
    check_new_folder(out)
    if n < 1 or not 0 <= test_fraction < 1:
        raise KdforgeError(f"need n >= 1 and 0 <= test_fraction < 1, got n={n}, test_fraction={test_fraction}")
    speed = checked_range(speed or DEFAULT_SPEED, "speed (words/min)", 80, 450)
    pitch = checked_range(pitch or DEFAULT_PITCH, "pitch", 0, 100)
    noise = checked_range(noise_snr, "noise SNR (dB)", -20, 100)
    speakers = [s.name for s in make_speakers(list(voices or DEFAULT_VOICES), list(variants or DEFAULT_VARIANTS))]
    if len(speakers) < 2 and test_fraction > 0:
        raise KdforgeError("a train/test split needs at least two speakers (voices x variants)")
    plans, split_speakers = plan_corpus(n, seed, speakers, load_sentences(sentences_file), test_fraction,
                                        (int(speed[0]), int(speed[1])), (int(pitch[0]), int(pitch[1])), noise)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        audio_seconds, wall = write_corpus(staging, plans, workers)
        summary = CorpusSummary(
            out=str(out), seed=seed, sentence_source=SOURCE if sentences_file is None else str(sentences_file),
            utterances={split: len(plan) for split, plan in plans.items()}, speakers=split_speakers,
            audio_seconds=round(audio_seconds, 2), wall_seconds=round(wall, 3),
            realtime_factor=round(audio_seconds / wall, 1), workers=workers, speed_wpm=speed, pitch=pitch,
            noise_snr_db=noise)
        (staging / "corpus.json").write_text(json.dumps(asdict(summary), indent=2) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def _run_chunk(tasks: list[tuple[Utterance, str]]) -> list[float]:
    """Write one chunk in a fresh ``python -m kdforge.data.synth`` process; the durations.

    A plain subprocess rather than a multiprocessing "spawn" worker: spawn re-imports the parent's
    ``__main__`` (for the ``kdforge`` script, the whole CLI with torch), seconds per process.
    """
    payload = json.dumps([[asdict(utterance), split_dir] for utterance, split_dir in tasks])
    done = subprocess.run([sys.executable, "-m", "kdforge.data.synth"], input=payload, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        last_line = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise KdforgeError(f"a synthesis process failed: {last_line}")
    return json.loads(done.stdout)


def _run_tasks(tasks: list[tuple[Utterance, str]], workers: int) -> list[float]:
    """Write every utterance: chunks of :data:`UTTERANCES_PER_PROCESS`, each in a fresh process
    (never a fork of this one, which may hold eSpeak state), ``workers`` processes at a time."""
    chunks = [tasks[start:start + UTTERANCES_PER_PROCESS] for start in range(0, len(tasks), UTTERANCES_PER_PROCESS)]
    with ThreadPoolExecutor(max(1, min(workers, len(chunks)))) as pool:
        return [duration for chunk in pool.map(_run_chunk, chunks) for duration in chunk]


def _worker_main() -> None:
    """Entry point of a synthesis process: ``[[utterance fields, split folder], ...]`` as JSON on
    stdin; writes the files and prints their durations as a JSON list."""
    tasks = json.load(sys.stdin)
    json.dump([write_utterance(Utterance(**fields), Path(split_dir)) for fields, split_dir in tasks], sys.stdout)


if __name__ == "__main__":
    _worker_main()
