"""Reading audio at any rate and channel layout, and audiofolders."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from kdforge.data.audio import load_audio, read_audiofolder, read_metadata
from kdforge.errors import KdforgeError


def tone(frequency: float, rate: int, seconds: float, amplitude: float) -> np.ndarray:
    """``(rate * seconds,)`` float32 sine."""
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def peak_frequency(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio))
    return float(np.fft.rfftfreq(len(audio), 1 / rate)[spectrum.argmax()])


def test_44k1_stereo_is_mixed_down_and_resampled(tmp_path):
    left, right = tone(440, 44_100, 1.0, 0.6), tone(440, 44_100, 1.0, 0.2)
    soundfile.write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), 44_100)
    audio = load_audio(tmp_path / "stereo.wav")
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - 16_000) <= 1
    assert peak_frequency(audio, 16_000) == pytest.approx(440, abs=1.5)
    middle = audio[2000:14000]  # away from the resampler's edges
    assert np.max(np.abs(middle)) == pytest.approx(0.4, abs=0.01)  # the mean of 0.6 and 0.2


def test_8k_flac_is_upsampled_without_changing_pitch(tmp_path):
    soundfile.write(tmp_path / "low.flac", tone(1000, 8_000, 0.5, 0.5), 8_000)
    audio = load_audio(tmp_path / "low.flac")
    assert abs(len(audio) - 8_000) <= 1
    assert peak_frequency(audio, 16_000) == pytest.approx(1000, abs=2.5)
    # nothing above the old Nyquist frequency (4 kHz) appears
    spectrum = np.abs(np.fft.rfft(audio))
    frequencies = np.fft.rfftfreq(len(audio), 1 / 16_000)
    assert spectrum[frequencies > 4200].max() < 1e-2 * spectrum.max()


def test_16k_mono_passes_through_unchanged(tmp_path):
    samples = tone(300, 16_000, 0.25, 0.5)
    soundfile.write(tmp_path / "same.wav", samples, 16_000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(tmp_path / "same.wav"), samples)


def test_empty_unreadable_and_missing_files_raise_one_clear_error(tmp_path):
    soundfile.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16_000)
    with pytest.raises(KdforgeError, match="holds no samples"):
        load_audio(tmp_path / "empty.wav")
    (tmp_path / "junk.wav").write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(KdforgeError, match="cannot decode"):
        load_audio(tmp_path / "junk.wav")
    with pytest.raises(KdforgeError, match="does not exist"):
        load_audio(tmp_path / "absent.wav")


def test_channel_counts_and_sample_rates_that_are_not_speech_recordings_are_refused(tmp_path):
    soundfile.write(tmp_path / "stereo.wav", np.stack([tone(200, 16_000, 0.2, 0.3)] * 2, axis=1), 16_000)
    assert load_audio(tmp_path / "stereo.wav").shape == (3200,)  # stereo is mixed down
    soundfile.write(tmp_path / "surround.wav", np.stack([tone(200, 16_000, 0.2, 0.3)] * 6, axis=1), 16_000)
    with pytest.raises(KdforgeError, match=r"surround.wav has 6 channels; kdforge reads mono or stereo"):
        load_audio(tmp_path / "surround.wav")
    soundfile.write(tmp_path / "slow.wav", tone(100, 500, 1.0, 0.3), 500)
    with pytest.raises(KdforgeError, match=r"slow.wav is sampled at 500 Hz; kdforge resamples 8000-384000 Hz"):
        load_audio(tmp_path / "slow.wav")


def test_bad_audio_reaches_the_user_as_one_line_and_exit_2(tiny_whisper, tmp_path):
    import subprocess
    import sys

    write_folder(tmp_path / "data", ["surround.wav,hello"])
    soundfile.write(tmp_path / "data" / "surround.wav", np.stack([tone(200, 16_000, 0.2, 0.3)] * 6, axis=1), 16_000)
    done = subprocess.run([sys.executable, "-m", "kdforge", "eval", "--model", str(tiny_whisper), "--data",
                           str(tmp_path / "data")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"kdforge: error: audio file {tmp_path / 'data' / 'surround.wav'} has 6 channels; kdforge reads mono or "
        "stereo (mixed down to mono)"]


def write_folder(folder, rows, header="file_name,transcription"):
    folder.mkdir(parents=True)
    (folder / "metadata.csv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")


def test_audiofolder_items_come_in_metadata_order_at_16k(tmp_path):
    folder = tmp_path / "corpus" / "test"
    write_folder(folder, ["b.wav,\"second, with a comma\"", "a.wav,first"])
    soundfile.write(folder / "a.wav", tone(200, 22_050, 0.5, 0.3), 22_050)
    soundfile.write(folder / "b.wav", tone(200, 8_000, 0.25, 0.3), 8_000)
    items = list(read_audiofolder(folder))
    assert [(i.id, i.transcription) for i in items] == [("b.wav", "second, with a comma"), ("a.wav", "first")]
    assert [len(i.audio) for i in items] == pytest.approx([4000, 8000], abs=1)


def test_audiofolder_errors_name_the_problem(tmp_path):
    with pytest.raises(KdforgeError, match="splits test: pass"):
        write_folder(tmp_path / "c" / "test", ["a.wav,x"])
        read_metadata(tmp_path / "c")
    write_folder(tmp_path / "nocol", ["a.wav"], header="file_name")
    with pytest.raises(KdforgeError, match="lacks the column"):
        read_metadata(tmp_path / "nocol")
    write_folder(tmp_path / "gone", ["a.wav,hello"])
    with pytest.raises(KdforgeError, match="missing file"):
        read_metadata(tmp_path / "gone")


def test_the_labelled_part_ignores_file_order_and_grows_by_adding():
    from kdforge.data.audio import AudioRecord, labelled_ids

    records = [AudioRecord(f"{i:04d}.wav", None, "text") for i in range(50)]
    ten = labelled_ids(records, 10)
    assert len(ten) == 10 and labelled_ids(records[::-1], 10) == ten
    assert ten < labelled_ids(records, 20)
    assert labelled_ids(records, None) == {r.id for r in records}
    with pytest.raises(KdforgeError, match="data.labelled is 51 but the training set has 50"):
        labelled_ids(records, 51)
