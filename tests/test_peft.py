"""minillm's Trainer, checkpoints and generation with models prepared by ``peft`` (a test-only
dependency: minillm itself never imports it), and peft's LoRA against minillm's LoRALinear.

Tiny decoder (C=32, 2 layers, V=100, T=16), LoRA of rank 4 on q_proj and v_proj, CPU. The base
is random with init_std=0.1: at GPT's 0.02 the logits are so flat that a rank-4 update on
attention moves the loss by only ~0.05 in 8 steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minillm import checkpoint as ckpt
from minillm.config import ModelConfig
from minillm.generation import generate
from minillm.lora import LoRALinear, add_lora, unwrap_model
from minillm.tasks import build_model
from minillm.train_config import TrainConfig
from minillm.trainer import Trainer, seed_everything

peft = pytest.importorskip("peft")

V, T, RANK, ALPHA = 100, 16, 4, 32.0
TARGETS = ["q_proj", "v_proj"]

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def causal_lm(seed: int = 0):
    seed_everything(seed)
    fields = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=T, init_std=0.1)
    return build_model(ModelConfig(**fields), "causal-lm")


def peft_lm(seed: int = 0):
    """A minillm CausalLM with peft's LoRA on q_proj and v_proj: everything else frozen by peft."""
    model = causal_lm(seed)
    return peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))


def counting_batches(n: int = 8, seed: int = 0) -> list[dict]:
    """Rows that count up by one from a random start: a pattern a tiny model learns in a few steps."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        start = torch.randint(0, V - 7, (4, 1), generator=g)
        ids = 7 + (start + torch.arange(T)) % (V - 7)  # (4, T)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return batches


def config(tmp_path: Path, name: str, **overrides) -> TrainConfig:
    fields = dict(out_dir=str(tmp_path / name), task="causal-lm", max_steps=8, warmup_steps=0, lr=3e-2,
                  eval_every=0, log_every=1, checkpoint_every=0, progress=False, finetune_mode="keep")
    return TrainConfig(**{**fields, **overrides})


def requires_grad(model) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.named_parameters()}


def train_losses(out_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


# =============================================================================================
# requires_grad as the model arrives
# =============================================================================================


@pytest.mark.parametrize("mode", ["full", "bitfit"])
@pytest.mark.parametrize("given", ["PeftModel", "the model get_peft_model changed in place"])
def test_a_model_frozen_by_peft_is_not_unfrozen(tmp_path, mode, given):
    """finetune_mode="full" (the default) used to make every parameter trainable again: 1,024
    trainable parameters after get_peft_model, all 30,208 after Trainer(...), without a word."""
    model = peft_lm()
    given_model = model if given == "PeftModel" else model.get_base_model()
    flags = requires_grad(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * len(TARGETS) * RANK * (32 + 32)  # 2 blocks, A (r, 32) and B (32, r) per target
    with pytest.raises(ValueError, match=r"finetune_mode='keep'") as err:
        Trainer(given_model, config(tmp_path, mode, finetune_mode=mode), counting_batches())
    assert f"finetune_mode={mode!r}" in str(err.value) and "\n" not in str(err.value)
    assert requires_grad(model) == flags and not (tmp_path / mode).exists()  # refused before touching anything

    trainer = Trainer(given_model, config(tmp_path, "keep", max_steps=1), counting_batches())
    assert requires_grad(model) == flags
    assert trainer.trainable == {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}
    assert trainer.fit()["trainable_parameters"] == trainable


def test_keep_trains_exactly_what_the_caller_left_trainable(tmp_path):
    model = causal_lm()
    model.decoder.embeddings.requires_grad_(False)  # tied to lm_head: frozen too
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    with pytest.raises(ValueError, match=r"requires_grad=False: decoder\.embeddings\.token\.weight"):
        Trainer(model, config(tmp_path, "full", finetune_mode="full"), counting_batches())
    trainer = Trainer(model, config(tmp_path, "keep", max_steps=2), counting_batches())
    trainer.fit()
    after = dict(trainer.raw_model.named_parameters())
    assert frozen and all(torch.equal(after[name], value) for name, value in frozen.items())
    assert trainer.trainable["trainable"] == sum(p.numel() for p in after.values() if p.requires_grad)


# =============================================================================================
# A peft model in the Trainer, its checkpoints and generation
# =============================================================================================


def test_a_peft_lora_model_trains_resumes_and_generates(tmp_path):
    model = peft_lm()
    inner = unwrap_model(model)
    assert type(inner).__name__ == "CausalLM" and inner is model.get_base_model()
    base_before = {n: t.clone() for n, t in inner.state_dict().items() if "lora_" not in n}
    task = counting_batches(1)  # one batch of counting rows, every step: the loss must go down
    full = Trainer(model, config(tmp_path, "full"), task)
    full.fit()

    losses = train_losses(tmp_path / "full")
    assert len(losses) == 8 and all(a > b for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.5, losses
    state = inner.state_dict()
    assert all(torch.equal(state[n], t) for n, t in base_before.items())  # the base, bit for bit
    lora = {n: t for n, t in state.items() if "lora_" in n}
    assert len(lora) == 2 * len(TARGETS) * 2 and all(state[n].abs().max() > 0 for n in lora if "lora_B" in n)
    assert full.raw_model is inner  # the trainer trains the model inside the wrapper

    # Resume: stopped at step 4, continued with a freshly wrapped model, it ends where the full run did.
    def stop_at_4(trainer, row):
        trainer.should_stop = trainer.step == 4

    Trainer(peft_lm(), config(tmp_path, "cut"), task, hooks={"on_step_end": stop_at_4}).fit()
    resumed = Trainer(peft_lm(seed=123), config(tmp_path, "cut", resume=True), task)
    assert resumed.step == 4
    resumed.fit()
    assert train_losses(tmp_path / "cut") == losses
    assert all(torch.equal(resumed.raw_model.state_dict()[n], t) for n, t in state.items())

    # The run's weights carry peft's names: load_model says so instead of failing on them.
    with pytest.raises(ValueError, match="was trained wrapped by peft"):
        ckpt.load_model(tmp_path / "full")

    # Generation takes the PeftModel; greedy tokens equal a step-by-step argmax through peft's forward.
    prompt = counting_batches(1, seed=3)[0]["input_ids"][:2, :5]
    out = generate(model, prompt, max_new_tokens=4)
    ids = prompt
    with torch.no_grad():
        for _ in range(4):
            ids = torch.cat((ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, ids)
    with model.disable_adapter():  # the adapters are what the model generates with
        assert not torch.equal(generate(model, prompt, max_new_tokens=4), out)


# =============================================================================================
# peft's LoRA and minillm's LoRALinear compute the same thing
# =============================================================================================


def test_peft_lora_equals_minillm_lora():
    """Same A, B, alpha and rank on q_proj and v_proj: the same logits (fp32 tolerance)."""
    ours, theirs = causal_lm(), peft_lm()
    add_lora(ours, RANK, ALPHA, targets=tuple(TARGETS))
    wrapped = {name: m for name, m in ours.named_modules() if isinstance(m, LoRALinear)}
    g = torch.Generator().manual_seed(0)
    peft_layers = dict(unwrap_model(theirs).named_modules())
    with torch.no_grad():
        for name, layer in wrapped.items():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))  # B != 0: the update counts
            theirs_layer = peft_layers[name]
            theirs_layer.lora_A["default"].weight.copy_(layer.lora_A)  # (r, in)
            theirs_layer.lora_B["default"].weight.copy_(layer.lora_B)  # (out, r)
            assert theirs_layer.scaling["default"] == layer.scaling == ALPHA / RANK
    assert len(wrapped) == 2 * len(TARGETS)
    ids = counting_batches(1, seed=5)[0]["input_ids"]
    ours.eval(), theirs.eval()
    expected, got = ours(ids).logits, theirs(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with theirs.disable_adapter():
        assert (theirs(input_ids=ids).logits - expected).abs().max() > 1e-2  # the update is not negligible
