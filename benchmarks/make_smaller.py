"""Make it smaller: distillation, pruning and quantization of a small GPT, side by side.

    python benchmarks/make_smaller.py                         # teacher: the tiny GPT, trained here first
    python benchmarks/make_smaller.py --teacher runs/pretrain-gpt
    python benchmarks/make_smaller.py --quick --inputs corpus/  # seconds: the size the tests run
    minillm bench make-smaller --quick                          # the same, through the command line

Arms, each scored on the same validation windows of the teacher's corpus (mean next-token loss):

* the teacher (``--teacher RUN``, or a GPT trained here on ``--inputs``, the embedded corpus by default);
* a student with half the teacher's layers, trained for ``--steps`` steps three ways, from the same
  initial weights and batches: on the labels alone (alpha = 0: "no teacher"), distilled
  (alpha = 0.5, T = 2; Hinton et al., 2015), and distilled from the teacher's blocks
  (init_from_teacher, every other block);
* the teacher pruned without fine-tuning: unstructured magnitude pruning and structured pruning
  of heads and MLP channels (Michel et al., 2019), at 25%, 50% and 75% (--quick: 50% only);
* the teacher's weights quantized to int8 and int4 through ``minillm.checkpoint.quantize_checkpoint``
  when this checkout has it (a row says so when it does not).

Size on disk is the safetensors file of each model (unstructured pruning keeps dense tensors, so
its zeros save nothing on disk). CPU tokens/s: the fastest of 20 forward passes (3 with --quick) of
--batch windows of the corpus's seq_len, in inference mode, after one warm-up pass, with the
threads torch has (its default: one per core). Writes benchmarks/results/make_smaller_cpu.{md,csv,json,png} (``--results``
elsewhere): the table and the chart of validation loss against sparsity.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SPARSITIES = (0.25, 0.5, 0.75)


def quiet(*lines) -> None:
    pass


def weights_bytes(directory: Path) -> int:
    """Bytes of the model weights a checkpoint directory holds (safetensors files)."""
    return sum(f.stat().st_size for f in Path(directory).rglob("*.safetensors"))


def tokens_per_second(model, seq_len: int, batch: int, vocab: int, repeats: int) -> float:
    """Forward passes of (batch, seq_len) random ids on the CPU, in inference mode: tokens per second
    of the fastest of ``repeats`` passes (on a shared machine the fastest is the least disturbed)."""
    import torch

    ids = torch.randint(7, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    model = model.cpu().eval()
    fastest = float("inf")
    with torch.inference_mode():
        model(ids)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(ids)
            fastest = min(fastest, time.perf_counter() - start)
    return batch * seq_len / fastest


class Scorer:
    """Validation loss on the teacher's data and CPU speed of a model, always measured the same way."""

    def __init__(self, teacher_dir: Path, eval_batches: int, batch: int, repeats: int):
        from minillm import checkpoint as ckpt
        from minillm import recipes
        from minillm.data import DataConfig
        from minillm.tasks import get_task

        teacher, configs, self.tokenizer = ckpt.load_model(teacher_dir)
        self.task = get_task(configs["task"])
        self.data = DataConfig.from_dict({**configs["data"], "tokenizer": str(ckpt.resolve_checkpoint(teacher_dir))})
        recipes.prepare_data(self.data, progress=False)
        self.task_data = self.task.datasets(self.data, self.tokenizer, teacher.config, 0)
        self.eval_batches, self.batch, self.repeats = eval_batches, batch, repeats

    def loss(self, model) -> float:
        from minillm.batches import eval_batches
        from minillm.evaluation import evaluate

        data = self.task_data
        batches = eval_batches(data.validation, data.collate, batch_size=self.batch, seed=0, rank=0, world=1)
        return evaluate(model.cpu(), self.task, batches, max_batches=self.eval_batches)["val_loss"]

    def speed(self, model) -> float:
        return tokens_per_second(model, self.data.seq_len, self.batch, model.config.vocab_size, self.repeats)


def row(method: str, model, size: int, scorer: Scorer, note: str = "") -> dict:
    loss = scorer.loss(model)
    return {"method": method, "parameters": model.num_parameters(), "size_bytes": size, "val_loss": loss,
            "tokens_per_s": scorer.speed(model), "note": note}


def train_teacher(args, out: Path) -> Path:
    """A GPT trained on --inputs with `minillm pretrain`'s recipe, at the benchmark's size."""
    from minillm import recipes

    overrides = {"data.inputs": args.inputs, "data.prepared_dir": str(out / "data"), "train.out_dir": str(out / "teacher"),
                 "train.max_steps": str(args.teacher_steps), "train.overwrite": "true", "train.progress": "false",
                 "train.max_minutes": "none", "train.eval_every": "0", "train.warmup_steps": str(max(1, args.teacher_steps // 20))}
    if args.quick:
        overrides.update({"model.n_layers": "2", "model.d_model": "32", "model.n_heads": "4", "model.max_seq_len": "32",
                          "data.vocab_size": "320", "data.seq_len": "32", "data.val_fraction": "0.1",
                          "train.batch_size": "4", "train.eval_batches": "2"})
    else:  # the tiny preset at half its width and context: minutes on two shared CPU cores
        overrides.update({"model.d_model": str(args.d_model), "data.seq_len": str(args.seq_len),
                          "train.batch_size": str(args.batch), "train.eval_batches": "10"})
    configs, _ = recipes.configs("pretrain", "gpt", None, overrides)
    result = recipes.pretrain(configs["model"], configs["data"], configs["train"], echo=quiet, num_samples=0)
    return Path(result["out_dir"])


def distil_arms(args, teacher: Path, teacher_model, out: Path, scorer: Scorer) -> list[dict]:
    """The student three ways: labels only (alpha = 0), distilled, distilled from the teacher's blocks."""
    from minillm.distill import DistillConfig, distill

    layers = max(1, teacher_model.config.n_layers // 2)
    train = {"max_steps": args.steps, "overwrite": True, "progress": False, "eval_every": 0, "max_minutes": None,
             "warmup_steps": max(1, args.steps // 20), "checkpoint_every": 0, "batch_size": args.batch}
    if args.quick:
        train.update(eval_batches=2)
    arms = (("student, no teacher (alpha=0)", DistillConfig(teacher=str(teacher), alpha=0.0)),
            ("student, distilled (T=2, alpha=0.5)", DistillConfig(teacher=str(teacher), temperature=2.0, alpha=0.5)),
            ("student, distilled from teacher blocks", DistillConfig(teacher=str(teacher), temperature=2.0, alpha=0.5,
                                                                     init_from_teacher=True)))
    rows = []
    for i, (name, config) in enumerate(arms):
        run_dir = out / f"student-{i}"
        result = distill(config, {"n_layers": layers}, {**train, "out_dir": str(run_dir)}, echo=quiet)
        from minillm import checkpoint as ckpt

        student, _, _ = ckpt.load_model(run_dir)
        rows.append(row(name, student, weights_bytes(ckpt.resolve_checkpoint(run_dir)), scorer,
                        f"{layers} of {teacher_model.config.n_layers} layers, {args.steps} steps"))
        print(f"  {name}: val loss {rows[-1]['val_loss']:.4f} ({result['summary']['steps']} steps)", flush=True)
    return rows


def prune_arms(teacher: Path, out: Path, scorer: Scorer, sparsities) -> list[dict]:
    """The teacher pruned without fine-tuning: magnitude, heads and MLP channels, at each sparsity."""
    import itertools

    from minillm import checkpoint as ckpt
    from minillm.batches import eval_batches
    from minillm.prune import magnitude_prune, sparsity_of, structured_prune

    rows = []
    train = scorer.task_data.train
    for kind, sparsity in itertools.product(("unstructured", "heads", "mlp"), sparsities):
        model, _, _ = ckpt.load_model(teacher)
        if kind == "unstructured":
            magnitude_prune(model, sparsity)
            note = f"{sparsity_of(model):.0%} of block weights zero (dense on disk)"
        else:
            batches = itertools.islice(eval_batches(train, scorer.task_data.collate, batch_size=scorer.batch, seed=0,
                                                    rank=0, world=1), 4)
            structured_prune(model, kind, sparsity, scorer.task, batches)
            note = (f"{model.config.n_heads} head{'s' if model.config.n_heads > 1 else ''} per block left" if kind == "heads"
                    else f"d_ff {model.config.d_ff} left")
        folder = out / f"pruned-{kind}-{sparsity:g}"
        ckpt.save_model(folder, model, task=scorer.task.name)
        rows.append({**row(f"pruned, {kind}, {sparsity:.0%}", model, weights_bytes(folder), scorer, note),
                     "kind": kind, "sparsity": sparsity})
        print(f"  pruned {kind} {sparsity:.0%}: val loss {rows[-1]['val_loss']:.4f}", flush=True)
    return rows


def quantize_arms(teacher: Path, out: Path, scorer: Scorer) -> list[dict]:
    """int8 per channel and int4 in groups of 32, symmetric (``minillm.checkpoint.quantize_checkpoint``)."""
    from minillm import checkpoint as ckpt

    rows = []
    for bits, group_size in ((8, None), (4, 32)):
        folder = out / f"quantized-int{bits}"
        ckpt.quantize_checkpoint(teacher, folder, bits, group_size, "symmetric")
        model, _, _ = ckpt.load_model(folder)
        where = "per channel" if group_size is None else f"groups of {group_size}"
        rows.append(row(f"quantized, int{bits}", model, weights_bytes(folder), scorer,
                        f"symmetric, {where}; dequantized in PyTorch on CPU"))
        print(f"  quantized int{bits}: val loss {rows[-1]['val_loss']:.4f}", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    def cell(value, spec):
        return "n/a" if value is None else format(value, spec)

    lines = ["| method | parameters | size on disk | val loss (nats/token) | CPU tokens/s | note |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        size = "n/a" if r["size_bytes"] is None else f"{r['size_bytes'] / 1e6:.2f} MB"
        lines.append(f"| {r['method']} | {cell(r['parameters'], ',')} | {size} | "
                     f"{cell(r['val_loss'], '.4f')} | {cell(r['tokens_per_s'], ',.0f')} | {r['note']} |")
    return "\n".join(lines)


def plot(teacher_loss: float, rows: list[dict], path: Path, title: str) -> None:
    """Validation loss against sparsity, one line per kind of pruning, the teacher at 0."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for kind, style in (("unstructured", "o-"), ("heads", "s--"), ("mlp", "^-.")):
        points = [(0.0, teacher_loss)] + [(r["sparsity"], r["val_loss"]) for r in rows if r.get("kind") == kind]
        ax.plot([p[0] for p in points], [p[1] for p in points], style, label=kind)
    ax.set_xlabel("sparsity (fraction of block weights / heads / MLP channels removed)")
    ax.set_ylabel("validation loss (nats/token), no fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default=None, help="a trained GPT run (default: train one here)")
    parser.add_argument("--inputs", default="default", help="corpus to train the teacher on (default: the embedded one)")
    parser.add_argument("--teacher-steps", type=int, default=None, help="teacher steps (default 300; --quick 4)")
    parser.add_argument("--steps", type=int, default=None, help="student steps, each arm (default 150; --quick 3)")
    parser.add_argument("--eval-batches", type=int, default=None, help="validation batches (default 20; --quick 2)")
    parser.add_argument("--batch", type=int, default=None, help="windows per batch (default 16; --quick 4)")
    parser.add_argument("--d-model", type=int, default=64, help="width of the teacher trained here (default 64)")
    parser.add_argument("--seq-len", type=int, default=64, help="window of the teacher trained here (default 64)")
    parser.add_argument("--quick", action="store_true", help="a tiny model and a few steps: seconds, for the tests")
    parser.add_argument("--out", default="runs/make-smaller", help="where the runs go")
    parser.add_argument("--results", default=str(RESULTS), help="where the table, CSV, JSON and chart go")
    args = parser.parse_args(argv)
    quick = args.quick
    args.teacher_steps = args.teacher_steps or (4 if quick else 300)
    args.steps = args.steps or (3 if quick else 150)
    args.eval_batches = args.eval_batches or (2 if quick else 20)
    args.batch = args.batch or (4 if quick else 16)
    for name in ("teacher_steps", "steps", "eval_batches", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(args, name)}")

    import torch

    from minillm import checkpoint as ckpt

    out = Path(args.out)
    started = time.perf_counter()
    teacher = Path(args.teacher) if args.teacher else train_teacher(args, out)
    try:
        teacher_dir = ckpt.resolve_checkpoint(teacher)
    except FileNotFoundError as err:
        parser.error(f"--teacher: {err}")
    teacher_model, configs, _ = ckpt.load_model(teacher_dir)
    if configs["task"] != "causal-lm":
        parser.error(f"--teacher: expected a GPT (task causal-lm), got task {configs['task']!r}")
    scorer = Scorer(teacher_dir, args.eval_batches, args.batch, repeats=3 if quick else 20)
    device = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads), torch {torch.__version__}"
    c = teacher_model.config
    size = f"teacher {c.n_layers} layers x {c.d_model} wide, {c.n_heads} heads, vocab {c.vocab_size}, seq_len {scorer.data.seq_len}"
    print(f"{device}; {size}; teacher {teacher_dir}", flush=True)

    rows = [row("teacher", teacher_model, weights_bytes(teacher_dir), scorer, f"{c.n_layers} layers")]
    rows += distil_arms(args, teacher_dir, teacher_model, out, scorer)
    pruned = prune_arms(teacher_dir, out, scorer, (0.5,) if quick else SPARSITIES)
    rows += pruned
    rows += quantize_arms(teacher_dir, out, scorer)

    table = markdown(rows)
    print(table)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = results / ("make_smaller_quick_cpu" if quick else "make_smaller_cpu")
    command = "python benchmarks/make_smaller.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (f"{size}; {args.steps} student steps; val loss over {args.eval_batches} batches of {args.batch}; "
              f"{device}\n\n`{command.strip()}`\n\n")
    stem.with_suffix(".md").write_text(header + table + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["method", "parameters", "size_bytes", "val_loss", "tokens_per_s", "note"],
                            extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    stem.with_suffix(".csv").write_text(buffer.getvalue())
    summary = {"device": device, "size": size, "teacher": str(teacher_dir), "command": command.strip(),
               "student_steps": args.steps, "eval_batches": args.eval_batches, "batch": args.batch, "rows": rows,
               "seconds": time.perf_counter() - started}
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(rows[0]["val_loss"], pruned, stem.with_suffix(".png"), f"{size}\n{device}")
    print(f"wrote {stem}.md, .csv, .json, .png ({summary['seconds']:.0f} s)")
    return summary


if __name__ == "__main__":
    main()
