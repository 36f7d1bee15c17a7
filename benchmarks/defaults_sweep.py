"""Defaults chosen by measurement: the GPT pretraining recipe and one-at-a-time variations of it.

    python benchmarks/defaults_sweep.py --text default --cpu-minutes 0.75
    python benchmarks/defaults_sweep.py --only lr=4e-3,vocab_size=8192 --cpu-minutes 0.5
    python benchmarks/defaults_sweep.py --quick          # a few seconds: the plumbing, not a result

The text is normalised and split 90/10 exactly as ``quality_per_minute.py`` does (its functions,
imported): ``train.txt`` is the one input of every run (``text_split`` auto), ``heldout.txt`` is
scored by its one evaluator, ``score_minillm``: nats per character of the held-out text, every
token scored once, so runs with different tokenizers are compared on the same code length.

Method: equal compute. Each run is the recipe of ``minillm pretrain --model gpt`` (preset tiny,
learned positions, LayerNorm, GELU-tanh, biases, vocab 4096, seq_len 64, batch 8, lr 2e-3,
30 warmup steps, cosine fitted to the budget with max_steps=0) with one setting changed, trained in
this process on ONE torch thread (``torch.set_num_threads(1)``) for a budget of process CPU time
(``recipes.train(..., clock=time.process_time)``): the budget and the time-fitted schedule both
follow CPU seconds, so runs are fair to each other on a machine whose cores are shared with other
jobs, where a wall-clock budget would not be. The ranking at equal CPU time on one thread is what
the defaults are chosen from; a machine with more cores or a GPU may rank them differently.
Two more changes from the recipe, the same for every run: the in-training evaluations are off
(``eval_every=0``: their cost differs between variants and would come out of the budget), and
each run writes to its own folder. The tokenizer is trained before the clock starts.

The variations (setting = value; each alone, the rest at the recipe's defaults):

* ``default`` at seeds 0 and 1: the difference between the two is the noise of one run;
* ``vocab_size`` 1024, 2048, 8192 (the tokenizer, hence the embedding and head);
* ``seq_len`` 128, 256, with ``model.max_seq_len`` set to it (the learned position table is
  as long as the training windows, and the evaluator's context is the model's max_seq_len);
* ``batch_size`` 16, 32; ``lr`` 1e-3, 4e-3.

The measured tables in docs/measured/defaults_sweep_cpu*.md were taken when the recipe had
seq_len 128 and batch 16, with the variations seq_len 64 / 256 and batch 8 / 32: their results
made 64 and 8 the recipe's defaults (README, "Quality per minute"); the variations above are the
same values seen from the new defaults.

The rest:

* the modern options, each alone and all together: ``rope`` (rotary positions, no position
  table: 16k fewer parameters), ``rmsnorm``, ``swiglu`` with d_ff = 344 (about 2/3 of 4 x 128,
  rounded to a multiple of 8, so its three matrices hold as many parameters as GELU's two of
  512: 132,096 against 131,072 per block), ``no_bias`` (bias=False: the recipe has biases),
  and ``modern`` (all four).

Output: a table on stdout (setting, value, nats/char, delta against the seed-0 default, steps),
and ``defaults_sweep_<name>.{json,md,png}`` in --out (``<name>`` is ``cpu``; the chart shows each
variant's delta with the seed-to-seed difference as a band). The JSON is rewritten after every
run, so an interrupted sweep keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from minillm import recipes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality_per_minute import normalise, read_text, score_minillm, split_text  # noqa: E402  (written once)

MEASURED = Path(__file__).resolve().parent.parent / "docs" / "measured"
SWIGLU_D_FF = 344  # ~ 2/3 * 4 * 128, a multiple of 8: 3 * 128 * 344 ~ 2 * 128 * 512 parameters


@dataclasses.dataclass(frozen=True)
class Variant:
    """One run of the sweep: the recipe with ``overrides`` ({"section.field": text}, as the CLI's)."""

    setting: str
    value: str
    overrides: dict
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.setting}={self.value}"


MODERN = {"model.pos_encoding": "rope", "model.norm": "rmsnorm", "model.activation": "swiglu",
          "model.d_ff": str(SWIGLU_D_FF), "model.bias": "false"}
# In the order they run: the most informative first, so a sweep cut short still says the most.
VARIANTS = [
    Variant("default", "seed 0", {}),
    Variant("default", "seed 1", {}, seed=1),
    Variant("lr", "1e-3", {"train.lr": "1e-3"}),
    Variant("lr", "4e-3", {"train.lr": "4e-3"}),
    Variant("vocab_size", "1024", {"data.vocab_size": "1024"}),
    Variant("vocab_size", "2048", {"data.vocab_size": "2048"}),
    Variant("vocab_size", "8192", {"data.vocab_size": "8192"}),
    Variant("seq_len", "128", {"data.seq_len": "128", "model.max_seq_len": "128"}),
    Variant("seq_len", "256", {"data.seq_len": "256", "model.max_seq_len": "256"}),
    Variant("modern", "all four", MODERN),
    Variant("batch_size", "16", {"train.batch_size": "16"}),
    Variant("batch_size", "32", {"train.batch_size": "32"}),
    Variant("rope", "pos_encoding=rope", {"model.pos_encoding": "rope"}),
    Variant("rmsnorm", "norm=rmsnorm", {"model.norm": "rmsnorm"}),
    Variant("swiglu", f"activation=swiglu, d_ff={SWIGLU_D_FF}",
            {"model.activation": "swiglu", "model.d_ff": str(SWIGLU_D_FF)}),
    Variant("no_bias", "bias=false", {"model.bias": "false"}),
]
QUICK = {"cpu_minutes": 0.01, "characters": 60_000, "only": ["default=seed 0", "lr=4e-3"], "vocab_size": "512"}


def select(only: str | None) -> list[Variant]:
    """The variants named in ``only`` ("setting=value,..." or "setting,..."; None: all), in sweep order."""
    if only is None:
        return list(VARIANTS)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    known = {v.name for v in VARIANTS} | {v.setting for v in VARIANTS}
    unknown = [w for w in wanted if w not in known]
    if unknown or not wanted:
        raise SystemExit(f"defaults_sweep: --only {only}: unknown {', '.join(unknown) or '(empty)'}; expected "
                         f"settings or setting=value among: {', '.join(v.name for v in VARIANTS)}")
    return [v for v in VARIANTS if v.name in wanted or v.setting in wanted]


def run_variant(variant: Variant, train_file: Path, heldout: str, work: Path, cpu_minutes: float,
                extra: dict) -> dict:
    """Train the recipe with the variant's overrides for ``cpu_minutes`` of process CPU time; score it."""
    overrides = {"data.inputs": str(train_file), "train.max_minutes": f"{cpu_minutes:g}", "train.eval_every": "0",
                 "train.progress": "false", "train.overwrite": "true", "train.seed": str(variant.seed),
                 **extra, **variant.overrides}
    vocab = overrides.get("data.vocab_size", str(recipes.CORPUS["vocab_size"]))
    overrides.setdefault("data.prepared_dir", str(work / f"prepared-vocab{vocab}"))
    overrides["train.out_dir"] = str(work / "runs" / variant.name.replace("=", "_").replace(" ", "_").replace(",", ""))
    configs, sources = recipes.configs("pretrain", "gpt", None, overrides)
    started = time.perf_counter()
    result = recipes.pretrain(configs["model"], configs["data"], configs["train"], echo=None, num_samples=0,
                              sources=sources, clock=time.process_time)
    nats = score_minillm(Path(result["out_dir"]), heldout)
    summary = result["summary"]
    return {"setting": variant.setting, "value": variant.value, "seed": variant.seed, "overrides": variant.overrides,
            "nats_per_char": nats, "steps": summary["steps"], "tokens": summary["tokens"],
            "parameters": result["parameters"], "train_cpu_seconds": summary["train_seconds"],
            "wall_seconds": time.perf_counter() - started, "stopped": summary["stopped"]}


def table(rows: list[dict]) -> list[str]:
    """The markdown table: setting, value, nats/char, delta against the seed-0 default, steps, ..."""
    base = next((r["nats_per_char"] for r in rows if r["setting"] == "default" and r["seed"] == 0), None)
    lines = ["| setting | value | nats/char | delta vs default | steps | tokens | parameters |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        delta = "" if base is None else f"{r['nats_per_char'] - base:+.4f}"
        lines.append(f"| {r['setting']} | {r['value']} | {r['nats_per_char']:.4f} | {delta} | {r['steps']} | "
                     f"{r['tokens']:,} | {r['parameters']:,} |")
    return lines


def noise(rows: list[dict]) -> float | None:
    """|nats/char at seed 1 - at seed 0| of the default recipe, when both ran."""
    seeds = {r["seed"]: r["nats_per_char"] for r in rows if r["setting"] == "default"}
    return abs(seeds[1] - seeds[0]) if {0, 1} <= seeds.keys() else None


def write_results(result: dict, out: Path, name: str) -> None:
    """<out>/defaults_sweep_<name>.json and .md (each written whole, then renamed into place)."""
    out.mkdir(parents=True, exist_ok=True)
    rows, spread = result["rows"], noise(result["rows"])
    md = [f"# Defaults sweep: GPT pretraining at equal CPU time ({result['cpu_minutes']:g} CPU-minutes, 1 thread)", "",
          f"Command: `{result['command']}`", "",
          f"Text: {result['text']} ({result['characters']:,} characters; held out {result['heldout_characters']:,}). "
          f"{result['device']}, torch {result['torch']}, {result['date']}.", "",
          "Method: each run is the `minillm pretrain --model gpt` recipe with one setting changed, on one torch "
          "thread, for a budget of process CPU time (`recipes.train(..., clock=time.process_time)`; the "
          "time-fitted schedule follows the same clock), in-training evaluation off (`eval_every=0`). Scored by "
          "`quality_per_minute.score_minillm`: nats per character of heldout.txt, every token once. The "
          "docstring of benchmarks/defaults_sweep.py says what each variant sets.", "",
          *table(rows), "",
          f"Noise: the default at seeds 0 and 1 differs by {spread:.4f} nats/char." if spread is not None
          else "Noise: the default did not run at both seeds.", ""]
    for suffix, text in (("json", json.dumps(result, indent=2)), ("md", "\n".join(md))):
        path = out / f"defaults_sweep_{name}.{suffix}"
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text)
        os.replace(partial, path)


def plot(rows: list[dict], path: Path, cpu_minutes: float) -> None:
    """Each variant's delta against the seed-0 default, with the seed-to-seed difference as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r["nats_per_char"] for r in rows if r["setting"] == "default" and r["seed"] == 0)
    others = [r for r in rows if not (r["setting"] == "default" and r["seed"] == 0)]
    labels = [f"{r['setting']}: {r['value']}" for r in others]
    deltas = [r["nats_per_char"] - base for r in others]
    fig, ax = plt.subplots(figsize=(8.5, 0.35 * len(others) + 1.5))
    ax.barh(labels, deltas, color=["tab:green" if d < 0 else "tab:red" for d in deltas])
    spread = noise(rows)
    if spread is not None:
        ax.axvspan(-spread, spread, color="grey", alpha=0.25, label=f"seed 0 vs 1 of the default (±{spread:.3f})")
        ax.legend(loc="lower right", fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel(f"held-out nats/char minus the default's ({base:.3f}); lower is better")
    ax.set_title(f"GPT pretraining defaults at {cpu_minutes:g} CPU-minutes, 1 thread", fontsize=10)
    fig.tight_layout()
    partial = path.with_name(path.stem + ".partial" + path.suffix)
    fig.savefig(partial, dpi=120)
    plt.close(fig)
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", default="default", help="a text file, or 'default' (the embedded corpus)")
    parser.add_argument("--cpu-minutes", type=float, default=0.75, help="process CPU time per run, on 1 thread")
    parser.add_argument("--only", default=None, help="comma-separated settings or setting=value to run (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run: {QUICK['cpu_minutes']} CPU-minutes, the text's first "
                             f"{QUICK['characters']:,} characters, vocab {QUICK['vocab_size']}, "
                             f"variants {', '.join(QUICK['only'])} unless --only")
    parser.add_argument("--work", default="runs/defaults_sweep", help="where the split text and the runs go")
    parser.add_argument("--out", default=str(MEASURED), help="where the JSON, table and chart go")
    parser.add_argument("--name", default="cpu", help="results name: defaults_sweep_<name>.*")
    args = parser.parse_args(argv)
    if not args.cpu_minutes > 0:
        raise SystemExit(f"defaults_sweep: --cpu-minutes {args.cpu_minutes:g}: expected a time > 0")
    cpu_minutes = QUICK["cpu_minutes"] if args.quick else args.cpu_minutes
    variants = select(args.only if args.only or not args.quick else ",".join(QUICK["only"]))
    # --quick: a small tokenizer, so the base vocabulary is the one the variants are measured against
    extra = {"data.vocab_size": QUICK["vocab_size"]} if args.quick else {}

    torch.set_num_threads(1)
    text = normalise(read_text(args.text))
    if args.quick:
        text = normalise(text[:QUICK["characters"]])
    train, heldout = split_text(text, 0.9)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train_file = work / "train.txt"
    train_file.write_text(train, encoding="utf-8")
    (work / "heldout.txt").write_text(heldout, encoding="utf-8")
    device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread)"
    print(f"text: {args.text} ({len(text):,} characters): train {len(train):,}, held out {len(heldout):,}; "
          f"{device}; {cpu_minutes:g} CPU-minutes per run, {len(variants)} runs", flush=True)

    result = {"text": args.text, "characters": len(text), "heldout_characters": len(heldout), "device": device,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "command": "python benchmarks/defaults_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "cpu_minutes": cpu_minutes, "clock": "time.process_time", "threads": 1, "rows": []}
    out = Path(args.out)
    for variant in variants:
        row = run_variant(variant, train_file, heldout, work, cpu_minutes, extra)
        result["rows"].append(row)
        print(f"  {variant.name}: {row['nats_per_char']:.4f} nats/char, {row['steps']} steps, {row['tokens']:,} "
              f"tokens, {row['parameters']:,} parameters ({row['train_cpu_seconds']:.0f} CPU-s training, "
              f"{row['wall_seconds']:.0f} s wall with tokenizer and report)", flush=True)
        write_results(result, out, args.name)
    print("\n" + "\n".join(table(result["rows"])))
    spread = noise(result["rows"])
    if spread is not None:
        print(f"noise: the default at seeds 0 and 1 differs by {spread:.4f} nats/char")
    chart = any(r["setting"] == "default" and r["seed"] == 0 for r in result["rows"])  # the deltas' reference
    if chart:
        plot(result["rows"], out / f"defaults_sweep_{args.name}.png", cpu_minutes)
    print(f"wrote {out / f'defaults_sweep_{args.name}'}.json, .md" + (", .png" if chart else ""))
    return result


if __name__ == "__main__":
    main()
