"""AdaLoRA (minillm.adalora): the SVD-form update, its regulariser, the importance-based rank
allocation on its budget schedule, AdaLoRA runs (adapter-only checkpoints, merging, resume), and
peft's AdaLoRA as the reference (same logits, same trainable count, same triplets masked).

Tiny encoder classifier (C=32, 3 blocks, V=100) from tests/test_lora.py; GPT-2-shaped decoder
(C=32, 2 blocks) for peft through minillm.convert.to_hf. CPU, fp32.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from minillm import checkpoint as ckpt
from minillm.adalora import (AdaLoRALinear, RankAllocator, add_adalora, adalora_layers, orthogonality_penalty)
from minillm.config import ModelConfig
from minillm.lora import LoRALinear, merge_lora
from minillm.tasks import build_model
from minillm.train_config import TrainConfig
from minillm.trainer import Trainer, seed_everything
from test_lora import base_run, batches, classifier, logits

peft = pytest.importorskip("peft")  # test-only: the reference AdaLoRA

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

SETTINGS = dict(task="classification", finetune_mode="adalora", adalora_init_rank=4, adalora_target_rank=2,
                adalora_warmup_steps=1, adalora_final_steps=2, adalora_mask_interval=1, lora_alpha=8.0,
                max_steps=8, warmup_steps=0, lr=1e-2, eval_every=0, log_every=1, progress=False,
                early_stopping_metric="accuracy")


def adalora_run(tmp_path, name: str = "adalora", model=None, **overrides) -> tuple[Trainer, dict]:
    config = TrainConfig(out_dir=str(tmp_path / name), init_from=base_run(tmp_path), **{**SETTINGS, **overrides})
    trainer = Trainer(classifier() if model is None else model, config, batches())
    return trainer, trainer.fit()


# =============================================================================================
# The layer, the regulariser, the schedule
# =============================================================================================


def test_adalora_layer_is_p_lambda_q_and_starts_as_the_base():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    x = torch.randn(3, 6)
    expected = base(x).detach()
    layer = AdaLoRALinear(base, rank=3, alpha=6.0)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)  # λ = 0 at the start
    with torch.no_grad():
        layer.lora_E.copy_(torch.tensor([1.0, -2.0, 0.5]))
    P, lam, Q = layer.lora_B, layer.lora_E, layer.lora_A  # (5, 3), (3,), (3, 6)
    by_hand = expected + (6.0 / 3) * x @ (P @ torch.diag(lam) @ Q).T
    torch.testing.assert_close(layer(x), by_hand, rtol=1e-6, atol=1e-6)
    merged = layer.merged()
    torch.testing.assert_close(merged(x), by_hand, rtol=1e-6, atol=1e-6)


def test_orthogonality_penalty_by_hand():
    model = torch.nn.Module()
    model.layer = AdaLoRALinear(torch.nn.Linear(4, 4), rank=2, alpha=2.0)
    with torch.no_grad():
        model.layer.lora_A.copy_(torch.eye(4)[:2])  # Q Qᵀ = I
        model.layer.lora_B.copy_(2 * torch.eye(4)[:, :2])  # Pᵀ P = 4 I: ||3 I||² = 9 + 9
    assert orthogonality_penalty(model).item() == pytest.approx(18.0)
    with torch.no_grad():
        model.layer.lora_B.copy_(torch.eye(4)[:, :2])
    assert orthogonality_penalty(model).item() == 0.0


def two_layers(rank: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.a = AdaLoRALinear(torch.nn.Linear(8, 6), rank, alpha=rank)
    model.b = AdaLoRALinear(torch.nn.Linear(8, 6), rank, alpha=rank)
    return model


def test_budget_schedule_is_the_cubic_one():
    """b(0) = 8, b(T) = 2 (2 layers, ranks 4 -> 1), T = 20, t_i = 2, t_f = 4: the middle phase is
    steps 3..16, b(t) = 2 + 6 (1 - (t - 2) / 14)³ rounded down."""
    allocator = RankAllocator(two_layers(), target_rank=1, total_steps=20, warmup_steps=2, final_steps=4,
                              mask_interval=3)
    assert (allocator.initial_budget, allocator.target_budget) == (8, 2)
    assert allocator.budget(2) == (8, False)
    for t in range(3, 17):
        assert allocator.budget(t) == (int(2 + 6 * (1 - (t - 2) / 14) ** 3), t % 3 == 0)
    assert allocator.budget(17) == (2, True) and allocator.budget(20) == (2, True)


def test_masking_keeps_the_budget_of_highest_scores_over_all_layers():
    model = two_layers()
    allocator = RankAllocator(model, target_rank=1, total_steps=10)
    with torch.no_grad():
        for layer in (model.a, model.b):
            layer.lora_E.fill_(1.0)
    # gradients that make layer a's triplets 0 and 2 and layer b's triplet 1 the important ones
    for layer, important in ((model.a, [0, 2]), (model.b, [1])):
        weight = torch.full((4,), 0.01)
        weight[important] = 1.0
        layer.lora_E.grad = weight.clone()
        layer.lora_A.grad = weight[:, None].expand(4, 8).clone()
        layer.lora_B.grad = weight[None, :].expand(6, 4).clone()
    for _ in range(3):  # Ū needs I to move away from Ī: a varying sensitivity
        allocator.update_importance()
        for layer in (model.a, model.b):
            for p in (layer.lora_A, layer.lora_B, layer.lora_E):
                p.grad *= 2
    pattern = allocator.mask_to_budget(3)
    assert pattern == {"a": [True, False, True, False], "b": [False, True, False, False]}
    assert model.a.lora_E.tolist() == [1.0, 0.0, 1.0, 0.0] and model.b.lora_E.tolist() == [0.0, 1.0, 0.0, 0.0]
    assert allocator.ranks() == {"a": 2, "b": 1}


# =============================================================================================
# AdaLoRA runs
# =============================================================================================


def test_an_adalora_run_trains_only_its_parameters_and_ends_at_the_target_budget(tmp_path, capsys):
    model = classifier()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer, summary = adalora_run(tmp_path, model=model)
    layers = adalora_layers(trainer.raw_model)
    assert len(layers) == 3 * 7  # every projection of the 3 SwiGLU blocks
    trainable = {n for n, p in trainer.raw_model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in trainer.raw_model.named_parameters()
                         if ".lora_" in n or n.startswith("classifier.")}
    # r (in + out + 1) per layer, plus the head
    expected = sum(4 * (m.base.in_features + m.base.out_features + 1) for m in layers.values())
    expected += sum(p.numel() for p in trainer.raw_model.classifier.parameters())
    assert summary["trainable_parameters"] == expected
    after = {n.replace(".base.", "."): p for n, p in trainer.raw_model.named_parameters()}
    frozen_changed = [n for n in before if not n.startswith("classifier.") and not torch.equal(before[n], after[n])]
    assert frozen_changed == []
    assert all(not torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B)) for layer in layers.values())
    # The budget: 21 layers x target rank 2 at the end, a pattern that agrees with the zeros of λ
    ranks = summary["adalora_ranks"]
    assert list(ranks) == list(layers) and sum(ranks.values()) <= 21 * 2 and len(set(ranks.values())) > 1
    for name, layer in layers.items():
        kept = trainer.rank_allocator.rank_pattern[name]
        assert all(layer.lora_E[i].item() == 0.0 for i in range(4) if not kept[i])
    assert f"AdaLoRA ranks at step 8 ({sum(ranks.values())} in all)" in capsys.readouterr().out


def test_an_adalora_run_saves_its_adapter_and_merges_to_the_same_outputs(tmp_path):
    trainer, summary = adalora_run(tmp_path)
    batch = batches(1, seed=5)[0]
    trained = logits(trainer.raw_model, batch)
    saved = ckpt.latest_checkpoint(tmp_path / "adalora")
    names = set(ckpt.read_weights(saved))
    assert names == {n for n, p in trainer.raw_model.named_parameters() if p.requires_grad}
    adapter = ckpt.read_adapter(saved)
    assert (adapter.method, adapter.rank, adapter.alpha) == ("adalora", 4, 8.0)
    assert {name: sum(kept) for name, kept in adapter.rank_pattern.items()} == summary["adalora_ranks"]
    base_size = (tmp_path / "base-0" / "step_000000" / ckpt.WEIGHTS).stat().st_size
    assert (saved / ckpt.WEIGHTS).stat().st_size < base_size / 2

    unmerged, _, _ = ckpt.load_model(tmp_path / "adalora", merge_lora=False)
    assert sum(isinstance(m, AdaLoRALinear) for m in unmerged.modules()) == 3 * 7
    torch.testing.assert_close(logits(unmerged, batch), trained, rtol=0, atol=0)
    merged, _, _ = ckpt.load_model(tmp_path / "adalora")
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, batch), trained, rtol=1e-5, atol=1e-6)
    on_base = ckpt.load_adapter(classifier(seed=0), tmp_path / "adalora")
    torch.testing.assert_close(logits(on_base, batch), trained, rtol=0, atol=0)
    with pytest.raises(ValueError, match="a different base model"):
        ckpt.load_adapter(classifier(seed=1), tmp_path / "adalora")


def test_adalora_resume_is_bit_exact(tmp_path):
    """Stop at step 4 (mid-schedule) and resume: the same losses, ranks and adapter as one run,
    so the importance averages travel with the checkpoint."""
    full, full_summary = adalora_run(tmp_path, "full")

    def stop_at_4(trainer, row):
        trainer.should_stop = trainer.step == 4

    config = TrainConfig(out_dir=str(tmp_path / "cut"), init_from=base_run(tmp_path), **SETTINGS)
    Trainer(classifier(), config, batches(), hooks={"on_step_end": stop_at_4}).fit()
    resumed = Trainer(classifier(7), dataclasses.replace(config, resume=True), batches())
    assert resumed.step == 4
    summary = resumed.fit()

    def losses(name: str) -> list[float]:
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["kind"] == "train"]

    assert losses("cut") == losses("full") and summary["adalora_ranks"] == full_summary["adalora_ranks"]
    expected, got = full.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert all(torch.equal(got[n], t) for n, t in expected.items())


def test_the_regulariser_enters_the_gradient(tmp_path):
    """adalora_ortho_weight > 0 changes the update of P and Q; 0 leaves only the task's gradient."""
    def one_step(weight: float) -> dict:
        trainer, _ = adalora_run(tmp_path, f"w{weight}", max_steps=4, adalora_ortho_weight=weight,
                                 adalora_final_steps=1)
        return {n: p.detach().clone() for n, p in trainer.raw_model.named_parameters() if ".lora_A" in n}

    plain, regularised = one_step(0.0), one_step(10.0)
    assert any(not torch.equal(plain[n], regularised[n]) for n in plain)


@pytest.mark.parametrize("field, value, message", [
    ("adalora_init_rank", 0, "an integer >= 1"),
    ("adalora_target_rank", 5, r"an integer in \[1, adalora_init_rank=4\]"),
    ("adalora_ortho_weight", -1.0, "a finite number >= 0"),
    ("adalora_beta1", 1.0, r"a number in \(0, 1\)"),
    ("adalora_final_steps", 7, "fewer than max_steps - adalora_warmup_steps = 7"),
    ("adalora_mask_interval", 0, "an integer >= 1"),
    ("init_from", None, "a pretrained checkpoint when finetune_mode='adalora'"),
])
def test_bad_adalora_settings_are_refused(field, value, message):
    fields = {**SETTINGS, "init_from": "runs/base", field: value}
    with pytest.raises(ValueError, match=f"TrainConfig.{field}: got .*{message}"):
        TrainConfig(**fields)


def test_adalora_fields_outside_adalora_are_reported_unused():
    unused = TrainConfig(finetune_mode="lora", init_from="runs/base").fields_without_effect()
    assert unused["adalora_target_rank"] == "finetune_mode is not 'adalora'"
    unused = TrainConfig(**{**SETTINGS, "init_from": "runs/base"}).fields_without_effect()
    assert "lora_rank" in unused and "lora_alpha" not in unused and "adalora_init_rank" not in unused


# =============================================================================================
# peft's AdaLoRA: the reference
# =============================================================================================

INIT_R, TARGET_R, ALPHA, STEPS = 4, 2, 8.0, 10
OURS_TO_HF = {"attn.out_proj": "attn.c_proj", "mlp.fc_in": "mlp.c_fc", "mlp.fc_out": "mlp.c_proj"}


def gpt_pair():
    """(minillm CausalLM with AdaLoRA on out_proj, fc_in, fc_out; the same base through to_hf with
    peft's AdaLoRA on c_proj and c_fc, the same layers), with the same P, Λ, Q."""
    from minillm.convert import to_hf

    seed_everything(0)
    config = ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, init_std=0.1)
    ours = build_model(config, "causal-lm")
    hf = to_hf(ours)
    ours.requires_grad_(False)
    add_adalora(ours, INIT_R, ALPHA, targets=("out_proj", "fc_in", "fc_out"))
    peft_config = peft.AdaLoraConfig(init_r=INIT_R, target_r=TARGET_R, lora_alpha=ALPHA, total_step=STEPS,
                                     target_modules=["c_proj", "c_fc"], tinit=1, tfinal=2, deltaT=1)
    theirs = peft.get_peft_model(hf, peft_config)
    modules = dict(theirs.base_model.model.named_modules())
    g = torch.Generator().manual_seed(1)
    pairs = {}
    with torch.no_grad():
        for name, layer in adalora_layers(ours).items():
            block, _, leaf = name.removeprefix("decoder.blocks.").partition(".")
            their = modules[f"transformer.h.{block}.{OURS_TO_HF[leaf]}"]
            layer.lora_E.copy_(torch.randn(INIT_R, generator=g))  # λ != 0: the update counts
            their.lora_A["default"].copy_(layer.lora_A)  # Q: (r, in)
            their.lora_E["default"].copy_(layer.lora_E[:, None])  # λ: peft keeps it (r, 1)
            their.lora_B["default"].copy_(layer.lora_B)  # P: (out, r)
            pairs[name] = their
    return ours, theirs, pairs


def test_peft_adalora_gives_the_same_logits_and_trainable_count():
    ours, theirs, pairs = gpt_pair()
    assert len(pairs) == 2 * 3
    ours_trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    theirs_trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert ours_trainable == theirs_trainable == 2 * sum(INIT_R * (i + o + 1) for i, o in
                                                         ((32, 32), (32, 128), (128, 32)))
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    ours.eval(), theirs.eval()
    with torch.no_grad():
        expected, got = ours(ids).logits, theirs(input_ids=ids).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        with theirs.disable_adapter():
            assert (theirs(input_ids=ids).logits - expected).abs().max() > 1e-2  # the update is not negligible
        merge_lora(ours)
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_the_same_triplets_are_masked_as_by_peft_rank_allocator():
    """Hand-set gradients, three importance updates, one masking to a budget of 13 of 24: the same
    Ī and Ū as peft's RankAllocator, the same triplets kept (and the same λ zeroed)."""
    from peft.tuners.adalora.layer import RankAllocator as PeftRankAllocator

    ours, theirs, pairs = gpt_pair()
    allocator = RankAllocator(ours, target_rank=TARGET_R, total_steps=STEPS, warmup_steps=1, final_steps=2)
    reference = PeftRankAllocator(theirs.base_model.model, theirs.peft_config["default"], "default")
    g = torch.Generator().manual_seed(3)
    shaped = {"lora_A": lambda s: s[:, None], "lora_E": lambda s: s, "lora_B": lambda s: s[None, :]}
    for _ in range(3):
        # Each step, each triplet's Q row, λ and P column get their own gradient scale (e^(2 N(0, 1))), so
        # that every term of S_i and both averages count; λ ~ 1 against P, Q ~ 0.02: its gradients are 0.02x.
        scales = {(name, kind): torch.exp(2 * torch.randn(INIT_R, generator=g)) * (0.02 if kind == "lora_E" else 1.0)
                  for name in adalora_layers(ours) for kind in ("lora_A", "lora_E", "lora_B")}
        for name, layer in adalora_layers(ours).items():
            for kind in ("lora_A", "lora_E", "lora_B"):
                ours_param, their_param = getattr(layer, kind), getattr(pairs[name], kind)["default"]
                grad = torch.randn(ours_param.shape, generator=g) * shaped[kind](scales[name, kind])
                ours_param.grad = grad
                their_param.grad = grad[:, None] if kind == "lora_E" else grad.clone()
        allocator.update_importance()
        reference.update_ipt(theirs.base_model.model)
    modules = {id(m): n for n, m in theirs.base_model.model.named_modules()}
    for name, layer in adalora_layers(ours).items():  # the same smoothed sensitivities Ī and uncertainties Ū
        for kind in ("lora_A", "lora_E", "lora_B"):
            their_name, shape = f"{modules[id(pairs[name])]}.{kind}.default", getattr(layer, kind).shape
            torch.testing.assert_close(allocator.sensitivity[f"{name}.{kind}"],
                                       reference.exp_avg_ipt[their_name].reshape(shape))
            torch.testing.assert_close(allocator.uncertainty[f"{name}.{kind}"],
                                       reference.exp_avg_unc[their_name].reshape(shape))
    pattern = allocator.mask_to_budget(13)
    their_pattern = reference.mask_to_budget(theirs.base_model.model, 13)
    for name, kept in pattern.items():
        their_name = f"{modules[id(pairs[name])]}.lora_E.default"
        assert kept == their_pattern[their_name], name
        torch.testing.assert_close(adalora_layers(ours)[name].lora_E, pairs[name].lora_E["default"][:, 0])
    assert sum(map(sum, pattern.values())) == 13
