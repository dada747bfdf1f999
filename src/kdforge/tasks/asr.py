"""The speech-recognition recipe for Whisper models: audiofolder -> log-mel batches -> teacher-forced loss.

Alignment: a transcript is tokenised as Whisper's decoder sees it, ``<|startoftranscript|>
[<|en|> <|transcribe|>] <|notimestamps|> text <|endoftext|>`` (the prompt tokens come from the
model's own tokenizer, so English-only and multilingual checkpoints both work); the decoder input is
the sequence without its last token and the targets are the sequence without its first, and only
targets after the prompt (the text and the end token) count. Text gets the leading space Whisper
itself produces.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.progress import track
from torch import Tensor

from kdforge.data.audio import load_audio, read_metadata
from kdforge.data.augment import spec_augment
from kdforge.errors import KdforgeError
from kdforge.models.loading import load_whisper


class WhisperTask:
    """Fine-tuning (and, with teachers in later recipes, distilling) a Whisper model on an audiofolder."""

    def __init__(self, config, work_dir: Path):
        from kdforge.student.lora import add_lora

        self.config = config
        if config.student.path is None:
            raise KdforgeError("task 'asr' needs student.path: a Whisper model directory")
        if config.teachers:
            raise KdforgeError("task 'asr' trains from labels for now: distillation from ASR teachers reads "
                               "the teacher cache, which is not built yet")
        self.student, self.processor = load_whisper(config.student.path, config.audio.audio_ctx)
        self.student.train()
        self.tokenizer = self.processor.tokenizer
        self.prompt_length = len(self.tokenizer("").input_ids) - 1  # everything before the text, minus eos
        if config.student.lora is not None:
            self.student = add_lora(self.student, config.student.lora)
        records = read_metadata(config.data.train)
        self.train_examples = [self._label_ids(r.transcription, r.path) for r in records]
        audio = [load_audio(r.path) for r in track(records, description="reading audio", transient=True)]
        self.features = self._log_mel(audio)

    def _label_ids(self, text: str, where: Path) -> list[int]:
        ids = self.tokenizer(" " + text.strip()).input_ids
        if len(ids) > self.student.config.max_target_positions:
            raise KdforgeError(f"the transcription of {where} is longer than the decoder's "
                               f"{self.student.config.max_target_positions} positions")
        return ids

    def _log_mel(self, audio: list) -> Tensor:
        """``(N, 80, 2 * audio_ctx)`` features, extracted once (they do not change between epochs)."""
        extractor = self.processor.feature_extractor
        chunks = [extractor(audio[i : i + 64], sampling_rate=extractor.sampling_rate, return_tensors="pt").input_features
                  for i in range(0, len(audio), 64)]
        return torch.cat(chunks)

    def batch(self, indices: list[int]) -> dict[str, Tensor]:
        """Features ``(B, 80, frames)``, decoder inputs, targets and target mask ``(B, L)``."""
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
        return {"features": self.features[indices], "inputs": inputs, "targets": targets, "target_mask": target_mask}

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        from kdforge.training.objective import token_loss_terms

        features = batch["features"]
        if self.config.audio.spec_augment is not None and self.student.training:
            features = spec_augment(features, self.config.audio.spec_augment)
        logits = self.student(input_features=features, decoder_input_ids=batch["inputs"]).logits
        return token_loss_terms(logits, None, batch["targets"], batch["target_mask"], self.config.objective)

    def evaluate(self) -> dict[str, float]:
        """WER and CER on ``data.eval`` by greedy decoding (empty without eval data)."""
        from kdforge.evaluation.recognizers import WhisperRecognizer
        from kdforge.evaluation.runner import evaluate_recognizer

        if not self.config.data.eval:
            return {}
        self.student.eval()
        try:
            result = evaluate_recognizer(WhisperRecognizer(self.student, self.processor), self.config.data.eval,
                                         batch_size=8, progress=False)
        finally:
            self.student.train()
        return {"wer": result["wer"], "cer": result["cer"]}

    def export(self, out_dir: Path, model: torch.nn.Module) -> None:
        """A plain Whisper directory with its processor (and the trained ``audio_ctx``)."""
        model.save_pretrained(out_dir)
        self.processor.save_pretrained(out_dir)
