"""How large is a LoRA run's checkpoint? The tiny presets, fine-tuned with finetune_mode="lora".

    python benchmarks/lora_checkpoint_size.py            # prints one line per preset

For each preset (tiny: GPT causal-lm; tiny-bert: classification), a base run of 1 step is saved,
then a LoRA run (rank 8, every target) of 2 steps starts from it (init_from). Printed: the bytes of
the base's model.safetensors, of the LoRA checkpoint's model.safetensors and of its whole
step directory (optimizer state included), and the trainable parameters.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from minillm import checkpoint as ckpt
from minillm.config import preset
from minillm.tasks import build_model
from minillm.train_config import TrainConfig
from minillm.trainer import Trainer, seed_everything

RUNS = {"tiny": ("causal-lm", "val_loss"), "tiny-bert": ("classification", "accuracy")}


def batches(task: str, vocab: int, n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(7, vocab, (2, 32), generator=g) for _ in range(n)]
    if task == "causal-lm":
        return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": torch.randint(0, 2, (2,), generator=g)}
            for x in ids]


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def measure(name: str, work: Path) -> str:
    task, metric = RUNS[name]
    config = preset(name, num_labels=2) if task == "classification" else preset(name)
    common = dict(task=task, batch_size=2, warmup_steps=0, eval_every=0, progress=False, early_stopping_metric=metric,
                  device="cpu")
    seed_everything(0)
    base = Trainer(build_model(config, task), TrainConfig(out_dir=str(work / f"{name}-base"), max_steps=1, **common),
                   batches(task, config.vocab_size))
    base.fit()
    seed_everything(0)
    lora = Trainer(build_model(config, task),
                   TrainConfig(out_dir=str(work / f"{name}-lora"), max_steps=2, finetune_mode="lora", lora_rank=8,
                               init_from=str(work / f"{name}-base"), **common),
                   batches(task, config.vocab_size))
    lora.fit()
    base_ckpt, lora_ckpt = ckpt.latest_checkpoint(work / f"{name}-base"), ckpt.latest_checkpoint(work / f"{name}-lora")
    return (f"{name} ({task}): base model.safetensors {size(base_ckpt / ckpt.WEIGHTS):,} B; LoRA run "
            f"model.safetensors {size(lora_ckpt / ckpt.WEIGHTS):,} B, step directory {size(lora_ckpt):,} B; "
            f"{lora.trainable['trainable']:,} of {lora.trainable['total']:,} parameters trained")


if __name__ == "__main__":
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for preset_name in RUNS:
            print(measure(preset_name, Path(tmp)))
