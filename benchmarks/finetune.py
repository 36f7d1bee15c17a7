"""Does pretraining pay? A pretrained checkpoint against the same model from scratch, fine-tuned alike.

    python benchmarks/finetune.py                                  # runs/pretrain-bert vs scratch
    python benchmarks/finetune.py --init runs/bert-14k --seeds 0 1 --train-examples 1000 0
    python benchmarks/finetune.py --jobs 1 --train.max_steps=300   # any `minillm finetune` override

Each run is `minillm finetune --model bert` (the embedded stdlib-package task unless overrides say
otherwise), once from `--init` and once from scratch (`--train.init_from=none`, the checkpoint's
architecture and tokenizer), for every seed and every label budget (`--data.train_examples`, 0 =
all). The seed sets the initial weights, the data order and which examples a budget keeps; the two
arms of a seed see the same examples. Both arms take the same fine-tuning settings; the head-only
probe (`train.probe_steps`, on by default) runs in the pretrained arm only, as in `minillm finetune`,
since from scratch there is nothing to probe. Runs go `--jobs` at a time, each with cores / jobs threads.

Reported per budget: test accuracy and MCC (validation figures when the data has no test split: say
``--data.test_file`` with your own files), mean and standard deviation over seeds, for both arms,
and the paired difference pretrained - scratch (same seed) with how many seeds it is positive; the
majority-class baseline. Results go to benchmarks/results/finetune_<device>.json and a chart of
MCC and accuracy (beside the majority baseline) against the number of labelled examples to
benchmarks/results/finetune_<device>.png (``--results`` elsewhere). Stopping the benchmark (Ctrl-C,
SIGTERM) stops its runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("pretrained", "scratch")


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


@contextlib.contextmanager
def _workers_stop_with_us(pool: ProcessPoolExecutor):
    """Stop the runs in progress when this process is stopped (Ctrl-C, or SIGTERM from `kill`/`timeout`).

    Left alone, the pool would wait for them to finish (up to train.max_minutes each) or, on
    SIGTERM, leave them running with no parent.
    """
    def on_sigterm(signum, frame):
        raise SystemExit(128 + signum)

    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main_thread else None
    try:
        yield
    except BaseException:
        if hasattr(pool, "terminate_workers"):  # Python >= 3.14
            pool.terminate_workers()
        else:
            for process in list((pool._processes or {}).values()):
                process.terminate()
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def fine_tune(job: dict) -> dict:
    """One `minillm finetune` run (in a worker process); its metrics on the test split (or validation)."""
    import dataclasses

    from minillm import checkpoint, recipes

    overrides = {**job["overrides"], "train.seed": str(job["seed"]), "data.seed": str(job["seed"]),
                 "data.train_examples": str(job["train_examples"]), "train.out_dir": job["out_dir"],
                 "train.progress": "false", "train.overwrite": "true", "train.init_from": job["init"]}
    c, _ = recipes.configs("finetune", "bert", job["config"], overrides)
    if job["arm"] == "scratch":  # the checkpoint's architecture and tokenizer, not its weights
        saved = checkpoint.resolve_checkpoint(job["init"])
        c["model"] = checkpoint.saved_architecture(saved, c["model"])
        c["data"] = dataclasses.replace(c["data"], tokenizer=str(saved / checkpoint.TOKENIZER))
        c["train"] = dataclasses.replace(c["train"], init_from=None)
    result = recipes.finetune(c["model"], c["data"], c["train"], echo=lambda *lines: None)
    return {**{k: job[k] for k in ("arm", "seed", "train_examples")}, "metrics": result["metrics"],
            "split": result["split"],
            "majority_baseline": result["majority_baseline"], "steps": result["summary"]["steps"],
            "n_train": result["n_train"], "start": result["start"]}


def summarise(runs: list[dict]) -> list[dict]:
    """Mean/std per (budget, arm) and the paired pretrained - scratch differences."""
    rows = []
    for budget in sorted({r["train_examples"] for r in runs}, key=lambda n: n or float("inf")):
        by_arm = {arm: {r["seed"]: r for r in runs if r["train_examples"] == budget and r["arm"] == arm}
                  for arm in ARMS}
        seeds = sorted(set(by_arm["pretrained"]) & set(by_arm["scratch"]))
        first = by_arm["scratch"][seeds[0]]
        row = {"train_examples": budget, "n_train": first["n_train"], "seeds": seeds, "split": first["split"],
               "majority_baseline": first["majority_baseline"]}
        for metric in ("accuracy", "mcc"):
            for arm in ARMS:
                values = [by_arm[arm][s]["metrics"][metric] for s in seeds]
                row[f"{arm}_{metric}"] = values
                row[f"{arm}_{metric}_mean"] = statistics.fmean(values)
                row[f"{arm}_{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            diffs = [p - s for p, s in zip(row[f"pretrained_{metric}"], row[f"scratch_{metric}"])]
            row[f"gain_{metric}"] = diffs
            row[f"gain_{metric}_mean"] = statistics.fmean(diffs)
            row[f"gain_{metric}_positive"] = sum(d > 0 for d in diffs)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> list[str]:
    """The summary, one line per label budget: both arms' means, the paired gains, the baseline."""
    lines = [f"{'examples':>8} {'pretrained acc':>15} {'scratch acc':>12} {'acc gain':>9} {'> 0':>5} "
             f"{'pretrained MCC':>15} {'scratch MCC':>12} {'MCC gain':>9} {'> 0':>5} {'majority':>9}"]
    for r in rows:
        seeds = len(r["seeds"])
        lines.append(f"{r['n_train']:>8} {r['pretrained_accuracy_mean']:>15.1%} {r['scratch_accuracy_mean']:>12.1%} "
                     f"{100 * r['gain_accuracy_mean']:>+6.1f} pt {r['gain_accuracy_positive']:>3}/{seeds:<1} "
                     f"{r['pretrained_mcc_mean']:>15.3f} {r['scratch_mcc_mean']:>12.3f} {r['gain_mcc_mean']:>+9.3f} "
                     f"{r['gain_mcc_positive']:>3}/{seeds:<1} {r['majority_baseline']:>9.1%}")
    lines.append(f"on the {rows[0]['split']} split; gain = pretrained - scratch with the same seed (the same training "
                 f"examples), mean over seeds; > 0: for how many seeds it is positive")
    return lines


def plot(rows: list[dict], path: Path, title: str) -> None:
    """MCC and accuracy against the label budget, both arms; accuracy with the majority baseline."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    fig = Figure(figsize=(10, 4))
    ax_mcc, ax_acc = fig.subplots(1, 2)
    x = [r["n_train"] for r in rows]
    split = rows[0]["split"]
    for ax, metric, name in ((ax_mcc, "mcc", f"{split} MCC"), (ax_acc, "accuracy", f"{split} accuracy")):
        for arm, style, shift in zip(ARMS, ("o-", "s--"), (1.0, 1.03)):  # shifted: error bars apart
            ax.errorbar([n * shift for n in x], [r[f"{arm}_{metric}_mean"] for r in rows],
                        yerr=[r[f"{arm}_{metric}_std"] for r in rows], fmt=style, capsize=3, label=arm)
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{n:,}" for n in x])
        ax.minorticks_off()
        ax.set_xlabel("labelled training examples")
        ax.set_ylabel(f"{name} (mean and std over seeds)")
        ax.grid(alpha=0.3)
    ax_acc.plot(x, [r["majority_baseline"] for r in rows], ":", color="gray", label="majority class")
    ax_acc.yaxis.set_major_formatter(lambda value, _: f"{value:.0%}")
    ax_mcc.legend()
    ax_acc.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    from minillm import checkpoint, config_io

    overrides, rest = config_io.parse_overrides(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--init", default="runs/pretrain-bert", help="pretrained checkpoint or run directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--train-examples", type=int, nargs="+", default=[0],
                        help="label budgets (data.train_examples); 0 = every training example")
    parser.add_argument("--jobs", type=int, default=None, help="runs at a time (default: 2 on CPU, 1 on a GPU)")
    parser.add_argument("--config", default=None, help="a finetune TOML file, as for `minillm finetune --config`")
    parser.add_argument("--out", default=None, help="where the runs go (default: a temporary directory)")
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON and the chart go")
    args = parser.parse_args(rest)
    try:
        checkpoint.resolve_checkpoint(args.init)
    except FileNotFoundError as err:
        parser.error(f"--init: {err} (run `minillm pretrain --model bert` first)")
    if any(n < 0 for n in args.train_examples):
        parser.error(f"--train-examples: expected counts >= 0, got {args.train_examples}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: expected distinct seeds, got {args.seeds}")

    import torch

    on_gpu = torch.cuda.is_available()
    jobs = args.jobs or (1 if on_gpu else min(2, os.cpu_count() or 1))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    device = (torch.cuda.get_device_name(0) if on_gpu
              else f"CPU ({os.cpu_count()} cores, {jobs} runs x {threads} threads)")
    print(f"device: {device}; {len(args.seeds)} seeds x {len(args.train_examples)} budgets x 2 arms, from {args.init}")
    with tempfile.TemporaryDirectory(prefix="minillm-finetune-") as tmp:
        out = Path(args.out or tmp)
        work = [{"arm": arm, "seed": seed, "train_examples": n, "init": args.init, "config": args.config,
                 "overrides": overrides, "out_dir": str(out / f"{arm}-n{n}-seed{seed}")}
                for n in args.train_examples for seed in args.seeds for arm in ARMS]
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_set_threads,
                                 initargs=(threads,)) as pool, _workers_stop_with_us(pool):
            runs = []
            for run in pool.map(fine_tune, work):
                print(f"  {run['arm']:<10} examples={run['train_examples'] or 'all':<5} seed={run['seed']}: "
                      f"{run['split']} accuracy {run['metrics']['accuracy']:.1%}, MCC {run['metrics']['mcc']:.3f}",
                      flush=True)
                runs.append(run)
    rows = summarise(runs)
    print("\n".join(table(rows)))
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    kind = "cuda" if on_gpu else "cpu"
    summary = {"device": device, "torch": torch.__version__, "init": args.init, "overrides": overrides,
               "rows": rows, "runs": runs}
    path = results / f"finetune_{kind}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    plot(rows, results / f"finetune_{kind}.png", f"{args.init} vs scratch, {device}")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return summary


if __name__ == "__main__":
    main()
