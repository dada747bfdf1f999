"""The causal-LM recipe: records -> token batches with exact target masks; models; evaluation.

Alignment (the official RLKD code is off by one here): the logits at position t predict token
t + 1, so a batch carries ``inputs (B, L)``, ``targets = inputs[:, 1:]`` and ``target_mask (B, L-1)``
True where ``targets[:, t]`` is a real token that counts (a response token for instruction data,
any token but padding for plain text); the student's logits are cut to ``[:, :-1]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from kdforge.data.lm import Record
from kdforge.devices import device_of
from kdforge.errors import KdforgeError
from kdforge.losses.sparse import Teacher


@dataclass(frozen=True)
class Example:
    """One tokenised record: ``ids`` and, per token, whether it is a target the loss sees."""

    ids: list[int]
    is_target: list[bool]


def prompt_text(tokenizer: PreTrainedTokenizerBase, query: str) -> str:
    """The text a model sees before its response: the chat template where the tokenizer has one."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": query}], tokenize=False,
                                             add_generation_prompt=True)
    return f"{query}\n"


def encode_record(record: Record, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Example:
    """Tokenise a text or instruction record, ending with eos, cut to ``max_length`` tokens."""
    if "text" in record:
        ids = tokenizer(record["text"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        is_target = [False] + [True] * (len(ids) - 1)  # the first token has no prediction
    else:
        prompt = tokenizer(prompt_text(tokenizer, record["query"]), add_special_tokens=False).input_ids
        response = tokenizer(record["response"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        ids = prompt + response
        is_target = [False] * len(prompt) + [True] * len(response)
    return Example(ids[:max_length], is_target[:max_length])


def collate(examples: list[Example], pad_id: int) -> dict[str, Tensor]:
    """Right-padded batch: ``inputs``, ``attention_mask`` ``(B, L)``; ``targets``, ``target_mask`` ``(B, L-1)``."""
    length = max(len(e.ids) for e in examples)
    inputs = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.bool)
    target = torch.zeros((len(examples), length), dtype=torch.bool)
    for row, example in enumerate(examples):
        inputs[row, : len(example.ids)] = torch.tensor(example.ids)
        attention[row, : len(example.ids)] = True
        target[row, : len(example.ids)] = torch.tensor(example.is_target)
    return {"inputs": inputs, "attention_mask": attention, "targets": inputs[:, 1:], "target_mask": target[:, 1:]}


def load_vocabulary(model_dir: str | Path) -> tuple[PretrainedConfig, PreTrainedTokenizerBase]:
    """A causal LM's config (``vocab_size``...) and its tokenizer (padding with eos where it has no pad
    token), without its weights."""
    from kdforge.models.loading import load_preprocessor, model_type_of

    model_type_of(model_dir)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    tokenizer = load_preprocessor(AutoTokenizer, Path(model_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return config, tokenizer


def load_causal_lm(model_dir: str | Path) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a local directory (never remote code)."""
    from kdforge.models.loading import SAFE_LOADING

    _, tokenizer = load_vocabulary(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **SAFE_LOADING)
    return model, tokenizer


def tokenised_splits(config, tokenizer: PreTrainedTokenizerBase) -> dict[str, list[Example]]:
    """The run's ``train`` and ``eval`` (empty without ``data.eval``) records as examples.

    Raises:
        KdforgeError: the training data holds no records, or a split no target token within ``max_length``.
    """
    from kdforge.data.lm import load_records

    def encode(source: str | None) -> list[Example]:
        records = load_records(source) if source else []
        return [encode_record(record, tokenizer, config.data.max_length) for record in records]

    splits = {"train": encode(config.data.train), "eval": encode(config.data.eval)}
    if not splits["train"]:
        raise KdforgeError(f"{config.data.train} holds no training records")
    for split, source in (("train", config.data.train), ("eval", config.data.eval)):
        if splits[split] and not any(any(example.is_target) for example in splits[split]):
            raise KdforgeError(f"{source}: no response token falls within data.max_length = {config.data.max_length} "
                               "tokens of any record; raise it")
    return splits


def cache_teachers(config, splits: dict[str, list[Example]], pad_id: int, out: str | Path) -> dict:
    """:func:`~kdforge.teachers.lm_cache.build_lm_cache` for a run config's teachers and ``cache`` settings."""
    from kdforge.teachers.lm_cache import build_lm_cache

    return build_lm_cache({t.label: t.path for t in config.teachers}, splits, pad_id, out, top_k=config.cache.top_k,
                          batch_size=config.cache.batch_size)


def build_lm_cache_from_config(config, out: str | Path) -> dict:
    """:func:`cache_teachers` over the run's data, tokenised as its student will be (its tokenizer is its
    teacher's)."""
    _, tokenizer = load_vocabulary(config.student.path or config.student.init_from)
    return cache_teachers(config, tokenised_splits(config, tokenizer), tokenizer.pad_token_id, out)


def open_lm_cache(config, splits: dict[str, list[Example]], pad_id: int):
    """The run's :class:`~kdforge.teachers.lm_cache.CachedLMTeachers` (``cache.dir``), built first when the
    folder does not exist yet."""
    from kdforge.teachers.lm_cache import CachedLMTeachers

    if not (config.cache.dir / "manifest.json").exists():
        cache_teachers(config, splits, pad_id, config.cache.dir)
    return CachedLMTeachers(config.cache.dir, {t.label: (t.path, t.weight) for t in config.teachers}, splits,
                            config.cache.top_k)


def check_same_vocabulary(student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase,
                          student_vocab: int, teacher_vocab: int, teacher_name: str) -> None:
    """Refuse a teacher whose vocabulary differs from the student's, naming sizes or the first differing token."""
    if student_vocab != teacher_vocab:
        raise KdforgeError(f"vocabulary mismatch: student has {student_vocab} logits, teacher {teacher_name} "
                           f"has {teacher_vocab}; distillation needs the same tokenizer")
    student_map, teacher_map = student_tok.get_vocab(), teacher_tok.get_vocab()
    if student_map != teacher_map:
        by_id = {i: t for t, i in teacher_map.items()}
        first = next((t for t, i in sorted(student_map.items(), key=lambda kv: kv[1]) if by_id.get(i) != t), None)
        raise KdforgeError(f"tokenizer mismatch with teacher {teacher_name}: student token {first!r} "
                           f"has id {student_map.get(first)}, the teacher's is {by_id.get(student_map.get(first))!r}")


def next_token_logits(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """``(B, L-1, V)`` logits aligned with ``batch['targets']``.

    The last input predicts nothing, and a causal model's logits at earlier positions do not depend
    on it: leaving it out is cheaper than slicing the full ``(B, L, V)`` logits, whose slice would be
    copied in the forward and zero-padded back to full size in the backward.
    """
    return model(input_ids=batch["inputs"][:, :-1], attention_mask=batch["attention_mask"][:, :-1]).logits


@dataclass(frozen=True)
class Sampling:
    """Sampled decoding: softmax ``temperature``, nucleus ``top_p``, and the ``seed`` that makes it repeatable."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@torch.no_grad()
def generate_answers(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, queries: list[str],
                     max_new_tokens: int = 48, batch_size: int = 32, sampling: Sampling | None = None) -> list[str]:
    """Continuations of the prompts, batched (left padding) with the KV cache: greedy, or sampled
    with ``sampling`` (seeded without touching the caller's random state)."""
    decoding = (dict(do_sample=False) if sampling is None else
                dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0))
    was_training = model.training
    model.eval()
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers = []
    try:
        with torch.random.fork_rng():
            if sampling is not None:
                torch.manual_seed(sampling.seed)
            for start in range(0, len(queries), batch_size):
                prompts = [prompt_text(tokenizer, q) for q in queries[start : start + batch_size]]
                encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(
                    device_of(model))
                output = model.generate(**encoded, max_new_tokens=max_new_tokens, **decoding,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                answers += tokenizer.batch_decode(output[:, encoded.input_ids.shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = previous_side
        model.train(was_training)
    return answers


class LMTask:
    """Everything the loop needs for causal-LM distillation: models, data, loss, evaluation, export."""

    selection_metric = "ppl"  # the best checkpoint has the lowest held-out perplexity

    def __init__(self, config, work_dir: Path):
        from kdforge.student.init import init_student
        from kdforge.student.lora import add_lora

        self.config = config
        self.step = 0  # the loop sets it; the loss weights' warm-ups read it
        student_dir = config.student.path
        if student_dir is None:
            student_dir = work_dir / "student-init"
            if not (student_dir / "config.json").exists():
                init_student(config.student.init_from, student_dir, config.student.layers,
                             config.student.num_layers, config.student.encoder_layers)
        self.student, self.tokenizer = load_causal_lm(student_dir)
        reads_cache = bool(config.teachers) and config.cache.dir is not None
        self.teachers = []
        for teacher_config in config.teachers:
            if reads_cache:  # a cached run needs only the teacher's tokenizer and vocabulary size, not its weights
                teacher_model_config, teacher_tokenizer = load_vocabulary(teacher_config.path)
            else:
                teacher, teacher_tokenizer = load_causal_lm(teacher_config.path)
                self.teachers.append(teacher.eval().requires_grad_(False))
                teacher_model_config = teacher.config
            check_same_vocabulary(self.tokenizer, teacher_tokenizer, self.student.config.vocab_size,
                                  teacher_model_config.vocab_size, str(teacher_config.path))
        self.teacher_weights = [t.weight for t in config.teachers]
        if config.student.lora is not None:
            self.student = add_lora(self.student, config.student.lora)
        splits = tokenised_splits(config, self.tokenizer)
        self.train_examples, self.eval_examples = splits["train"], splits["eval"]
        self.cached = open_lm_cache(config, splits, self.tokenizer.pad_token_id) if reads_cache else None

    def to(self, device: torch.device) -> None:
        """Place the student and the online teachers on ``device`` (the loop moves each batch there)."""
        self.student.to(device)
        for teacher in self.teachers:
            teacher.to(device)

    def batch(self, indices: list[int]) -> dict[str, Tensor]:
        """Collated training examples (:func:`collate`), plus ``teacher_topk`` (the cached ensemble's
        :class:`~kdforge.losses.TopKTeacher` on the ``(B, L-1)`` target grid) when the run reads a cache."""
        batch = collate([self.train_examples[i] for i in indices], self.tokenizer.pad_token_id)
        if self.cached is not None:
            batch["teacher_topk"] = self.cached.top_k("train", indices, batch["targets"].shape[1])
        return batch

    @torch.no_grad()
    def teacher(self, batch: dict[str, Tensor]) -> Teacher | None:
        """The ensemble teacher of a training batch: cached top-k, or ``(B, L-1, V)`` log-probabilities of the
        teachers run now (None without teachers)."""
        from kdforge.teachers.ensemble import ensemble_logprobs

        if "teacher_topk" in batch:
            return batch["teacher_topk"]
        if not self.teachers:
            return None
        return ensemble_logprobs([next_token_logits(t, batch) for t in self.teachers], self.teacher_weights)

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        from kdforge.training.objective import token_loss_terms, warmed_objective

        student_logits = next_token_logits(self.student, batch)
        return token_loss_terms(student_logits, self.teacher(batch), batch["targets"],
                                batch["target_mask"], warmed_objective(self.config.objective, self.step))

    def export(self, out_dir: Path, model: torch.nn.Module) -> None:
        """A plain Hugging Face causal-LM directory with the tokenizer."""
        model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)

    def evaluate(self) -> dict[str, float]:
        """Held-out perplexity and, with a teacher, CR@1..5 and MOR@3/5/10/20 in percent."""
        from kdforge.evaluation.lm import agreement_metrics

        if not self.eval_examples:
            return {}
        if self.cached is not None:
            def teacher(indices, batch):
                return self.cached.top_k("eval", indices, batch["targets"].shape[1])
        elif self.teachers:
            def teacher(indices, batch):
                return self.teacher(batch)
        else:
            teacher = None
        return agreement_metrics(self.student, teacher, self.eval_examples, self.tokenizer.pad_token_id)
