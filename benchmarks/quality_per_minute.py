"""Quality per minute: minillm's default recipe against a minimal char-level GPT, same text, same time.

    python benchmarks/quality_per_minute.py --text default --minutes 1,2,5
    python benchmarks/quality_per_minute.py --text book.txt --minutes 1,2
    minillm bench quality-per-minute --text default --minutes 1

The text (a file, or ``default``: the embedded corpus, its documents joined by blank lines) is
normalised (``\\r\\n`` -> ``\\n``, trailing spaces dropped, runs of blank lines -> one blank line,
so that paragraphs are separated by exactly ``\\n\\n``) and split by characters: the first 90%
(at a paragraph boundary) is ``train.txt``, the rest ``heldout.txt``, both in ``--work``.

The two trainers, each for the same training time M (minutes), one after the other:

* minillm: ``python -m minillm pretrain --data.inputs=train.txt --train.max_minutes=M``, its
  defaults otherwise (only where the run and its shards go is set). Its tokenizer is trained on
  train.txt before the clock starts; the table gives that time apart.
* the minimal GPT (``MinimalGPT`` of benchmarks/step.py) with the char-level CPU recipe of a
  well-known minimal GPT trainer: 4 layers, 128 wide, 4 heads, block 64, batch 12, AdamW
  (lr 1e-3, betas (0.9, 0.99), weight decay 0.1), 100 warmup iterations then cosine to 1e-4,
  dropout 0, gradient clipping at 1.0. Its recipe decays over 2000 iterations; here its cosine
  spans the time budget instead (progress = training time / M), so it too ends decayed.

One evaluator scores both on heldout.txt: every symbol once, each from up to its model's
context length of preceding symbols (``minillm.evaluation.CoveringWindows``), summed into the
negative log-likelihood of the whole held-out text plus one end marker; dividing by the same
count, ``len(heldout) + 1`` characters, gives nats per character. The char model's symbols are the
characters (end marker: ``\\n``); minillm's are its tokens, one document per paragraph, each
followed by EOS (which stands for the ``\\n\\n`` between paragraphs and for the end marker): the
coding is checked to be lossless (every paragraph decodes back to itself), so both totals are
code lengths of the same text.

Output: a table on stdout, and ``quality_per_minute_<name>.{json,png}`` in --out (nats/char
against training minutes, both trainers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minillm import checkpoint as ckpt
from minillm.data.collate import IGNORE_INDEX
from minillm.evaluation import CoveringWindows

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step import MinimalGPT, fused_adamw  # noqa: E402  (the baseline, written once)

RESULTS = Path(__file__).resolve().parent / "results"
CHAR_RECIPE = {"layers": 4, "width": 128, "heads": 4, "block": 64, "batch": 12, "lr": 1e-3, "min_lr": 1e-4,
               "warmup": 100, "weight_decay": 0.1, "betas": (0.9, 0.99), "clip": 1.0}


# ---------------------------------------------------------------------------------------------
# The text
# ---------------------------------------------------------------------------------------------


def read_text(source: str) -> str:
    """The text of a file, or of the embedded corpus (``default``: its documents, blank-line joined)."""
    if source == "default":
        from minillm.data.default_corpus import default_corpus_documents

        return "\n\n".join(doc.text for doc in default_corpus_documents())
    path = Path(source)
    if not path.is_file():
        raise SystemExit(f"quality_per_minute: --text {source}: no such file")
    return path.read_text(encoding="utf-8")


def normalise(text: str) -> str:
    """Paragraphs separated by exactly one blank line; no trailing spaces, no blank edges."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def split_text(text: str, train_fraction: float) -> tuple[str, str]:
    """(train, heldout): the first ``train_fraction`` of the characters, cut at the paragraph break
    nearest after that point."""
    cut = text.find("\n\n", int(len(text) * train_fraction))
    if cut < 0:
        raise SystemExit("quality_per_minute: the text has no paragraph break after its first 90%")
    return text[:cut], text[cut + 2:]


# ---------------------------------------------------------------------------------------------
# The one evaluator
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def total_nats(logits_of, tokens: np.ndarray, context_id: int, seq_len: int, batch_size: int = 32) -> float:
    """-ln p of ``tokens``, every token scored once from up to ``seq_len - 1`` tokens before it
    (the first from ``context_id``): ``logits_of(input_ids (B, T)) -> (B, T, V)``."""
    windows = CoveringWindows(tokens, context_id, seq_len)
    total = 0.0
    for start in range(0, len(windows), batch_size):
        items = [windows[k] for k in range(start, min(start + batch_size, len(windows)))]
        input_ids = torch.from_numpy(np.stack([item["input_ids"] for item in items]))  # (B, T)
        labels = torch.from_numpy(np.stack([item["labels"] for item in items]))  # (B, T)
        logits = logits_of(input_ids).float()  # (B, T, V); position t predicts labels[t + 1]
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="sum").item()
    return total


def score_char_model(model: MinimalGPT, heldout: str, stoi: dict[str, int]) -> float:
    tokens = np.array([stoi[ch] for ch in heldout + "\n"], dtype=np.int64)  # the text, then the end marker
    model.eval()
    return total_nats(model.logits, tokens, stoi["\n"], CHAR_RECIPE["block"]) / (len(heldout) + 1)


def score_minillm(run: Path, heldout: str) -> float:
    model, _, tokenizer = ckpt.load_model(run)
    paragraphs = heldout.split("\n\n")
    encoded = [tokenizer.encode(p) for p in paragraphs]
    for paragraph, ids in zip(paragraphs, encoded):
        if tokenizer.decode(ids) != paragraph:
            raise SystemExit(f"quality_per_minute: {run}'s tokenizer does not give back {paragraph[:60]!r}: "
                             f"its nats would not be a code length of the text")
    eos = tokenizer.require("eos")
    tokens = np.array([t for ids in encoded for t in (*ids, eos)], dtype=np.int64)  # EOS after each paragraph
    return total_nats(lambda x: model(x).logits, tokens, eos, model.config.max_seq_len) / (len(heldout) + 1)


# ---------------------------------------------------------------------------------------------
# The two trainers
# ---------------------------------------------------------------------------------------------


def train_char_gpt(train: str, vocab: list[str], minutes: float, seed: int) -> tuple[MinimalGPT, dict]:
    """The char-level recipe for ``minutes`` of training time (module docstring)."""
    r = CHAR_RECIPE
    torch.manual_seed(seed)
    stoi = {ch: i for i, ch in enumerate(vocab)}
    data = torch.tensor([stoi[ch] for ch in train], dtype=torch.long)
    model = MinimalGPT(len(vocab), r["block"], r["width"], r["layers"], r["heads"]).train()
    optimizer = fused_adamw([{"params": [p for p in model.parameters() if p.dim() >= 2]},  # decay: matrices only
                             {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                            r["lr"], betas=r["betas"], weight_decay=r["weight_decay"])
    generator = torch.Generator().manual_seed(seed)
    budget, step, elapsed, loss = 60 * minutes, 0, 0.0, float("nan")
    start = time.perf_counter()
    while elapsed < budget:
        if step < r["warmup"]:
            lr = r["lr"] * (step + 1) / r["warmup"]
        else:  # cosine over the time budget
            progress = min(1.0, elapsed / budget)
            lr = r["min_lr"] + 0.5 * (1 + math.cos(math.pi * progress)) * (r["lr"] - r["min_lr"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(len(data) - r["block"] - 1, (r["batch"],), generator=generator)
        chunk = torch.stack([data[s : s + r["block"] + 1] for s in starts.tolist()])  # (B, block + 1)
        loss = model(chunk[:, :-1], chunk[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r["clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.perf_counter() - start
    return model, {"steps": step, "train_seconds": elapsed, "last_lr": lr, "train_loss": loss.item()}


def train_minillm(train_file: Path, work: Path, minutes: float, extra: list[str]) -> tuple[Path, dict]:
    run = work / f"minillm-{minutes:g}min"
    command = [sys.executable, "-m", "minillm", "pretrain", f"--data.inputs={train_file}",
               f"--train.max_minutes={minutes:g}", f"--train.out_dir={run}",
               f"--data.prepared_dir={work / 'prepared'}", "--train.progress=false", *extra]
    print("  $ " + " ".join(command[2:]), flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"quality_per_minute: minillm pretrain failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    state = torch.load(ckpt.resolve_checkpoint(run) / "state.pt", weights_only=False)  # the run's last checkpoint
    lr_line = next((line for line in done.stdout.splitlines() if line.startswith("learning rate:")), "")
    return run, {"steps": state["step"], "train_seconds": state["train_seconds"], "command_seconds": wall,
                 "schedule": lr_line}


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", default="default", help="a text file, or 'default' (the embedded corpus)")
    parser.add_argument("--minutes", default="1,2,5", help="training times to compare, comma-separated")
    parser.add_argument("--work", default="runs/quality_per_minute", help="where the split text and the runs go")
    parser.add_argument("--out", default=str(RESULTS), help="where the JSON and the chart go")
    parser.add_argument("--name", default=None, help="results name (default: the text's name)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minillm-arg", action="append", default=[],
                        help="an extra override for minillm pretrain (repeatable), e.g. --minillm-arg=--model.n_layers=2")
    args = parser.parse_args()
    try:
        minutes = [float(m) for m in args.minutes.split(",")]
    except ValueError:
        raise SystemExit(f"quality_per_minute: --minutes {args.minutes}: expected numbers separated by commas")
    if not minutes or any(m <= 0 for m in minutes):
        raise SystemExit(f"quality_per_minute: --minutes {args.minutes}: every time must be > 0")
    name = args.name or ("embedded" if args.text == "default" else Path(args.text).stem)
    work = Path(args.work) / name
    work.mkdir(parents=True, exist_ok=True)
    text = normalise(read_text(args.text))
    train, heldout = split_text(text, 0.9)
    train_file = work / "train.txt"
    train_file.write_text(train, encoding="utf-8")
    (work / "heldout.txt").write_text(heldout, encoding="utf-8")
    vocab = sorted(set(text) | {"\n"})  # the char model's vocabulary: every character of the text
    print(f"text: {args.text} ({len(text):,} characters, {len(vocab)} distinct): train {len(train):,}, "
          f"held out {len(heldout):,}; {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
          flush=True)

    rows = []
    for m in minutes:
        print(f"{m:g} min: minimal char-level GPT", flush=True)
        char_model, char_run = train_char_gpt(train, vocab, m, args.seed)
        char_nats = score_char_model(char_model, heldout, {ch: i for i, ch in enumerate(vocab)})
        print(f"  {char_run['steps']} steps in {char_run['train_seconds']:.0f} s: {char_nats:.4f} nats/char", flush=True)
        print(f"{m:g} min: minillm pretrain", flush=True)
        run, ours = train_minillm(train_file, work, m, args.minillm_arg)
        ours_nats = score_minillm(run, heldout)
        print(f"  {ours['steps']} steps in {ours['train_seconds']:.0f} s ({ours['command_seconds']:.0f} s with "
              f"tokenizer, data and report): {ours_nats:.4f} nats/char; {ours['schedule']}", flush=True)
        rows.append({"minutes": m, "minimal_gpt": {**char_run, "nats_per_char": char_nats},
                     "minillm": {**ours, "nats_per_char": ours_nats, "run": str(run)}})

    print("\n| training time | minimal char-level GPT (nats/char) | minillm default recipe (nats/char) |")
    print("| --- | --- | --- |")
    for row in rows:
        a, b = row["minimal_gpt"]["nats_per_char"], row["minillm"]["nats_per_char"]
        print(f"| {row['minutes']:g} min | {a:.3f} ({row['minimal_gpt']['steps']} steps) | "
              f"{'**' if b < a else ''}{b:.3f}{'**' if b < a else ''} ({row['minillm']['steps']} steps) |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"text": args.text, "characters": len(text), "heldout_characters": len(heldout),
              "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
              "char_recipe": CHAR_RECIPE, "rows": rows}
    (out / f"quality_per_minute_{name}.json").write_text(json.dumps(result, indent=2))
    plot(rows, out / f"quality_per_minute_{name}.png", args.text)
    print(f"wrote {out / f'quality_per_minute_{name}.json'} and .png")


def plot(rows: list[dict], path: Path, text: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    x = [row["minutes"] for row in rows]
    for key, label in (("minimal_gpt", "minimal char-level GPT"), ("minillm", "minillm pretrain (defaults)")):
        ax.plot(x, [row[key]["nats_per_char"] for row in rows], marker="o", label=label)
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("held-out nats per character")
    ax.set_title(f"Quality per minute on {'the embedded corpus' if text == 'default' else Path(text).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
