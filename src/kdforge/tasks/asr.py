"""The speech-recognition recipes: Whisper (seq2seq, teacher-forced) and kdforge's CTC models.

Whisper alignment: a transcript is tokenised as Whisper's decoder sees it, ``<|startoftranscript|>
[<|en|> <|transcribe|>] <|notimestamps|> text <|endoftext|>`` (the prompt tokens come from the
model's own tokenizer, so English-only and multilingual checkpoints both work); the decoder input is
the sequence without its last token and the targets are the sequence without its first, and only
targets after the prompt (the text and the end token) count. Text gets the leading space Whisper
itself produces.

CTC (:mod:`kdforge.models.ctc`): stacked log-mel frames in, characters out; the task loss is CTC
(weighted by ``objective.ce_weight``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.progress import track
from torch import Tensor

from kdforge.data.audio import labelled_ids, load_audio, read_metadata
from kdforge.data.augment import spec_augment
from kdforge.errors import KdforgeError
from kdforge.models.loading import (SAFE_LOADING, decoder_prompt_length, encoder_window, load_preprocessor, load_whisper,
                                    model_type_of, window_positions)


def read_training_audio(data_dir: str, labelled: int | None = None) -> tuple[list, list]:
    """The audiofolder's records and their 16 kHz samples, read once (with a progress bar).

    With ``labelled`` (``data.labelled``), only the utterances whose transcripts a run may use.
    """
    records = read_metadata(data_dir)
    keep = labelled_ids(records, labelled)
    records = [record for record in records if record.id in keep]
    audio = [load_audio(r.path) for r in track(records, description="reading audio", transient=True)]
    return records, audio


def student_folder(config, work_dir: Path) -> Path:
    """``student.path``, or the student built from ``student.init_from`` once, in ``work_dir/student-init``."""
    from kdforge.student.init import init_student

    if config.student.path is not None:
        return config.student.path
    folder = work_dir / "student-init"
    if not (folder / "config.json").exists():
        init_student(config.student.init_from, folder, config.student.layers, config.student.num_layers,
                     config.student.encoder_layers)
    return folder


def word_error_rates(recognizer, model: torch.nn.Module, eval_dir: str | None) -> dict[str, float]:
    """WER and CER of ``recognizer`` (built on ``model``) on ``eval_dir``; {} without eval data."""
    from kdforge.evaluation.runner import evaluate_recognizer

    if not eval_dir:
        return {}
    was_training = model.training
    model.eval()
    try:
        result = evaluate_recognizer(recognizer, eval_dir, batch_size=8, progress=False)
    finally:
        model.train(was_training)
    return {"wer": result["wer"], "cer": result["cer"]}


class WhisperTask:
    """Fine-tuning a Whisper model on an audiofolder's labels (with teachers:
    :class:`kdforge.tasks.asr_distill.WhisperDistillationTask`)."""

    selection_metric = "wer"  # the best checkpoint has the lowest validation WER

    def __init__(self, config, work_dir: Path):
        self.config = config
        self._load_student(work_dir)
        self._add_adapters()
        self.student.train()
        records, self.audio = read_training_audio(config.data.train, config.data.labelled)
        self.train_examples = [self._label_ids(r.transcription, r.path) for r in records]

    def to(self, device: torch.device) -> None:
        """Place the student on ``device`` (the loop moves each batch there)."""
        self.student.to(device)

    def _load_student(self, work_dir: Path) -> None:
        """The student model, its processor and tokenizer, and the length of its decoder prompt."""
        self.student, self.processor = load_whisper(student_folder(self.config, work_dir), self.config.audio.audio_ctx)
        # saved with the exported model, so kdforge's decoding uses the window it was trained with
        self.student.config.kdforge_dynamic_window = self.config.audio.dynamic_window
        self.tokenizer = self.processor.tokenizer
        self.prompt_length = decoder_prompt_length(self.tokenizer)

    def _add_adapters(self) -> None:
        """LoRA as the config says, seeded: the same adapters whether or not student-init was just built."""
        from kdforge.student.lora import add_lora

        if self.config.student.lora is not None:
            torch.manual_seed(self.config.training.seed)
            self.student = add_lora(self.student, self.config.student.lora)

    def _label_ids(self, text: str, where: Path) -> list[int]:
        ids = self.tokenizer(" " + text.strip()).input_ids
        if len(ids) > self.student.config.max_target_positions:
            raise KdforgeError(f"the transcription of {where} is longer than the decoder's "
                               f"{self.student.config.max_target_positions} positions")
        return ids

    def batch(self, indices: list[int]) -> dict[str, Tensor]:
        """Log-mel ``features (B, 80, 2 * W)`` with ``frames (B,)`` of speech in each, decoder
        ``inputs``, ``targets`` and ``target_mask`` ``(B, L)``; W is ``audio_ctx``, or with
        ``audio.dynamic_window`` what the longest utterance needs. Features are extracted per batch:
        kept for a whole corpus they would take about 1 MB per utterance at the full window."""
        sequences = [self.train_examples[i] for i in indices]
        length = max(len(s) for s in sequences) - 1
        pad = self.tokenizer.eos_token_id
        inputs = torch.full((len(sequences), length), pad, dtype=torch.long)
        targets = torch.full((len(sequences), length), pad, dtype=torch.long)
        target_mask = torch.zeros((len(sequences), length), dtype=torch.bool)
        for row, ids in enumerate(sequences):
            inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1])
            targets[row, : len(ids) - 1] = torch.tensor(ids[1:])
            target_mask[row, self.prompt_length - 1 : len(ids) - 1] = True
        extractor = self.processor.feature_extractor
        audio = [self.audio[i] for i in indices]
        features = extractor(audio, sampling_rate=extractor.sampling_rate, return_tensors="pt").input_features
        frames = torch.tensor([-(-len(a) // extractor.hop_length) for a in audio])
        if self.config.audio.dynamic_window:
            features = features[..., : 2 * window_positions(frames.tolist(), features.shape[-1] // 2)]
        return {"features": features, "frames": frames, "inputs": inputs, "targets": targets, "target_mask": target_mask}

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        from kdforge.training.objective import token_loss_terms

        features = batch["features"]
        if self.config.audio.spec_augment is not None and self.student.training:
            features = spec_augment(features, self.config.audio.spec_augment, batch["frames"])
        logits = self.forward(features, batch["inputs"]).logits
        return token_loss_terms(logits, None, batch["targets"], batch["target_mask"], self.config.objective)

    def forward(self, features: Tensor, inputs: Tensor, hidden_states: bool = False):
        """The student's output on ``features (B, 80, 2 * W)``, its encoder cut to those W positions."""
        with encoder_window(self.student, features.shape[-1] // 2):
            return self.student(input_features=features, decoder_input_ids=inputs, output_hidden_states=hidden_states)

    def evaluate(self) -> dict[str, float]:
        """WER and CER on ``data.eval`` by greedy decoding (empty without eval data)."""
        from kdforge.evaluation.recognizers import WhisperRecognizer

        return word_error_rates(WhisperRecognizer(self.student, self.processor), self.student, self.config.data.eval)

    def export(self, out_dir: Path, model: torch.nn.Module) -> None:
        """A plain Whisper directory with its processor (and the trained ``audio_ctx``)."""
        model.save_pretrained(out_dir)
        self.processor.save_pretrained(out_dir)


class CTCTask:
    """Training a CTC model over characters (:mod:`kdforge.models.ctc`) from an audiofolder's labels.

    The loss is CTC summed over the batch and divided by its number of target characters, so it is
    a per-character mean like every other term, and micro-batches weigh by their characters.
    """

    selection_metric = "wer"

    def __init__(self, config, work_dir: Path):
        from transformers import Wav2Vec2BertForCTC, Wav2Vec2CTCTokenizer, WhisperFeatureExtractor

        from kdforge.models.ctc import CHARACTERS, frame_stack_of

        self.config = config
        if config.teachers:
            raise KdforgeError("a CTC model trains from labels for now; remove 'teachers'")
        model_type_of(config.student.path)
        self.student = Wav2Vec2BertForCTC.from_pretrained(config.student.path, **SAFE_LOADING)
        self.student.train()
        self.tokenizer = load_preprocessor(Wav2Vec2CTCTokenizer, config.student.path)
        self.extractor = load_preprocessor(WhisperFeatureExtractor, config.student.path)
        self.frame_stack = frame_stack_of(self.student)
        records, self.audio = read_training_audio(config.data.train, config.data.labelled)
        for record in records:
            outside = sorted(set(record.transcription.replace(" ", "")) - set(CHARACTERS))
            if outside:
                raise KdforgeError(f"the transcription of {record.path} has characters outside the model's "
                                   f"alphabet: {''.join(outside)!r}")
        self.train_examples = [self.tokenizer(r.transcription).input_ids for r in records]
        hop = self.extractor.hop_length * self.frame_stack
        for record, audio, ids in zip(records, self.audio, self.train_examples):
            repeats = sum(a == b for a, b in zip(ids, ids[1:]))  # CTC needs a blank between repeated labels
            if len(audio) // hop < len(ids) + repeats:
                raise KdforgeError(f"{record.path} is too short for its transcription at this model's frame rate "
                                   f"({len(audio) // hop} frames for {len(ids) + repeats} labels)")

    def to(self, device: torch.device) -> None:
        """Place the model on ``device`` (the loop moves each batch there)."""
        self.student.to(device)

    def batch(self, indices: list[int]) -> dict[str, Tensor]:
        """Log-mel ``(B, 80, F)`` with ``mel_mask`` ``(B, F)``, and padded character ``targets`` ``(B, L)``."""
        from kdforge.models.ctc import log_mel

        mel, mel_mask = log_mel(self.extractor, [self.audio[i] for i in indices])
        labels = [self.train_examples[i] for i in indices]
        targets = torch.zeros((len(labels), max(len(ids) for ids in labels)), dtype=torch.long)
        target_mask = torch.zeros_like(targets, dtype=torch.bool)
        for row, ids in enumerate(labels):
            targets[row, : len(ids)] = torch.tensor(ids)
            target_mask[row, : len(ids)] = True
        return {"mel": mel, "mel_mask": mel_mask, "targets": targets, "target_mask": target_mask}

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        from kdforge.models.ctc import stack_frames

        mel = batch["mel"]
        if self.config.audio.spec_augment is not None and self.student.training:
            mel = spec_augment(mel, self.config.audio.spec_augment, batch["mel_mask"].sum(-1))
        features, frame_mask = stack_frames(mel, batch["mel_mask"], self.frame_stack)
        logits = self.student(input_features=features, attention_mask=frame_mask.long()).logits
        log_probs = torch.log_softmax(logits.float(), -1).transpose(0, 1)  # (T, B, C), as ctc_loss wants
        target_lengths = batch["target_mask"].sum(-1)
        ctc = torch.nn.functional.ctc_loss(log_probs, batch["targets"], frame_mask.sum(-1), target_lengths,
                                           blank=self.tokenizer.pad_token_id, reduction="sum", zero_infinity=True)
        ctc = ctc / target_lengths.sum().clamp(min=1)
        return self.config.objective.ce_weight * ctc, {"ctc": ctc}

    def evaluate(self) -> dict[str, float]:
        from kdforge.evaluation.recognizers import CTCRecognizer

        return word_error_rates(CTCRecognizer(self.student, self.tokenizer, self.extractor), self.student,
                                self.config.data.eval)

    def export(self, out_dir: Path, model: torch.nn.Module) -> None:
        model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        self.extractor.save_pretrained(out_dir)
