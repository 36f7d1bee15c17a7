"""Knowledge distillation (minillm.distill): the loss against the formula computed by hand, where
gradients flow, the student run end to end through `minillm distill`, and the refusals."""

import json
import math

import pytest
import torch

from minillm import checkpoint as ckpt
from minillm.config import preset
from minillm.distill import (
    DistillationTask,
    DistillConfig,
    distillation_loss,
    init_from_teacher,
    soft_target_loss,
    spread,
)
from minillm.tasks import build_model, get_task
from test_cli import one_line_error, run  # the CLI helpers every CLI test shares

TINY = dict(vocab_size=50, d_model=16, n_layers=2, n_heads=2, max_seq_len=16)


# ----------------------------------------------------------------------------- the loss


def test_soft_loss_is_t_squared_times_the_kl_computed_by_hand():
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    T = 2.0
    expected = 0.0
    for zs, zt in zip(student, teacher):  # KL(p_t || p_s) = sum_v p_t(v) (log p_t(v) - log p_s(v))
        ps = [math.exp(z / T) for z in zs]
        pt = [math.exp(z / T) for z in zt]
        ps, pt = [p / sum(ps) for p in ps], [p / sum(pt) for p in pt]
        expected += sum(t * (math.log(t) - math.log(s)) for s, t in zip(ps, pt))
    got = soft_target_loss(torch.tensor(student), torch.tensor(teacher), T)
    assert got.item() == pytest.approx(T ** 2 * expected, rel=1e-6)


def test_t_squared_scaling_and_equal_logits_give_zero():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 7), torch.randn(5, 7)
    kl_at = {}
    for T in (1.0, 3.0):
        log_ps, log_pt = torch.log_softmax(student / T, -1), torch.log_softmax(teacher / T, -1)
        kl_at[T] = (log_pt.exp() * (log_pt - log_ps)).sum()
        assert soft_target_loss(student, teacher, T).item() == pytest.approx(T ** 2 * kl_at[T].item(), rel=1e-5)
    assert soft_target_loss(teacher, teacher, 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_mixed_loss_counts_only_labelled_rows():
    torch.manual_seed(1)
    student, teacher = torch.randn(4, 6), torch.randn(4, 6)
    labels = torch.tensor([2, -100, 5, -100])
    keep = labels != -100
    loss = distillation_loss(student, teacher, labels, temperature=2.0, alpha=0.3)
    soft = soft_target_loss(student[keep], teacher[keep], 2.0)
    hard = torch.nn.functional.cross_entropy(student[keep], labels[keep], reduction="sum")
    assert loss.item() == pytest.approx((0.3 * soft + 0.7 * hard).item(), rel=1e-6)
    # a masked row may hold anything: it changes nothing
    student[1] += 100
    assert distillation_loss(student, teacher, labels, 2.0, 0.3).item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("task_name", ["causal-lm", "mlm", "classification"])
def test_the_task_loss_is_the_formula_on_labelled_positions_and_only_the_student_learns(task_name):
    torch.manual_seed(0)
    arch = "decoder" if task_name != "mlm" else "encoder"
    config = preset("tiny" if arch == "decoder" else "tiny-bert", **TINY)
    teacher, student = build_model(config, task_name), build_model(preset(config.arch == "decoder" and "tiny" or
                                                                          "tiny-bert", **{**TINY, "n_layers": 1}),
                                                                   task_name)
    base = get_task(task_name)
    distill = DistillConfig(teacher="t", temperature=2.0, alpha=0.25, hidden_weight=0.5)
    task = DistillationTask(base, teacher, distill, student)
    ids = torch.randint(7, 50, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # padding never counts
    if task_name == "causal-lm":
        labels = ids.masked_fill(mask == 0, -100)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    elif task_name == "mlm":
        labels = torch.full_like(ids, -100)
        labels[:, 2] = ids[:, 2]
        labels[1, 5] = ids[1, 5]
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    else:
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1])}
    _, terms = task.forward(student, batch)

    # the same figure from the two models' own outputs
    if task_name == "causal-lm":
        zs, zt = student(ids, mask).logits[:, :-1].flatten(0, 1), teacher(ids, mask).logits[:, :-1].flatten(0, 1)
        rows = labels[:, 1:].flatten()
    elif task_name == "mlm":
        zs, zt = student(ids, mask).logits.flatten(0, 1), teacher(ids, mask).logits.flatten(0, 1)
        rows = labels.flatten()
    else:
        zs, zt, rows = student(ids, mask).logits, teacher(ids, mask).logits, batch["labels"]
    expected = distillation_loss(zs, zt, rows, 2.0, 0.25)
    assert terms[base.loss_terms[0]].item() == pytest.approx(expected.item(), rel=1e-4)
    assert task.target_counts(batch)["hidden"] == mask.sum() * 1  # one student block, real tokens only

    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in task.projections.parameters())


def test_mlm_nsp_distils_both_heads():
    torch.manual_seed(0)
    config = preset("tiny-bert", **TINY)
    teacher, student = build_model(config, "mlm-nsp"), build_model(preset("tiny-bert", **{**TINY, "n_layers": 1}),
                                                                  "mlm-nsp")
    task = DistillationTask(get_task("mlm-nsp"), teacher, DistillConfig(teacher="t", temperature=3.0, alpha=0.6), student)
    ids = torch.randint(7, 50, (2, 10))
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    nsp = torch.tensor([0, 1])
    _, terms = task.forward(student, {"input_ids": ids, "labels": labels, "next_sentence_label": nsp})
    zs, zt = student(ids).nsp_logits, teacher(ids).nsp_logits
    expected = distillation_loss(zs, zt, nsp, 3.0, 0.6)
    assert set(terms) == {"mlm", "nsp"}
    assert terms["nsp"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_a_hidden_layer_map_of_the_wrong_length_or_range_is_refused():
    teacher = build_model(preset("tiny", **TINY), "causal-lm")
    student = build_model(preset("tiny", **{**TINY, "n_layers": 1}), "causal-lm")
    for layers in ([0, 1], [2]):
        with pytest.raises(ValueError, match=r"DistillConfig.hidden_layers: got \[.*\], expected 1 teacher block"):
            DistillationTask(get_task("causal-lm"), teacher,
                             DistillConfig(teacher="t", hidden_weight=1.0, hidden_layers=layers), student)


def test_spread_and_init_from_teacher_copy_blocks():
    torch.manual_seed(0)
    assert spread(2, 4) == [1, 3] and spread(1, 3) == [2] and spread(3, 3) == [0, 1, 2]
    teacher = build_model(preset("tiny", **{**TINY, "n_layers": 4}), "causal-lm")
    student = build_model(preset("tiny", **TINY), "causal-lm")
    assert init_from_teacher(student, teacher, "spread") == [0, 2]
    for s, t in ((0, 0), (1, 2)):
        for (name, ps), pt in zip(student.decoder.blocks[s].named_parameters(), teacher.decoder.blocks[t].parameters()):
            assert torch.equal(ps, pt), name
    assert torch.equal(student.decoder.embeddings.token.weight, teacher.decoder.embeddings.token.weight)
    assert init_from_teacher(student, teacher, "first") == [0, 1]
    assert torch.equal(student.decoder.blocks[1].mlp.fc_in.weight, teacher.decoder.blocks[1].mlp.fc_in.weight)
    narrow = build_model(preset("tiny", **{**TINY, "d_model": 8}), "causal-lm")
    with pytest.raises(ValueError, match=r"init_from_teacher.*d_model \(8 vs the teacher's 16\)"):
        init_from_teacher(narrow, teacher)


@pytest.mark.parametrize("field, value, needle", [
    ("temperature", 0.0, "DistillConfig.temperature: got 0.0, expected a positive"),
    ("temperature", -1.0, "DistillConfig.temperature"),
    ("alpha", 1.5, "DistillConfig.alpha: got 1.5, expected a number in [0, 1]"),
    ("alpha", -0.1, "DistillConfig.alpha"),
    ("hidden_weight", -1.0, "DistillConfig.hidden_weight"),
    ("init_layers", "last", "DistillConfig.init_layers"),
])
def test_bad_settings_name_the_field(field, value, needle):
    with pytest.raises(ValueError) as err:
        DistillConfig(teacher="t", **{field: value})
    assert needle in str(err.value)


# ----------------------------------------------------------------------------- the command


@pytest.fixture
def teacher_run(tiny_gpt_run):
    return tiny_gpt_run


STUDENT_TRAIN = ["--train.max_steps=3", "--train.eval_batches=2", "--train.eval_every=0", "--train.batch_size=4"]


def test_distill_command_trains_a_student_and_saves_what_ran(teacher_run, one_thread):
    root, teacher = teacher_run
    out = root / "student"
    code, stdout, err = run("distill", "--teacher", teacher, "--model.n_layers=1", "--distill.temperature", "3",
                            "--distill.alpha=0.7", "--distill.init_from_teacher=true", "--distill.init_layers=first",
                            "--distill.hidden_weight=0.1", *STUDENT_TRAIN, f"--train.out_dir={out}")
    assert code == 0, err
    assert "blocks copied from teacher blocks [0]" in stdout
    model, configs, tokenizer = ckpt.load_model(out)
    assert model.config.n_layers == 1 and tokenizer is not None
    assert configs["distill"]["temperature"] == 3.0 and configs["distill"]["alpha"] == 0.7
    assert configs["distill"]["teacher"] == str(teacher)
    assert configs["train"]["max_steps"] == 3 and configs["task"] == "causal-lm"
    assert "[distill]" in (out / "config.toml").read_text()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("kind") == "eval" and "val_loss" in row for row in metrics)


@pytest.mark.parametrize("argv, needles", [
    (["--distill.temperature=0"], ["DistillConfig.temperature: got 0.0"]),
    (["--distill.alpha=2"], ["DistillConfig.alpha: got 2"]),
    (["--model.vocab_size=99"], ["ModelConfig.vocab_size", "teacher's vocabulary"]),
    (["--model.d_model=16", "--distill.init_from_teacher=true"], ["init_from_teacher", "d_model (16"]),
    (["--distill.init_layers=first"], ["distill.init_layers", "no effect", "init_from_teacher is false"]),
    (["--data.seq_len=8"], ["data.seq_len (set by --data.seq_len)", "teacher's data"]),
    (["--train.lora_rank=4"], ["TrainConfig.lora_rank", "no effect"]),
])
def test_distill_refusals_are_one_line(teacher_run, argv, needles):
    root, teacher = teacher_run
    one_line_error(*run("distill", "--teacher", teacher, *argv, *STUDENT_TRAIN,
                        f"--train.out_dir={root / 'refused'}")[::2], *needles)
    assert not (root / "refused").exists()


def test_a_missing_teacher_is_one_line(tmp_path):
    one_line_error(*run("distill", "--teacher", tmp_path / "nowhere")[::2], "DistillConfig.teacher", "nowhere")
