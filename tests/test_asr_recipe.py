"""The ASR recipes on tiny random models: Whisper (alignment, learning, audio_ctx export),
the CTC family (frame rate, learning, alphabet check) and SpecAugment."""

import pytest
import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from kdforge.config import SpecAugmentConfig, parse_config
from kdforge.data.augment import spec_augment
from kdforge.tasks.asr import WhisperTask
from kdforge.training.loop import train


SHORT_WINDOW = {"audio_ctx": 50, "spec_augment": {"time_masks": 1, "time_width": 5, "freq_masks": 1, "freq_width": 4}}


def asr_config(model_dir, data_dir, audio=SHORT_WINDOW, steps=40, lr=3e-2):
    """Labels only, evaluated on the training folder; the tiny Whisper gets a 1 s window by default."""
    return parse_config({
        "task": "asr",
        "student": {"path": str(model_dir)},
        "data": {"train": str(data_dir), "eval": str(data_dir)},
        "objective": {"name": "none", "ce_weight": 1.0},
        "audio": audio,
        "training": {"steps": steps, "batch_size": 4, "lr": lr, "eval_every": steps, "checkpoint_every": 100},
    })


def test_targets_are_the_text_tokens_after_the_prompt(tiny_whisper, speech, tmp_path):
    task = WhisperTask(asr_config(tiny_whisper, speech), tmp_path)
    batch = task.batch([0, 1])
    tokenizer = task.tokenizer
    first = task.train_examples[0]
    assert first[:2] == tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    assert batch["inputs"][0, 0].item() == first[0]
    text_and_eos = batch["targets"][0][batch["target_mask"][0]].tolist()
    assert text_and_eos == first[2:] and text_and_eos[-1] == tokenizer.eos_token_id
    from kdforge.data.audio import read_metadata

    assert tokenizer.decode(text_and_eos[:-1]) == " " + read_metadata(speech)[0].transcription
    assert batch["features"].shape == (2, 80, 100)  # audio_ctx 50 -> 1 s -> 100 mel frames


def test_training_lowers_the_loss_and_exports_the_short_window(tiny_whisper, speech, tmp_path):
    config = asr_config(tiny_whisper, speech)
    task = WhisperTask(config, tmp_path / "probe")
    task.student.eval()
    with torch.no_grad():
        before = task.loss(task.batch(list(range(len(task.train_examples)))))[0].item()
    result = train(config, tmp_path / "run", show_progress=False)
    student = WhisperForConditionalGeneration.from_pretrained(tmp_path / "run" / "student")
    processor = WhisperProcessor.from_pretrained(tmp_path / "run" / "student")
    assert student.config.max_source_positions == 50 and student.model.encoder.embed_positions.num_embeddings == 50
    assert processor.feature_extractor.n_samples == 16_000 and isinstance(processor.feature_extractor.chunk_length, int)
    from kdforge.data.audio import load_audio, read_metadata
    from kdforge.evaluation.recognizers import load_recognizer

    recognizer = load_recognizer(tmp_path / "run" / "student")  # what `kdforge eval` does with it
    assert len(recognizer.transcribe([load_audio(read_metadata(speech)[0].path)])) == 1
    trained = WhisperTask(asr_config(tmp_path / "run" / "student", speech), tmp_path / "probe2")
    trained.student.eval()
    with torch.no_grad():
        after = trained.loss(trained.batch(list(range(len(trained.train_examples)))))[0].item()
    assert after < 0.7 * before
    assert set(result["eval"]) == {"wer", "cer"}


def test_spec_augment_masks_bands_with_the_utterance_mean():
    torch.manual_seed(0)
    features = torch.randn(3, 80, 200)
    settings = SpecAugmentConfig(time_masks=1, time_width=30, freq_masks=1, freq_width=10)
    torch.manual_seed(1)
    masked = spec_augment(features, settings)
    torch.manual_seed(1)
    assert torch.equal(masked, spec_augment(features, settings))  # the torch RNG decides: resumable
    for row in range(3):
        changed = masked[row] != features[row]
        assert torch.allclose(masked[row][changed], features[row].mean().expand(int(changed.sum())))
        full_bins, full_frames = changed.all(1), changed.all(0)
        assert full_bins.sum() <= 10 and full_frames.sum() <= 30
        assert torch.equal(changed, full_bins[:, None] | full_frames[None, :])  # only whole bands change
    assert not torch.equal(masked, features)
    torch.manual_seed(2)
    speech_frames = torch.tensor([50, 120, 200])
    padded = spec_augment(features, SpecAugmentConfig(time_masks=3, time_width=30, freq_masks=0), speech_frames)
    for row, frames in enumerate(speech_frames.tolist()):
        assert torch.equal(padded[row, :, frames:], features[row, :, frames:])  # padding is never masked
        changed = padded[row] != features[row]
        assert torch.allclose(padded[row][changed], features[row, :, :frames].mean().expand(int(changed.sum())))


def ctc_config(model_dir, data_dir):
    return asr_config(model_dir, data_dir, audio={}, steps=60, lr=2e-2)


def test_ctc_model_runs_at_its_own_frame_rate_and_learns(speech, tmp_path):
    from kdforge.evaluation.recognizers import CTCRecognizer, load_recognizer
    from kdforge.models.ctc import build_ctc_model
    from kdforge.tasks.asr import CTCTask

    model_dir = build_ctc_model(tmp_path / "ctc", size="tiny", frame_stack=4)
    task = CTCTask(ctc_config(model_dir, speech), tmp_path / "probe")
    from kdforge.models.ctc import stack_frames

    batch = task.batch([0])
    seconds = len(task.audio[0]) / 16_000
    features, frame_mask = stack_frames(batch["mel"], batch["mel_mask"], task.frame_stack)
    assert features.shape[-1] == 320  # 4 stacked 80-bin frames: 25 frames per second
    assert abs(int(frame_mask.sum()) - seconds * 25) <= 1
    assert task.tokenizer.decode(batch["targets"][0].tolist(), group_tokens=False).replace("|", " ").strip() \
        == task.tokenizer.decode(task.train_examples[0], group_tokens=False).replace("|", " ").strip()
    everything = task.batch(list(range(len(task.train_examples))))
    task.student.eval()
    with torch.no_grad():
        before = task.loss(everything)[0].item()
    result = train(ctc_config(model_dir, speech), tmp_path / "run", show_progress=False)
    trained = CTCTask(ctc_config(tmp_path / "run" / "student", speech), tmp_path / "probe2")
    trained.student.eval()
    with torch.no_grad():
        after = trained.loss(everything)[0].item()
    assert after < 0.7 * before
    assert isinstance(load_recognizer(tmp_path / "run" / "student"), CTCRecognizer)
    assert set(result["eval"]) == {"wer", "cer"}


def test_ctc_refuses_characters_outside_its_alphabet(speech, tmp_path):
    import shutil

    from kdforge.errors import KdforgeError
    from kdforge.models.ctc import build_ctc_model

    data = tmp_path / "data"
    shutil.copytree(speech, data)
    metadata = (data / "metadata.csv").read_text().splitlines()
    first = metadata[1].split(",")
    metadata[1] = ",".join([first[0], first[1] + " 42"] + first[2:])
    (data / "metadata.csv").write_text("\n".join(metadata) + "\n")
    with pytest.raises(KdforgeError, match=r"characters outside the model's alphabet: '24'"):
        train(ctc_config(build_ctc_model(tmp_path / "ctc", size="tiny"), data), tmp_path / "run", show_progress=False)


def test_a_dynamic_window_trains_on_and_decodes_only_what_the_batch_needs(tiny_whisper, speech, tmp_path):
    """The tiny model's window is 2 s (100 positions); clips of 0.3-0.7 s need 50 of them (1 s steps)."""
    import soundfile

    from kdforge.data.audio import load_audio, read_metadata
    from kdforge.evaluation.recognizers import WhisperRecognizer, load_recognizer
    from kdforge.models.loading import load_whisper, window_positions

    assert window_positions([70, 30], 100) == 50 and window_positions([101], 100) == 100
    assert window_positions([401], 100) == 100  # never beyond the model's window
    records = read_metadata(speech)
    clips = tmp_path / "clips"
    clips.mkdir()
    lines = ["file_name,transcription\n"]
    for index, (record, seconds) in enumerate(zip(records[:4], (0.3, 0.5, 0.6, 0.7))):
        audio = load_audio(record.path)[: int(16_000 * seconds)]
        soundfile.write(clips / f"clip{index}.wav", audio, 16_000)
        lines.append(f"clip{index}.wav,{record.transcription.split()[0]}\n")
    (clips / "metadata.csv").write_text("".join(lines))
    audio = {"spec_augment": None, "dynamic_window": True}
    task = WhisperTask(asr_config(tiny_whisper, clips, audio=audio), tmp_path / "probe")
    assert task.batch([0, 1, 2, 3])["features"].shape[-1] == 100  # 50 positions, not the model's 100
    train(asr_config(tiny_whisper, clips, audio=audio, steps=2), tmp_path / "run", show_progress=False)
    dynamic = load_recognizer(tmp_path / "run" / "student")
    assert dynamic.model.config.kdforge_dynamic_window
    assert dynamic.model.config.max_source_positions == 100  # the saved model keeps its full window
    cut = WhisperRecognizer(*load_whisper(tmp_path / "run" / "student", audio_ctx=50))  # the same weights, cut
    batch = [load_audio(clips / f"clip{index}.wav") for index in range(4)]
    assert dynamic.token_ids(batch) == cut.token_ids(batch)
    assert dynamic.model.config.max_source_positions == 100  # restored after decoding
