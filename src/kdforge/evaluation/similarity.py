"""How alike a student's encoder representations are to each teacher's: linear CKA per paired layer.

The projection mapping (METHODS.md section 1) is meant to move the student's hidden states towards
the teachers'. Whether it does, and whether logit distillation alone already does as much, is a
question about representations, not WER. Linear centred kernel alignment (Kornblith et al. 2019)
answers it for any student, trained with the mapping or not: it is invariant to orthogonal maps and
to scale, so it needs no learned projection. Layers pair by the uniform map and frames by time, as
the mapping pairs them (:func:`~kdforge.alignment.uniform_layer_map`, :func:`~kdforge.alignment.pack_points`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from kdforge.alignment import pack_points, uniform_layer_map
from kdforge.errors import KdforgeError


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of ``N`` paired points: ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``.

    ``Xc``, ``Yc`` are the points with each column's mean removed; computed in float64.

    Args:
        x: ``(N, d_x)``.
        y: ``(N, d_y)``, row ``i`` paired with ``x``'s row ``i``.

    Returns:
        A value in ``[0, 1]``: 1 when ``y`` is ``x`` up to an orthogonal map, a scale and a shift.
    """
    if x.dim() != 2 or y.dim() != 2 or len(x) != len(y) or len(x) < 2:
        raise ValueError(f"linear CKA needs two (N, d) tensors of the same N >= 2, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = (points.double() - points.double().mean(0) for points in (x, y))
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    return float(cross / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)))


def encoder_states(model_dir: str | Path, layers: list[int], audio: list, texts: list[str], audio_ctx: int | None = None,
                   batch_size: int = 8) -> dict[int, list[Tensor]]:
    """Per layer, each utterance's encoder hidden states ``(frames, width)`` (its own frames only), from a
    Whisper or kdforge CTC model, as the teacher cache records them.

    Args:
        audio: per utterance its 16 kHz samples; ``texts`` its transcript (Whisper's decoder is forced on it).
    """
    from kdforge.teachers.build import batch_starts, teacher_signals

    run = teacher_signals(model_dir, layers, 1, audio_ctx)
    states: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    for start in batch_starts(len(audio), batch_size, f"{Path(model_dir).name}: hidden states"):
        for signals in run(audio[start : start + batch_size], texts[start : start + batch_size]):
            for layer in layers:
                states[layer].append(signals[f"hidden.{layer}"].float())
    return states


def representation_similarity(students: list[str | Path], teachers: list[str | Path], data_dir: str | Path,
                              audio_ctx: int | None = None, batch_size: int = 8) -> list[dict]:
    """Linear CKA between every encoder layer of each student and its paired layer of each teacher.

    Each student's mapped layers are its encoder layers' outputs (hidden states ``1..depth-1``, as the
    recipe maps them), paired with each teacher's by the uniform map; each utterance's teacher frames
    are those the student's window heard, resampled to the student's frames. The audio is read and
    every model run once.

    Args:
        students: Whisper model folders (an exported student, its ``student-init``, ...).
        teachers: Whisper or kdforge CTC model folders.
        data_dir: an audiofolder (its transcripts force the Whisper decoders; only encoders are compared).
        audio_ctx: the Whisper encoder window (400 = 8 s), as in the runs compared.

    Returns:
        One row per (student, teacher, student layer): ``student``, ``teacher``, ``student_layer``,
        ``teacher_layer``, ``points`` and ``cka``.
    """
    from kdforge.tasks.asr import read_training_audio
    from kdforge.tasks.asr_distill import encoder_shape

    students, teachers = [str(model) for model in students], [str(model) for model in teachers]
    shapes = {model: encoder_shape(model) for model in [*students, *teachers]}
    layers = {}  # per student its mapped layers, and per (student, teacher) the teacher's paired ones
    for student in students:
        depth = shapes[student][0]
        if depth < 2:
            raise KdforgeError(f"{student} has no encoder layer to compare")
        layers[student] = list(range(1, depth))
        for teacher in teachers:
            layers[student, teacher] = uniform_layer_map(layers[student], depth, shapes[teacher][0])
    records, audio = read_training_audio(str(data_dir))
    texts = [record.transcription for record in records]
    student_states = {student: encoder_states(student, layers[student], audio, texts, audio_ctx, batch_size)
                      for student in students}
    rows = []
    for teacher in teachers:
        needed = sorted({layer for student in students for layer in layers[student, teacher]})
        teacher_states = encoder_states(teacher, needed, audio, texts, audio_ctx, batch_size)
        for student in students:
            student_rate, teacher_rate = shapes[student][2], shapes[teacher][2]
            for layer, teacher_layer in zip(layers[student], layers[student, teacher]):
                own = student_states[student][layer]
                counts = [len(frames) for frames in own]
                # a teacher without Whisper's window heard more than the student: keep what the window heard
                heard = [frames[: math.ceil(count / student_rate * teacher_rate)]
                         for frames, count in zip(teacher_states[teacher_layer], counts)]
                rows.append({"student": student, "teacher": teacher, "student_layer": layer,
                             "teacher_layer": teacher_layer, "points": sum(counts),
                             "cka": linear_cka(torch.cat(own), pack_points(heard, counts))})
    return rows
