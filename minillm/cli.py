"""The ``minillm`` command: pretrain | finetune | evaluate | generate | prepare | bench.

    minillm pretrain                                  # tiny GPT on the embedded corpus, ~5 min on 2 cores
    minillm pretrain --model bert                     # tiny BERT, MLM + NSP
    minillm finetune                                  # classify stdlib docstrings, from runs/pretrain-bert
    minillm generate --checkpoint runs/pretrain-gpt --prompt "Return the"
    minillm evaluate --checkpoint runs/finetune-bert
    minillm pretrain --config configs/gpt2-124m.toml --data.inputs=corpus/*.txt --train.max_steps=20000

Configuration (pretrain, finetune, prepare): built-in defaults for the chosen ``--model``, then
``--config file.toml`` (sections [model], [data], [train]), then dotted overrides
``--model.n_layers=6``, ``--train.lr=3e-4``, ``--data.inputs=a.txt,b.txt``
(see :mod:`minillm.config_io`). The resolved config is printed and saved as
``<out_dir>/config.toml``. The work itself is done by :mod:`minillm.recipes`.

Errors in what the user gave (a bad value, an unknown key, a missing file) print one line and exit
with status 2. ``MINILLM_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from pathlib import Path

from minillm import config_io
from minillm.config import ModelConfig
from minillm.data import DataConfig
from minillm.train_config import TrainConfig

SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}

# What `--model gpt|bert|seq2seq` means for pretraining: a preset, a task and its batches.
MODEL_KINDS = {
    "gpt": ({"preset": "tiny"}, "causal-lm", "causal"),
    "bert": ({"preset": "tiny-bert"}, "mlm-nsp", "nsp"),
    "seq2seq": ({"preset": "tiny-seq2seq"}, "seq2seq", "seq2seq"),
}

# The default corpus: tokenizer size for the tiny presets, 5% of the documents held out, shards
# under runs/ (never in the source tree).
DATA_DEFAULTS = {"inputs": ["default"], "vocab_size": 4096, "seq_len": 128, "val_fraction": 0.05,
                 "prepared_dir": "runs/data/default"}

# The main job's budget: ~5 minutes on 2 CPU cores, preparation included. max_minutes caps the
# training loop on slower machines; the learning-rate schedule's horizon is max_steps.
PRETRAIN_DEFAULTS = {
    "gpt": {"batch_size": 16, "max_steps": 600, "max_minutes": 4.5, "lr": 2e-3, "warmup_steps": 30,
            "eval_every": 100, "eval_batches": 0, "checkpoint_every": 0, "log_every": 10, "weight_decay": 0.1},
    "bert": {"batch_size": 16, "max_steps": 1000, "max_minutes": 4.5, "lr": 1e-3, "warmup_steps": 50,
             "eval_every": 100, "eval_batches": 20, "checkpoint_every": 0, "log_every": 10, "weight_decay": 0.01,
             "early_stopping_metric": "val_loss"},
    "seq2seq": {"batch_size": 16, "max_steps": 600, "max_minutes": 4.5, "lr": 1e-3, "warmup_steps": 30,
                "eval_every": 100, "eval_batches": 20, "checkpoint_every": 0, "log_every": 10},
}

# About 3 epochs of the stdlib task's 6,355 training docstrings.
# probe_steps: LP-FT from a pretrained checkpoint (skipped from scratch); it lifted the pretrained
# BERT's test accuracy in 7 of 8 paired seeds, +3.6 points on average (README, Known limits).
FINETUNE_DEFAULTS = {"batch_size": 32, "max_steps": 600, "max_minutes": 4.5, "lr": 1e-3, "warmup_steps": 60,
                     "probe_steps": 600,
                     "eval_every": 100, "eval_batches": 0, "checkpoint_every": 0, "log_every": 10,
                     "weight_decay": 0.01, "early_stopping_metric": "mcc"}  # imbalanced classes: accuracy favours the majority
# The classifier reads the mean of the hidden states: from scratch, a [CLS] summary is slow to learn.
FINETUNE_MODEL = {"classifier_pooling": "mean"}

BENCHMARKS = ("attention", "layer_norm", "data", "train")  # `bench all`: the speed benchmarks
EXPERIMENTS = ("finetune",)  # minutes to an hour: run by name only (pretrained vs scratch)


class UsageError(Exception):
    """A mistake in the command line: reported as one line, exit status 2."""


def defaults_for(command: str, kind: str) -> config_io.Layer:
    """The built-in layer under --config and the overrides."""
    model, task, objective = MODEL_KINDS[kind]
    if command == "finetune":  # from `minillm pretrain --model KIND`'s run when there is one
        pretrained = pretrain_dir(kind)
        train = {**FINETUNE_DEFAULTS, "task": "classification", "out_dir": f"runs/finetune-{kind}",
                 "init_from": pretrained if (Path(pretrained) / "latest").is_file() else None}
        # docstrings average ~55 tokens: 64 keeps most of each and halves the padded batch
        data = {**DATA_DEFAULTS, "train_file": "default", "objective": "classification", "seq_len": 64}
        return {"model": {**model, **FINETUNE_MODEL}, "data": data, "train": train}
    return {"model": model, "data": {**DATA_DEFAULTS, "objective": objective},
            "train": {**PRETRAIN_DEFAULTS[kind], "task": task, "out_dir": pretrain_dir(kind)}}


def pretrain_dir(kind: str) -> str:
    return f"runs/pretrain-{kind}"


def resolve(args: argparse.Namespace, overrides: dict[str, str]) -> dict:
    """The run's typed configs, printed."""
    configs = config_io.load_configs(SECTIONS, args.config, overrides, defaults_for(args.command, args.model))
    print(f"# resolved config ({args.command} --model {args.model})")
    print(config_io.to_toml(configs))
    return configs


# --------------------------------------------------------------------------- commands


def cmd_pretrain(args, overrides) -> int:
    from minillm import recipes

    c = resolve(args, overrides)
    recipes.pretrain(c["model"], c["data"], c["train"], before_fit=lambda: config_io.save_configs(c, c["train"].out_dir))
    return 0


def cmd_finetune(args, overrides) -> int:
    from minillm import recipes

    c = resolve(args, overrides)
    if c["train"].init_from is None:
        print(f"note: training from scratch (train.init_from is none); by default finetune starts from "
              f"{pretrain_dir(args.model)}, written by `minillm pretrain --model {args.model}`")
    recipes.finetune(c["model"], c["data"], c["train"], before_fit=lambda: config_io.save_configs(c, c["train"].out_dir))
    return 0


def cmd_prepare(args, overrides) -> int:
    from minillm import recipes

    c = resolve(args, overrides)
    tokenizer, summary = recipes.prepare_data(c["data"], progress=True)
    entropy = recipes.unigram_entropy(summary["prepared_dir"])
    state = "up to date (skipped)" if summary["skipped"] else f"written in {summary['seconds']:.1f} s"
    print(f"{summary['prepared_dir']}: {state}; tokenizer {summary['tokenizer']} ({summary['vocab_size']} pieces); "
          f"train {summary['train_documents']} documents / {summary['train_tokens']:,} tokens, "
          f"val {summary['val_documents']} documents / {summary['val_tokens']:,} tokens; "
          f"unigram entropy {entropy:.3f} nats")
    return 0


def cmd_generate(args, overrides) -> int:
    from minillm import checkpoint as ckpt
    from minillm import recipes

    _no_overrides("generate", overrides)
    model, configs, tokenizer = ckpt.load_model(args.checkpoint)
    if tokenizer is None:
        raise UsageError(f"--checkpoint: {args.checkpoint} has no tokenizer.model to encode the prompt")
    outputs = recipes.sample(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             greedy=args.greedy, seed=args.seed)
    for prompt, text in zip(args.prompt, outputs):
        print(text if isinstance(model, recipes.MaskedLM) else prompt + text)
    return 0


def cmd_evaluate(args, overrides) -> int:
    from minillm import recipes

    data = None
    if overrides or args.config:
        bad = sorted(k for k in overrides if not k.startswith("data."))
        if bad:
            raise UsageError(f"evaluate takes only --data.* overrides, got --{bad[0]}")
        data = config_io.load_configs({"data": DataConfig}, args.config, overrides)["data"]
    recipes.evaluate(args.checkpoint, data=data, batch_size=args.batch_size, max_batches=args.max_batches,
                     device=args.device)
    return 0


def cmd_bench(args, overrides) -> int:
    _no_overrides("bench", overrides)
    folder = _benchmarks_folder()
    names = BENCHMARKS if args.name == "all" else (args.name,)
    for name in names:
        script = folder / f"{name}.py"
        if not script.is_file():
            raise UsageError(f"bench: {script} not found")
        command = [sys.executable, str(script), *args.args]
        print("$ " + " ".join(command), flush=True)
        code = subprocess.call(command)
        if code != 0:
            return code
    return 0


def _benchmarks_folder() -> Path:
    for folder in (Path.cwd() / "benchmarks", Path(__file__).resolve().parent.parent / "benchmarks"):
        if folder.is_dir():
            return folder
    raise UsageError("bench: no benchmarks/ folder (run from a checkout of the minillm repository)")


def _no_overrides(command: str, overrides: dict) -> None:
    if overrides:
        raise UsageError(f"{command} takes no --section.key overrides, got --{next(iter(overrides))}")


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minillm", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pretrain, fine-tune, evaluate and sample small Transformers (BERT, GPT, encoder-decoder).",
        epilog="Config overrides: --model.FIELD=V, --data.FIELD=V, --train.FIELD=V (lists: a,b,c; None: none).\n"
               "Fields: ModelConfig (minillm/config.py), DataConfig (minillm/data/config.py), "
               "TrainConfig (minillm/train_config.py).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def configured(name: str, help: str, description: str):
        p = sub.add_parser(name, help=help, description=description,
                           epilog="Also: --model.FIELD=V --data.FIELD=V --train.FIELD=V overrides "
                                  "(after defaults and --config).")
        p.add_argument("--config", metavar="FILE.toml", help="TOML file with [model], [data], [train] sections")
        p.add_argument("--model", choices=sorted(MODEL_KINDS), default="gpt" if name != "finetune" else "bert",
                       help="gpt: tiny preset, causal LM; bert: tiny-bert, MLM + NSP; seq2seq: tiny-seq2seq, span "
                            "corruption (default: %(default)s)")
        return p

    configured("pretrain", "pretrain a model (default: tiny GPT on the embedded corpus, ~5 min on CPU)",
               "Prepare the corpus, train the tokenizer and the model, report the validation loss next to the "
               "corpus's unigram entropy, print samples, save checkpoint, metrics and plot under runs/.")
    configured("finetune", "fine-tune a classifier (default: stdlib-package task from runs/pretrain-bert)",
               "Sequence classification. Starts from --train.init_from (default runs/pretrain-MODEL when it holds "
               "a checkpoint, else from scratch; --train.init_from=none forces scratch). Default data: the "
               "embedded stdlib-package task (--data.train_file=default); or --data.train_file=train.csv "
               "--data.validation_file=dev.csv. Reports test accuracy next to the majority-class baseline.")
    configured("prepare", "tokenise a corpus into shards (the data step of pretrain)",
               "Train (or load) the tokenizer and write token shards to data.prepared_dir, with progress.")

    p = sub.add_parser("generate", help="sample text from a checkpoint",
                       description="GPT: continue each prompt. Encoder-decoder: greedy output. BERT: fill [MASK].")
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory (its latest checkpoint)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several)")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("evaluate", help="metrics of a checkpoint on held-out data",
                       description="Pretraining checkpoints: the validation split of their data. Classifiers: the "
                                   "test split. --config / --data.* replace the saved data config.")
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory (its latest checkpoint)")
    p.add_argument("--config", metavar="FILE.toml", help="TOML file with a [data] section")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-batches", type=int, default=0, help="0 = the whole held-out set")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")

    p = sub.add_parser("bench", help="run a benchmark script from benchmarks/",
                       description="Runs benchmarks/NAME.py with the remaining arguments (their own --help).")
    p.add_argument("name", choices=(*BENCHMARKS, *EXPERIMENTS, "all"))
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    return parser


COMMANDS = {"pretrain": cmd_pretrain, "finetune": cmd_finetune, "prepare": cmd_prepare,
            "generate": cmd_generate, "evaluate": cmd_evaluate, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``minillm`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if argv[:1] == ["bench"]:  # its arguments belong to the script, dotted or not
            overrides, rest = {}, argv
        else:
            overrides, rest = config_io.parse_overrides(argv)
        args = parser.parse_args(rest)
        if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports; errors still reach stderr
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                return COMMANDS[args.command](args, overrides)
        return COMMANDS[args.command](args, overrides)
    except (UsageError, ValueError, TypeError, FileNotFoundError, FileExistsError, FloatingPointError) as err:
        if os.environ.get("MINILLM_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"minillm: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minillm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
