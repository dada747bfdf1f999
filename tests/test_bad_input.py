"""Bad input through the command line (issue 8): one line naming the problem and where, exit status
2, no traceback (unless ``--debug``), and no file of an earlier finished run changed.

The CLI runs in-process. Every case fails before training starts, except a non-finite loss and a
full disk, which fail at a chosen step of a 4-step run, so each case takes seconds.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile
import torch
import yaml

from kdforge.cli import main
from kdforge.errors import KdforgeError
from kdforge.files import sha256_file
from kdforge.models.tiny import build_tiny_lm, train_tokenizer


@dataclass(frozen=True)
class Snapshot:
    """The sha256 of every file under ``roots`` at the time it was taken."""

    roots: tuple[Path, ...]
    digests: dict[Path, str]

    @classmethod
    def of(cls, *roots: Path) -> Snapshot:
        files = [path for root in roots for path in root.rglob("*") if path.is_file()]
        return cls(roots, {path: sha256_file(path) for path in files})

    def changes(self) -> list[str]:
        """The files added, removed or rewritten since the snapshot."""
        now = Snapshot.of(*self.roots).digests
        return sorted(str(path) for path in self.digests.keys() | now.keys()
                      if self.digests.get(path) != now.get(path))


@dataclass(frozen=True)
class EarlierRun:
    """A finished run: its YAML ``config``, which bad runs reuse with overrides, its ``folder``,
    and a snapshot of the run with everything it read (config, teacher, data)."""

    config: Path
    folder: Path
    files: Snapshot


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def train_args(config: Path, out: Path, *overrides: str) -> list[str]:
    """``kdforge train CONFIG --out OUT --set OVERRIDE...``"""
    return ["train", str(config), "--out", str(out), *(part for o in overrides for part in ("--set", o))]


def exit_status(argv: list[str]) -> int:
    """Run ``kdforge ARGV`` in this process; its exit status."""
    with pytest.raises(SystemExit) as exit:
        main(argv)
    return exit.value.code


@pytest.fixture(scope="module")
def earlier(tiny_lm, tmp_path_factory) -> EarlierRun:
    """A finished 4-step LM distillation with a checkpoint at step 2."""
    folder = tmp_path_factory.mktemp("earlier")
    config = write_config(folder / "lm.yaml", {
        "task": "lm", "teachers": [{"path": str(tiny_lm["teacher"])}],
        "student": {"init_from": str(tiny_lm["teacher"]), "layers": [0, 3]},
        "data": {"train": str(tiny_lm["data"]), "max_length": 64},
        "objective": {"name": "kl", "ce_weight": 0.5},
        "training": {"steps": 4, "batch_size": 4, "checkpoint_every": 2}})
    assert exit_status(train_args(config, folder / "run")) == 0
    return EarlierRun(config, folder / "run", Snapshot.of(folder, tiny_lm["root"]))


@pytest.fixture
def kdforge_fails(earlier, capsys) -> Callable[..., str]:
    """``kdforge_fails(argv, untouched=())`` runs ``kdforge ARGV`` and returns its error message, after
    checking it failed as bad input must: status 2, one line on stderr, no traceback, and no file
    changed in the earlier run nor in the ``untouched`` snapshots."""

    def run(argv: list[str], untouched: tuple[Snapshot, ...] = ()) -> str:
        status = exit_status(argv)
        stderr = capsys.readouterr().err
        assert status == 2, stderr
        assert "Traceback" not in stderr
        assert stderr.startswith("kdforge: error: ") and stderr.count("\n") == 1, stderr
        for snapshot in (earlier.files, *untouched):
            assert snapshot.changes() == []
        return stderr.removeprefix("kdforge: error: ").removesuffix("\n")

    return run


@pytest.mark.parametrize("override,message", [
    ("training.stpes=3", "unknown config key 'training.stpes' (did you mean 'steps'?)"),
    ("objectiv.name=kl", "unknown config key 'objectiv' (did you mean 'objective'?)"),
    ("training.steps=many", "config key 'training.steps': Input should be a valid integer, unable to parse "
                            "string as an integer"),
    ("training.lr=-0.1", "config key 'training.lr': Input should be greater than 0"),
    ("objective.beta=1.5", "config key 'objective.beta': Input should be less than or equal to 1"),
], ids=["misspelled-key", "misspelled-section", "wrong-type", "below-range", "above-range"])
def test_config_problems_name_the_key(earlier, kdforge_fails, tmp_path, override, message):
    assert kdforge_fails(train_args(earlier.config, tmp_path / "run", override)) == message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("options", [[], ["--resume"]], ids=["new", "resume"])
def test_an_output_folder_holding_a_finished_run_is_refused(earlier, kdforge_fails, options):
    message = kdforge_fails([*train_args(earlier.config, earlier.folder), *options])
    assert message == f"{earlier.folder} already holds a finished run; choose another --out"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has the GPU the case asks for")
def test_a_gpu_asked_for_where_torch_sees_none_is_refused(earlier, kdforge_fails, tmp_path):
    message = kdforge_fails(train_args(earlier.config, tmp_path / "run", "training.device=cuda"))
    assert message == ("training.device is 'cuda' but torch sees no GPU (this torch build or machine has none); "
                       "use 'cpu' or 'auto'")
    assert not (tmp_path / "run").exists()


def test_a_launch_under_deepspeed_is_refused(earlier, kdforge_fails, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what accelerate launch --use_deepspeed sets
    message = kdforge_fails(train_args(earlier.config, tmp_path / "run"))
    assert message == ("kdforge does not run under DeepSpeed (its engine owns the step and pickles its "
                       "checkpoints); shard the student with accelerate launch --use_fsdp instead")
    assert not (tmp_path / "run").exists()

def test_debug_shows_the_traceback(earlier):
    with pytest.raises(KdforgeError, match="already holds a finished run"):
        main(["--debug", *train_args(earlier.config, earlier.folder)])
    assert earlier.files.changes() == []


def needs_remote_code(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (model / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage,message", [
    (None, "{model} is not a model directory (no config.json)"),
    (lambda model: (model / "config.json").write_text("{"),
     "cannot read {model}/config.json: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    (lambda model: (model / "config.json").write_text("[]"),
     "{model}/config.json names no model_type: it is not the config of a Hugging Face model"),
    (lambda model: (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:-1]),
     "cannot read {model}/model.safetensors: Error while deserializing header: incomplete metadata, file not fully "
     "covered"),
    (lambda model: (model / "model.safetensors").rename(model / "pytorch_model.bin"),
     "{model} holds no *.safetensors weights; kdforge never loads pickled (.bin) weights"),
    (needs_remote_code, "{model} needs code shipped with the model (auto_map in config.json); kdforge never runs it"),
    (lambda model: [(model / name).unlink() for name in ("tokenizer.json", "tokenizer_config.json")],
     "cannot load the AutoTokenizer of {model}: Couldn't instantiate the backend tokenizer from one of:"),
], ids=["missing", "config-not-json", "config-not-an-object", "cut-off-weights", "pickled-weights", "remote-code",
        "no-tokenizer"])
def test_a_teacher_folder_kdforge_cannot_load_is_named(earlier, kdforge_fails, tiny_lm, tmp_path, damage, message):
    """``damage`` spoils a copy of the good teacher (None: there is no folder at all)."""
    model = tmp_path / "teacher"
    if damage is not None:
        shutil.copytree(tiny_lm["teacher"], model)
        damage(model)
    teachers = "teachers=" + json.dumps([{"path": str(model)}])
    assert kdforge_fails(train_args(earlier.config, tmp_path / "run", teachers)) == message.format(model=model)


@pytest.mark.parametrize("vocab_size,message", [
    (280, "vocabulary mismatch: student has 300 logits, teacher {teacher} has 280; distillation needs the same "
          "tokenizer"),
    (300, "tokenizer mismatch with teacher {teacher}: student token "),
], ids=["size", "ids"])
def test_a_teacher_with_another_vocabulary_is_refused(earlier, kdforge_fails, tiny_lm, tmp_path, vocab_size, message):
    """The teacher's tokenizer learnt its merges from the student's texts reversed."""
    tokenizer = train_tokenizer([text[::-1] for text in tiny_lm["texts"]], vocab_size)
    teacher = build_tiny_lm(tmp_path / "teacher", "student", tokenizer)
    teachers = "teachers=" + json.dumps([{"path": str(teacher)}])
    assert kdforge_fails(train_args(earlier.config, tmp_path / "run", teachers)).startswith(
        message.format(teacher=teacher))


def test_a_student_layer_the_teacher_lacks_is_named(earlier, kdforge_fails, tmp_path):
    message = kdforge_fails(train_args(earlier.config, tmp_path / "run", "student.layers=[0, 9]"))
    assert message == "the teacher has layers 0..3; it lacks layer 9"


@pytest.mark.parametrize("lines,message", [
    (['{"text": "fine"}', "", '{"text": broken'], "{data}:3: not JSON (Expecting value)"),
    (['{"text": "fine"}', '{"query": "2 + 2"}'], "{data}:2: expected an object with 'text', or 'query' and 'response'"),
    (["", "  "], "{data} holds no records"),
], ids=["not-json", "wrong-fields", "empty"])
def test_bad_text_data_is_named_with_its_line(earlier, kdforge_fails, tmp_path, lines, message):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    message = message.format(data=data)
    assert kdforge_fails(train_args(earlier.config, tmp_path / "run", f"data.train={data}")) == message


def test_instruction_data_whose_responses_lie_beyond_max_length_is_refused(earlier, kdforge_fails, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"query": "a long question " * 40, "response": "#### 1"}) + "\n")
    message = kdforge_fails(train_args(earlier.config, tmp_path / "run", f"data.train={data}"))
    assert message == (f"{data}: no response token falls within data.max_length = 64 tokens of any record; raise it")


def one_clip(write: Callable[[Path], None], transcription: str = "hello") -> Callable[[Path], None]:
    """A filling for an empty audiofolder: one utterance, ``clip.wav``, written by ``write(path)``."""

    def fill(folder: Path) -> None:
        (folder / "metadata.csv").write_text(f"file_name,transcription\nclip.wav,{transcription}\n")
        write(folder / "clip.wav")

    return fill


def labels_only(student: Path, data: Path) -> dict:
    """A raw asr config training ``student`` on the transcripts of the audiofolder ``data``."""
    return {"task": "asr", "student": {"path": str(student)}, "data": {"train": str(data)},
            "objective": {"name": "none", "ce_weight": 1.0}, "training": {"steps": 1, "batch_size": 1}}


@pytest.mark.parametrize("fill,message", [
    (one_clip(lambda path: soundfile.write(path, np.zeros(0, np.float32), 16_000)),
     "audio file {data}/clip.wav holds no samples"),
    (one_clip(lambda path: path.write_bytes(b"not audio at all" * 20)), "cannot decode audio file {data}/clip.wav: "),
    (one_clip(lambda path: soundfile.write(path, np.full((1600, 6), 0.1, np.float32), 16_000)),
     "audio file {data}/clip.wav has 6 channels; kdforge reads mono or stereo (mixed down to mono)"),
    (one_clip(lambda path: soundfile.write(path, np.full(500, 0.1, np.float32), 500)),
     "audio file {data}/clip.wav is sampled at 500 Hz; kdforge resamples 8000-384000 Hz audio to 16000 Hz"),
    (lambda folder: (folder / "metadata.csv").write_text("file_name,transcription\n"),
     "{data}/metadata.csv lists no audio"),
], ids=["empty-clip", "not-audio", "six-channels", "500-hz", "no-utterances"])
def test_bad_audio_is_named_with_its_file(kdforge_fails, tiny_whisper, tmp_path, fill, message):
    data = tmp_path / "data"
    data.mkdir()
    fill(data)
    config = write_config(tmp_path / "asr.yaml", labels_only(tiny_whisper, data))
    assert kdforge_fails(train_args(config, tmp_path / "run")).startswith(message.format(data=data))


def test_transcription_characters_outside_a_ctc_alphabet_are_named(kdforge_fails, tiny_ctc, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    one_clip(lambda path: soundfile.write(path, np.full(16_000, 0.1, np.float32), 16_000), "hello 42!")(data)
    config = write_config(tmp_path / "asr.yaml", labels_only(tiny_ctc, data))
    assert kdforge_fails(train_args(config, tmp_path / "run")) == (
        f"the transcription of {data / 'clip.wav'} has characters outside the model's alphabet: '!24'")


def distillation(tiny_whisper: Path, speech: Path, cache: Path) -> dict:
    """A raw asr config distilling tiny_whisper, as teacher 'teacher' with its one encoder layer
    mapped, into a student built from it, through the teacher cache ``cache``."""
    return {"task": "asr", "teachers": [{"path": str(tiny_whisper), "name": "teacher", "layers": [1]}],
            "student": {"init_from": str(tiny_whisper), "num_layers": 1}, "data": {"train": str(speech)},
            "objective": {"name": "kl", "ce_weight": 1.0}, "alignment": {"weight": 1.0},
            "cache": {"top_k": 4, "dir": str(cache)}, "training": {"steps": 1, "batch_size": 2}}


@pytest.mark.parametrize("change,message", [
    (lambda raw: raw["alignment"].update(student_layers=[5]),
     "alignment.student_layers names layer 5, but the student has encoder hidden states 0..1"),
    (lambda raw: raw["teachers"][0].update(layers=[7]), "teacher 'teacher' has hidden states 0..1; it lacks layer 7"),
], ids=["student", "teacher"])
def test_a_layer_map_naming_a_layer_a_model_lacks_is_refused(kdforge_fails, tiny_whisper, speech, tmp_path,
                                                            change, message):
    raw = distillation(tiny_whisper, speech, tmp_path / "cache")
    change(raw)
    assert kdforge_fails(train_args(write_config(tmp_path / "asr.yaml", raw), tmp_path / "run")) == message
    assert not (tmp_path / "cache").exists()  # refused before any teacher ran


@pytest.fixture(scope="module")
def teacher_cache(tiny_whisper, speech, tmp_path_factory) -> Path:
    """The teacher cache :func:`distillation` reads, built once for this module."""
    from kdforge.config import parse_config
    from kdforge.teachers.build import build_cache_from_config

    folder = tmp_path_factory.mktemp("teacher-cache") / "cache"
    build_cache_from_config(parse_config(distillation(tiny_whisper, speech, folder)), folder)
    return folder


@pytest.mark.parametrize("override,setting", [("cache.top_k=3", "top_k"), ("data.labelled=3", "labelled")])
def test_a_stale_teacher_cache_is_refused_naming_the_setting(kdforge_fails, tiny_whisper, speech, teacher_cache,
                                                            tmp_path, override, setting):
    cache = shutil.copytree(teacher_cache, tmp_path / "cache")
    config = write_config(tmp_path / "asr.yaml", distillation(tiny_whisper, speech, cache))
    message = kdforge_fails(train_args(config, tmp_path / "run", override), untouched=(Snapshot.of(cache),))
    assert message == (f"the teacher cache {cache} was built for 'teacher' with other settings ({setting} differ); "
                       "rebuild it")


def flip_last_byte(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))


def edit_teacher_entry(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """A damage to a teacher cache: ``edit`` applied to the manifest entry of teacher 'teacher'."""

    def damage(cache: Path) -> None:
        manifest = json.loads((cache / "manifest.json").read_text())
        edit(manifest["teachers"]["teacher"])
        (cache / "manifest.json").write_text(json.dumps(manifest))

    return damage


@pytest.mark.parametrize("damage,message", [
    (lambda cache: flip_last_byte(cache / "teacher" / "shard-00000.safetensors"),
     "shard teacher/shard-00000.safetensors is missing or corrupted; run `kdforge cache verify`"),
    (lambda cache: (cache / "manifest.json").write_text("{"),
     "{cache}/manifest.json is damaged (Invalid JSON: EOF while parsing an object at line 1 column 1); "
     "rebuild the cache"),
    (edit_teacher_entry(lambda entry: entry.pop("shards")),
     "{cache}/manifest.json is damaged (teachers.teacher.shards: Field required); rebuild the cache"),
    (edit_teacher_entry(lambda entry: entry.update(model={})),
     "the teacher cache {cache} holds another model for 'teacher' (cached ?, now {teacher}); rebuild it"),
], ids=["shard", "manifest-not-json", "manifest-incomplete", "manifest-without-model"])
def test_a_corrupted_teacher_cache_is_named_and_left_as_it_is(kdforge_fails, tiny_whisper, speech, teacher_cache,
                                                              tmp_path, damage, message):
    cache = shutil.copytree(teacher_cache, tmp_path / "cache")
    damage(cache)
    config = write_config(tmp_path / "asr.yaml", distillation(tiny_whisper, speech, cache))
    message = message.format(cache=cache, teacher=tiny_whisper)
    assert kdforge_fails(train_args(config, tmp_path / "run"), untouched=(Snapshot.of(cache),)) == message


def test_a_missing_audiofolder_is_named_when_a_teacher_cache_exists(kdforge_fails, tiny_whisper, speech,
                                                                    teacher_cache, tmp_path):
    config = write_config(tmp_path / "asr.yaml", distillation(tiny_whisper, speech, teacher_cache))
    message = kdforge_fails(train_args(config, tmp_path / "run", f"data.train={tmp_path / 'gone'}"),
                            untouched=(Snapshot.of(teacher_cache),))
    assert message == f"{tmp_path / 'gone'} is not an audiofolder (no metadata.csv)"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_loss_stops_naming_the_step_and_the_kept_checkpoint(earlier, kdforge_fails, spoil_lm_loss,
                                                                          tmp_path, value):
    spoil_lm_loss(3, lambda loss: loss * value)
    message = kdforge_fails(train_args(earlier.config, tmp_path / "run"))
    assert message == f"the loss became {value} at step 3; stopped (last good checkpoint: step-0000002)"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000002"]


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(earlier, kdforge_fails, fill_disk_after,
                                                                       monkeypatch, tmp_path):
    fill_disk_after(3)  # the checkpoint of step 2 writes 3 safetensors files
    run = train_args(earlier.config, tmp_path / "run", "training.steps=6")
    message = kdforge_fails(run)
    assert message == "could not write checkpoint step-0000004 (No space left on device); the earlier ones are intact"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000002"]
    monkeypatch.undo()  # space was freed: the run resumes from the checkpoint the full disk left intact
    assert exit_status([*run, "--resume"]) == 0
    history = (tmp_path / "run" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in history] == [1, 2, 3, 4, 5, 6]


@pytest.fixture
def interrupted(earlier, spoil_lm_loss, tmp_path, monkeypatch, capsys) -> list[str]:
    """``kdforge train`` args of a 4-step run that stopped at step 3, its checkpoint of step 2 kept
    (add ``--resume`` to continue it)."""
    spoil_lm_loss(3, lambda loss: loss * float("nan"))
    run = train_args(earlier.config, tmp_path / "run")
    assert exit_status(run) == 2
    assert "the loss became nan at step 3" in capsys.readouterr().err
    monkeypatch.undo()
    return run


@pytest.mark.parametrize("damage,message", [
    (lambda run: (run / "checkpoints/step-0000002/trainable.safetensors").write_bytes(b"\0" * 9),
     "checkpoint {run}/checkpoints/step-0000002 is damaged ("),
    (lambda run: (run / "checkpoints/step-0000002/state.json").write_text('{"step": 2}'),
     "checkpoint {run}/checkpoints/step-0000002 is damaged (state.json lacks 'optimizer'); delete it to resume "
     "from the one before"),
    (lambda run: (run / "history.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2,\n{"step": 3}\n'),
     "{run}/history.jsonl is damaged at line 2; this run cannot be resumed"),
], ids=["cut-off-weights", "state-without-optimizer", "history-line"])
def test_a_damaged_checkpoint_or_history_is_named_on_resume(kdforge_fails, interrupted, tmp_path, damage, message):
    run = tmp_path / "run"
    damage(run)
    damaged = Snapshot.of(run)
    assert kdforge_fails([*interrupted, "--resume"], untouched=(damaged,)).startswith(message.format(run=run))


def test_a_history_cut_off_by_a_kill_is_resumed(interrupted, tmp_path):
    history = tmp_path / "run" / "history.jsonl"
    history.write_text(history.read_text() + '{"step": 3, "lo')  # killed while appending step 3's entry
    assert exit_status([*interrupted, "--resume"]) == 0
    assert [json.loads(line)["step"] for line in history.read_text().splitlines()] == [1, 2, 3, 4]
