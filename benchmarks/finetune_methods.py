"""Fine-tuning methods side by side: every finetune_mode on one classification task, and few-shot learning.

    python benchmarks/finetune_methods.py                       # from runs/pretrain-bert (+ runs/pretrain-gpt)
    python benchmarks/finetune_methods.py --tsv glue/SST-2/train.tsv glue/SST-2/dev.tsv --glue-task sst2 \\
        --cloze-verbalizer 0=bad,1=good --label-words bad,good
    python benchmarks/finetune_methods.py --model gpt           # the methods on runs/pretrain-gpt
    python benchmarks/finetune_methods.py --quick --init RUN    # a tiny size, seconds per run (the tests)
    minillm bench finetune-methods -- --seeds 0 1               # the same, through the command

Methods. Every mode of ``minillm.train_config.FINETUNE_MODES`` (but "keep", which trains whatever
the caller left trainable) runs as `minillm finetune --model bert|gpt` (``--model``) from the same
pretrained body (``--init``),
with the same step budget (``--steps``) and data (prefix and prompt tuning: the text cut to what
their virtual tokens leave of ``max_seq_len``), for every seed, each at its own peak learning
rate (``METHOD_LR``: the fewer numbers a method moves, the larger its steps, as in the papers;
``--lr`` sets one rate for all): a mode added to FINETUNE_MODES appears here without a change
(at 1e-3 until it has a rate in METHOD_LR). Settings a mode needs: LoRA rank 8, AdaLoRA from
rank 12 to an average of 8 (warmup a tenth of the steps, the last fifth fixed), freeze: the first
block. The data is the embedded stdlib-docstring task, or ``--tsv TRAIN DEV`` (a GLUE task with
``--glue-task``, any TSV with ``--data.*`` overrides; the dev file is then the reported split).

Every run keeps its best checkpoint by validation MCC (the fine-tuning recipe's choice) and
reports its test figures. Table: trainable parameters, size of the saved weights file (what a run
of the mode keeps: for LoRA, AdaLoRA, adapters, prefixes and prompts the method's own weights and
the head, which load on the base), accuracy and MCC (mean and standard deviation over seeds, on
the test split, or validation when there is none), wall time per run.

Few-shot: ``--shots 16 32 64`` labelled examples per class (``data.train_examples`` = shots x
classes, a seeded random sample, not stratified) for head fine-tuning (mode "full") and PET cloze
(task "cloze", ``--cloze-verbalizer``: one single-token word per label; on the embedded task
``EMBEDDED_WORDS`` unless given), and zero-shot label
scoring with a causal LM (``--gpt``: a GPT checkpoint; ``--label-words``), which trains nothing.
Zero-shot scoring uses no labelled example and nothing random: it runs once. A cloze arm whose
words are not single tokens, or scoring without ``--gpt``, is reported as skipped with the reason.

With ``--model gpt`` the few-shot PET arm is reported as skipped (it needs a masked LM).

Results: benchmarks/results/finetune_methods_<device>.{json,csv,md,png} (``--results``);
finetune_methods_gpt_<device>.* with ``--model gpt``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
QUICK = {"model.max_seq_len": None, "data.seq_len": "32", "train.batch_size": "8", "train.eval_every": "0",
         "train.eval_batches": "2", "train.log_every": "5"}
SKIPPED_MODES = ("keep",)  # trains what the caller left trainable: not a method of its own


# Each method's peak learning rate: full and freeze at the fine-tuning recipe's, the others as in
# notebook 3: a method that moves fewer numbers takes larger steps, as in its paper; prompt tuning,
# which moves the fewest, the largest. --lr sets one for all.
METHOD_LR = {"full": 1e-3, "freeze": 1e-3, "lora": 2e-3, "adalora": 2e-3, "bitfit": 5e-3, "adapter": 1e-3,
             "prefix": 5e-3, "deep-prompt": 1e-2, "prompt": 3e-2}
DEFAULT_LR = 1e-3  # a mode not in METHOD_LR (one added to FINETUNE_MODES later)
# PET's verbalizer for the embedded task: the label's name where the default 4096-piece tokenizer
# keeps it whole, else a one-token word of its package. (Label scoring needs no such thing: it scores
# every label name's tokens.)
EMBEDDED_WORDS = {"asyncio": "asyncio", "distutils": "distutils", "email": "email", "idlelib": "editor",
                  "importlib": "import", "lib2to3": "grammar", "logging": "logging", "tkinter": "widget",
                  "other": "other"}


def mode_overrides(mode: str, steps: int) -> dict[str, str]:
    """The settings a mode needs beyond finetune_mode (module docstring)."""
    if mode == "lora":
        return {"train.lora_rank": "8"}
    if mode == "adalora":
        return {"train.adalora_init_rank": "12", "train.adalora_target_rank": "8",
                "train.adalora_warmup_steps": str(steps // 10), "train.adalora_final_steps": str(steps // 5),
                "train.adalora_mask_interval": str(max(1, steps // 20))}
    if mode == "freeze":
        return {"train.freeze_layers": "1"}
    return {}


def weights_size(out_dir: str) -> int:
    """Bytes of the saved weights file of a run's latest checkpoint."""
    from minillm import checkpoint

    return (checkpoint.resolve_checkpoint(out_dir) / checkpoint.WEIGHTS).stat().st_size


def fine_tune(init: str, overrides: dict[str, str], out_dir: str, family: str = "bert") -> dict:
    """One `minillm finetune` run; its figures, size and wall time."""
    from minillm import checkpoint, recipes

    overrides = {**overrides, "train.init_from": init, "train.out_dir": out_dir, "train.progress": "false",
                 "train.overwrite": "true"}
    c, _ = recipes.configs("finetune", family, None, overrides)
    if c["train"].virtual_tokens is not None:
        # A prefix or soft prompt comes first and shares the body's max_seq_len (64 for the tiny GPT):
        # the text gets what is left, as `minillm finetune` would ask for.
        room = checkpoint.read_configs(init)["model"]["max_seq_len"] - c["train"].virtual_tokens[1]
        if c["data"].seq_len > room:
            c, _ = recipes.configs("finetune", family, None, {**overrides, "data.seq_len": str(room)})
    started = time.perf_counter()
    result = recipes.finetune(c["model"], c["data"], c["train"], echo=lambda *lines: None)
    return {"accuracy": result["metrics"]["accuracy"], "mcc": result["metrics"]["mcc"], "split": result["split"],
            "trainable": result["summary"]["trainable_parameters"], "bytes": weights_size(out_dir),
            "seconds": time.perf_counter() - started, "n_train": result["n_train"],
            "majority_baseline": result["majority_baseline"]}


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict], key: str) -> list[dict]:
    """Mean and spread over seeds for each value of `key` (in order of first appearance)."""
    rows = []
    for name in dict.fromkeys(r[key] for r in runs):
        mine = [r for r in runs if r[key] == name]
        row = {k: mine[0][k] for k in mine[0] if k not in ("seed", "accuracy", "mcc", "seconds", "bytes", "trainable")}
        if "skipped" in mine[0]:
            rows.append(row)
            continue
        for metric in ("accuracy", "mcc", "seconds"):
            row[f"{metric}_mean"], row[f"{metric}_std"] = spread([r[metric] for r in mine])
        row["trainable"], row["bytes"], row["seeds"] = mine[0]["trainable"], mine[0]["bytes"], len(mine)
        rows.append(row)
    return rows


def markdown(rows: list[dict], first: str) -> list[str]:
    lines = [f"| {first} | trainable params | saved file | accuracy | MCC | wall time per run |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r[first]} | | | skipped: {r['skipped']} | | |")
            continue
        size = f"{r['bytes'] / 1e3:,.0f} KB" if r["bytes"] else "nothing (no training)"
        lines.append(f"| {r[first]} | {r['trainable']:,} | {size} | {r['accuracy_mean']:.1%} ± {r['accuracy_std']:.1%} "
                     f"| {r['mcc_mean']:.3f} ± {r['mcc_std']:.3f} | {r['seconds_mean']:.1f} s |")
    return lines


def write_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def plot(methods: list[dict], few_shot: list[dict], path: Path, title: str) -> None:
    """MCC by method (accuracy flatters "always the majority class"), trainable parameters by
    method, and few-shot MCC against labelled examples per class, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in methods if "skipped" not in r]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.5))
    names = [r["method"] for r in done]
    left.bar(names, [r["mcc_mean"] for r in done], yerr=[r["mcc_std"] for r in done], capsize=4)
    left.axhline(0.0, color="gray", linestyle="--", label="majority class (MCC 0)")
    left.set_ylabel("test MCC (mean ± std over seeds)")
    left.legend()
    middle.bar(names, [r["trainable"] for r in done], color="tab:orange")
    middle.set_yscale("log")
    middle.set_ylabel("trainable parameters (log scale)")
    trained = [r for r in few_shot if "skipped" not in r and r["shots"] > 0]
    for arm in dict.fromkeys(r["arm"].rsplit(", ", 1)[0] for r in trained):  # "PET cloze, 16/class" -> "PET cloze"
        points = [r for r in trained if r["arm"].rsplit(", ", 1)[0] == arm]
        right.errorbar([r["shots"] for r in points], [r["mcc_mean"] for r in points],
                       yerr=[r["mcc_std"] for r in points], marker="o", capsize=4, label=arm)
    for r in few_shot:
        if "skipped" not in r and r["shots"] == 0:
            right.axhline(r["mcc_mean"], color="tab:green", linestyle=":", label="zero-shot label scoring (GPT)")
    right.set_xlabel("labelled examples per class")
    right.set_ylabel("test MCC")
    right.set_title("few-shot")
    if right.has_data():
        right.legend()
    for axis in (left, middle):
        axis.tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def zero_shot(gpt: str, data_overrides: dict[str, str], words: list[str] | None, shots: int, seed: int) -> dict:
    """Label scoring with a causal LM (minillm.label_scoring): trains nothing, saves nothing."""
    from minillm.label_scoring import evaluate_checkpoint

    fields = data_fields(data_overrides, ("seq_len", "train_examples", "seed"))
    started = time.perf_counter()
    result = evaluate_checkpoint(gpt, fields, shots=shots, verbalizer=words, seed=seed, echo=lambda *lines: None)
    return {"accuracy": result["accuracy"], "mcc": result["mcc"], "split": result["split"], "trainable": 0,
            "bytes": 0, "seconds": time.perf_counter() - started, "majority_baseline": result["majority_baseline"]}


def main(argv: list[str] | None = None) -> dict:
    from minillm import checkpoint, config_io
    from minillm.train_config import FINETUNE_MODES

    overrides, rest = config_io.parse_overrides(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("bert", "gpt"), default="bert",
                        help="the body the methods fine-tune: `minillm finetune --model bert|gpt` (default: bert)")
    parser.add_argument("--init", default=None, help="its pretrained checkpoint or run directory "
                                                     "(default: runs/pretrain-bert or runs/pretrain-gpt)")
    parser.add_argument("--gpt", default=None, help="a causal-LM checkpoint for zero-shot label scoring "
                                                    "(default: runs/pretrain-gpt when it exists)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps of every run (the "
                        "fine-tuning recipe's)")
    parser.add_argument("--lr", type=float, default=None,
                        help="one peak learning rate for every run (default: each method's own, METHOD_LR)")
    parser.add_argument("--shots", type=int, nargs="*", default=[16, 32, 64], help="few-shot sizes per class")
    parser.add_argument("--tsv", nargs=2, metavar=("TRAIN", "DEV"), default=None, help="a GLUE-style train/dev pair")
    parser.add_argument("--glue-task", default=None, help="the GLUE layout of --tsv (e.g. sst2, cola)")
    parser.add_argument("--cloze-pattern", default=None, help="few-shot PET: data.cloze_pattern")
    parser.add_argument("--cloze-verbalizer", default=None, help="few-shot PET: data.cloze_verbalizer label=word,...")
    parser.add_argument("--label-words", default=None, help="zero-shot scoring: one word per label, W1,W2,...")
    parser.add_argument("--quick", action="store_true", help="a tiny size (short sequences, small batches): tests")
    parser.add_argument("--out", default=None, help="where the runs go (default: a temporary directory)")
    parser.add_argument("--results", default=str(RESULTS), help="where the table and the chart go")
    args = parser.parse_args(rest)
    args.init = args.init or f"runs/pretrain-{args.model}"
    try:
        checkpoint.resolve_checkpoint(args.init)
    except FileNotFoundError as err:
        parser.error(f"--init: {err} (run `minillm pretrain --model {args.model}` first)")
    if args.steps < 1 or any(n < 1 for n in args.shots) or len(set(args.seeds)) != len(args.seeds):
        parser.error("--steps and --shots must be >= 1 and --seeds distinct")
    if args.gpt is None and Path("runs/pretrain-gpt").exists():
        args.gpt = "runs/pretrain-gpt"

    import torch

    if args.lr is not None and args.lr <= 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    # The kept checkpoint is the best by validation MCC, the fine-tuning recipe's choice: by accuracy,
    # "always other" (65% of the embedded task) wins every run that has not yet beaten it.
    base = {"train.max_steps": str(args.steps), "train.warmup_steps": str(args.steps // 10),
            "train.probe_steps": "0"}
    if args.quick:
        base |= {k: v for k, v in QUICK.items() if v is not None}
    if args.tsv:
        base |= {"data.train_file": args.tsv[0], "data.validation_file": args.tsv[1]}
        if args.glue_task:
            base["data.glue_task"] = args.glue_task
    base |= overrides
    if not args.tsv and "data.train_file" not in overrides:  # the embedded task: PET's one-token words
        args.cloze_verbalizer = args.cloze_verbalizer or ",".join(f"{k}={v}" for k, v in EMBEDDED_WORDS.items())
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    modes = [m for m in FINETUNE_MODES if m not in SKIPPED_MODES]
    print(f"device: {device}; {len(modes)} methods x {len(args.seeds)} seeds, {args.steps} steps each, "
          f"from {args.init} ({args.model})")
    method_runs, few_runs = [], []
    with tempfile.TemporaryDirectory(prefix="minillm-methods-") as tmp:
        out = Path(args.out or tmp)
        for mode in modes:
            for seed in args.seeds:
                lr = args.lr if args.lr is not None else METHOD_LR.get(mode, DEFAULT_LR)
                settings = {"train.lr": str(lr), **base, **mode_overrides(mode, args.steps), "train.finetune_mode": mode,
                            "train.seed": str(seed), "data.seed": str(seed)}
                run = {"method": mode, "seed": seed,
                       **fine_tune(args.init, settings, str(out / f"{mode}-{seed}"), args.model)}
                print(f"  {mode:<10} seed={seed}: accuracy {run['accuracy']:.1%}, MCC {run['mcc']:.3f}, "
                      f"{run['trainable']:,} trainable, {run['bytes'] / 1e3:,.0f} KB, {run['seconds']:.1f} s", flush=True)
                method_runs.append(run)
        arms = {"head fine-tuning": {}, "PET cloze": {"train.task": "cloze"}}
        if args.cloze_pattern:
            arms["PET cloze"]["data.cloze_pattern"] = args.cloze_pattern
        if args.cloze_verbalizer:
            arms["PET cloze"]["data.cloze_verbalizer"] = args.cloze_verbalizer
        for shots in args.shots:
            for arm, extra in arms.items():
                if arm == "PET cloze" and args.model != "bert":
                    few_runs.append({"arm": arm, "shots": shots, "seed": 0,
                                     "skipped": "PET fills a [MASK]: it needs a masked LM (--model bert)"})
                    continue
                for seed in args.seeds:
                    lr = args.lr if args.lr is not None else METHOD_LR["full"]
                    settings = {"train.lr": str(lr), **base, **extra, "train.seed": str(seed), "data.seed": str(seed),
                                "data.train_examples": str(shots * num_labels(base))}
                    try:
                        run = fine_tune(args.init, settings, str(out / f"few-{arm[:4]}-{shots}-{seed}"), args.model)
                    except ValueError as err:  # a verbalizer word of several tokens, say
                        few_runs.append({"arm": arm, "shots": shots, "seed": seed, "skipped": str(err)})
                        print(f"  {arm} skipped: {err}", flush=True)
                        break
                    few_runs.append({"arm": arm, "shots": shots, "seed": seed, **run})
        # zero-shot: no labelled example, nothing random: once
        if args.gpt is None:
            few_runs.append({"arm": "zero-shot scoring", "shots": 0, "seed": 0, "skipped": "no --gpt checkpoint"})
        else:
            words = args.label_words.split(",") if args.label_words else None
            try:
                few_runs.append({"arm": "zero-shot scoring", "shots": 0, "seed": 0,
                                 **zero_shot(args.gpt, base, words, 0, 0)})
            except ValueError as err:
                few_runs.append({"arm": "zero-shot scoring", "shots": 0, "seed": 0, "skipped": str(err)})
    methods = summarise(method_runs, "method")
    few = summarise_few(few_runs)
    table = markdown(methods, "method")
    few_table = markdown(few, "arm")
    print("\n".join(table), "\nfew-shot (examples per class in the arm's name):", "\n".join(few_table), sep="\n")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    stem = results / (f"finetune_methods_{kind}" if args.model == "bert" else f"finetune_methods_{args.model}_{kind}")
    summary = {"device": device, "torch": torch.__version__, "model": args.model, "init": args.init, "gpt": args.gpt,
               "settings": base,
               "methods": methods, "few_shot": few, "runs": method_runs, "few_shot_runs": few_runs}
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    stem.with_suffix(".csv").write_text(write_csv(methods + few))
    stem.with_suffix(".md").write_text("\n".join(table + ["", *few_table]) + "\n")
    plot(methods, few, stem.with_suffix(".png"), f"fine-tuning methods on a {args.model.upper()}, {args.steps} steps, {device}")
    print(f"wrote {stem}.json, .csv, .md and .png")
    return summary


def data_fields(settings: dict[str, str], leave_out: tuple[str, ...] = ()) -> dict:
    """The typed DataConfig fields of "data.*" command-line settings (but `leave_out`)."""
    from minillm import config_io
    from minillm.data import DataConfig

    wanted = {k: v for k, v in settings.items() if k.startswith("data.") and k.removeprefix("data.") not in leave_out}
    layer, _ = config_io.user_layer({"data": DataConfig}, None, wanted)
    return layer.get("data", {})


def num_labels(settings: dict[str, str]) -> int:
    """Classes of the task the settings read (for shots x classes training examples)."""
    from minillm.data import DataConfig
    from minillm.data.pipeline import classification_examples

    data = DataConfig.from_dict({"train_file": "default", **data_fields(settings, ("train_examples",))})
    return len(classification_examples(data)["train"].label_map)


def summarise_few(runs: list[dict]) -> list[dict]:
    """Few-shot rows: one per (arm, shots), named "arm, N/class"."""
    named = [{**r, "arm": f"{r['arm']}, {r['shots']}/class"} for r in runs]
    return summarise(named, "arm")


if __name__ == "__main__":
    main()
