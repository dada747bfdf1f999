"""Distilling an ensemble of ASR teachers into a Whisper student, from the teacher cache.

The student trains on the whole training audio. Each utterance's target text is the cache's
training target (:mod:`kdforge.teachers.build`): the reference for the labelled part
(``data.labelled``), the ensemble's transcript elsewhere. The step's loss (METHODS.md section 1):

    L = ce_weight * CE + w(step) * weight * L_logit + rlkd.weight * L_rank + d(step) * L_LPPM

* logit terms (KD at ``objective.temperature``, RLKD) use the teachers whose vocabulary is the
  student's, through their cached top-k teacher-forced on the same target tokens;
* ``L_LPPM`` (:func:`kdforge.alignment.lppm_loss`) reaches every mapped teacher, whatever its
  vocabulary, frame rate or width: the student's encoder hidden states of ``student_layers`` go
  through learned projections, each teacher's paired layers through fixed seeded isometries, into
  one space of dimension ``D``; teacher frames are resampled to the student's frames. With
  ``decoder_layers`` the student's decoder states are mapped too, their points the target tokens,
  each Whisper teacher's (teacher-forced on the same text, in its own tokenization) resampled to
  the student's tokens; the term is then the mean over all mapped layers, each the mean over its
  points; the teachers weighted by their config ``weight`` or by validation WER
  (``alignment.teacher_weights``).

No teacher runs during training: a missing cache is built first, a stale one refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from kdforge.alignment import (StudentProjection, TeacherProjection, infonce_loss, lppm_loss, pack_points, pool_points,
                               procrustes_map, shared_dimension, uniform_layer_map)
from kdforge.errors import KdforgeError
from kdforge.evaluation.runner import evaluate
from kdforge.files import write_json_atomic
from kdforge.models.loading import model_type_of
from kdforge.tasks.asr import WhisperTask, read_training_audio
from kdforge.teachers.cache import (ENSEMBLE, TOP_K_FIELDS, TeacherCache, as_top_k, data_fingerprint,
                                    stack_top_k)
from kdforge.teachers.ensemble import ensemble_top_k, weights_by_wer


def encoder_shape(model_dir: str | Path) -> tuple[int, int, float]:
    """``(hidden states, width, frames per second)`` of a Whisper or kdforge CTC model's encoder.

    Hidden states count the input embedding, as ``output_hidden_states`` returns them.
    """
    from transformers import AutoConfig

    model_type_of(model_dir)  # a missing or unsafe folder is named before transformers reads it
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type == "whisper":
        return config.encoder_layers + 1, config.d_model, 50.0
    return config.num_hidden_layers + 1, config.hidden_size, 100.0 / config.kdforge_frame_stack


def layer_plan(config) -> tuple[list[int], dict[str, list[int]]]:
    """The student's mapped hidden states and each teacher's paired ones (METHODS.md "Layer-wise map").

    Defaults: every student encoder layer's output, and per teacher the uniform map; a teacher's
    explicit ``layers`` must pair one-to-one with the student's.

    Raises:
        KdforgeError: a layer a model lacks (``student.encoder_layers`` included), or an explicit
            list of the wrong length.
    """
    student = config.student
    student_depth = encoder_shape(student.path or student.init_from)[0]
    if student.encoder_layers:  # set only with init_from: the student keeps that many of its encoder layers
        if student.encoder_layers >= student_depth:
            raise KdforgeError(f"student.encoder_layers is {student.encoder_layers}, but {student.init_from} "
                               f"has {student_depth - 1} encoder layers")
        student_depth = student.encoder_layers + 1
    alignment = config.alignment
    student_layers = (alignment.student_layers if alignment and alignment.student_layers
                      else list(range(1, student_depth)))
    outside = [layer for layer in student_layers if not 0 <= layer < student_depth]
    if outside:  # checked here: teachers with explicit layers never reach uniform_layer_map's check
        raise KdforgeError(f"alignment.student_layers names layer {outside[0]}, but the student has encoder "
                           f"hidden states 0..{student_depth - 1}")
    plan = {}
    for teacher in config.teachers:
        depth = encoder_shape(teacher.path)[0]
        layers = teacher.layers or uniform_layer_map(student_layers, student_depth, depth)
        if len(layers) != len(student_layers):
            raise KdforgeError(f"teacher {teacher.label!r} lists {len(layers)} layers for {len(student_layers)} "
                               "student layers (alignment.student_layers)")
        outside = [layer for layer in layers if not 0 <= layer < depth]
        if outside:
            raise KdforgeError(f"teacher {teacher.label!r} has hidden states 0..{depth - 1}; it lacks layer {outside[0]}")
        plan[teacher.label] = layers
    return student_layers, plan


def decoder_depth(model_dir: str | Path) -> int | None:
    """Decoder hidden states (the token embedding counted) of a Whisper model; None without a decoder."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return config.decoder_layers + 1 if config.model_type == "whisper" else None


def student_decoder_depth(student) -> int:
    """Decoder hidden states of the student a ``student:`` config section loads or builds."""
    if student.path is not None:
        return decoder_depth(student.path)
    return (len(student.layers) if student.layers is not None else student.num_layers or 2) + 1


def decoder_layer_plan(config) -> tuple[list[int], dict[str, list[int]]]:
    """The student's mapped decoder hidden states (``alignment.decoder_layers``) and, per Whisper
    teacher, the uniform map's paired ones; teachers without a decoder are left out.

    Raises:
        KdforgeError: a decoder layer the student lacks.
    """
    student_layers = config.alignment.decoder_layers if config.alignment else []
    if not student_layers:
        return [], {}
    depth = student_decoder_depth(config.student)
    outside = [layer for layer in student_layers if not 0 <= layer < depth]
    if outside:
        raise KdforgeError(f"alignment.decoder_layers names layer {outside[0]}, but the student has decoder "
                           f"hidden states 0..{depth - 1}")
    depths = {t.label: decoder_depth(t.path) for t in config.teachers}
    return student_layers, {name: uniform_layer_map(student_layers, depth, teacher_depth)
                            for name, teacher_depth in depths.items() if teacher_depth is not None}


def cache_expectations(config) -> dict[str, tuple[Path, dict]]:
    """Per teacher, its model folder and the settings a cache must have been built with to serve ``config``."""
    _, plan = layer_plan(config)
    _, decoder_plan = decoder_layer_plan(config)
    settings = {"top_k": config.cache.top_k, "audio_ctx": config.audio.audio_ctx, "labelled": config.data.labelled}
    return {t.label: (t.path, {"layers": plan[t.label], "decoder_layers": decoder_plan.get(t.label, []), **settings})
            for t in config.teachers}


def mapped_teachers(config) -> list:
    """The teachers the projection mapping reaches, in config order (their maps' seeds follow it)."""
    alignment = config.alignment
    if alignment is None or alignment.weight == 0:
        return []
    return [t for t in config.teachers if alignment.teachers is None or t.label in alignment.teachers]


def shared_space_dimension(config) -> int:
    """``D``: ``alignment.dim``, or :func:`~kdforge.alignment.shared_dimension` of the student's and
    the mapped teachers' widths."""
    widths = [encoder_shape(config.student.path or config.student.init_from)[1],
              *(encoder_shape(t.path)[1] for t in mapped_teachers(config))]  # a Whisper decoder is as wide
    return config.alignment.dim or shared_dimension(widths)


def fixed_teacher_maps(config) -> dict[str, dict]:
    """Per mapped teacher, what fixes its encoder maps: ``{"dim", "seed", "layers"}`` (the map of
    ``layers[i]`` is :class:`~kdforge.alignment.TeacherProjection`'s slot ``i`` drawn from ``seed``).

    The cache stores each teacher's hidden states mapped this way (``mapped.<layer>``) beside the raw
    ones, so that a run with these maps reads its teacher points ready in the shared space (METHODS.md:
    the cache holds mapped hidden states). Empty when the maps are learned, the identity, or refitted
    by ``procrustes`` (those runs read the raw states).
    """
    teachers = mapped_teachers(config)
    if not teachers or config.alignment.teacher_map != "fixed":
        return {}
    dim, plan = shared_space_dimension(config), layer_plan(config)[1]
    return {t.label: {"dim": dim, "seed": config.alignment.seed + index, "layers": plan[t.label]}
            for index, t in enumerate(teachers)}


def open_cache(config) -> TeacherCache:
    """The run's teacher cache (``cache.dir``), built first if the folder does not exist yet."""
    from kdforge.teachers.build import build_cache_from_config

    if config.cache.dir is None:
        raise KdforgeError("distilling from ASR teachers reads a teacher cache: set cache.dir "
                           "(it is built there if the folder does not exist)")
    expected = cache_expectations(config)  # a bad layer map is named before anything is built
    if not (config.cache.dir / "manifest.json").exists():
        build_cache_from_config(config, config.cache.dir)
    cache = TeacherCache(config.cache.dir, expected, data_fingerprint(config.data.train))
    members = cache.members()
    if members != [t.label for t in config.teachers]:  # their order breaks ties in the ensemble's vote
        raise KdforgeError(f"the teacher cache {config.cache.dir} holds the transcripts of the ensemble "
                           f"{', '.join(members)}, not of {', '.join(t.label for t in config.teachers)}; rebuild it")
    return cache


def same_vocabulary(student_tokenizer, model_dir: str | Path) -> bool:
    """Whether the model in ``model_dir`` has exactly the student tokenizer's vocabulary."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir).get_vocab() == student_tokenizer.get_vocab()
    except (OSError, ValueError):
        return False


#: Training utterances over which ``alignment.teacher_map: procrustes`` fits its maps, once.
PROCRUSTES_UTTERANCES = 64


def frames_of_speech(hidden_states: tuple[Tensor, ...], batch: dict[str, Tensor]) -> Tensor:
    """``(B, T)`` bool over the student's encoder window: True on each utterance's frames of speech."""
    window, device = hidden_states[0].shape[1], hidden_states[0].device
    return torch.arange(window, device=device) < batch["encoder_frames"][:, None]


def valid_points(states: list[Tensor], valid: Tensor) -> Tensor:
    """Each layer's ``(B, T, d)`` states at the ``(B, T)`` bool ``valid`` points, packed: ``(layers, N, d)``."""
    # the order of states[valid], as a flat index: its gather's backward is ~3x cheaper than the mask's
    rows = valid.flatten().nonzero().squeeze(1)
    return torch.stack([layer.flatten(0, 1).index_select(0, rows) for layer in states])


def validation_wers(teachers: dict[str, Path], data: Path, audio_ctx: int | None, record: Path) -> dict[str, float]:
    """Each teacher's greedy WER on the labelled audiofolder ``data``, kept in ``record`` (JSON).

    A record of the same folder and teachers is read instead of decoding again: a resumed run, and every
    process after the first, get the weights the first measured.
    """
    if record.exists():
        kept = json.loads(record.read_text())
        if kept.get("validation") == str(data) and set(kept.get("wer", {})) == set(teachers):
            return {name: kept["wer"][name] for name in teachers}
    with torch.random.fork_rng():  # whatever loading the teachers draws, the student's adapters start as without it
        wers = {name: evaluate(path, data, audio_ctx=audio_ctx)["wer"] for name, path in teachers.items()}
    write_json_atomic(record, {"validation": str(data), "wer": wers})
    return wers


class WhisperDistillationTask(WhisperTask):
    """A Whisper student (optionally built from a teacher's layers, optionally LoRA) distilled from the cache."""

    def __init__(self, config, work_dir: Path):
        self.config = config
        self._load_student(work_dir)
        self.cache = open_cache(config)
        records, self.audio = read_training_audio(config.data.train)
        self.ids = [record.id for record in records]
        self.train_examples = [self._label_ids(self.cache.text(ENSEMBLE, r.id, "target"), r.path) for r in records]
        self.logit_teachers = [t.label for t in config.teachers
                               if config.objective.uses_teacher_logits and same_vocabulary(self.tokenizer, t.path)]
        self._check_cached_labels()
        self.student_layers, plan = layer_plan(config)
        alignment = config.alignment
        self.mapped = mapped_teachers(config)
        # teachers whose cached points are already in the shared space, through this run's very maps
        self.premapped = {name for name, maps in fixed_teacher_maps(config).items() if self.cache.maps(name) == maps}
        self.teacher_layers = {t.label: plan[t.label] for t in self.mapped}
        self.teacher_rates = {t.label: encoder_shape(t.path)[2] for t in self.mapped}
        self.decoder_layers, decoder_plan = decoder_layer_plan(config) if self.mapped else ([], {})
        self.decoder_mapped = [t for t in self.mapped if t.label in decoder_plan]
        if self.decoder_layers and not self.decoder_mapped:
            raise KdforgeError("alignment.decoder_layers is set, but no mapped teacher has a decoder")
        self.teacher_decoder_layers = {t.label: decoder_plan[t.label] for t in self.decoder_mapped}
        weights = self._mapping_weights(work_dir)
        self.teacher_weights = torch.tensor([weights[t.label] for t in self.mapped])
        self.decoder_weights = torch.tensor([weights[t.label] for t in self.decoder_mapped])
        self._add_adapters()
        torch.manual_seed(config.training.seed + 1)  # the same heads whether or not student-init was just built
        self.heads = self._projection_heads() if self.mapped else None
        if self.mapped and alignment.teacher_map == "procrustes":
            self._fit_maps_to_reference()
        self.student.train()
        self.step = 0

    def to(self, device: torch.device) -> None:
        """Place the student, its projection heads and the teachers' weights on ``device``."""
        super().to(device)
        if self.heads is not None:
            self.heads.to(device)
        self.teacher_weights = self.teacher_weights.to(device)
        self.decoder_weights = self.decoder_weights.to(device)

    def teachers_used(self) -> dict[str, list[str]]:
        """Which teachers fed which term: ``targets`` (the ensemble's transcripts), ``logit``, ``lppm``
        and, with ``alignment.decoder_layers``, ``lppm_tokens``."""
        used = {"targets": [t.label for t in self.config.teachers] if self.config.data.labelled else [],
                "logit": self.logit_teachers, "lppm": [t.label for t in self.mapped]}
        return used | ({"lppm_tokens": [t.label for t in self.decoder_mapped]} if self.decoder_layers else {})

    def _mapping_weights(self, work_dir: Path) -> dict[str, float]:
        """Each mapped teacher's weight ``w_m`` in the mapping's target: its config ``weight``, or by validation
        WER (:func:`validation_wers`, measured once per run folder)."""
        alignment = self.config.alignment
        if not self.mapped or alignment.teacher_weights == "config":
            return {t.label: t.weight for t in self.mapped}
        wers = validation_wers({t.label: t.path for t in self.mapped}, alignment.validation,
                               self.config.audio.audio_ctx, Path(work_dir) / "teacher_wers.json")
        return dict(zip(wers, weights_by_wer(list(wers.values()), alignment.wer_temperature)))

    def _check_cached_labels(self) -> None:
        """The logit teachers were teacher-forced on exactly the student's target tokens."""
        for teacher in self.logit_teachers:
            for utterance, ids in zip(self.ids, self.train_examples):
                cached = self.cache.signals(teacher, utterance, ["label_ids"])["label_ids"].tolist()
                if cached != ids[self.prompt_length :]:
                    raise KdforgeError(f"the cache's {teacher!r} labels for {utterance!r} are not the student's "
                                       "target tokens; rebuild the cache")

    def _projection_heads(self) -> torch.nn.ModuleDict:
        """Student projections (learned, one per mapped layer) and teacher maps (fixed by default);
        ``decoder_student`` and ``decoder_teachers`` likewise for the mapped decoder layers."""
        alignment = self.config.alignment
        widths = {t.label: encoder_shape(t.path)[1] for t in self.mapped}  # a Whisper decoder is as wide
        student_width = self.student.config.d_model
        dim = shared_space_dimension(self.config)

        def teacher_maps(teachers: list, layers: int, first_seed: int) -> torch.nn.ModuleList:
            # a list in the order of teachers: names such as "whisper-tiny.en" are not module names
            kind = "fixed" if alignment.teacher_map == "procrustes" else alignment.teacher_map  # refitted after
            return torch.nn.ModuleList([TeacherProjection(widths[t.label], dim, layers, first_seed + index, kind=kind)
                                        for index, t in enumerate(teachers)])

        # a fixed student map's seed follows every teacher map's (seed + index), so none shares one
        student_seed = alignment.seed + len(self.mapped) + len(self.decoder_mapped)
        layers = len(self.student_layers)
        heads = torch.nn.ModuleDict({"student": StudentProjection(student_width, dim, layers, alignment.projection,
                                                                  seed=student_seed),
                                     "teachers": teacher_maps(self.mapped, layers, alignment.seed)})
        if self.decoder_layers:  # made after the encoder's heads, which stay what they were without these
            layers = len(self.decoder_layers)
            heads["decoder_student"] = StudentProjection(student_width, dim, layers, alignment.projection,
                                                         seed=student_seed + 1)
            heads["decoder_teachers"] = teacher_maps(self.decoder_mapped, layers, alignment.seed + len(self.mapped))
        return heads

    @torch.no_grad()
    def _fit_maps_to_reference(self) -> None:
        """``alignment.teacher_map: procrustes``: in each group of points (encoder frames; decoder tokens
        with ``decoder_layers``), the fixed maps of every mapped teacher but the group's first (the
        reference, which keeps its seeded ones), and the student's with ``projection: fixed``, become
        the isometries that best carry their unit points onto the reference's mapped unit points
        (:func:`~kdforge.alignment.procrustes_map`), over the points of the first
        :data:`PROCRUSTES_UTTERANCES` training utterances (the student's as initialised).

        Independently seeded maps send the teachers' points for one frame in unrelated directions, so
        their sum or centroid gives the student no common target (docs/results-asr.md); these maps make
        the teachers agree as far as a rotation of each one's states can (a map is unique only up to the
        directions the reference's points do not span, e.g. for a teacher wider than it). The fit pairs unit
        points one by one, whatever ``pointwise`` and ``normalize`` say. Checkpoints keep trainable
        weights only: a resumed run (or another rank) fits the same maps again from the same utterances.
        """
        fit_student = self.config.alignment.projection == "fixed"
        groups = [("", self.mapped, "hidden")]
        if self.decoder_layers:
            groups.append(("decoder_", self.decoder_mapped, "decoder"))
        refitted = {group: [*self.heads[f"{group}teachers"][1:], *([self.heads[f"{group}student"].layers]
                                                                    if fit_student else [])]
                    for group, *_ in groups}
        if not any(refitted.values()):  # one mapped teacher per group and learned student projections
            return
        crosses = {group: [0.0] * len(maps) for group, maps in refitted.items()}
        count, size = min(PROCRUSTES_UTTERANCES, len(self.ids)), self.config.training.batch_size
        was_training = self.student.training
        self.student.eval()
        for start in range(0, count, size):
            batch = self.batch(list(range(start, min(start + size, count))))
            output = self.forward(batch["features"], batch["inputs"], hidden_states=True) if fit_student else None
            for group, teachers, key in groups:
                points = [batch[f"{key}/{t.label}"] for t in teachers]  # raw: nothing is premapped here
                if fit_student:
                    hidden_states = output.decoder_hidden_states if group else output.encoder_hidden_states
                    points.append(valid_points(*self._mapped_states(group, hidden_states, batch)))
                reference = self.heads[f"{group}teachers"][0].map_layers(F.normalize(points[0], dim=-1))
                for index, own in enumerate(points[1:]):
                    # packed teacher points are float32; the student's states are in its own dtype
                    crosses[group][index] = crosses[group][index] + torch.einsum(
                        "lnD,lnd->lDd", reference, F.normalize(own.float(), dim=-1))
        self.student.train(was_training)
        for group, maps in refitted.items():
            for fitted, cross in zip(maps, crosses[group]):
                fitted.maps.copy_(procrustes_map(cross))

    def batch(self, indices: list[int]) -> dict[str, Tensor]:
        """:meth:`WhisperTask.batch` plus the teachers' cached signals for these utterances.

        Adds ``encoder_frames (B,)`` (the student's frames of speech), ``teacher_topk`` (a
        :class:`~kdforge.losses.TopKTeacher` on the ``(B, L)`` target grid: the weighted mean of the teachers that
        share the student's vocabulary, :func:`kdforge.teachers.ensemble.ensemble_top_k`), per
        mapped teacher ``hidden/<name>`` ``(layers, N, d_m)``: its cached hidden states resampled to
        the student's frames of speech, packed (:func:`~kdforge.alignment.pack_points`; ``N`` is
        ``encoder_frames.sum()``; ``(layers, N, D)`` for a teacher in :attr:`premapped`, read already
        through its maps), and per decoder-mapped teacher ``decoder/<name>`` ``(layers, N_tok, d_m)``:
        its cached decoder states at its text tokens resampled to the student's target tokens, packed
        likewise (``N_tok`` is ``target_mask.sum()``).
        """
        batch = super().batch(indices)
        window = batch["features"].shape[-1] // 2
        batch["encoder_frames"] = ((batch["frames"] + 1) // 2).clamp(max=window)
        utterances = [self.ids[i] for i in indices]
        if self.logit_teachers:
            grids = [stack_top_k(as_top_k(self.cache.batch(name, utterances, TOP_K_FIELDS)), self.prompt_length - 1,
                                 batch["targets"].shape[1]) for name in self.logit_teachers]
            weights = [t.weight for t in self.config.teachers if t.label in self.logit_teachers]
            batch["teacher_topk"] = ensemble_top_k(grids, weights) if len(grids) > 1 else grids[0]
        for teacher in self.mapped:
            # a teacher without Whisper's window heard more than the student: keep the frames of the window
            heard = math.ceil(window / 50.0 * self.teacher_rates[teacher.label])
            signal = "mapped" if teacher.label in self.premapped else "hidden"
            batch[f"hidden/{teacher.label}"] = self._packed_points(
                teacher.label, utterances, [f"{signal}.{layer}" for layer in self.teacher_layers[teacher.label]],
                batch["encoder_frames"].tolist(), heard)
        for teacher in self.decoder_mapped:
            # teacher-forced on the same text in its own tokenization: its text tokens meet the student's
            batch[f"decoder/{teacher.label}"] = self._packed_points(
                teacher.label, utterances, [f"decoder.{layer}" for layer in self.teacher_decoder_layers[teacher.label]],
                batch["target_mask"].sum(dim=1).tolist())
        return batch

    def _packed_points(self, teacher: str, utterances: list[str], names: list[str], counts: list[int],
                       heard: int | None = None) -> Tensor:
        """A teacher's cached states ``names`` (the first ``heard`` of each), resampled to ``counts``
        points per utterance and packed: ``(len(names), sum(counts), d_m)``."""
        signals = self.cache.batch(teacher, utterances, names)
        # every layer's sequences in one call: one gather for the whole batch instead of one per layer
        packed = pack_points([s[name][:heard] for name in names for s in signals], counts * len(names),
                             self.config.alignment.resample)
        return packed.view(len(names), sum(counts), packed.shape[-1])

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        from kdforge.data.augment import spec_augment
        from kdforge.training.objective import linear_warmup, token_loss_terms, warmed_objective

        features = batch["features"]
        if self.config.audio.spec_augment is not None and self.student.training:
            features = spec_augment(features, self.config.audio.spec_augment, batch["frames"])
        output = self.forward(features, batch["inputs"], hidden_states=bool(self.mapped))
        total, terms = token_loss_terms(output.logits, batch.get("teacher_topk"), batch["targets"],
                                        batch["target_mask"], warmed_objective(self.config.objective, self.step))
        if self.mapped:
            alignment = self.config.alignment
            terms["lppm"], extra = self._lppm(output.encoder_hidden_states, batch)
            if self.decoder_layers:
                terms["lppm_tokens"], token_extra = self._token_lppm(output.decoder_hidden_states, batch)
                frame_share = len(self.student_layers) / (len(self.student_layers) + len(self.decoder_layers))
                terms["lppm_frames"] = terms["lppm"]
                terms["lppm"] = frame_share * terms["lppm_frames"] + (1 - frame_share) * terms["lppm_tokens"]
                extra = None if extra is None else frame_share * extra + (1 - frame_share) * token_extra
            total = total + alignment.weight * linear_warmup(self.step, alignment.warmup_steps) * terms["lppm"]
            if extra is not None:
                terms["infonce"] = extra
                total = total + alignment.infonce_weight * extra
        return total, terms

    def _lppm(self, hidden_states: tuple[Tensor, ...], batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """The projection-mapping loss over frame points (encoder states of the frames of speech), and
        the InfoNCE term when the teacher maps are learned."""
        states, valid = self._mapped_states("", hidden_states, batch)
        return self._group_loss("", states, [batch[f"hidden/{t.label}"] for t in self.mapped], valid,
                                self.teacher_weights, [t.label in self.premapped for t in self.mapped])

    def _token_lppm(self, hidden_states: tuple[Tensor, ...], batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """:meth:`_lppm` over token points: the decoder states at the target positions."""
        states, valid = self._mapped_states("decoder_", hidden_states, batch)
        return self._group_loss("decoder_", states, [batch[f"decoder/{t.label}"] for t in self.decoder_mapped], valid,
                                self.decoder_weights, [False] * len(self.decoder_mapped))

    def _mapped_states(self, group: str, hidden_states: tuple[Tensor, ...], batch: dict[str, Tensor]
                       ) -> tuple[list[Tensor], Tensor]:
        """One group's student points: its mapped layers' states ``(B, T, d_s)`` and the ``(B, T)`` bool mask
        of its points: the encoder's frames of speech (``group`` ``""``) or the decoder's target tokens
        (``"decoder_"``), from the encoder's or the decoder's ``hidden_states``."""
        if group == "decoder_":
            return [hidden_states[layer] for layer in self.decoder_layers], batch["target_mask"]
        return [hidden_states[layer] for layer in self.student_layers], frames_of_speech(hidden_states, batch)

    def _group_loss(self, group: str, student_states: list[Tensor], teacher_points: list[Tensor], valid: Tensor,
                    weights: Tensor, already_mapped: list[bool]) -> tuple[Tensor, Tensor | None]:
        """:func:`~kdforge.alignment.lppm_loss` of one group's points (``group``: ``""`` for frames,
        ``"decoder_"`` for tokens), and the InfoNCE term when the teacher maps are learned.

        Args:
            student_states: per mapped student layer ``(B, T, d_s)``.
            teacher_points: per mapped teacher ``(layers, N, d_m)``, packed on the student's points
                (``(layers, N, D)`` where ``already_mapped`` says they were read from the cache mapped).
            valid: ``(B, T)`` bool, the student's points (``N`` of them). Only they are mapped: point-wise
                as one row of ``N`` points (most of a window is padding), otherwise pooled per utterance.
        """
        alignment = self.config.alignment
        if any(states.shape[:2] != valid.shape for states in student_states):
            raise ValueError(f"student states {[tuple(s.shape) for s in student_states]} do not match the "
                             f"{tuple(valid.shape)} mask of valid points")
        student = valid_points(student_states, valid)
        count = student.shape[1]
        if any(points.shape[1] != count for points in teacher_points):
            raise ValueError(f"the teachers' packed points ({', '.join(str(p.shape[1]) for p in teacher_points)}) "
                             f"are not the student's {count}: batch() and the loss disagree on the valid points")
        student = self.heads[f"{group}student"].map_layers(student)
        teachers = [points if ready else maps.map_layers(points) for maps, points, ready
                    in zip(self.heads[f"{group}teachers"], teacher_points, already_mapped)]
        if alignment.pointwise:  # (L, 1, N, D) and M x (L, 1, N, D)
            student, teachers = student.unsqueeze(-3), [points.unsqueeze(-3) for points in teachers]
        else:  # (L, B, 1, D) and M x (L, B, 1, D)
            counts = valid.sum(dim=1).tolist()
            student, *teachers = [pool_points(points, counts).unsqueeze(-2) for points in (student, *teachers)]
        mask = torch.ones(student.shape[1:3], dtype=torch.bool, device=student.device)
        loss = lppm_loss(student, teachers, mask, weights, target=alignment.target,
                         point_loss=alignment.point_loss, normalize=alignment.normalize)
        if alignment.teacher_map != "learned":
            return loss, None
        # learned teacher maps could collapse every point onto one: contrast each student point with its own
        contrast = torch.stack([infonce_loss(student[-1][mask], points[-1][mask]) for points in teachers])
        return loss, contrast.mean()
