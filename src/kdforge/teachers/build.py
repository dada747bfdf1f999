"""Running each teacher once over the training audio and storing what distillation needs.

Two passes. First every teacher transcribes every utterance (greedy); the ensemble's transcript
of an utterance is the minimum-Bayes-risk choice among them
(:func:`kdforge.evaluation.ensemble.minimum_bayes_risk`). Each utterance's *training target* is
then its reference transcript if it belongs to the labelled part (``data.labelled``), else the
ensemble's transcript: the text the student is trained to produce. Second, every teacher is run
again and stores, per utterance (:mod:`kdforge.teachers.cache`):

* ``hidden.<l>``: the encoder's hidden states of each kept layer ``l`` (0 = the input embedding),
  ``(frames, width)`` float16, cut to the utterance's own frames;
* ``decoder.<l>`` (Whisper teachers, the decoder layers kept): the decoder's hidden states at the
  text positions below, ``(L, width)`` float16;
* ``pseudo_label``: the teacher's own greedy transcript, UTF-8 bytes as uint8;
* Whisper teachers, teacher-forced on the training target in their own tokenization:
  ``label_ids (L,)`` and, at each text position, the top-k of the next-token distribution
  (``topk_ids (L, k)``, ``topk_logprobs (L, k)``, ``tail_logprob (L,)``, the
  :class:`~kdforge.losses.TopKTeacher` fields);
* CTC teachers: the frame-level top-k of their character distribution, same three fields with
  frames instead of tokens.

The entry ``ensemble`` holds ``pseudo_label`` (the ensemble's transcript) and ``target`` (the
training target) of every utterance. Teachers are independent, so ``workers`` processes take one
teacher each at a time in both passes; each process uses ``cores // workers`` torch threads.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from torch import Tensor

from kdforge.alignment import TeacherProjection
from kdforge.data.audio import labelled_ids, read_metadata
from kdforge.models.loading import SAFE_LOADING, decoder_prompt_length, model_type_of
from kdforge.tasks.asr import read_training_audio
from kdforge.teachers.cache import (ENSEMBLE, MAP_SETTING, TeacherShards, data_fingerprint, model_identity,
                                    sealed_build, top_k_signals, write_manifest)


def _text_bytes(text: str) -> Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


@torch.no_grad()
def whisper_signals(model, processor, audio: list[np.ndarray], texts: list[str], layers: list[int],
                    k: int, decoder_layers: list[int] = ()) -> list[dict]:
    """A Whisper teacher's hidden states and top-k teacher-forced on ``texts``, for one batch."""
    extractor, tokenizer = processor.feature_extractor, processor.tokenizer
    features = extractor(audio, sampling_rate=extractor.sampling_rate, return_tensors="pt").input_features
    encoded = model.model.encoder(features, output_hidden_states=True)
    labels = [tokenizer(" " + text.strip()).input_ids for text in texts]
    length = max(len(ids) for ids in labels) - 1
    inputs = torch.full((len(labels), length), tokenizer.eos_token_id, dtype=torch.long)
    for row, ids in enumerate(labels):
        inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1])
    decoded = model(encoder_outputs=(encoded.last_hidden_state,), decoder_input_ids=inputs,
                    output_hidden_states=bool(decoder_layers))
    prompt = decoder_prompt_length(tokenizer)
    window = features.shape[-1] // 2
    out = []
    for row, samples in enumerate(audio):
        frames = min(window, math.ceil(len(samples) / extractor.hop_length / 2))  # the encoder halves the mel rate
        text_positions = slice(prompt - 1, len(labels[row]) - 1)  # logits predicting the text and its end
        out.append({**{f"hidden.{layer}": encoded.hidden_states[layer][row, :frames].half() for layer in layers},
                    **{f"decoder.{layer}": decoded.decoder_hidden_states[layer][row, text_positions].half()
                       for layer in decoder_layers},
                    "label_ids": torch.tensor(labels[row][prompt:]), **top_k_signals(decoded.logits[row, text_positions], k)})
    return out


@torch.no_grad()
def ctc_signals(model, extractor, audio: list[np.ndarray], layers: list[int], k: int) -> list[dict]:
    """A kdforge CTC teacher's hidden states and frame-level top-k for one batch."""
    from kdforge.models.ctc import frame_stack_of, stacked_log_mel

    features, mask = stacked_log_mel(extractor, audio, frame_stack_of(model))
    output = model(input_features=features, attention_mask=mask.long(), output_hidden_states=True)
    out = []
    for row in range(len(audio)):
        frames = int(mask[row].sum())
        out.append({**{f"hidden.{layer}": output.hidden_states[layer][row, :frames].half() for layer in layers},
                    **top_k_signals(output.logits[row, :frames], k)})
    return out


def batch_starts(count: int, batch_size: int, description: str):
    """``0, batch_size, 2 * batch_size, ...`` below ``count``, with a progress bar on a terminal."""
    return tqdm(range(0, count, batch_size), desc=description, unit="batch", disable=None)


def transcribe_teacher(name: str, model_dir: str, data_dir: str, batch_size: int, threads: int,
                       audio_ctx: int | None = None) -> tuple[list[str], float]:
    """First pass: one teacher's greedy transcript of every utterance, and the seconds it took."""
    from kdforge.evaluation.recognizers import load_recognizer

    torch.set_num_threads(threads)
    started = time.perf_counter()
    _, audio = read_training_audio(data_dir)
    recognizer = load_recognizer(model_dir, audio_ctx)
    with torch.inference_mode():
        texts = [text for start in batch_starts(len(audio), batch_size, f"{name}: transcripts")
                 for text in recognizer.transcribe(audio[start : start + batch_size])]
    return texts, time.perf_counter() - started


def teacher_signals(model_dir: str | Path, layers: list[int], k: int, audio_ctx: int | None,
                    decoder_layers: list[int] = ()) -> Callable[[list[np.ndarray], list[str]], list[dict]]:
    """The teacher in ``model_dir``, loaded, as a function of a batch's audio and training targets
    to each utterance's signals (:func:`whisper_signals` or :func:`ctc_signals`; a CTC teacher
    ignores the targets and has no decoder layers)."""
    if model_type_of(model_dir) == "wav2vec2-bert":
        from transformers import Wav2Vec2BertForCTC, WhisperFeatureExtractor

        model = Wav2Vec2BertForCTC.from_pretrained(model_dir, **SAFE_LOADING).eval()
        extractor = WhisperFeatureExtractor.from_pretrained(model_dir)

        def signals(batch_audio, texts):
            return ctc_signals(model, extractor, batch_audio, layers, k)
    else:
        from kdforge.models.loading import load_whisper

        model, processor = load_whisper(model_dir, audio_ctx)

        def signals(batch_audio, texts):
            return whisper_signals(model, processor, batch_audio, texts, layers, k, decoder_layers)
    return signals


def mapped_hidden_states(signals: dict[str, Tensor], maps: TeacherProjection, layers: list[int]) -> dict[str, Tensor]:
    """One utterance's ``hidden.<layer>`` ``(n, d_m)`` through ``maps`` (slot ``i`` for ``layers[i]``)
    into the shared space: ``mapped.<layer>`` ``(n, D)`` float16, as the cache stores them."""
    raw = torch.stack([signals[f"hidden.{layer}"] for layer in layers]).float()
    return {f"mapped.{layer}": points.half() for layer, points in zip(layers, maps.map_layers(raw))}


def cache_teacher(name: str, model_dir: str, data_dir: str, root: str, layers: list[int], k: int, batch_size: int,
                  threads: int, audio_ctx: int | None, targets: list[str], transcripts: list[str],
                  decoder_layers: list[int], maps: dict | None = None) -> tuple[list[dict], float]:
    """Second pass: store one teacher's signals in ``root/<name>``; returns its shards and seconds.

    ``targets`` and ``transcripts`` (its own first-pass output) are per utterance, in data order.
    ``maps`` (:func:`kdforge.tasks.asr_distill.fixed_teacher_maps`) adds the hidden states mapped
    into the shared space (:func:`mapped_hidden_states`).
    """
    from kdforge.tasks.asr_distill import encoder_shape

    torch.set_num_threads(threads)
    started = time.perf_counter()
    records, audio = read_training_audio(data_dir)
    shards = TeacherShards(Path(root), name)
    signals = teacher_signals(model_dir, layers, k, audio_ctx, decoder_layers)
    projection = None if maps is None else \
        TeacherProjection(encoder_shape(model_dir)[1], maps["dim"], len(maps["layers"]), maps["seed"])
    for start in batch_starts(len(records), batch_size, f"{name}: hidden states and top-k"):
        batch = slice(start, start + batch_size)
        for record, tensors, transcript in zip(records[batch], signals(audio[batch], targets[batch]), transcripts[batch]):
            if projection is not None:
                tensors |= mapped_hidden_states(tensors, projection, maps["layers"])
            shards.add(record.id, {**tensors, "pseudo_label": _text_bytes(transcript)})
    shards.flush()
    return shards.shards, time.perf_counter() - started


def ensemble_transcripts(transcripts: dict[str, list[str]]) -> list[str]:
    """Per utterance, the minimum-Bayes-risk choice among the teachers' transcripts (in teacher order)."""
    from kdforge.evaluation.ensemble import minimum_bayes_risk

    return [options[minimum_bayes_risk(list(options))] for options in zip(*transcripts.values())]


def _run_all(function, jobs: list[tuple], workers: int) -> list:
    if workers == 1:
        return [function(*job) for job in jobs]
    # spawn, not fork: a forked child inherits torch's thread pools mid-flight and can hang
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(function, *zip(*jobs)))


def build_cache(teachers: dict[str, str | Path], data_dir: str | Path, out: str | Path, layers: dict[str, list[int]],
                top_k: int = 32, batch_size: int = 8, workers: int = 1, audio_ctx: int | None = None,
                labelled: int | None = None, decoder_layers: dict[str, list[int]] | None = None,
                maps: dict[str, dict] | None = None) -> dict:
    """Cache every teacher's signals over ``data_dir`` into ``out``; ``workers`` teachers run at once.

    ``layers`` names each teacher's encoder hidden states to keep, ``decoder_layers`` (optional) the
    decoder's of Whisper teachers. ``maps`` (optional, per teacher: ``{"dim", "seed", "layers"}``,
    :func:`kdforge.tasks.asr_distill.fixed_teacher_maps`) stores those hidden states mapped into
    the shared space too, and records the maps in the teacher's settings (``"map"``).

    ``audio_ctx`` cuts Whisper teachers' window and ``labelled`` is ``data.labelled`` (which
    utterances keep their reference as training target); both are part of the cached settings.

    Returns:
        ``{"seconds": wall time, "teacher_seconds": {name: seconds over both passes}}``.
    """
    records = read_metadata(data_dir)  # a bad audiofolder fails here, before any process starts
    keep = labelled_ids(records, labelled)
    threads = max(1, (os.cpu_count() or 1) // workers)
    started = time.perf_counter()
    names = list(teachers)
    decoder_layers = {name: (decoder_layers or {}).get(name, []) for name in names}
    maps = {name: (maps or {}).get(name) for name in names}
    with sealed_build(out) as out:
        first = _run_all(transcribe_teacher, [(n, str(teachers[n]), str(data_dir), batch_size, threads, audio_ctx)
                                              for n in names], workers)
        transcripts = {name: texts for name, (texts, _) in zip(names, first)}
        ensemble = ensemble_transcripts(transcripts)
        targets = [r.transcription if r.id in keep else chosen for r, chosen in zip(records, ensemble)]
        second = _run_all(cache_teacher, [(n, str(teachers[n]), str(data_dir), str(out), layers[n], top_k,
                                           batch_size, threads, audio_ctx, targets, transcripts[n], decoder_layers[n],
                                           maps[n]) for n in names],
                          workers)
        settings = {"top_k": top_k, "audio_ctx": audio_ctx, "labelled": labelled}
        written = {}
        for name, (shards, _) in zip(names, second):
            teacher = TeacherShards(out, name)
            teacher.shards = shards
            written[name] = (model_identity(teachers[name]), {"layers": layers[name], "decoder_layers": decoder_layers[name],
                                                              MAP_SETTING: maps[name], **settings}, teacher)
        choice = TeacherShards(out, ENSEMBLE)
        for record, chosen, target in zip(records, ensemble, targets):
            choice.add(record.id, {"pseudo_label": _text_bytes(chosen), "target": _text_bytes(target)})
        written[ENSEMBLE] = ({"members": names}, settings, choice)
        write_manifest(out, data_fingerprint(data_dir), written)
    seconds = {name: first[i][1] + second[i][1] for i, name in enumerate(names)}
    return {"seconds": time.perf_counter() - started, "teacher_seconds": seconds}


def build_cache_from_config(config, out: str | Path, workers: int = 1) -> dict:
    """:func:`build_cache` for the teachers, training data and ``cache`` settings of a run config
    (``task: lm``: its LM counterpart, teachers one after another, ``workers`` unused).

    Each teacher keeps the hidden states the student's layer maps pair with its own
    (:func:`kdforge.tasks.asr_distill.layer_plan`, :func:`~kdforge.tasks.asr_distill.decoder_layer_plan`),
    and, with fixed teacher maps, those states mapped into the shared space too
    (:func:`~kdforge.tasks.asr_distill.fixed_teacher_maps`).
    """
    from kdforge.tasks.asr_distill import decoder_layer_plan, fixed_teacher_maps, layer_plan

    if config.task == "lm":
        from kdforge.tasks.lm import build_lm_cache_from_config

        return build_lm_cache_from_config(config, out)
    teachers = {teacher.label: teacher.path for teacher in config.teachers}
    return build_cache(teachers, config.data.train, out, layer_plan(config)[1], top_k=config.cache.top_k,
                       batch_size=config.cache.batch_size, workers=workers, audio_ctx=config.audio.audio_ctx,
                       labelled=config.data.labelled, decoder_layers=decoder_layer_plan(config)[1],
                       maps=fixed_teacher_maps(config))
