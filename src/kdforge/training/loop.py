"""The distillation loop, top to bottom: data order, micro-batches, the weighted terms, checkpoints.

One step: take the step's global batch (a pure function of seed and step, so a resumed run sees
the same data), split it into ``grad_accum`` micro-batches, weight each micro-batch's mean loss by
its share of the batch's target tokens (so accumulation never changes the loss scale), step the
optimizer, log, evaluate and checkpoint now and then. The student is exported at the end, with
``curves.png`` (loss terms and evaluations against the step) beside it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kdforge.config import RunConfig
from kdforge.devices import to_device
from kdforge.errors import KdforgeError
from kdforge.models.loading import model_type_of
from kdforge.student.lora import exportable
from kdforge.training.curves import TensorBoardLog, plot_history
from kdforge.files import write_json_atomic, write_text_atomic
from kdforge.training import distributed, sharding
from kdforge.training.checkpoint import (best_value, claim_run_folder, empty_run_folder, latest_checkpoint,
                                         load_checkpoint, optimizer_payload, rng_states, save_best,
                                         save_checkpoint)
from kdforge.training.distributed import World
from kdforge.training.objective import term_gradient_norms
from kdforge.training.precision import autocast, grad_scaler


def batch_indices(step: int, dataset_size: int, batch_size: int, seed: int) -> list[int]:
    """The global batch of ``step``: consecutive slices of a per-epoch seeded permutation."""
    indices = []
    position = step * batch_size
    while len(indices) < batch_size:
        epoch, offset = divmod(position, dataset_size)
        order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(batch_size - len(indices), dataset_size - offset)
        indices += order[offset : offset + take].tolist()
        position += take
    return indices


def learning_rate_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def target_tokens(batches: list[dict]) -> int:
    """How many target tokens (positions the loss counts) the batches hold."""
    return sum(int(batch["target_mask"].sum()) for batch in batches)


def accumulate_gradients(task, micro_batches: list[dict], batch_tokens: int, out_dir: Path,
                         step: int, norms_over: list[torch.Tensor] | None = None,
                         scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """Backpropagate this process's part of the global batch through its micro-batches; return the
    logged terms (this process's share of each batch mean).

    Each micro-batch's loss is a mean over its own target tokens; weighting it by its share of the
    global batch's ``batch_tokens`` target tokens makes the sum over micro-batches and processes
    the mean over the whole batch, whatever the split. With ``norms_over`` (parameters), each term's
    gradient norm over them is logged too, as ``grad_norm/<term>`` (same weighting). The forwards run
    in the task's ``training.precision`` (:mod:`kdforge.training.precision`); ``scaler``, float16's,
    multiplies what is backpropagated (none: a pass-through).
    """
    logged: dict[str, float] = {}
    device = next(task.student.parameters()).device
    in_precision = autocast(task.config.training.precision, device)
    scaler = scaler if scaler is not None else grad_scaler("float32", device)
    for micro in micro_batches:
        share = int(micro["target_mask"].sum()) / max(batch_tokens, 1)
        norms = {}
        if norms_over:  # on a forward of its own: the chunked logit terms allow one backward per graph
            # the same random draws as the step's forward, which follows
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                with in_precision:
                    measured_terms = task.loss(micro)[1]
                norms = term_gradient_norms(measured_terms, norms_over, scaler.get_scale())
        with in_precision:
            loss, terms = task.loss(micro)
        if not torch.isfinite(loss):
            raise KdforgeError(f"the loss became {loss.item()} at step {step + 1}; stopped ({kept_checkpoint(out_dir)})")
        scaler.scale(loss * share).backward()
        values = {"loss": float(loss.detach()), **{name: float(value.detach()) for name, value in terms.items()},
                  **{f"grad_norm/{name}": norm for name, norm in norms.items()}}
        for name, value in values.items():
            logged[name] = logged.get(name, 0.0) + value * share
    return logged


def kept_checkpoint(out_dir: Path) -> str:
    """What a stopped run still has: its newest checkpoint, named."""
    last = latest_checkpoint(out_dir)
    return f"last good checkpoint: {last.name}" if last else "no checkpoint was written yet"


def parameter_counts(task, trainable: dict[str, torch.nn.Parameter]) -> dict[str, int]:
    """``student``: the exported student's parameters (adapters merged); ``trainable``: what the
    optimizer steps (adapters or weights, plus training-only heads); ``adapter``: the trainable part
    that ships with the student (LoRA, or every trained weight without LoRA)."""
    heads = getattr(task, "heads", None)
    head_count = sum(p.numel() for p in heads.parameters() if p.requires_grad) if heads is not None else 0
    total = sum(p.numel() for name, p in task.student.named_parameters() if "lora_" not in name)
    trained = sum(p.numel() for p in trainable.values())
    return {"student": total, "trainable": trained, "adapter": trained - head_count}


def build_task(config: RunConfig, out_dir: Path):
    """The recipe object for ``config.task`` (models, data, loss, evaluation, export)."""
    if config.task == "asr":
        from kdforge.tasks.asr import CTCTask, WhisperTask

        from kdforge.tasks.asr_distill import WhisperDistillationTask

        student_dir = config.student.path or config.student.init_from
        if student_dir is None:
            raise KdforgeError("task 'asr' needs student.path (a Whisper or kdforge CTC model directory) "
                               "or student.init_from (a Whisper teacher)")
        if model_type_of(student_dir) == "wav2vec2-bert":
            return CTCTask(config, out_dir)
        return WhisperDistillationTask(config, out_dir) if config.teachers else WhisperTask(config, out_dir)
    from kdforge.tasks.lm import LMTask

    return LMTask(config, out_dir)


def read_history(path: Path) -> list[dict]:
    """The entries of ``history.jsonl`` (none if it does not exist yet).

    A run killed while appending leaves a cut-off last line: it is dropped, as the step it logged
    is redone anyway.

    Raises:
        KdforgeError: a damaged line before the last one.
    """
    lines = path.read_text().splitlines() if path.exists() else []
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise KdforgeError(f"{path} is damaged at line {number}; this run cannot be resumed") from None
    return entries


def sum_terms(world: World, terms: dict[str, float]) -> dict[str, float]:
    """Each logged term summed over the processes (every process logs the same names)."""
    names = sorted(terms)
    totals = world.sum(torch.tensor([terms[name] for name in names], dtype=torch.float64))
    return dict(zip(names, totals.tolist()))


def adamw(parameters, lr: float, weight_decay: float = 0.0, sharded: bool = False) -> torch.optim.AdamW:
    """AdamW as training steps it: fused (one kernel for every tensor, several times faster than the
    per-tensor default for a LoRA student and its projection heads on the CPU), except for FSDP-sharded
    weights: those are DTensors, for which the default implementation is the one the FSDP tests run.
    A run resumed from a checkpoint keeps the implementation it started with (the optimizer's saved
    settings are restored with its state)."""
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=not sharded)


def train(config: RunConfig, out_dir: str | Path, resume: bool = False, show_progress: bool = True) -> dict:
    """Train (or resume) the run described by ``config`` into ``out_dir``; returns the final metrics.

    Started by torchrun or accelerate launch, every process runs this with the same arguments and
    they train one model with data parallelism (:mod:`kdforge.training.distributed`).

    Raises:
        KdforgeError: the folder holds a finished or different run, bad data or models, a batch that
            does not split over the processes, or the loss stopped being finite (the last good
            checkpoint is kept).
    """
    out_dir = Path(out_dir)
    settings = config.training
    world = distributed.join(settings.device)
    sharded = sharding.requested(settings.fsdp) and world.size > 1  # before the folder is claimed: a refusal leaves none
    if sharded and settings.term_grad_norms_every:  # autograd reaches the gathered weights, not the shards
        raise KdforgeError("training.term_grad_norms_every cannot be used with FSDP (a term's own gradient "
                           "needs the whole weights); set it to 0")
    if sharded and settings.precision == "float16":  # each rank would see only its shards' overflows
        raise KdforgeError("training.precision float16 cannot be used with FSDP (its loss scaler needs every "
                           "gradient); use bfloat16")
    if settings.batch_size % (world.size * settings.grad_accum):
        raise KdforgeError(f"training.batch_size {settings.batch_size} does not split into {world.size} processes x "
                           f"{settings.grad_accum} micro-batches (training.grad_accum)")
    with world.main_first():  # one process claims the folder and builds what the others reuse
        new_run = claim_run_folder(out_dir, config, resume) if world.is_main else False
        torch.manual_seed(settings.seed)
        try:
            task = build_task(config, out_dir)
            task.to(world.device)
        except BaseException:
            if new_run:  # nothing was trained: leave the folder as it was, so a corrected config can use it
                empty_run_folder(out_dir)
            raise
    heads = getattr(task, "heads", None)  # training-only modules (projection heads): trained, never exported
    model = task.student if heads is None else torch.nn.ModuleDict({"student": task.student, "heads": heads})
    model.train()
    world.broadcast_from_main([p for p in model.parameters() if p.requires_grad])
    export_shell = sharding.shard(task.student, world) if sharded else None  # replaces the student's parameters
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    student_weights = [p for p in task.student.parameters() if p.requires_grad]
    optimizer = adamw(trainable.values(), settings.lr, settings.weight_decay, sharded)
    scaler = grad_scaler(settings.precision, world.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, settings.warmup_steps, settings.steps))
    # Training draws its random numbers (augmentation masks, dropout) from here on, whatever the task
    # drew while it was built (projection heads, for one): runs of one seed then share them across
    # methods, so that rows of a comparison differ by their method, not by their random streams.
    torch.manual_seed(settings.seed)
    start = 0
    checkpoint = latest_checkpoint(out_dir) if resume else None
    if checkpoint is not None:
        start = load_checkpoint(checkpoint, model, optimizer, scheduler, world, scaler)
    history_path = out_dir / "history.jsonl"
    history = [entry for entry in read_history(history_path) if entry["step"] <= start]  # drop what the crash outran
    if world.is_main:
        write_text_atomic(history_path, "".join(json.dumps(e) + "\n" for e in history))

    metric = task.selection_metric  # lower is better
    best = best_value(out_dir)
    started = time.perf_counter()
    columns = (TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
               TimeRemainingColumn())
    tensorboard = TensorBoardLog(out_dir / "tensorboard", start) if world.is_main else None
    rank_size = settings.batch_size // world.size
    micro_size = rank_size // settings.grad_accum
    with Progress(*columns, disable=not (show_progress and world.is_main)) as progress:
        bar = progress.add_task("train", total=settings.steps, completed=start, status="")
        for step in range(start, settings.steps):
            indices = batch_indices(step, len(task.train_examples), settings.batch_size, settings.seed)
            mine = indices[world.rank * rank_size : (world.rank + 1) * rank_size]
            micro_batches = [to_device(task.batch(mine[i : i + micro_size]), world.device)
                             for i in range(0, rank_size, micro_size)]
            batch_tokens = world.sum(torch.tensor(target_tokens(micro_batches)))
            optimizer.zero_grad(set_to_none=True)
            task.step = step  # loss weights with a warm-up read it
            measure = settings.term_grad_norms_every and (step + 1) % settings.term_grad_norms_every == 0
            step_terms = sum_terms(world, accumulate_gradients(task, micro_batches, int(batch_tokens), out_dir, step,
                                                               student_weights if measure else None, scaler))
            world.sum_gradients(list(trainable.values()))
            scaler.unscale_(optimizer)  # clipping reads the true gradients
            # a finite loss can still give non-finite gradients; stepping them would poison the weights
            # (float16's scaler skips such a step itself, lowering its scale: an overflow is expected there)
            norm = sharding.clip_gradients(list(trainable.values()), settings.max_grad_norm or float("inf"))
            if not torch.isfinite(norm) and not scaler.is_enabled():
                raise KdforgeError(f"the gradients became {norm.item()} at step {step + 1}; stopped "
                                   f"({kept_checkpoint(out_dir)})")
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            done = step + 1
            entry = {"step": done, "lr": scheduler.get_last_lr()[0], **step_terms}
            # the weights are the same on every process: the main one evaluates, or all of them when a
            # sharded forward needs them all (and all then come to the same result)
            if (world.is_main or sharded) and (done % settings.eval_every == 0 or done == settings.steps):
                with sharding.root_gathered(task.student):
                    entry["eval"] = task.evaluate()
                value = entry["eval"].get(metric)
                if value is not None and (best is None or value < best):
                    best = value
                    weights = sharding.full_tensors(trainable)
                    if world.is_main:
                        save_best(out_dir, done, weights, metric, value)
            history.append(entry)
            if world.is_main:  # logged before the checkpoint, so a resumed run's history misses no step
                with history_path.open("a") as log:
                    log.write(json.dumps(entry) + "\n")
                tensorboard.log(entry)
            if done % settings.checkpoint_every == 0 and done != settings.steps:
                # every process takes part: each one's generator is saved, sharded tensors are gathered
                weights, moments, rng = sharding.full_tensors(trainable), optimizer_payload(optimizer), rng_states(world)
                if world.is_main:
                    save_checkpoint(out_dir, done, weights, moments, scheduler, settings.keep_checkpoints, rng,
                                    scaler.state_dict())
            # the other processes need not wait for the main one's evaluation or checkpoint here:
            # the next step's first sum does
            progress.update(bar, advance=1, status=f"loss {step_terms['loss']:.4f}")

    evaluations = [e["eval"] for e in history if "eval" in e]
    result = {"steps": settings.steps, "train_seconds": time.perf_counter() - started,
              "final_loss": history[-1]["loss"] if history else None,
              "eval": evaluations[-1] if evaluations else {}, "parameters": parameter_counts(task, trainable),
              "processes": world.size, "fsdp": sharded}
    if hasattr(task, "teachers_used"):
        result["teachers_used"] = task.teachers_used()
    student = sharding.gathered_student(task.student, export_shell, world) if sharded else task.student
    if world.is_main:
        tensorboard.close()
        lora = config.student.lora
        task.export(out_dir / "student", exportable(student, merge=lora is None or lora.merge_on_export))
        plot_history(history, out_dir / "curves.png")
        write_json_atomic(out_dir / "result.json", result)
    world.barrier()
    distributed.leave(world)
    return result
