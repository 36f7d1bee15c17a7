"""The training loop: exact resume, accumulation = large batch, torchrun = single process,
NaN handling, early stopping, per-task losses, bad input, and the metrics.

Everything runs on CPU with tiny models (C=32, 2 layers, T<=16, V=100) and synthetic tokens.
This file is also the worker that `test_torchrun_matches_single_process` launches under torchrun.
"""

from __future__ import annotations

import json
import math
import warnings
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minillm import checkpoint as ckpt
from minillm.config import ModelConfig
from minillm.metrics import (
    MetricsLog, accuracy, binary_f1, classification_metrics, confusion_matrix, macro_f1, mcc, perplexity, plot_metrics,
    read_metrics,
)
from minillm.batches import train_batches
from minillm.tasks import build_model, get_task
from minillm.train_config import TrainConfig
from minillm.trainer import Trainer, seed_everything

V, T = 100, 16


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=T)
    return ModelConfig(**{**fields, **overrides})


class Sequences(torch.utils.data.Dataset):
    """Random token sequences of lengths in [min_len, T]; labels follow the causal-lm convention."""

    def __init__(self, n: int, seed: int, min_len: int = T):
        rng = np.random.default_rng(seed)
        self.rows = [rng.integers(7, V, size=rng.integers(min_len, T + 1)) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.rows[i]


class PadCollator:
    """Right-pad; labels -100 at padding. With `drop` > 0, also hides random labels, drawing from
    `self.rng()` the way minillm's MLM collator does (so the trainer must seed it per batch)."""

    def __init__(self, drop: float = 0.0):
        self.drop = drop
        self.rng = lambda: np.random.default_rng()  # unseeded on purpose: the trainer replaces it

    def __call__(self, rows: list[np.ndarray]) -> dict[str, torch.Tensor]:
        L = max(len(r) for r in rows)
        ids = np.zeros((len(rows), L), dtype=np.int64)
        mask = np.zeros_like(ids)
        for b, r in enumerate(rows):
            ids[b, : len(r)], mask[b, : len(r)] = r, 1
        labels = np.where(mask == 1, ids, -100)
        if self.drop:
            labels[self.rng().random(labels.shape) < self.drop] = -100
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                "labels": torch.from_numpy(labels)}


def train_config(tmp_path: Path, name: str, **overrides) -> TrainConfig:
    """fp32 unless a test says otherwise: several compare runs exactly (accumulation against one batch,
    torchrun against one process), and precision="auto" is bf16 autocast on a CPU with native bf16."""
    fields = dict(out_dir=str(tmp_path / name), task="causal-lm", batch_size=4, max_steps=6, warmup_steps=2,
                  lr=3e-3, eval_every=0, eval_batches=2, log_every=1, checkpoint_every=0, progress=False,
                  precision="fp32")  # overrides win: {**fields, **overrides}
    return TrainConfig(**{**fields, **overrides})


def make_model(seed: int = 0, task: str = "causal-lm", **overrides):
    seed_everything(seed)
    return build_model(tiny_config(**overrides), task)


def train_losses(out_dir: str | Path) -> torch.Tensor:
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return torch.tensor([r["loss"] for r in records if r["kind"] == "train"], dtype=torch.float64)


def parameters(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# =============================================================================================
# Resume
# =============================================================================================


def test_resume_is_bit_exact(tmp_path):
    """Stop at step 3, resume to 8: the same per-step losses and weights as 8 uninterrupted steps.
    Dropout, random label dropping in the collator, accumulation and an evaluation in between all
    consume or depend on random state that the checkpoint must carry."""
    data, val = Sequences(40, seed=1, min_len=10), Sequences(8, seed=2)
    settings = dict(max_steps=8, grad_accum_steps=2, eval_every=4, checkpoint_every=0)

    full = Trainer(make_model(resid_dropout=0.1, attn_dropout=0.1), train_config(tmp_path, "full", **settings),
                   data, val, collate_fn=PadCollator(drop=0.2))
    full.fit()

    def stop_at_3(trainer, row):
        if trainer.step == 3:
            trainer.should_stop = True

    first = Trainer(make_model(resid_dropout=0.1, attn_dropout=0.1), train_config(tmp_path, "cut", **settings),
                    data, val, collate_fn=PadCollator(drop=0.2), hooks={"on_step_end": stop_at_3})
    summary = first.fit()
    assert summary["stopped"] == "hook" and summary["steps"] == 3
    assert ckpt.latest_checkpoint(tmp_path / "cut").name == "step_000003"

    # A fresh process would rebuild the model with other random weights: resume must replace them.
    resumed = Trainer(make_model(seed=123, resid_dropout=0.1, attn_dropout=0.1),
                      train_config(tmp_path, "cut", resume=True, **settings), data, val, collate_fn=PadCollator(drop=0.2))
    assert resumed.step == 3
    resumed.fit()

    expected, got = train_losses(tmp_path / "full"), train_losses(tmp_path / "cut")
    assert len(expected) == 8 and len(got) == 8
    assert torch.equal(expected, got), (expected, got)
    for name, value in parameters(full.raw_model).items():
        assert torch.equal(value, resumed.raw_model.state_dict()[name]), name
    # The losses did move: the comparison is not between two constant sequences.
    assert expected[0] != expected[-1]


def test_resume_with_an_iterable_of_batches(tmp_path):
    """Iterables of ready batches are resumed by skipping the batches already consumed."""
    collate = PadCollator()
    data = Sequences(24, seed=3)
    batches = [collate([data[i] for i in range(j, j + 4)]) for j in range(0, 24, 4)]  # 6 batches, cycled
    full = Trainer(make_model(), train_config(tmp_path, "full", max_steps=8), batches)
    full.fit()

    def stop_at_5(trainer, row):
        trainer.should_stop = trainer.step == 5

    Trainer(make_model(), train_config(tmp_path, "cut", max_steps=8), batches, hooks={"on_step_end": stop_at_5}).fit()
    Trainer(make_model(seed=9), train_config(tmp_path, "cut", max_steps=8, resume=True), batches).fit()
    assert torch.equal(train_losses(tmp_path / "full"), train_losses(tmp_path / "cut"))


def test_mlm_batches_are_a_function_of_seed_and_position(tmp_path):
    """minillm's MLM collator draws masks from its own generator; the trainer reseeds it per
    micro-batch, so the k-th batch is the same from a fresh start, after a resume, and when a
    DataLoader worker process builds it."""
    from minillm.data import MLMCollator
    from minillm.tokenizer import Tokenizer

    tok = Tokenizer.train([f"the quick brown fox {i} jumps over the lazy dog {i * 7}" for i in range(100)],
                          tmp_path / "tok", vocab_size=320, n_sentinels=0, num_threads=1)
    texts = [np.array(tok.encode(f"a fox {i} and a dog {i + 1} jump over {i * 3} lazy brown foxes")) for i in range(12)]

    class Texts(torch.utils.data.Dataset):
        def __len__(self):
            return len(texts)

        def __getitem__(self, i):
            return {"input_ids": texts[i]}

    def stream(skip: int, workers: int):
        config = train_config(tmp_path, f"mlm{skip}{workers}", task="mlm", batch_size=3, num_workers=workers)
        model = make_model(task="mlm", arch="encoder", vocab_size=tok.vocab_size)
        trainer = Trainer(model, config, Texts(), collate_fn=MLMCollator(tok, mlm_probability=0.3))
        return train_batches(trainer.train_data, trainer.collate_fn, batch_size=3, seed=config.seed, rank=0, world=1,
                             start=skip, num_workers=workers)  # start: where a resumed run starts

    fresh = stream(0, 0)
    batches = [next(fresh) for _ in range(6)]  # 1.5 epochs
    resumed = stream(4, 1)
    for k in (4, 5):
        got = next(resumed)
        assert all(torch.equal(got[key], batches[k][key]) for key in batches[k]), k
    assert not torch.equal(batches[0]["labels"], batches[4]["labels"])


# =============================================================================================
# Accumulation and data parallelism
# =============================================================================================


def grads_after_accumulate(trainer: Trainer, micro: list[dict]) -> dict[str, torch.Tensor]:
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer._accumulate(micro)
    return {n: p.grad.clone() for n, p in trainer.raw_model.named_parameters() if p.grad is not None}


def test_accumulation_equals_one_large_batch(tmp_path):
    """4 micro-batches of 2 = one batch of 8, although the micro-batches hold different numbers of
    target tokens (variable lengths, padding): gradients, then weights after one optimizer step.
    eps=1 makes Adam's first step proportional to the gradient (with the usual tiny eps the first
    step is sign(g) and would hide a wrongly scaled gradient)."""
    data = Sequences(16, seed=4, min_len=3)
    common = dict(max_steps=1, warmup_steps=0, schedule="constant", lr=0.5, eps=1.0, grad_clip=0.0)
    big = Trainer(make_model(), train_config(tmp_path, "big", batch_size=8, **common), data, collate_fn=PadCollator())
    small = Trainer(make_model(), train_config(tmp_path, "small", batch_size=2, grad_accum_steps=4, **common),
                    data, collate_fn=PadCollator())

    stream = train_batches(data, small.collate_fn, batch_size=2, seed=small.config.seed, rank=0, world=1, start=0)
    micro = [next(stream) for _ in range(4)]
    counts = [int(get_task("causal-lm").target_counts(b)["loss"]) for b in micro]
    assert len(set(counts)) > 1, counts  # the case that per-micro-batch means would get wrong
    large = next(train_batches(data, big.collate_fn, batch_size=8, seed=big.config.seed, rank=0, world=1, start=0))
    width = large["input_ids"].shape[1]
    padded = [torch.nn.functional.pad(b["input_ids"], (0, width - b["input_ids"].shape[1])) for b in micro]
    assert sorted(map(tuple, large["input_ids"].tolist())) == sorted(map(tuple, torch.cat(padded).tolist()))
    g_small, g_big = grads_after_accumulate(small, micro), grads_after_accumulate(big, [large])
    for name in g_big:
        torch.testing.assert_close(g_small[name], g_big[name], rtol=1e-5, atol=1e-7, msg=name)
    # The naive recipe (mean per micro-batch, averaged) gives a different gradient here.
    naive = {n: torch.zeros_like(g) for n, g in g_big.items()}
    for b in micro:
        small.optimizer.zero_grad(set_to_none=True)
        (small.raw_model(**b).loss / 4).backward()
        for n, p in small.raw_model.named_parameters():
            naive[n] += p.grad
    assert max((naive[n] - g_big[n]).abs().max().item() for n in g_big) > 1e-4

    small.optimizer.zero_grad(set_to_none=True)
    big.optimizer.zero_grad(set_to_none=True)
    big.fit()
    small.fit()
    for name, value in big.raw_model.state_dict().items():
        torch.testing.assert_close(small.raw_model.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(big.raw_model.state_dict()["decoder.blocks.0.mlp.fc_in.weight"],
                           make_model().state_dict()["decoder.blocks.0.mlp.fc_in.weight"])


DDP_SETTINGS = dict(max_steps=3, warmup_steps=1, grad_accum_steps=2, lr=1e-2, grad_clip=0.5, precision="fp32")


def ddp_worker(out_dir: str) -> None:
    """Run under torchrun: 2 ranks x batch_size 2, the same data and seed as the reference."""
    torch.set_num_threads(1)
    config = TrainConfig(out_dir=out_dir, task="causal-lm", batch_size=2, device="cpu", progress=False,
                         eval_every=0, log_every=1, **DDP_SETTINGS)
    trainer = Trainer(make_model(), config, Sequences(24, seed=5, min_len=4), Sequences(6, seed=6),
                      collate_fn=PadCollator())
    summary = trainer.fit()
    if trainer.rank == 0:
        Path(out_dir, "summary.json").write_text(json.dumps({"world": trainer.world, "final": summary["final"]}))
    torch.distributed.destroy_process_group()


def test_torchrun_matches_single_process(tmp_path, free_port):
    """2 processes (gloo) with batch_size 2 each = 1 process with batch_size 4, same global batch:
    same weights after 3 steps with accumulation, clipping and padded variable-length batches;
    the same validation loss (each rank evaluates half of the set, then all_reduce)."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port}",
         __file__, str(out)],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    info = json.loads((out / "summary.json").read_text())
    assert info["world"] == 2

    single = Trainer(make_model(), train_config(tmp_path, "single", batch_size=4, device="cpu", **DDP_SETTINGS),
                     Sequences(24, seed=5, min_len=4), Sequences(6, seed=6), collate_fn=PadCollator())
    summary = single.fit()
    distributed, _, _ = ckpt.load_model(out)
    for name, value in single.raw_model.state_dict().items():
        if name.endswith("k_proj.bias"):
            # softmax ignores a shift shared by all keys: this gradient is 0 up to rounding, and
            # Adam scales rounding noise up to a step of its own, different for any reduction order.
            continue
        torch.testing.assert_close(distributed.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert math.isclose(info["final"]["val_loss"], summary["final"]["val_loss"], rel_tol=1e-5)
    torch.testing.assert_close(train_losses(out), train_losses(tmp_path / "single"), rtol=1e-5, atol=1e-6)


# =============================================================================================
# Losses per task equal the models' own mean losses
# =============================================================================================


@pytest.mark.parametrize("task", ["causal-lm", "mlm", "mlm-nsp", "classification", "seq2seq"])
def test_summed_terms_over_counts_equal_the_mean_loss(task):
    arch = {"causal-lm": "decoder", "seq2seq": "encoder-decoder"}.get(task, "encoder")
    model = make_model(task=task, arch=arch, num_labels=3).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(7, V, (3, 9), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "classification":
        batch["labels"] = torch.tensor([0, 2, 1])
    else:
        labels = ids.clone()
        labels[torch.rand(ids.shape, generator=g) < 0.4] = -100
        batch["labels"] = labels
    if task == "mlm-nsp":
        batch["next_sentence_label"] = torch.tensor([0, 1, 1])
    counts = get_task(task).target_counts(batch)
    _, sums = get_task(task).forward(model, batch)
    ours = sum(sums[t] / counts[t] for t in sums)
    torch.testing.assert_close(ours, model(**batch).loss, rtol=1e-6, atol=1e-6)


def task_batches(task: str, n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(7, V, (4, 12), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if task == "classification":
            batch["labels"] = torch.randint(0, 3, (4,), generator=g)
        else:
            labels = torch.randint(7, V, (4, 10 if task == "seq2seq" else 12), generator=g)
            if task in ("mlm", "mlm-nsp"):
                labels[torch.rand(labels.shape, generator=g) < 0.7] = -100
            batch["labels"] = labels
        if task == "mlm-nsp":
            batch["next_sentence_label"] = torch.randint(0, 2, (4,), generator=g)
        out.append(batch)
    return out


@pytest.mark.parametrize("task", ["causal-lm", "mlm", "mlm-nsp", "classification", "seq2seq"])
def test_every_task_trains_and_reports_its_metrics(tmp_path, task):
    arch = {"causal-lm": "decoder", "seq2seq": "encoder-decoder"}.get(task, "encoder")
    model = make_model(task=task, arch=arch, num_labels=3)
    metric = "accuracy" if task == "classification" else "val_loss"
    config = train_config(tmp_path, task, task=task, max_steps=2, early_stopping_metric=metric)
    summary = Trainer(model, config, task_batches(task, 3, 0), task_batches(task, 2, 1)).fit()
    final = summary["final"]
    assert set(final) - {"step"} == set(get_task(task).metrics) - ({"f1"} if task == "classification" else set())
    assert all(math.isfinite(v) for v in final.values())
    assert summary["tokens"] == 2 * 4 * (12 + (10 if task == "seq2seq" else 0))
    if task == "mlm-nsp":
        assert final["val_loss"] == pytest.approx(final["mlm_loss"] + final["nsp_loss"])
        assert final["val_ppl"] == pytest.approx(math.exp(final["mlm_loss"]))


# =============================================================================================
# NaN, early stopping, hooks, outputs
# =============================================================================================


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    def poison_at_3(trainer, row):  # weights blow up after step 3: step 4's loss is NaN
        if trainer.step == 3:
            with torch.no_grad():
                trainer.raw_model.decoder.blocks[0].mlp.fc_in.weight.fill_(float("inf"))

    config = train_config(tmp_path, "nan", max_steps=10, checkpoint_every=2)
    trainer = Trainer(make_model(), config, Sequences(16, seed=7), collate_fn=PadCollator(), hooks={"on_step_end": poison_at_3})
    with pytest.raises(FloatingPointError, match=r"step 4: the training loss is nan.*step_000002"):
        trainer.fit()
    assert ckpt.latest_checkpoint(config.out_dir).name == "step_000002"
    model, _, _ = ckpt.load_model(config.out_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (Path(config.out_dir) / "step_000003").exists()
    # And a checkpoint is never written from non-finite weights.
    with pytest.raises(FloatingPointError, match="non-finite"):
        trainer.save()
    assert ckpt.latest_checkpoint(config.out_dir).name == "step_000002"


def test_early_stopping_best_checkpoint_and_outputs(tmp_path):
    """lr ~ 0: the metric never improves after the first evaluation, so training stops after
    `patience` more evaluations; `best` points at the first; log, CSV and plot are written."""
    n = 24
    rng = np.random.default_rng(8)
    samples = [{"input_ids": torch.from_numpy(rng.integers(7, V, size=8)), "labels": torch.tensor(i % 3)} for i in range(n)]
    config = train_config(tmp_path, "cls", task="classification", lr=1e-30, warmup_steps=0, max_steps=20,
                          eval_every=1, early_stopping_metric="accuracy", early_stopping_patience=2, keep_checkpoints=1)
    batches = [torch.utils.data.default_collate(samples[i : i + 4]) for i in range(0, n, 4)]  # lists: ready batches
    seen = []
    trainer = Trainer(make_model(task="classification", arch="encoder", num_labels=3), config, batches[:4], batches[4:],
                      hooks={"on_eval_end": lambda t, m: seen.append(m["step"])})
    summary = trainer.fit()
    assert summary["stopped"] == "early_stopping" and summary["steps"] == 3, summary
    assert seen == [1, 2, 3]
    assert summary["best_step"] == 1 and os.readlink(Path(config.out_dir) / "best") == "step_000001"
    assert set(summary["final"]) >= {"val_loss", "accuracy", "macro_f1", "mcc"}
    out = Path(config.out_dir)
    assert sorted(p.name for p in out.glob("step_*")) == ["step_000001", "step_000003"]  # best + last kept
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"step", "kind", "loss", "lr", "val_loss", "accuracy"} <= set(header)
    assert (out / "metrics.png").stat().st_size > 1000


def test_regression_head_trains_on_mse(tmp_path):
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(7, V, (4, 8), generator=g), "labels": torch.rand(4, generator=g)}
               for _ in range(3)]
    model = make_model(task="classification", arch="encoder", num_labels=1)
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(model.eval()(batches[2]["input_ids"]).logits.squeeze(-1), batches[2]["labels"])
    config = train_config(tmp_path, "reg", task="classification", max_steps=1, lr=1e-30, warmup_steps=0)
    summary = Trainer(model, config, batches, batches[2:]).fit()
    assert set(summary["final"]) == {"step", "val_loss"}
    assert summary["final"]["val_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_wall_clock_budget_and_bf16_autocast(tmp_path):
    config = train_config(tmp_path, "budget", max_steps=50, max_minutes=1e-9, precision="bf16")
    trainer = Trainer(make_model(), config, task_batches("causal-lm", 2, 0), task_batches("causal-lm", 1, 1))
    with pytest.warns(UserWarning, match=r"max_minutes=1e-09 stopped the run at step 1 of max_steps=50.*max_steps=1"):
        summary = trainer.fit()
    assert summary["stopped"] == "max_minutes" and summary["steps"] == 1
    assert trainer.dtype == torch.bfloat16 and math.isfinite(summary["train_loss"])
    assert ckpt.latest_checkpoint(config.out_dir).name == "step_000001"
    # a budget that is not reached: the schedule finishes, nothing to warn about
    roomy = train_config(tmp_path, "roomy", max_steps=3, max_minutes=60.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*max_minutes")
        assert Trainer(make_model(), roomy, task_batches("causal-lm", 2, 0)).fit()["stopped"] == "max_steps"


# =============================================================================================
# Bad input
# =============================================================================================


@pytest.mark.parametrize("field, value, error", [
    ("lr", -1.0, ValueError), ("lr", "3e-4", TypeError), ("batch_size", 0, ValueError),
    ("batch_size", 4.0, TypeError), ("schedule", "step", ValueError), ("precision", "fp8", ValueError),
    ("task", "gan", ValueError), ("warmup_steps", -1, ValueError), ("grad_clip", -1.0, ValueError),
    ("finetune_mode", "prefix-tuning", ValueError), ("layer_lr_decay", 1.5, ValueError), ("max_minutes", 0.0, ValueError),
    ("early_stopping_metric", "accuracy", ValueError), ("compile", "yes", TypeError),
    ("probe_steps", -1, ValueError), ("probe_steps", 5, ValueError),  # 5: the default task is causal-lm
    ("probe_lr", 0.0, ValueError),
])
def test_bad_config_values_name_the_field(field, value, error):
    with pytest.raises(error, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})


def test_config_round_trip_and_unknown_keys():
    config = TrainConfig(task="mlm-nsp", lr=1e-3, early_stopping_metric="nsp_accuracy")
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 1e-3})


def test_bad_runs_are_refused_clearly(tmp_path):
    data = Sequences(8, seed=0)
    with pytest.raises(FileNotFoundError, match=f"no checkpoint to resume in {tmp_path / 'r'}"):
        Trainer(make_model(), train_config(tmp_path, "r", resume=True), data, collate_fn=PadCollator())
    Trainer(make_model(), train_config(tmp_path, "r", max_steps=1), data, collate_fn=PadCollator()).fit()
    with pytest.raises(FileExistsError, match="already holds a run"):
        Trainer(make_model(), train_config(tmp_path, "r", max_steps=1), data, collate_fn=PadCollator())
    (tmp_path / "r" / "notes.txt").write_text("mine")
    Trainer(make_model(), train_config(tmp_path, "r", max_steps=2, overwrite=True), data, collate_fn=PadCollator())
    # the old run is set aside until the new one's first checkpoint, the user's file stays; the new
    # run's log and TensorBoard events begin
    left = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert left == [".previous-run", "config.toml", "metrics.csv", "metrics.jsonl", "notes.txt", "tensorboard"]
    assert len(list((tmp_path / "r" / "tensorboard").iterdir())) == 1  # the new writer's events file only
    with pytest.raises(ValueError, match="TrainConfig.overwrite"):
        train_config(tmp_path, "r", resume=True, overwrite=True)
    with pytest.raises(ValueError, match="unknown hook"):
        Trainer(make_model(), train_config(tmp_path, "h"), data, hooks={"on_batch": print})
    with pytest.raises(ValueError, match="cannot fill one global micro-batch"):
        Trainer(make_model(), train_config(tmp_path, "s", batch_size=16), data, collate_fn=PadCollator()).fit()

    with pytest.raises(ValueError, match="TrainConfig.precision: 'fp16' needs a CUDA device"):
        Trainer(make_model(), train_config(tmp_path, "p", precision="fp16", device="cpu"), data)

    class Tok:  # only the vocabulary size matters for this check
        vocab_size = V + 1

    with pytest.raises(ValueError, match=f"tokenizer has {V + 1} pieces but the model's vocab_size is {V}"):
        Trainer(make_model(), train_config(tmp_path, "v"), data, tokenizer=Tok())


# =============================================================================================
# Metrics against hand-computed values
# =============================================================================================


def test_classification_metrics_by_hand():
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1])
    preds = torch.tensor([1, 1, 0, 0, 0, 1, 0, 1])
    m = confusion_matrix(preds, labels, 2)
    assert m.tolist() == [[3, 1], [1, 3]]  # TN=3, FP=1, FN=1, TP=3
    assert accuracy(preds, labels) == 6 / 8
    assert binary_f1(m) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert macro_f1(m) == pytest.approx(0.75)
    assert mcc(m) == pytest.approx((3 * 3 - 1 * 1) / math.sqrt(4 * 4 * 4 * 4))  # (TP TN - FP FN) / sqrt(...)

    # 3 classes: rows true, columns predicted
    m3 = torch.tensor([[2, 1, 0], [0, 1, 1], [1, 0, 3]])
    f1 = [2 * 2 / (4 + 1 + 1), 2 * 1 / (2 + 1 + 1), 2 * 3 / (6 + 1 + 1)]
    assert macro_f1(m3) == pytest.approx(sum(f1) / 3)
    c, s, t, p = 6, 9, np.array([3, 2, 4]), np.array([3, 2, 4])
    assert mcc(m3) == pytest.approx((c * s - t @ p) / math.sqrt((s * s - p @ p) * (s * s - t @ t)))
    assert mcc(torch.tensor([[5, 0], [3, 0]])) == 0.0  # one predicted class: defined as 0
    metrics = classification_metrics(m3)
    assert metrics["accuracy"] == pytest.approx(6 / 9) and "f1" not in metrics

    # accuracy over labelled positions only (MLM)
    assert accuracy(torch.tensor([[1, 2, 3]]), torch.tensor([[1, -100, 4]])) == 0.5
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    with pytest.raises(ValueError, match="no labelled positions"):
        accuracy(torch.tensor([1]), torch.tensor([-100]))


def test_metrics_log_resume_truncates_and_plots(tmp_path):
    log = MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.log(step, "train", {"loss": 4.0 - step, "lr": 1e-3})
    log.log(3, "eval", {"val_loss": 2.5, "accuracy": 0.4})
    again = MetricsLog(tmp_path, resume_step=2)  # a run resumed from step 2 redoes step 3
    assert [r["step"] for r in again.records] == [1, 2]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    again.log(3, "eval", {"val_loss": 2.0, "accuracy": 0.5})
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,kind,loss,lr,val_loss,accuracy" and rows[-1] == "3,eval,,,2.0,0.5"
    assert plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "m.png").stat().st_size > 1000


def test_tensorboard_scalars_follow_the_log_through_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars(tag):
        events = EventAccumulator(str(tmp_path / "tensorboard"))
        events.Reload()
        return [(e.step, e.value) for e in events.Scalars(tag)]

    log = MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.log(step, "train", {"loss": 4.0 - step})
    log.log(3, "eval", {"val_loss": 2.5})
    log.close()
    assert scalars("train/loss") == [(1, 3.0), (2, 2.0), (3, 1.0)] and scalars("eval/val_loss") == [(3, 2.5)]
    again = MetricsLog(tmp_path, resume_step=2)  # resumed from step 2: step 3 is redone
    again.log(3, "train", {"loss": 0.5})
    again.close()
    assert scalars("train/loss") == [(1, 3.0), (2, 2.0), (3, 0.5)]


def test_without_tensorboard_the_log_is_written_all_the_same(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now raises ImportError
    log = MetricsLog(tmp_path)
    log.log(1, "train", {"loss": 3.0})
    log.close()
    assert log.tensorboard is None and not (tmp_path / "tensorboard").exists()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "kind": "train", "loss": 3.0}]


def test_plot_metrics_leaves_the_matplotlib_backend_alone(tmp_path):
    import matplotlib

    log = MetricsLog(tmp_path)
    log.log(1, "train", {"loss": 3.0})
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a caller's choice (a notebook's inline backend, say) must survive the plot
    try:
        plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "m.png")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # still a PNG, whatever the backend


if __name__ == "__main__":
    ddp_worker(sys.argv[1])


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_on_a_cpu_with_native_bf16_only(monkeypatch, native):
    from minillm import distributed

    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert distributed.pick_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)
    assert distributed.pick_dtype("fp32", cpu) == torch.float32 and distributed.pick_dtype("bf16", cpu) == torch.bfloat16
