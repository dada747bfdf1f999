"""Distilling ASR teachers into a Whisper student from the cache: layer plan, signals, terms, export."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from kdforge.config import parse_config
from kdforge.errors import KdforgeError


@pytest.fixture(scope="module")
def wide_whisper(tiny_whisper, tmp_path_factory):
    """A second Whisper teacher with the same tokenizer, twice as wide and twice as deep."""
    from kdforge.models.tiny import build_tiny_whisper

    return build_tiny_whisper(tmp_path_factory.mktemp("wide_whisper"), d_model=16, encoder_layers=2, ffn_dim=32,
                              window_seconds=2, seed=1)  # tiny_whisper's window


@pytest.fixture(scope="module")
def cache_dir(tiny_whisper, wide_whisper, tiny_ctc, speech, tmp_path_factory):
    """The teacher cache of :func:`distill_config`, built once for this module."""
    from kdforge.teachers.build import build_cache_from_config

    folder = tmp_path_factory.mktemp("distill") / "cache"
    build_cache_from_config(distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, folder), folder)
    return folder


def distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, cache_dir, **sections):
    raw = {
        "task": "asr",
        "teachers": [{"path": str(wide_whisper), "name": "wide"}, {"path": str(tiny_ctc), "name": "ctc.v1"}],
        "student": {"init_from": str(tiny_whisper), "num_layers": 1, "lora": {"r": 2, "alpha": 4}},
        "data": {"train": str(speech), "labelled": 3},
        "audio": {"audio_ctx": 50},
        "objective": {"name": "kl", "temperature": 2.0, "ce_weight": 1.0},
        "alignment": {"weight": 1.0},
        "cache": {"top_k": 4, "dir": str(cache_dir)},
        "training": {"steps": 3, "batch_size": 4, "lr": 1e-2, "eval_every": 100, "checkpoint_every": 100},
    }
    for section, values in sections.items():
        raw[section] = values if values is None else {**raw.get(section, {}), **values}
    return parse_config(raw)


def test_the_uniform_layer_map_pairs_every_student_layer(tiny_whisper, wide_whisper, tiny_ctc, speech, tmp_path):
    from kdforge.tasks.asr_distill import layer_plan

    config = distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, tmp_path / "cache")
    student_layers, plan = layer_plan(config)
    assert student_layers == [1]  # the student's one encoder layer (0 is the embedding)
    assert plan == {"wide": [2], "ctc.v1": [1]}  # the last of 3 and of 2 hidden states
    bad = distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, tmp_path / "cache")
    bad.teachers[0].layers = [7]
    with pytest.raises(KdforgeError, match="teacher 'wide' has hidden states 0..2; it lacks layer 7"):
        layer_plan(bad)


def test_distillation_reads_the_cache_and_never_runs_a_teacher(tiny_whisper, wide_whisper, tiny_ctc, speech,
                                                               cache_dir, tmp_path, monkeypatch):
    import kdforge.teachers.build as build
    from kdforge.training.loop import train

    config = distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, cache_dir)

    def no_teacher(*args, **kwargs):
        raise AssertionError("a teacher ran during training")

    monkeypatch.setattr(build, "transcribe_teacher", no_teacher)
    monkeypatch.setattr(build, "cache_teacher", no_teacher)
    result = train(config, tmp_path / "run", show_progress=False)
    assert result["steps"] == 3
    assert result["teachers_used"] == {"targets": ["wide", "ctc.v1"], "logit": ["wide"], "lppm": ["wide", "ctc.v1"]}
    counts = result["parameters"]
    heads = 8 * 64 + 64  # one linear student projection, width 8 -> the shared 64 dimensions
    assert counts["trainable"] - counts["adapter"] == heads
    from transformers import WhisperForConditionalGeneration

    exported_model = WhisperForConditionalGeneration.from_pretrained(tmp_path / "run" / "student")
    assert counts["student"] == sum(p.numel() for p in exported_model.parameters())
    import json

    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert {"ce", "kd", "lppm"} <= set(history[0])
    exported = load_file(tmp_path / "run" / "student" / "model.safetensors")
    assert not any("lora" in name or "heads" in name for name in exported)  # merged, projection heads left behind
    assert not any(".decoder.layers.1." in name for name in exported)  # one decoder layer kept


def test_targets_are_references_on_the_labelled_part_and_the_ensemble_elsewhere(tiny_whisper, wide_whisper,
                                                                                 tiny_ctc, speech, tmp_path, cache_dir):
    from kdforge.data.audio import labelled_ids, read_metadata
    from kdforge.tasks.asr_distill import WhisperDistillationTask
    from kdforge.teachers.cache import ENSEMBLE

    config = distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, cache_dir)
    task = WhisperDistillationTask(config, tmp_path)
    records = read_metadata(speech)
    labelled = labelled_ids(records, 3)
    for record, ids in zip(records, task.train_examples):
        text = record.transcription if record.id in labelled else task.cache.text(ENSEMBLE, record.id)
        assert ids == task.tokenizer(" " + text.strip()).input_ids
    assert task.logit_teachers == ["wide"]  # the CTC teacher's characters are not the student's vocabulary


def test_a_student_can_keep_some_of_the_encoder_too(tiny_whisper, wide_whisper, tiny_ctc, speech, tmp_path):
    from kdforge.models.tiny import build_tiny_whisper
    from kdforge.student.init import init_student
    from kdforge.tasks.asr_distill import layer_plan

    teacher = build_tiny_whisper(tmp_path / "deep", d_model=8, encoder_layers=3, decoder_layers=2, seed=4)
    student = init_student(teacher, tmp_path / "student", num_layers=1, encoder_layers=2)
    config = json.loads((student / "config.json").read_text())
    assert (config["encoder_layers"], config["decoder_layers"]) == (2, 1)
    teacher_weights, student_weights = load_file(teacher / "model.safetensors"), load_file(student / "model.safetensors")
    name = "model.encoder.layers.{}.fc1.weight"
    assert torch.equal(student_weights[name.format(0)], teacher_weights[name.format(0)])
    assert torch.equal(student_weights[name.format(1)], teacher_weights[name.format(2)])  # layers 0 and 2 of 3
    assert name.format(2) not in student_weights

    # the layer map reads the student's own encoder depth, not its teacher's
    cut = distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, tmp_path / "cache",
                         student={"init_from": str(teacher), "num_layers": 1, "encoder_layers": 2})
    student_layers, plan = layer_plan(cut)
    assert student_layers == [1, 2]
    assert plan == {"wide": [1, 2], "ctc.v1": [1, 1]}  # onto the 3 and 2 hidden states of the teachers
    cut.student.encoder_layers = 4  # named before any cache is built for a student that cannot exist
    with pytest.raises(KdforgeError, match="student.encoder_layers is 4, but .* has 3 encoder layers"):
        layer_plan(cut)
    with pytest.raises(KdforgeError, match="encoder_layers cuts a Whisper encoder"):
        init_student(tiny_ctc, tmp_path / "ctc-student", encoder_layers=1)


def test_teacher_hidden_states_reach_the_student_frames_in_the_batch(tiny_whisper, wide_whisper, tiny_ctc,
                                                                    speech, tmp_path, cache_dir):
    from kdforge.alignment import resample_points
    from kdforge.tasks.asr_distill import WhisperDistillationTask

    config = distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, cache_dir)
    task = WhisperDistillationTask(config, tmp_path)
    task.premapped = set()  # the raw states, as from a cache built without this run's maps
    batch = task.batch([0, 1, 2])
    frames = batch["encoder_frames"].tolist()
    for name, width in (("wide", 16), ("ctc.v1", 32)):
        hidden = batch[f"hidden/{name}"]
        assert hidden.shape == (1, sum(frames), width)  # each utterance's frames of speech, packed
        layer = f"hidden.{task.teacher_layers[name][0]}"
        for row, part in enumerate(hidden[0].split(frames)):
            cached = task.cache.signals(name, task.ids[row], [layer])[layer].float()
            if name == "wide":  # the student's rate: as cached
                torch.testing.assert_close(part, cached)
            else:  # another rate: the frames of the student's window, resampled to its frames of speech
                heard = math.ceil(batch["features"].shape[-1] / 2 / 50 * task.teacher_rates[name])
                assert cached.shape[0] != frames[row]
                torch.testing.assert_close(part, resample_points(cached[:heard], frames[row], config.alignment.resample))
    teacher = batch["teacher_topk"]
    position = task.prompt_length - 1
    stored = task.cache.signals("wide", task.ids[0], ["topk_ids"])["topk_ids"]
    assert torch.equal(teacher.indices[0, position : position + stored.shape[0]], stored)
    loss, terms = task.loss(batch)
    heads = [p for p in task.heads.parameters() if p.requires_grad]
    loss.backward()
    assert all(p.grad is not None for p in heads)  # the student projections train
    assert not any(p.requires_grad for p in task.heads["teachers"].parameters())  # the teacher maps are fixed


def test_the_lppm_term_is_the_loss_over_frames_of_speech_in_the_padded_window(tiny_whisper, wide_whisper, tiny_ctc,
                                                                              speech, tmp_path, cache_dir):
    from kdforge.alignment import lppm_loss
    from kdforge.tasks.asr_distill import WhisperDistillationTask

    config = distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, cache_dir)
    task = WhisperDistillationTask(config, tmp_path)
    task.premapped = set()  # raw states, mapped in the loss
    batch = task.batch([0, 1, 2])
    batch["encoder_frames"] = torch.tensor([20, 35, 50])  # these utterances fill the tiny window: pretend they don't
    for name in ("wide", "ctc.v1"):  # the teachers' points resampled to those frames
        layer = f"hidden.{task.teacher_layers[name][0]}"
        batch[f"hidden/{name}"] = task._packed_points(name, task.ids[:3], [layer], [20, 35, 50])
    output = task.student(input_features=batch["features"], decoder_input_ids=batch["inputs"], output_hidden_states=True)
    term, _ = task._lppm(output.encoder_hidden_states, batch)
    frames = torch.arange(50) < batch["encoder_frames"][:, None]

    def on_the_grid(points):  # packed points back in the padded window, zero elsewhere
        grid = points.new_zeros(3, 50, points.shape[-1])
        grid[frames] = points
        return grid

    student = torch.stack([task.heads["student"](output.encoder_hidden_states[1], 0)])
    teachers = torch.stack([torch.stack([task.heads["teachers"][m](on_the_grid(batch[f"hidden/{name}"][0]), 0)])
                            for m, name in enumerate(("wide", "ctc.v1"))])
    torch.testing.assert_close(term, lppm_loss(student, teachers, frames, task.teacher_weights))


def test_the_cache_stores_the_points_through_the_runs_fixed_maps_and_the_loss_reads_them_unchanged(
        tiny_whisper, wide_whisper, tiny_ctc, speech, tmp_path, cache_dir):
    from kdforge.tasks.asr_distill import WhisperDistillationTask

    config = distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, cache_dir)
    task = WhisperDistillationTask(config, tmp_path)
    assert task.premapped == {"wide", "ctc.v1"}
    for maps, name in zip(task.heads["teachers"], ("wide", "ctc.v1")):  # the run's own maps gave the cached points
        layer = task.teacher_layers[name][0]
        cached = task.cache.signals(name, task.ids[0], [f"hidden.{layer}", f"mapped.{layer}"])
        expected = maps.map_layers(cached[f"hidden.{layer}"].float()[None])[0]
        assert cached[f"mapped.{layer}"].shape == (expected.shape[0], 64)
        torch.testing.assert_close(cached[f"mapped.{layer}"].float(), expected, atol=2e-3, rtol=2e-3)  # float16
    batch = task.batch([0, 1, 2])
    assert batch["hidden/wide"].shape[-1] == batch["hidden/ctc.v1"].shape[-1] == 64
    ready, _ = task._lppm(task.forward(batch["features"], batch["inputs"], hidden_states=True).encoder_hidden_states,
                          batch)
    task.premapped = set()
    raw = task.batch([0, 1, 2])
    mapped_in_the_step, _ = task._lppm(task.forward(raw["features"], raw["inputs"], hidden_states=True)
                                       .encoder_hidden_states, raw)
    torch.testing.assert_close(ready, mapped_in_the_step, atol=1e-3, rtol=1e-3)

    # other maps (another seed) or learned ones: the cache still serves, the run maps the raw states itself
    other_seed = distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, cache_dir, alignment={"seed": 5})
    learned = distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, cache_dir,
                             alignment={"teacher_map": "learned"})
    for other in (other_seed, learned):
        assert WhisperDistillationTask(other, tmp_path / "other").premapped == set()


def test_a_stale_cache_is_refused_naming_the_setting(tiny_whisper, wide_whisper, tiny_ctc, speech, tmp_path, cache_dir):
    from kdforge.tasks.asr_distill import open_cache

    open_cache(distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, cache_dir))  # the matching one opens
    other = distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, cache_dir, data={"labelled": 4})
    with pytest.raises(KdforgeError, match="labelled differ"):
        open_cache(other)


def test_label_only_students_are_built_from_the_teacher_and_start_like_distilled_ones(
        tiny_whisper, wide_whisper, tiny_ctc, speech, cache_dir, tmp_path):
    from kdforge.tasks.asr import WhisperTask
    from kdforge.tasks.asr_distill import WhisperDistillationTask

    labels_only = distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, cache_dir,
                                 objective={"name": "none"}, alignment=None)
    labels_only.teachers = []
    plain = WhisperTask(labels_only, tmp_path / "plain")
    assert (tmp_path / "plain" / "student-init" / "config.json").exists()
    assert len(plain.train_examples) == 3  # data.labelled: the labelled part only
    distilled = WhisperDistillationTask(distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, cache_dir),
                                        tmp_path / "distilled")
    adapters = {n: p for n, p in plain.student.named_parameters() if "lora_A" in n}
    assert adapters and all(torch.equal(p, dict(distilled.student.named_parameters())[n]) for n, p in adapters.items())


def test_a_cache_of_another_ensemble_is_refused(tiny_whisper, wide_whisper, tiny_ctc, speech, cache_dir):
    from kdforge.tasks.asr_distill import open_cache

    config = distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, cache_dir)
    config.teachers = config.teachers[::-1]
    with pytest.raises(KdforgeError, match="holds the transcripts of the ensemble wide, ctc.v1, not of ctc.v1, wide"):
        open_cache(config)


def test_runs_of_one_seed_draw_the_same_augmentation_with_or_without_projection_heads(
        tiny_whisper, wide_whisper, tiny_ctc, speech, cache_dir, tmp_path):
    import json

    from kdforge.training.loop import train

    augment = {"spec_augment": {"time_masks": 2, "time_width": 10, "freq_masks": 2, "freq_width": 8}}
    first_ce = {}
    for name, alignment in (("kd", None), ("kd+lppm", {"weight": 1.0e-9})):
        config = distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, cache_dir, audio=augment,
                                alignment=alignment, training={"steps": 1})
        train(config, tmp_path / name, show_progress=False)
        history = (tmp_path / name / "history.jsonl").read_text().splitlines()
        first_ce[name] = json.loads(history[0])["ce"]
    # the first step's weights are the same in both runs: only different SpecAugment masks could move its CE
    assert first_ce["kd"] == first_ce["kd+lppm"]


@pytest.fixture(scope="module")
def token_cache_dir(tiny_whisper, wide_whisper, tiny_ctc, speech, tmp_path_factory):
    """A cache of :func:`distill_config` that also keeps the Whisper teacher's decoder states."""
    from kdforge.teachers.build import build_cache_from_config

    folder = tmp_path_factory.mktemp("distill-tokens") / "cache"
    build_cache_from_config(distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, folder,
                                           alignment={"decoder_layers": [0, 1]}), folder)
    return folder


def test_decoder_layers_pair_with_every_whisper_teacher_and_no_ctc(tiny_whisper, wide_whisper, tiny_ctc, speech, tmp_path):
    from kdforge.tasks.asr_distill import decoder_layer_plan

    config = distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, tmp_path / "cache",
                            alignment={"decoder_layers": [0, 1]})
    assert decoder_layer_plan(config) == ([0, 1], {"wide": [0, 1]})  # the CTC teacher has no decoder
    assert decoder_layer_plan(distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, tmp_path)) == ([], {})
    bad = distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, tmp_path / "cache",
                         alignment={"decoder_layers": [2]})
    with pytest.raises(KdforgeError, match="decoder_layers names layer 2, but the student has decoder hidden states 0..1"):
        decoder_layer_plan(bad)


def test_a_cache_without_decoder_states_is_refused_for_token_points_and_one_with_them_serves_frames_only(
        tiny_whisper, wide_whisper, tiny_ctc, speech, cache_dir, token_cache_dir):
    from kdforge.tasks.asr_distill import open_cache

    with pytest.raises(KdforgeError, match=r"decoder_layers \(0 not cached\)"):
        open_cache(distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, cache_dir,
                                  alignment={"decoder_layers": [0, 1]}))
    open_cache(distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, token_cache_dir))  # more layers serve fewer


def test_token_points_are_the_teachers_decoder_states_on_the_target_grid_and_join_the_lppm_term(
        tiny_whisper, wide_whisper, tiny_ctc, speech, tmp_path, token_cache_dir):
    from kdforge.alignment import lppm_loss
    from kdforge.tasks.asr_distill import WhisperDistillationTask

    config = distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, token_cache_dir,
                            alignment={"decoder_layers": [0, 1]})
    task = WhisperDistillationTask(config, tmp_path)
    batch = task.batch([0, 1, 2])
    tokens = batch["target_mask"]
    decoder = batch["decoder/wide"]
    assert "decoder/ctc.v1" not in batch
    assert task.teachers_used()["lppm_tokens"] == ["wide"]
    counts = tokens.sum(dim=1).tolist()
    assert decoder.shape == (2, sum(counts), 16)  # the target tokens of every utterance, packed
    for row, part in enumerate(decoder[1].split(counts)):  # one tokenizer: the cached states arrive unchanged
        cached = task.cache.signals("wide", task.ids[row], ["decoder.1"])["decoder.1"].float()
        torch.testing.assert_close(part, cached)
    output = task.student(input_features=batch["features"], decoder_input_ids=batch["inputs"], output_hidden_states=True)
    loss, terms = task.loss(batch)
    student = torch.stack([task.heads["decoder_student"](output.decoder_hidden_states[layer][tokens][None], slot)
                           for slot, layer in enumerate([0, 1])])
    teacher = torch.stack([task.heads["decoder_teachers"][0](decoder[slot][None], slot) for slot in range(2)])
    expected = lppm_loss(student, teacher[None], torch.ones(1, student.shape[2], dtype=torch.bool), torch.ones(1))
    torch.testing.assert_close(terms["lppm_tokens"], expected)
    # one encoder layer and two decoder layers mapped: the term is the mean over the three layers
    torch.testing.assert_close(terms["lppm"], (terms["lppm_frames"] + 2 * terms["lppm_tokens"]) / 3)
    loss.backward()
    assert all(p.grad is not None for p in task.heads["decoder_student"].parameters())
    assert not any(p.requires_grad for p in task.heads["decoder_teachers"].parameters())


def test_without_pointwise_alignment_token_points_are_pooled_per_utterance_like_frames(
        tiny_whisper, wide_whisper, tiny_ctc, speech, tmp_path, token_cache_dir):
    from kdforge.alignment import lppm_loss
    from kdforge.tasks.asr_distill import WhisperDistillationTask

    config = distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, token_cache_dir,
                            alignment={"decoder_layers": [0, 1], "pointwise": False})
    task = WhisperDistillationTask(config, tmp_path)
    batch = task.batch([0, 1, 2])
    tokens = batch["target_mask"]
    output = task.student(input_features=batch["features"], decoder_input_ids=batch["inputs"], output_hidden_states=True)
    term, _ = task._token_lppm(output.decoder_hidden_states, batch)
    counts = tokens.sum(dim=1).tolist()
    student = torch.stack([torch.stack([task.heads["decoder_student"](output.decoder_hidden_states[layer][row][tokens[row]],
                                                                      slot).mean(0) for row in range(3)])
                           for slot, layer in enumerate([0, 1])]).unsqueeze(-2)
    teacher = torch.stack([torch.stack([part.mean(0) for part in task.heads["decoder_teachers"][0](
        batch["decoder/wide"][slot], slot).split(counts)]) for slot in range(2)]).unsqueeze(-2)
    assert student.shape == (2, 3, 1, student.shape[-1])  # one point per utterance and layer
    torch.testing.assert_close(term, lppm_loss(student, teacher[None], torch.ones(3, 1, dtype=torch.bool), torch.ones(1)))
    task.config.alignment.pointwise = True  # the same points matched one by one: another loss
    assert not torch.allclose(task._token_lppm(output.decoder_hidden_states, batch)[0], term)


def test_with_fixed_student_projections_the_mapping_trains_the_student_alone(tiny_whisper, wide_whisper, tiny_ctc,
                                                                              speech, tmp_path, cache_dir):
    from kdforge.tasks.asr_distill import WhisperDistillationTask

    config = distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, cache_dir,
                            alignment={"projection": "fixed"}, objective={"name": "none", "ce_weight": 0.0})
    task = WhisperDistillationTask(config, tmp_path)
    assert not any(p.requires_grad for p in task.heads.parameters())
    seeds = {"student": task.heads["student"].layers.maps, **{m: maps.maps for m, maps in enumerate(task.heads["teachers"])}}
    assert len({tuple(maps.flatten()[:4].tolist()) for maps in seeds.values()}) == 3  # no map shared
    loss, terms = task.loss(task.batch([0, 1, 2]))
    assert set(terms) == {"lppm"}
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.student.parameters() if p.requires_grad)


def test_procrustes_maps_make_the_teachers_and_a_fixed_student_agree_with_the_first_teacher(
        tiny_whisper, wide_whisper, tiny_ctc, speech, tmp_path, cache_dir):
    from torch.nn import functional as F

    from kdforge.tasks.asr_distill import (PROCRUSTES_UTTERANCES, WhisperDistillationTask, frames_of_speech,
                                           valid_points)

    def task_with(teacher_map: str) -> WhisperDistillationTask:
        return WhisperDistillationTask(distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, cache_dir,
                                                      alignment={"teacher_map": teacher_map, "projection": "fixed"}),
                                       tmp_path)

    seeded, fitted = task_with("fixed"), task_with("procrustes")
    # every utterance took part in the fit, over more than one batch
    assert fitted.config.training.batch_size < len(fitted.ids) <= PROCRUSTES_UTTERANCES
    batch = fitted.batch(list(range(len(fitted.ids))))  # raw states: a procrustes run reads nothing premapped
    fitted.student.eval()
    with torch.no_grad():
        hidden = fitted.forward(batch["features"], batch["inputs"], hidden_states=True).encoder_hidden_states
    student = valid_points([hidden[layer] for layer in fitted.student_layers], frames_of_speech(hidden, batch))
    reference = seeded.heads["teachers"][0].map_layers(F.normalize(batch["hidden/wide"], dim=-1))

    assert torch.equal(fitted.heads["teachers"][0].maps, seeded.heads["teachers"][0].maps)  # the reference's own
    for side, points in (("ctc", batch["hidden/ctc.v1"]), ("student", student)):
        maps = {task: task.heads["teachers"][1] if side == "ctc" else task.heads["student"].layers
                for task in (seeded, fitted)}
        units = F.normalize(points, dim=-1)
        # optimal over every utterance's unit points, frame by frame, accumulated over the fit's batches:
        # tr(Q^T C) reaches C's nuclear norm (Q itself is not unique: C's rank is at most the reference's width)
        cross = torch.einsum("lnD,lnd->lDd", reference, units)
        torch.testing.assert_close((maps[fitted].maps * cross).sum((-2, -1)), torch.linalg.svdvals(cross).sum(-1),
                                   atol=1e-3, rtol=1e-4)
        cosine = {task: float((reference * maps[task].map_layers(units)).sum(-1).mean()) for task in maps}
        assert cosine[fitted] > cosine[seeded] + 0.1, side
    assert list(fitted.heads.parameters()) == [] and "teachers.1.maps" in fitted.heads.state_dict()


def test_procrustes_fits_the_fixed_student_decoder_maps_to_the_first_decoder_teachers_tokens(
        tiny_whisper, wide_whisper, tiny_ctc, speech, tmp_path, token_cache_dir):
    from torch.nn import functional as F

    from kdforge.tasks.asr_distill import WhisperDistillationTask, valid_points

    def task_with(teacher_map: str) -> WhisperDistillationTask:
        alignment = {"teacher_map": teacher_map, "projection": "fixed", "decoder_layers": [0, 1]}
        return WhisperDistillationTask(distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, token_cache_dir,
                                                      alignment=alignment), tmp_path)

    seeded, fitted = task_with("fixed"), task_with("procrustes")
    assert [t.label for t in fitted.decoder_mapped] == ["wide"]  # the only teacher with a decoder: the reference
    batch = fitted.batch(list(range(len(fitted.ids))))
    fitted.student.eval()
    with torch.no_grad():
        hidden = fitted.forward(batch["features"], batch["inputs"], hidden_states=True).decoder_hidden_states
    units = F.normalize(valid_points([hidden[layer] for layer in (0, 1)], batch["target_mask"]), dim=-1)
    reference = seeded.heads["decoder_teachers"][0].map_layers(F.normalize(batch["decoder/wide"], dim=-1))
    # the reference keeps its seeded maps
    assert torch.equal(fitted.heads["decoder_teachers"][0].maps, seeded.heads["decoder_teachers"][0].maps)
    cross = torch.einsum("lnD,lnd->lDd", reference, units)
    maps = {task: task.heads["decoder_student"].layers for task in (seeded, fitted)}
    torch.testing.assert_close((maps[fitted].maps * cross).sum((-2, -1)), torch.linalg.svdvals(cross).sum(-1),
                               atol=1e-3, rtol=1e-4)
    cosine = {task: float((reference * maps[task].map_layers(units)).sum(-1).mean()) for task in maps}
    assert cosine[fitted] > cosine[seeded] + 0.1


def test_teacher_weights_by_validation_wer_are_a_softmax_of_each_teachers_wer_measured_once(
        tiny_whisper, wide_whisper, tiny_ctc, speech, cache_dir, tmp_path, monkeypatch):
    import kdforge.tasks.asr_distill as asr_distill
    from kdforge.evaluation.runner import evaluate

    config = distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, cache_dir,
                            alignment={"teacher_weights": "validation_wer", "validation": str(speech),
                                       "wer_temperature": 0.5})
    wers = {"wide": evaluate(wide_whisper, speech, audio_ctx=50, progress=False)["wer"],
            "ctc.v1": evaluate(tiny_ctc, speech, audio_ctx=50, progress=False)["wer"]}
    expected = torch.softmax(-torch.tensor([wers["wide"], wers["ctc.v1"]], dtype=torch.float64) / 0.5, dim=0)
    task = asr_distill.WhisperDistillationTask(config, tmp_path)
    torch.testing.assert_close(task.teacher_weights.double(), expected)
    assert json.loads((tmp_path / "teacher_wers.json").read_text())["wer"] == pytest.approx(wers)

    def no_decoding(*args, **kwargs):
        raise AssertionError("the teachers were decoded again")

    monkeypatch.setattr(asr_distill, "evaluate", no_decoding)  # a resumed run reads the record
    torch.testing.assert_close(asr_distill.WhisperDistillationTask(config, tmp_path).teacher_weights, task.teacher_weights)
    record = json.loads((tmp_path / "teacher_wers.json").read_text())
    (tmp_path / "teacher_wers.json").write_text(json.dumps({**record, "validation": "another/folder"}))
    with pytest.raises(AssertionError, match="decoded again"):  # a record of another folder is measured anew
        asr_distill.WhisperDistillationTask(config, tmp_path)
    plain = asr_distill.WhisperDistillationTask(distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, cache_dir),
                                                tmp_path / "plain")
    assert plain.teacher_weights.tolist() == [1.0, 1.0]  # each teacher's config weight


def test_teacher_weights_by_wer_need_a_validation_folder(tiny_whisper, wide_whisper, tiny_ctc, speech, cache_dir):
    with pytest.raises(KdforgeError, match="alignment.validation"):
        distill_config(tiny_whisper, wide_whisper, tiny_ctc, speech, cache_dir,
                       alignment={"teacher_weights": "validation_wer"})
