"""The run configuration: one pydantic model, validated on load, unknown keys refused by name.

A YAML file (``kdforge train CONFIG.yaml``) plus ``--set key.path=value`` overrides become one
:class:`RunConfig`. Every problem is reported as one line naming the key, e.g.
``config key 'training.lr': Input should be greater than 0`` or
``unknown config key 'training.stpes' (did you mean 'steps'?)``.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdforge.errors import KdforgeError
from kdforge.home import kdforge_home

def _expand(path: Path) -> Path:
    """``~`` and ``$VARIABLES`` expanded; ``$KDFORGE_HOME`` means kdforge's home even when unset;
    ``builtin:NAME`` is a tiny model kdforge builds on first use (:mod:`kdforge.models.builtin`)."""
    from kdforge.models import builtin

    if str(path).startswith(builtin.PREFIX):
        return Path(builtin.resolve(str(path)))
    text = str(path).replace("${KDFORGE_HOME}", "$KDFORGE_HOME").replace("$KDFORGE_HOME", str(kdforge_home()))
    return Path(os.path.expandvars(text)).expanduser()


ModelPath = Annotated[Path, AfterValidator(_expand)]
ObjectiveName = Literal["kl", "rkl", "jsd", "tvd", "skl", "srkl", "akl", "none"]


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherConfig(StrictModel):
    path: ModelPath = Field(description="A Hugging Face model directory.")
    name: str | None = Field(None, description="The teacher's name in caches and results; default: the folder's name.")
    weight: float = Field(1.0, gt=0, description="Weight of this teacher's probabilities in the ensemble mean.")
    layers: list[int] | None = Field(None, description="Encoder hidden states paired with alignment.student_layers "
                                     "(0 = the input embedding); default: the uniform layer map (asr), the last layer.")

    @property
    def label(self) -> str:
        return self.name or self.path.name


class LoraConfig(StrictModel):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] | None = Field(
        None, description="Names of the linear layers that receive adapters; default: every attention and "
                          "feed-forward projection of the architecture.")
    merge_on_export: bool = Field(True, description="Merge the adapters into the exported student.")


class StudentConfig(StrictModel):
    path: ModelPath | None = Field(None, description="An existing student model directory.")
    init_from: ModelPath | None = Field(None, description="Build the student from this teacher directory's layers.")
    layers: list[int] | None = Field(None, description="Teacher layers kept (with init_from); default: maximally spaced.")
    num_layers: int | None = Field(None, ge=1, description="How many maximally spaced layers to keep (with init_from).")
    encoder_layers: int | None = Field(None, ge=1, description="Whisper only: keep this many maximally spaced "
                                       "encoder layers too (with init_from); default: the whole encoder.")
    lora: LoraConfig | None = Field(None, description="Train LoRA adapters instead of all weights.")

    @model_validator(mode="after")
    def _one_source(self) -> "StudentConfig":
        if (self.path is None) == (self.init_from is None):
            raise ValueError("give exactly one of 'path' and 'init_from'")
        if self.init_from is None and (self.layers, self.num_layers, self.encoder_layers) != (None, None, None):
            raise ValueError("'layers', 'num_layers' and 'encoder_layers' need 'init_from'")
        return self


class RLKDConfig(StrictModel):
    k: int = Field(5, ge=2, description="Top-k per model; the union has k..2k ids.")
    weight: float = Field(2.0, ge=0, description="Weight of the ranking term (the paper's +R uses 2).")
    dynamic: bool = Field(False, description="Weight each position's base loss by its top-k overlap (paper Eq. 2).")
    regularization_strength: float = Field(1.0, gt=0, description="Soft-rank eps.")
    rank_on: Literal["logits", "probs"] = Field("logits", description="Rank raw logits (official code) or probabilities.")
    warmup_steps: int = Field(0, ge=0, description="Steps over which the ranking term's weight rises linearly from 0.")


class ObjectiveConfig(StrictModel):
    name: ObjectiveName = Field("kl", description="Base logit objective; 'none' for CE or ranking only.")
    weight: float = Field(1.0, ge=0, description="Weight of the base objective.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature T of the base objective (scaled by T**2). "
                               "With several teachers their mean probabilities are tempered, not each teacher.")
    beta: float = Field(0.5, ge=0, le=1, description="Generalised JSD's beta.")
    alpha: float = Field(0.1, ge=0, lt=1, description="Skew KL's alpha.")
    mu: float = Field(0.5, gt=0, le=1, description="AKL's head threshold.")
    ce_weight: float = Field(0.0, ge=0, description="Weight of cross-entropy on the labels.")
    warmup_steps: int = Field(0, ge=0, description="Steps over which the base objective's weight rises linearly from 0.")
    rlkd: RLKDConfig | None = None

    @property
    def uses_teacher_logits(self) -> bool:
        """Whether a term compares the student's distribution with a teacher's (the base objective or RLKD)."""
        return (self.name != "none" and self.weight > 0) or (self.rlkd is not None and self.rlkd.weight > 0)

    def base_options(self) -> dict[str, float]:
        """The keyword arguments the chosen base objective takes beyond logits, mask and temperature."""
        return {"jsd": {"beta": self.beta}, "skl": {"alpha": self.alpha}, "srkl": {"alpha": self.alpha},
                "akl": {"mu": self.mu}}.get(self.name, {})


class DataConfig(StrictModel):
    train: str = Field(description="lm: a JSONL file or 'builtin:NAME'; asr: an audiofolder or 'builtin:tiny-speech'.")
    eval: str | None = Field(None, description="Held-out data of the same kind.")
    max_length: int = Field(128, ge=8, description="Tokens per sequence (longer ones are cut).")
    labelled: int | None = Field(None, ge=1, description="asr: only this many training utterances keep their "
                                 "transcripts (a fixed choice by utterance id); the rest is unlabelled audio.")


class SpecAugmentConfig(StrictModel):
    time_masks: int = Field(2, ge=0, description="Time bands masked per utterance.")
    time_width: int = Field(40, ge=1, description="Longest time band, in mel frames (10 ms each).")
    freq_masks: int = Field(2, ge=0, description="Frequency bands masked per utterance.")
    freq_width: int = Field(12, ge=1, description="Widest frequency band, in mel bins.")


class AudioConfig(StrictModel):
    audio_ctx: int | None = Field(None, ge=1, description="Whisper encoder positions kept (400 = 8 s); None = 1500.")
    spec_augment: SpecAugmentConfig | None = Field(None, description="Mask time and frequency bands in training.")
    dynamic_window: bool = Field(False, description="Whisper: run the encoder per batch on only as much of its window "
                                 "as the longest utterance needs (in 1 s steps), in training and, once exported, "
                                 "in kdforge's decoding: most of a fixed window is padding.")


class TrainingConfig(StrictModel):
    steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Sequences per optimizer step (global).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per step; batch_size must divide by it.")
    lr: float = Field(1e-3, gt=0, description="Peak AdamW learning rate (linear warm-up, cosine decay to 10%).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear learning-rate warm-up.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null for none.")
    seed: int = Field(0, description="Seeds initialisation, data order and augmentation.")
    eval_every: int = Field(50, ge=1, description="Steps between evaluations (and at the end).")
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints.")
    term_grad_norms_every: int = Field(0, ge=0, description="Every this many steps, log how hard each loss term "
                                       "pulls: the L2 norm of its unweighted gradient on the student's trainable "
                                       "weights (projection heads left out), as grad_norm/<term> (several micro-batches: "
                                       "their token-weighted mean); costs one more forward and a backward per term "
                                       "at those steps. 0: never.")
    keep_checkpoints: int = Field(2, ge=1, description="How many of the newest checkpoints are kept.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the student (and any online teacher) "
                                                   "trains: auto = a GPU when torch sees one (GPU LOCAL_RANK under "
                                                   "a launcher), else the CPU.")
    precision: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Precision of the student's forward and the loss terms' inputs: float32, or "
        "mixed precision (torch.autocast to bfloat16 or float16; weights, gradients, optimizer and the loss "
        "terms' own arithmetic stay float32). float16 scales the loss (torch.amp.GradScaler, kept in "
        "checkpoints) and skips a step whose gradients overflowed; bfloat16 needs no scaling.")
    fsdp: bool = Field(False, description="Shard the student's weights, gradients and optimizer state over the "
                       "processes (FSDP2, one unit per transformer block) instead of replicating them; on by "
                       "itself under accelerate launch --use_fsdp. One process: no effect.")

    @model_validator(mode="after")
    def _accumulation_divides(self) -> "TrainingConfig":
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        return self


class AlignmentConfig(StrictModel):
    """The layer- and point-wise projection mapping (METHODS.md section 1), for task asr."""

    weight: float = Field(1.0, ge=0, description="Weight d of the LPPM term.")
    warmup_steps: int = Field(0, ge=0, description="Steps over which the weight rises linearly from 0.")
    student_layers: list[int] | None = Field(None, description="Student encoder hidden states mapped (0 = the input "
                                             "embedding); default: every encoder layer's output.")
    decoder_layers: list[int] = Field(default_factory=list, description="Student decoder hidden states mapped too, "
                                      "their points the target tokens (0 = the token embedding); each Whisper "
                                      "teacher's paired by the uniform map over its decoder, resampled to the "
                                      "student's tokens. Default: none.")
    teachers: list[str] | None = Field(None, description="Names of the teachers mapped; default: all.")
    dim: int | None = Field(None, ge=1, description="Shared space dimension D; default: the largest width, "
                            "rounded up to a multiple of 64.")
    projection: Literal["linear", "mlp", "fixed"] = Field(
        "linear", description="The student's projections: learned ('linear', 'mlp'), or 'fixed' seeded "
        "semi-orthogonal maps like the teachers' (an ablation: only the student's states can then move).")
    teacher_map: Literal["fixed", "procrustes", "learned", "identity"] = Field(
        "fixed", description="Teacher side: fixed seeded semi-orthogonal maps; 'procrustes': fixed maps fitted "
        "once before training (orthogonal Procrustes on the cached states of the first 64 training utterances) "
        "so that every teacher's points, and the student's with projection fixed, agree with the first mapped "
        "teacher's, which keeps its seeded maps (frames and, with decoder_layers, tokens, each on their own); "
        "'learned' (an ablation, with infonce_weight); 'identity' (a teacher as wide as dim, as TextBrewer-style "
        "hidden MSE).")
    infonce_weight: float = Field(0.1, ge=0, description="Anti-collapse InfoNCE term's weight with teacher_map learned.")
    normalize: bool = Field(True, description="Map every point onto the unit sphere.")
    point_loss: Literal["geodesic", "cosine", "mse"] = Field("geodesic", description="Distance between matched points.")
    target: Literal["sum", "centroid"] = Field("sum", description="Per-teacher terms averaged by weight, or one term "
                                                "to the teachers' spherical centroid.")
    teacher_weights: Literal["config", "validation_wer"] = Field(
        "config", description="The mapped teachers' weights w_m: each teacher's `weight`, or softmax(-WER_m / "
        "wer_temperature) of its greedy WER on alignment.validation, measured once and kept in the run folder "
        "(teacher_wers.json).")
    wer_temperature: float = Field(0.1, gt=0, description="tau of teacher_weights: validation_wer.")
    validation: ModelPath | None = Field(None, description="A labelled audiofolder held out from the teachers' "
                                         "adaptation, for teacher_weights: validation_wer (never the test split).")
    pointwise: bool = Field(True, description="Match frames in time; false pools each utterance to one point.")
    resample: Literal["linear", "pool"] = Field("linear", description="How a teacher with another frame rate "
                                                "(or tokenization) is brought to the student's length.")
    seed: int = Field(0, description="Seed of the fixed maps (teachers', and the student's with projection fixed).")

    @model_validator(mode="after")
    def _validation_for_wer_weights(self) -> "AlignmentConfig":
        if self.teacher_weights == "validation_wer" and self.validation is None:
            raise ValueError("alignment.teacher_weights validation_wer needs alignment.validation, a labelled audiofolder")
        return self


class CacheConfig(StrictModel):
    top_k: int = Field(32, ge=1, description="Next-token (or frame) probabilities kept per position, with the tail mass.")
    batch_size: int = Field(8, ge=1, description="Utterances a teacher processes together.")
    dir: ModelPath | None = Field(None, description="The teacher cache training reads, built there first when "
                                  "the folder does not exist (asr with teachers: required; lm: optional, "
                                  "without it the teachers run at every step).")


class RunConfig(StrictModel):
    task: Literal["lm", "asr"] = Field(description="'lm' (causal language models) or 'asr' (speech recognition).")
    teachers: list[TeacherConfig] = Field(default_factory=list, description="Empty for plain fine-tuning.")
    student: StudentConfig
    data: DataConfig
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    audio: AudioConfig = Field(default_factory=AudioConfig, description="Speech options (task: asr).")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="What `kdforge cache` stores per teacher.")
    alignment: AlignmentConfig | None = Field(None, description="asr: the projection-mapping term (LPPM).")

    @model_validator(mode="after")
    def _builtin_audio(self) -> "RunConfig":
        """asr: a ``builtin:NAME`` audiofolder becomes its folder (LM data names are read by name)."""
        from kdforge.models.builtin import resolve

        if self.task == "asr":
            self.data.train = resolve(self.data.train, audio=True)
            self.data.eval = self.data.eval and resolve(self.data.eval, audio=True)
        return self

    @model_validator(mode="after")
    def _terms_and_teachers(self) -> "RunConfig":
        objective = self.objective
        distils = objective.uses_teacher_logits or (self.alignment is not None and self.alignment.weight > 0)
        if not distils and objective.ce_weight == 0:
            raise ValueError("no loss term is active: set objective.ce_weight, a base objective, rlkd or alignment with a weight")
        if distils and not self.teachers:
            raise ValueError("the objective distils from teachers, but 'teachers' is empty")
        names = [teacher.label for teacher in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"two teachers share the name {sorted(n for n in names if names.count(n) > 1)[0]!r}: set 'name'")
        unknown = [n for n in (self.alignment.teachers or []) if n not in names] if self.alignment else []
        if unknown:
            raise ValueError(f"alignment.teachers names {unknown[0]!r}, which is not a teacher ({', '.join(names)})")
        return self


def _model_at(location: tuple) -> type[BaseModel] | None:
    """The config section class found by following ``location`` from :class:`RunConfig`."""
    model: Any = RunConfig
    for part in location:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            for c in candidates:  # list[Section]
                inner = getattr(c, "__args__", ())
                model = next((i for i in inner if isinstance(i, type) and issubclass(i, BaseModel)), None)
                if model:
                    break
    return model


def describe_error(error: ValidationError) -> str:
    """The first validation problem as one line naming the key (and the closest valid key)."""
    first = error.errors()[0]
    location = tuple(first["loc"])
    dotted = ".".join(str(part) for part in location) or "<top level>"
    if first["type"] == "extra_forbidden":
        section = _model_at(location[:-1])
        known = list(section.model_fields) if section else []
        close = difflib.get_close_matches(str(location[-1]), known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(known)})"
        return f"unknown config key '{dotted}'{hint}"
    if first["type"] == "missing":
        return f"config key '{dotted}' is required"
    message = first["msg"].removeprefix("Value error, ")
    return f"config key '{dotted}': {message}" if location else f"config: {message}"


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``key.path=value`` override (value parsed as YAML) to the raw config dict; a number
    in the path picks a list item (``teachers.0.weight=2``)."""
    key, separator, value = assignment.partition("=")
    if not separator or not key:
        raise KdforgeError(f"--set expects key=value, got {assignment!r}")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        if isinstance(node, list):  # a list item by its index: teachers.0.layers
            if not part.isdigit() or int(part) >= len(node):
                raise KdforgeError(f"--set {key}: the list has items 0..{len(node) - 1}, not '{part}'")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise KdforgeError(f"--set {key}: '{part}' is not a section")
    if isinstance(node, list):
        raise KdforgeError(f"--set {key}: set a whole list ({'.'.join(parents)}=[...]) or a key of one item")
    try:
        node[leaf] = yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise KdforgeError(f"--set {key}: the value is not valid YAML ({str(error).splitlines()[0]})") from None


def parse_config(raw: Any, overrides: list[str] = ()) -> RunConfig:
    """Validate a raw mapping (plus overrides) into a :class:`RunConfig`, or raise a one-line KdforgeError."""
    if not isinstance(raw, dict):
        raise KdforgeError("a config must be a mapping of keys to values")
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise KdforgeError(describe_error(error)) from None


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read and validate a YAML config file; relative model paths stay relative to the working directory."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as error:
        raise KdforgeError(f"cannot read config {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise KdforgeError(f"config {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    return parse_config(raw if raw is not None else {}, overrides)
