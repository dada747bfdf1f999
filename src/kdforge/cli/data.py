"""``kdforge synth-speech``: argument parsing for :func:`kdforge.data.synth.synthesize_corpus`."""

from __future__ import annotations

from pathlib import Path

import typer

from kdforge.errors import KdforgeError


def parse_range(text: str | None, name: str) -> tuple[float, float] | None:
    """``"20"`` -> ``(20, 20)``; ``"10:30"`` -> ``(10, 30)``; None stays None."""
    if text is None:
        return None
    try:
        low, _, high = text.partition(":")
        return float(low), float(high or low)
    except ValueError:
        raise KdforgeError(f"--{name} takes a number or a range LOW:HIGH, got {text!r}") from None


def parse_names(values: list[str] | None) -> list[str] | None:
    """Repeated and/or comma-separated names -> one list (None when not given)."""
    names = [name.strip() for value in values or [] for name in value.split(",") if name.strip()]
    return names or None


def synth_speech(
    out: Path = typer.Option(..., "--out", help="New (or empty) folder for train/ and test/ audiofolders."),
    n: int = typer.Option(..., "--n", help="Utterances in all (train + test)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same corpus, byte for byte."),
    voices: list[str] = typer.Option(None, "--voices",
                                     help="eSpeak voices, comma-separated (default: 8 English accents)."),
    variants: list[str] = typer.Option(None, "--variants",
                                       help="eSpeak variants such as m3,f2 (default: plain, m1-m7, f1-f5)."),
    noise_snr: str = typer.Option(None, "--noise-snr", help="White noise at this SNR in dB, or a range LOW:HIGH."),
    speed: str = typer.Option(None, "--speed", help="Words per minute, LOW:HIGH (default 140:200)."),
    pitch: str = typer.Option(None, "--pitch", help="eSpeak pitch 0-100, LOW:HIGH (default 30:70)."),
    sentences: Path = typer.Option(None, "--sentences", help="Text file, one sentence per line (default: built-in)."),
    test_fraction: float = typer.Option(0.2, "--test-fraction",
                                        help="Share of speakers, sentences and utterances held out."),
    workers: int = typer.Option(2, "--workers", help="Synthesis processes."),
) -> None:
    """Synthesise a speech corpus with eSpeak NG: 16 kHz WAV + metadata.csv per split."""
    from kdforge.data.synth import synthesize_corpus

    speed_range, pitch_range = parse_range(speed, "speed"), parse_range(pitch, "pitch")
    summary = synthesize_corpus(
        out, n, seed, voices=parse_names(voices), variants=parse_names(variants),
        noise_snr=parse_range(noise_snr, "noise-snr"),
        speed=None if speed_range is None else (int(speed_range[0]), int(speed_range[1])),
        pitch=None if pitch_range is None else (int(pitch_range[0]), int(pitch_range[1])),
        sentences_file=sentences, test_fraction=test_fraction, workers=workers)
    splits = ", ".join(f"{split} {count} utterances / {len(summary.speakers[split])} speakers"
                       for split, count in summary.utterances.items())
    print(f"wrote {out}: {splits}; {summary.audio_seconds:.0f} s of audio in {summary.wall_seconds:.1f} s "
          f"({summary.realtime_factor:.0f}x real time, {summary.workers} workers)")
