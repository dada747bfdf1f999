"""The causal-LM recipe on tiny models: alignment, accumulation, resume, errors, students, LoRA."""

import json

import pytest
import torch
from safetensors.torch import load_file

from kdforge.config import parse_config
from kdforge.data import arithmetic
from kdforge.data.lm import read_jsonl
from kdforge.errors import KdforgeError
from kdforge.models.tiny import build_tiny_lm, train_tokenizer
from kdforge.student.init import init_student, maximally_spaced
from kdforge.tasks.lm import collate, encode_record
from kdforge.teachers.ensemble import ensemble_logprobs
from kdforge.training.checkpoint import optimizer_payload
from kdforge.training.loop import batch_indices, train


def config_for(tiny_lm, **training):
    return parse_config({
        "task": "lm",
        "teachers": [{"path": str(tiny_lm["teacher"])}],
        "student": {"init_from": str(tiny_lm["teacher"]), "layers": [0, 3]},
        "data": {"train": str(tiny_lm["data"]), "max_length": 64},
        "objective": {"name": "kl", "ce_weight": 0.5, "rlkd": {"k": 4}},
        "training": {"steps": 4, "batch_size": 8, "lr": 3e-3, "eval_every": 100, "checkpoint_every": 2, **training},
    })


def student_weights(run_dir):
    return load_file(run_dir / "student" / "model.safetensors")


def test_instruction_targets_are_the_response_tokens_shifted_by_one(tiny_lm):
    tokenizer = tiny_lm["tokenizer"]
    example = encode_record({"query": "how many", "response": "2 + 3 = 5\n#### 5"}, tokenizer, 64)
    prompt = tokenizer("how many\n", add_special_tokens=False).input_ids
    response = tokenizer("2 + 3 = 5\n#### 5", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert example.ids == prompt + response
    batch = collate([example, encode_record({"text": "a b"}, tokenizer, 64)], tokenizer.pad_token_id)
    targets, mask = batch["targets"][0], batch["target_mask"][0]
    # logits at position t predict token t + 1: exactly the response tokens (and eos) are targets
    assert targets[mask].tolist() == response
    assert mask.sum() == len(response) and not mask[: len(prompt) - 1].any()
    assert not batch["target_mask"][1, len(encode_record({"text": "a b"}, tokenizer, 64).ids) - 1 :].any()


def test_cross_entropy_equals_a_hand_computed_sum(tiny_lm, tmp_path):
    from kdforge.tasks.lm import LMTask

    config = config_for(tiny_lm).model_copy(update={"teachers": []})
    config.objective = config.objective.model_copy(update={"name": "none", "ce_weight": 1.0, "rlkd": None})
    task = LMTask(config, tmp_path)
    batch = task.batch([0, 1, 2])
    loss, terms = task.loss(batch)
    logits = task.student(input_ids=batch["inputs"], attention_mask=batch["attention_mask"]).logits
    nll, count = 0.0, 0
    for row in range(3):
        example = task.train_examples[row]
        for t in range(len(example.ids) - 1):
            if example.is_target[t + 1]:
                nll -= torch.log_softmax(logits[row, t], -1)[example.ids[t + 1]].item()
                count += 1
    assert loss.item() == pytest.approx(nll / count, rel=1e-5)


def test_the_base_and_ranking_weights_rise_over_their_warm_ups(tiny_lm, tmp_path):
    from kdforge.tasks.lm import LMTask

    config = config_for(tiny_lm)
    config.objective = config.objective.model_copy(update={
        "warmup_steps": 4, "rlkd": config.objective.rlkd.model_copy(update={"warmup_steps": 8})})
    task = LMTask(config, tmp_path)
    batch = task.batch([0, 1, 2])
    totals = {}
    for step in (0, 2, 8):
        task.step = step
        totals[step], terms = task.loss(batch)
        assert set(terms) == ({"ce"} if step == 0 else {"ce", "kd", "rank"})  # a term at weight 0 is not computed
    ce, kd, rank = (terms[name].item() for name in ("ce", "kd", "rank"))
    rlkd_weight = config.objective.rlkd.weight
    assert totals[0].item() == pytest.approx(0.5 * ce, rel=1e-5)  # only the labels' term before the warm-ups
    assert totals[2].item() == pytest.approx(0.5 * ce + 0.5 * kd + 0.25 * rlkd_weight * rank, rel=1e-5)
    assert totals[8].item() == pytest.approx(0.5 * ce + kd + rlkd_weight * rank, rel=1e-5)


def test_each_terms_gradient_norm_is_its_own():
    from kdforge.training.objective import term_gradient_norms

    weights, unused = torch.tensor([3.0, -4.0], requires_grad=True), torch.ones(2, requires_grad=True)
    bias = torch.tensor([1.0], requires_grad=True)
    terms = {"linear": (2 * weights).sum() + bias.sum(), "square": (weights**2).sum()}
    norms = term_gradient_norms(terms, [weights, unused, bias])
    assert norms["linear"] == pytest.approx(3.0)  # |(2, 2, 1)|
    assert norms["square"] == pytest.approx(10.0)  # |2 * (3, -4)|


def test_batches_cover_each_epoch_once_and_depend_only_on_seed_and_step():
    seen = [i for step in range(5) for i in batch_indices(step, 10, 2, seed=7)]
    assert sorted(seen) == list(range(10))
    assert batch_indices(3, 10, 4, seed=7) == batch_indices(3, 10, 4, seed=7) != batch_indices(3, 10, 4, seed=8)


def test_gradient_accumulation_keeps_the_loss_scale(tiny_lm, tmp_path):
    from kdforge.tasks.lm import LMTask
    from kdforge.training.loop import accumulate_gradients, target_tokens

    task = LMTask(config_for(tiny_lm), tmp_path)
    indices = list(range(8))  # sequences of different lengths: a mean of micro-batch means would be wrong
    gradients, logged = [], []
    for parts in (1, 4):
        task.student.zero_grad()
        size = 8 // parts
        micro = [task.batch(indices[i : i + size]) for i in range(0, 8, size)]
        assert len({int(b["target_mask"].sum()) for b in micro}) > 1 or parts == 1
        logged.append(accumulate_gradients(task, micro, target_tokens(micro), tmp_path, 0))
        gradients.append(torch.cat([p.grad.flatten() for p in task.student.parameters()]))
    torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-4, atol=1e-7)
    assert logged[0]["loss"] == pytest.approx(logged[1]["loss"], rel=1e-5)
    one = train(config_for(tiny_lm, grad_accum=1), tmp_path / "one", show_progress=False)
    four = train(config_for(tiny_lm, grad_accum=4), tmp_path / "four", show_progress=False)
    a, b = student_weights(tmp_path / "one"), student_weights(tmp_path / "four")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert one["final_loss"] == pytest.approx(four["final_loss"], rel=1e-4)


def test_term_gradient_norms_are_each_terms_own_pull_and_leave_the_step_unchanged(tiny_lm, tmp_path):
    from kdforge.tasks.lm import LMTask
    from kdforge.training.loop import accumulate_gradients, target_tokens
    from kdforge.training.objective import term_gradient_norms

    task = LMTask(config_for(tiny_lm), tmp_path)
    weights = [p for p in task.student.parameters() if p.requires_grad]
    batches = [task.batch(list(range(8)))]
    task.student.zero_grad()
    plain = accumulate_gradients(task, batches, target_tokens(batches), tmp_path, 0)
    step = [p.grad.clone() for p in weights]
    task.student.zero_grad()
    measured = accumulate_gradients(task, batches, target_tokens(batches), tmp_path, 0, norms_over=weights)
    assert all(torch.equal(p.grad, g) for p, g in zip(weights, step))  # measuring does not change the step
    assert {k: v for k, v in measured.items() if not k.startswith("grad_norm/")} == plain
    assert set(measured) - set(plain) == {"grad_norm/ce", "grad_norm/kd", "grad_norm/rank"}
    _, terms = task.loss(batches[0])
    for name in ("ce", "kd", "rank"):  # each norm is that term's gradient alone, unweighted
        task.student.zero_grad()
        terms[name].backward(retain_graph=True)
        own = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in weights]))
        assert measured[f"grad_norm/{name}"] == pytest.approx(float(own), rel=1e-5)
    constant = {"ce": terms["ce"], "none": torch.tensor(1.0)}  # a term that reaches no weight pulls with 0
    assert term_gradient_norms(constant, weights)["none"] == 0.0
    history = train(config_for(tiny_lm, term_grad_norms_every=2), tmp_path / "run", show_progress=False)
    entries = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries if "grad_norm/kd" in e] == [2, 4] and history["steps"] == 4


def test_mixed_precision_runs_the_forward_in_half_precision_and_keeps_float32_gradients(tiny_lm, tmp_path):
    from kdforge.tasks.lm import LMTask
    from kdforge.training.loop import accumulate_gradients, target_tokens

    gradients, losses = {}, {}
    for precision in ("float32", "bfloat16", "float16"):
        torch.manual_seed(0)
        task = LMTask(config_for(tiny_lm, precision=precision), tmp_path)
        batches = [task.batch(list(range(8)))]
        losses[precision] = accumulate_gradients(task, batches, target_tokens(batches), tmp_path, 0)["loss"]
        weights = [p for p in task.student.parameters() if p.requires_grad]
        assert all(p.dtype == p.grad.dtype == torch.float32 for p in weights)
        gradients[precision] = torch.cat([p.grad.flatten() for p in weights])
    for precision in ("bfloat16", "float16"):  # rounded, so not equal; close, so the same computation
        assert not torch.equal(gradients[precision], gradients["float32"])
        cosine = torch.nn.functional.cosine_similarity(gradients[precision], gradients["float32"], dim=0)
        assert cosine > 0.99
        assert losses[precision] == pytest.approx(losses["float32"], rel=1e-2)


def test_the_float16_loss_scaler_travels_in_checkpoints(tmp_path):
    from kdforge.training.checkpoint import load_checkpoint, save_checkpoint
    from kdforge.training.precision import grad_scaler

    def parts():
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.AdamW(model.parameters())
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), \
            grad_scaler("float16", torch.device("cpu"))

    model, optimizer, scheduler, scaler = parts()
    scaler.scale(model(torch.ones(1, 3)).sum() * float("inf")).backward()  # an overflow: the scale halves
    scaler.step(optimizer)
    scaler.update()
    for _ in range(3):  # then three good steps for the growth tracker
        optimizer.zero_grad()
        scaler.scale(model(torch.ones(1, 3)).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    saved = scaler.state_dict()
    assert saved["scale"] == 2.0**15 and saved["_growth_tracker"] == 3
    folder = save_checkpoint(tmp_path, 4, dict(model.named_parameters()), optimizer_payload(optimizer), scheduler, 1,
                             {"torch.rank0": torch.get_rng_state()}, saved)
    model, optimizer, scheduler, resumed = parts()
    assert load_checkpoint(folder, model, optimizer, scheduler, grad_scaler=resumed) == 4
    assert resumed.state_dict() == saved
    state = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**state, "grad_scaler": {}}))
    model, optimizer, scheduler, resumed = parts()
    with pytest.raises(KdforgeError, match="lacks the float16 loss scaler"):
        load_checkpoint(folder, model, optimizer, scheduler, grad_scaler=resumed)


def float16_config(tiny_lm):
    return config_for(tiny_lm, precision="float16")


def test_term_gradient_norms_in_float16_take_the_loss_scale_so_small_gradients_survive(tiny_lm, tmp_path):
    from kdforge.tasks.lm import LMTask
    from kdforge.training.objective import term_gradient_norms

    task = LMTask(config_for(tiny_lm, precision="float16"), tmp_path)
    weights = [p for p in task.student.parameters() if p.requires_grad]
    batch = task.batch(list(range(8)))
    tiny = 1e-7  # a term this small has gradients below float16's smallest number
    reference = term_gradient_norms({"small": task.loss(batch)[1]["ce"] * tiny}, weights)["small"]
    with torch.autocast("cpu", dtype=torch.float16):
        small = {"small": task.loss(batch)[1]["ce"] * tiny}
    assert term_gradient_norms(small, weights)["small"] < 0.5 * reference  # flushed to zero, or nearly
    assert term_gradient_norms(small, weights, loss_scale=2.0**16)["small"] == pytest.approx(reference, rel=0.05)


def random_config(tiny_lm):
    """Dropout in the adapters and two micro-batches a step: resuming must restore the RNG exactly."""
    raw = config_for(tiny_lm, grad_accum=2).model_dump(mode="json")
    raw["student"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.3}
    return parse_config(raw)


@pytest.mark.parametrize("make_config,crash_at_call", [(config_for, 4), (random_config, 7), (float16_config, 4)])
def test_resume_after_a_crash_is_bit_identical(tiny_lm, tmp_path, monkeypatch, make_config, crash_at_call):
    train(make_config(tiny_lm), tmp_path / "straight", show_progress=False)
    import kdforge.tasks.lm as lm

    original = lm.LMTask.loss
    calls = {"n": 0}

    def crash_in_step_four(self, batch):
        calls["n"] += 1
        if calls["n"] == crash_at_call:
            raise RuntimeError("killed")
        return original(self, batch)

    monkeypatch.setattr(lm.LMTask, "loss", crash_in_step_four)
    with pytest.raises(RuntimeError, match="killed"):
        train(make_config(tiny_lm), tmp_path / "crashed", show_progress=False)
    monkeypatch.setattr(lm.LMTask, "loss", original)
    assert sorted(p.name for p in (tmp_path / "crashed" / "checkpoints").iterdir()) == ["step-0000002"]
    with pytest.raises(KdforgeError, match="pass --resume"):
        train(make_config(tiny_lm), tmp_path / "crashed", show_progress=False)
    train(make_config(tiny_lm), tmp_path / "crashed", resume=True, show_progress=False)
    a, b = student_weights(tmp_path / "straight"), student_weights(tmp_path / "crashed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "crashed" / "history.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_finished_run_is_never_overwritten(tiny_lm, tmp_path):
    train(config_for(tiny_lm, steps=1), tmp_path / "run", show_progress=False)
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    with pytest.raises(KdforgeError, match="already holds a finished run"):
        train(config_for(tiny_lm, steps=1), tmp_path / "run", show_progress=False)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")} == before


def test_non_finite_loss_stops_and_names_the_step(tiny_lm, tmp_path, spoil_lm_loss):
    spoil_lm_loss(3, lambda loss: loss * float("nan"))
    with pytest.raises(KdforgeError, match=r"the loss became nan at step 3; stopped \(last good checkpoint: step-0000002\)"):
        train(config_for(tiny_lm), tmp_path / "run", show_progress=False)
    assert (tmp_path / "run" / "checkpoints" / "step-0000002" / "state.json").exists()


def test_non_finite_gradients_of_a_finite_loss_stop_before_the_weights_change(tiny_lm, tmp_path, spoil_lm_loss):
    # adds 0 to the loss, but its derivative is infinite
    spoil_lm_loss(3, lambda loss: loss + torch.sqrt(loss - loss.detach()))
    with pytest.raises(KdforgeError, match=r"the gradients became (nan|inf) at step 3; stopped "
                                           r"\(last good checkpoint: step-0000002\)"):
        train(config_for(tiny_lm), tmp_path / "run", show_progress=False)
    weights = load_file(tmp_path / "run" / "checkpoints" / "step-0000002" / "trainable.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_vocabulary_mismatch_names_both_sizes(tiny_lm, tmp_path):
    other = train_tokenizer(["completely different text here"] * 20, vocab_size=280)
    other_teacher = build_tiny_lm(tmp_path / "other", "student", other)
    config = config_for(tiny_lm)
    config.teachers = [config.teachers[0].model_copy(update={"path": other_teacher})]
    with pytest.raises(KdforgeError, match=r"student has \d+ logits, teacher .* has \d+"):
        train(config, tmp_path / "run", show_progress=False)
    assert not any((tmp_path / "run").iterdir())  # nothing left behind: the corrected run can use it
    train(config_for(tiny_lm, steps=1), tmp_path / "run", show_progress=False)


def test_student_keeps_the_chosen_teacher_layers(tiny_lm, tmp_path):
    init_student(tiny_lm["teacher"], tmp_path / "student", layers=[0, 2, 3])
    teacher = load_file(tiny_lm["teacher"] / "model.safetensors")
    student = load_file(tmp_path / "student" / "model.safetensors")
    for new, old in enumerate([0, 2, 3]):
        assert torch.equal(student[f"model.layers.{new}.mlp.up_proj.weight"], teacher[f"model.layers.{old}.mlp.up_proj.weight"])
    assert "model.layers.3.mlp.up_proj.weight" not in student
    assert torch.equal(student["model.embed_tokens.weight"], teacher["model.embed_tokens.weight"])
    assert maximally_spaced(30, 6) == [0, 6, 12, 17, 23, 29]
    with pytest.raises(KdforgeError, match="lacks layer 9"):
        init_student(tiny_lm["teacher"], tmp_path / "bad", layers=[0, 9])


def test_lora_trains_only_adapters_and_exports_a_merged_model(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    raw = config_for(tiny_lm, steps=2).model_dump(mode="json")
    raw["student"]["lora"] = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    config = parse_config(raw)
    train(config, tmp_path / "run", show_progress=False)
    exported = load_file(tmp_path / "run" / "student" / "model.safetensors")
    assert not any("lora" in key for key in exported)
    initial = load_file(tmp_path / "run" / "student-init" / "model.safetensors")
    changed = [k for k in initial if not torch.equal(initial[k], exported[k])]
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)  # only adapted layers moved
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")  # a plain HF directory
    assert sum(p.numel() for p in plain.parameters()) == sum(v.numel() for k, v in initial.items())


def test_ensemble_is_the_weighted_mean_of_probabilities():
    a, b = torch.randn(3, 7), torch.randn(3, 7)
    mixed = ensemble_logprobs([a, b], [3.0, 1.0]).exp()
    torch.testing.assert_close(mixed, 0.75 * a.softmax(-1) + 0.25 * b.softmax(-1))


def test_a_jsonl_line_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(KdforgeError, match=r"data.jsonl:2: not JSON"):
        read_jsonl(path)


def test_evaluation_reports_perplexity_and_full_agreement_with_itself(tiny_lm, tmp_path):
    from kdforge.tasks.lm import LMTask

    raw = config_for(tiny_lm).model_dump(mode="json")
    raw["student"] = {"path": str(tiny_lm["teacher"])}  # the student is the teacher: agreement must be total
    raw["data"]["eval"] = str(tiny_lm["data"])
    raw["objective"] = {"name": "kl", "ce_weight": 1.0}
    task = LMTask(parse_config(raw), tmp_path)
    metrics = task.evaluate()
    assert metrics["cr@5"] == 100.0 and metrics["mor@20"] == 100.0
    everything = collate(task.eval_examples, task.tokenizer.pad_token_id)
    _, terms = task.loss(everything)
    assert metrics["ppl"] == pytest.approx(float(terms["ce"].detach().exp()), rel=1e-4)


def test_the_best_evaluation_is_kept(tiny_lm, tmp_path):
    raw = config_for(tiny_lm, steps=5, eval_every=1, checkpoint_every=2, keep_checkpoints=1).model_dump(mode="json")
    raw["data"]["eval"] = str(tiny_lm["data"])
    train(parse_config(raw), tmp_path / "run", show_progress=False)
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    best_step = min(history, key=lambda entry: entry["eval"]["ppl"])["step"]
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == sorted([f"best-step-{best_step:07d}", "step-0000004"])
    state = json.loads((tmp_path / "run" / "checkpoints" / f"best-step-{best_step:07d}" / "state.json").read_text())
    assert state["value"] == min(entry["eval"]["ppl"] for entry in history)


def test_curves_reach_tensorboard_with_the_logged_values(tiny_lm, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raw = config_for(tiny_lm, steps=3, eval_every=2).model_dump(mode="json")
    raw["data"]["eval"] = str(tiny_lm["data"])
    train(parse_config(raw), tmp_path / "run", show_progress=False)
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (h["step"], pytest.approx(h["loss"])) for h in history]
    assert [e.step for e in events.Scalars("eval/ppl")] == [2, 3]


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tiny_lm, tmp_path, fill_disk_after):
    fill_disk_after(3)  # the first checkpoint writes 3 files
    with pytest.raises(KdforgeError, match=r"could not write checkpoint step-0000004 \(No space left on device\)"):
        train(config_for(tiny_lm, steps=6), tmp_path / "run", show_progress=False)
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-0000002"]  # complete, and no half-written folder beside it
    assert (tmp_path / "run" / "checkpoints" / "step-0000002" / "state.json").exists()


def test_generation_is_greedy_or_seeded_sampling_whatever_the_batch(tiny_lm):
    from transformers import AutoModelForCausalLM

    from kdforge.tasks.lm import Sampling, generate_answers

    model = AutoModelForCausalLM.from_pretrained(tiny_lm["teacher"])
    tokenizer = tiny_lm["tokenizer"]
    queries = [p.question for p in arithmetic.generate(6, seed=9)]
    greedy = generate_answers(model, tokenizer, queries, max_new_tokens=12, batch_size=4)
    assert greedy == [generate_answers(model, tokenizer, [q], max_new_tokens=12)[0] for q in queries]  # padding-proof
    hot = Sampling(temperature=3.0, seed=1)
    sampled = generate_answers(model, tokenizer, queries, max_new_tokens=12, sampling=hot)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    assert generate_answers(model, tokenizer, queries, max_new_tokens=12, sampling=hot) == sampled
    assert torch.rand(1) == before  # the caller's random stream is left alone
    assert sampled != greedy  # a random model at T = 3 does not follow its argmax for 12 tokens
