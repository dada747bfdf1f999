"""Running each teacher once over the training audio and storing what distillation needs.

Per teacher and utterance (:mod:`kdforge.teachers.cache` stores them):

* ``hidden.<l>``: the encoder's hidden states of each kept layer ``l`` (0 = the input embedding),
  ``(frames, width)`` float16, cut to the utterance's own frames;
* ``pseudo_label``: the teacher's greedy transcript, UTF-8 bytes as uint8;
* Whisper teachers, teacher-forced on the reference transcript in their own tokenization:
  ``label_ids (L,)`` and, at each text position, the top-k of the next-token distribution
  (``topk_ids (L, k)``, ``topk_logprobs (L, k)``, ``tail_logprob (L,)``, the
  :class:`~kdforge.losses.TopKTeacher` fields);
* CTC teachers: the frame-level top-k of their character distribution, same three fields with
  frames instead of tokens.

Teachers are independent, so ``workers`` processes take one teacher each at a time; each process
uses ``cores // workers`` torch threads. Once all have run, the cache also holds the ensemble's own
transcript of every utterance under the name ``ensemble``: the minimum-Bayes-risk choice among the
teachers' pseudo-labels (:func:`kdforge.evaluation.ensemble.minimum_bayes_risk`), the label the
student learns from where the audio has no transcript.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdforge.data.audio import read_metadata
from kdforge.losses import TopKTeacher
from kdforge.models.loading import decoder_prompt_length, model_type_of
from kdforge.tasks.asr import read_training_audio
from kdforge.teachers.cache import ENSEMBLE, TeacherShards, data_fingerprint, model_identity, write_manifest


def _text_bytes(text: str) -> Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def _top_k_fields(logits: Tensor, k: int) -> dict[str, Tensor]:
    """The :class:`TopKTeacher` fields of ``logits (n, V)``; a vocabulary of V <= k is kept whole."""
    sparse = TopKTeacher.from_logits(logits, min(k, logits.shape[-1]))
    return {"topk_ids": sparse.indices, "topk_logprobs": sparse.logprobs, "tail_logprob": sparse.tail_logprob}


@torch.no_grad()
def whisper_signals(recognizer, audio: list[np.ndarray], texts: list[str], layers: list[int], k: int) -> list[dict]:
    """The cached signals of a Whisper teacher (a :class:`WhisperRecognizer`) for one batch."""
    model, processor = recognizer.model, recognizer.processor
    extractor, tokenizer = processor.feature_extractor, processor.tokenizer
    features = extractor(audio, sampling_rate=extractor.sampling_rate, return_tensors="pt").input_features
    encoded = model.model.encoder(features, output_hidden_states=True)
    labels = [tokenizer(" " + text.strip()).input_ids for text in texts]
    length = max(len(ids) for ids in labels) - 1
    inputs = torch.full((len(labels), length), tokenizer.eos_token_id, dtype=torch.long)
    for row, ids in enumerate(labels):
        inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1])
    logits = model(encoder_outputs=(encoded.last_hidden_state,), decoder_input_ids=inputs).logits
    pseudo = recognizer.transcribe(audio)
    prompt = decoder_prompt_length(tokenizer)
    window = features.shape[-1] // 2
    out = []
    for row, samples in enumerate(audio):
        frames = min(window, math.ceil(len(samples) / extractor.hop_length / 2))  # the encoder halves the mel rate
        text_positions = slice(prompt - 1, len(labels[row]) - 1)  # logits predicting the text and its end
        out.append({**{f"hidden.{layer}": encoded.hidden_states[layer][row, :frames].half() for layer in layers},
                    "label_ids": torch.tensor(labels[row][prompt:]), **_top_k_fields(logits[row, text_positions], k),
                    "pseudo_label": _text_bytes(pseudo[row])})
    return out


@torch.no_grad()
def ctc_signals(model, tokenizer, extractor, audio: list[np.ndarray], layers: list[int], k: int) -> list[dict]:
    """The cached signals of a kdforge CTC teacher for one batch (see the module docstring)."""
    from kdforge.models.ctc import frame_stack_of, greedy_ctc, stacked_log_mel

    features, mask = stacked_log_mel(extractor, audio, frame_stack_of(model))
    output = model(input_features=features, attention_mask=mask.long(), output_hidden_states=True)
    pseudo = greedy_ctc(output.logits, mask, tokenizer)
    out = []
    for row in range(len(audio)):
        frames = int(mask[row].sum())
        out.append({**{f"hidden.{layer}": output.hidden_states[layer][row, :frames].half() for layer in layers},
                    **_top_k_fields(output.logits[row, :frames], k), "pseudo_label": _text_bytes(pseudo[row])})
    return out


def cache_teacher(name: str, model_dir: str, data_dir: str, root: str, layers: list[int], k: int,
                  batch_size: int, threads: int, audio_ctx: int | None = None) -> tuple[str, dict, list[dict], float]:
    """Run one teacher over the audiofolder into ``root/<name>``; returns its manifest pieces and seconds."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    records, audio = read_training_audio(data_dir)
    shards = TeacherShards(Path(root), name)
    if model_type_of(model_dir) == "wav2vec2-bert":
        from transformers import Wav2Vec2BertForCTC, Wav2Vec2CTCTokenizer, WhisperFeatureExtractor

        model = Wav2Vec2BertForCTC.from_pretrained(model_dir).eval()
        tokenizer, extractor = Wav2Vec2CTCTokenizer.from_pretrained(model_dir), WhisperFeatureExtractor.from_pretrained(model_dir)

        def signals(batch_audio, texts):
            return ctc_signals(model, tokenizer, extractor, batch_audio, layers, k)
    else:
        from kdforge.evaluation.recognizers import WhisperRecognizer
        from kdforge.models.loading import load_whisper

        recognizer = WhisperRecognizer(*load_whisper(model_dir, audio_ctx))

        def signals(batch_audio, texts):
            return whisper_signals(recognizer, batch_audio, texts, layers, k)
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        for record, tensors in zip(batch, signals(audio[start : start + batch_size], [r.transcription for r in batch])):
            shards.add(record.id, tensors)
    shards.flush()
    return name, model_identity(model_dir), shards.shards, time.perf_counter() - started


def build_cache(teachers: dict[str, str | Path], data_dir: str | Path, out: str | Path, layers: dict[str, list[int]],
                top_k: int = 32, batch_size: int = 8, workers: int = 1, audio_ctx: int | None = None) -> dict:
    """Cache every teacher's signals over ``data_dir`` into ``out``; ``workers`` teachers run at once.

    ``audio_ctx`` cuts Whisper teachers' window (it is part of the cached settings: other windows
    give other hidden states).

    Returns:
        ``{"seconds": wall time, "teacher_seconds": {name: seconds}}``.
    """
    from kdforge.files import check_new_folder

    out = check_new_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    read_metadata(data_dir)  # a bad audiofolder fails here, before any process starts
    threads = max(1, (os.cpu_count() or 1) // workers)
    jobs = [(name, str(path), str(data_dir), str(out), layers[name], top_k, batch_size, threads, audio_ctx)
            for name, path in teachers.items()]
    started = time.perf_counter()
    if workers == 1:
        results = [cache_teacher(*job) for job in jobs]
    else:
        # spawn, not fork: a forked child inherits torch's thread pools mid-flight and can hang
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(cache_teacher, *zip(*jobs)))
    written = {}
    for name, identity, shards, _ in results:
        teacher = TeacherShards(out, name)
        teacher.shards = shards
        written[name] = (identity, {"layers": layers[name], "top_k": top_k, "audio_ctx": audio_ctx}, teacher)
    if len(teachers) > 1:
        written[ENSEMBLE] = ({"members": sorted(teachers)}, {}, ensemble_pseudo_labels(out, written))
    write_manifest(out, data_fingerprint(data_dir), written)
    return {"seconds": time.perf_counter() - started, "teacher_seconds": {r[0]: r[3] for r in results}}


def ensemble_pseudo_labels(root: Path, written: dict[str, tuple]) -> TeacherShards:
    """Shards of the ensemble's transcript per utterance: the MBR choice among the teachers' own."""
    from safetensors import safe_open

    from kdforge.evaluation.ensemble import minimum_bayes_risk

    transcripts: dict[str, list[str]] = {}
    for _, _, shards in written.values():
        for shard in shards.shards:
            with safe_open(root / shard["file"], framework="pt") as handle:
                for utterance in shard["utterances"]:
                    text = bytes(handle.get_tensor(f"{utterance}/pseudo_label").tolist()).decode("utf-8")
                    transcripts.setdefault(utterance, []).append(text)
    ensemble = TeacherShards(root, ENSEMBLE)
    for utterance, options in transcripts.items():
        ensemble.add(utterance, {"pseudo_label": _text_bytes(options[minimum_bayes_risk(options)])})
    ensemble.flush()
    return ensemble


def last_encoder_layer(model_dir: str | Path) -> int:
    """The hidden-state index of a model's last encoder layer (0 is its input embedding)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return config.encoder_layers if config.model_type == "whisper" else config.num_hidden_layers


def build_cache_from_config(config, out: str | Path, workers: int = 1) -> dict:
    """:func:`build_cache` for the teachers, training data and ``cache`` settings of a run config."""
    teachers = {teacher.label: teacher.path for teacher in config.teachers}
    layers = {teacher.label: teacher.layers or [last_encoder_layer(teacher.path)] for teacher in config.teachers}
    return build_cache(teachers, config.data.train, out, layers, top_k=config.cache.top_k,
                       batch_size=config.cache.batch_size, workers=workers, audio_ctx=config.audio.audio_ctx)
