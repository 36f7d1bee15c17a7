"""The ``minillm`` command: pretrain | finetune | evaluate | generate | prepare | distill | prune | quantize | configs | bench.

    minillm pretrain                                  # tiny GPT on the embedded corpus, ~5 min on 2 cores
    minillm pretrain --model bert                     # tiny BERT, MLM + NSP
    minillm finetune                                  # classify stdlib docstrings, from runs/pretrain-bert
    minillm finetune --model seq2seq --data.train_file=train.jsonl --data.validation_file=dev.jsonl
    minillm generate --checkpoint runs/pretrain-gpt --prompt "Return the"
    minillm evaluate --checkpoint runs/finetune-bert
    minillm distill --teacher runs/pretrain-gpt --model.n_layers=2   # a 2-layer student of the teacher
    minillm prune --checkpoint runs/pretrain-gpt --sparsity 0.5 --out runs/pruned
    minillm quantize --checkpoint runs/pretrain-gpt --bits 4 --out runs/gpt-int4   # then generate/evaluate it
    minillm configs                                   # the configs shipped with minillm
    minillm pretrain --config gpt2-124m-gpu --data.inputs=corpus/*.txt --train.max_steps=20000
    python -m minillm --version                       # the same command, without the console script

Configuration (pretrain, finetune, prepare): the defaults of the recipe ``--model`` names
(:data:`minillm.recipes.RECIPES`), then ``--config NAME`` (a shipped config) or ``--config
FILE.toml`` (sections [model], [data], [train]), then dotted overrides ``--model.n_layers=6``, ``--train.lr=3e-4``,
``--data.inputs=a.txt,b.txt`` (see :mod:`minillm.config_io`). Resuming a run
(``--train.resume=true``) starts from the config it was saved with instead of the defaults. The
run resolves and checks everything once (:func:`minillm.recipes.resolve`), prints it and saves
exactly that as ``<out_dir>/config.toml``. The work itself is done by :mod:`minillm.recipes`.

Errors in what the user gave (a bad value, an unknown key, a missing file, a setting that would
have no effect) print one line and exit with status 2; warnings print one line each.
``MINILLM_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

from minillm import __version__, config_io, recipes
from minillm.data import DataConfig
from minillm.label_scoring import evaluate_checkpoint
from minillm.tasks import get_task

BENCHMARKS = ("attention", "layer_norm", "quant_matmul", "data", "train")  # `bench all`: the speed benchmarks
EXPERIMENTS = ("finetune", "make-smaller", "quality-per-minute")  # minutes to an hour: run by name only
SUITES = {"gpu": "gpu_suite"}  # by name only: `bench gpu` runs benchmarks/gpu_suite.py (needs --out)
EXPERIMENTS += ("finetune-methods",)  # every finetune_mode side by side, and few-shot (benchmarks/finetune_methods.py)


class UsageError(Exception):
    """A mistake in the command line: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors reported like every other: one line (``minillm COMMAND --help``
    still shows the usage)."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


# --------------------------------------------------------------------------- commands


def cmd_train(args, overrides) -> int:
    """pretrain and finetune: one road, minillm.recipes.train. The run is resolved and checked
    before anything is printed: a run that cannot start prints its one-line error alone."""
    configs, sources = recipes.configs(args.command, args.model, args.config, overrides)
    model, data, train = configs["model"], configs["data"], configs["train"]
    notes = []
    if args.command == "finetune" and train.init_from is None and not train.resume:
        family = args.model or recipes.DEFAULT_FAMILY["finetune"]
        notes.append(f"note: training from scratch (train.init_from is none); `minillm finetune --model {family}` "
                     f"starts from {recipes.pretrain_dir(family)} when `minillm pretrain --model {family}` has written it")

    def echo(line: str) -> None:  # the notes go out with the run's first line, once it has been checked
        while notes:
            print(notes.pop(0))
        print(line)

    run = recipes.pretrain if args.command == "pretrain" else recipes.finetune
    run(model, data, train, sources=sources, show_config=True, echo=echo)
    return 0


def cmd_prepare(args, overrides) -> int:
    data = recipes.configs("pretrain", args.model, args.config, overrides)[0]["data"]
    tokenizer, summary = recipes.prepare_data(data, progress=True)  # checks the inputs before any output
    entropy = recipes.unigram_entropy(summary["prepared_dir"])
    print(config_io.to_toml({"data": data}))
    state = "up to date (skipped)" if summary["skipped"] else f"written in {summary['seconds']:.1f} s"
    print(f"{summary['prepared_dir']}: {state}; tokenizer {summary['tokenizer']} ({summary['vocab_size']} pieces); "
          f"train {summary['train_documents']} documents / {summary['train_tokens']:,} tokens, "
          f"val {summary['val_documents']} documents / {summary['val_tokens']:,} tokens; "
          f"unigram entropy {entropy:.3f} nats")  # repeats dropped: prepare's own progress says it
    return 0


def cmd_generate(args, overrides) -> int:
    from minillm import checkpoint as ckpt
    from minillm.generation import generate_text
    from minillm.model import CausalLM, MaskedLM

    _no_overrides("generate", overrides)
    model, configs, tokenizer = ckpt.load_model(args.checkpoint)
    if tokenizer is None:
        raise UsageError(f"--checkpoint: {args.checkpoint} has no tokenizer (tokenizer.model, tokenizer.json, "
                         f"vocab.json or vocab.txt) to encode the prompt")
    results = generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=args.greedy,
                            seed=args.seed, num_beams=args.num_beams)
    for result in results:
        # a GPT continues its prompt; an encoder-decoder's output is a text of its own; BERT fills the prompt
        if isinstance(model, CausalLM):
            print(result.prompt + result.text)
        else:
            print(result.text if isinstance(model, MaskedLM) else f"{result.prompt}\n-> {result.text}")
        if result.note:
            print(f"note: {result.note}", file=sys.stderr)
    return 0


AUTO_CLASSES = {"GPT2LMHeadModel": "AutoModelForCausalLM", "BertForPreTraining": "AutoModelForPreTraining",
                "BertForMaskedLM": "AutoModelForMaskedLM",
                "BertForSequenceClassification": "AutoModelForSequenceClassification",
                "T5ForConditionalGeneration": "AutoModelForSeq2SeqLM"}


def cmd_export(args, overrides) -> int:
    from minillm.export import export

    _no_overrides("export", overrides)
    out = export(args.checkpoint, args.out, overwrite=args.overwrite)
    architecture = json.loads((out / "config.json").read_text())["architectures"][0]
    auto = AUTO_CLASSES[architecture]
    print(f"{out}: {architecture} with its tokenizer. Load it with transformers:\n"
          f"  from transformers import {auto}, AutoTokenizer\n"
          f"  model = {auto}.from_pretrained({str(out)!r})\n"
          f"  tokenizer = AutoTokenizer.from_pretrained({str(out)!r})")
    return 0


def cmd_evaluate(args, overrides) -> int:
    bad = sorted(k for k in overrides if not k.startswith("data."))
    if bad:
        raise UsageError(f"--{bad[0]}: evaluate takes only --data.* overrides (on top of the checkpoint's saved data)")
    user, sources = config_io.user_layer({"data": DataConfig}, args.config, overrides)
    scoring = {"--shots": args.shots, "--verbalizer": args.verbalizer, "--template": args.template}
    if args.label_scoring:
        verbalizer = args.verbalizer.split(",") if args.verbalizer else None
        evaluate_checkpoint(args.checkpoint, user.get("data", {}), shots=args.shots or 0, verbalizer=verbalizer,
                            template=args.template, batch_size=args.batch_size, device=args.device)
        return 0
    given = [flag for flag, value in scoring.items() if value is not None]
    if given:
        raise UsageError(f"{given[0]}: only with --label-scoring (zero-/few-shot scoring with a causal LM)")
    recipes.evaluate(args.checkpoint, overrides=user.get("data", {}), sources=sources, batch_size=args.batch_size,
                     max_batches=args.max_batches, device=args.device)
    return 0


def cmd_distill(args, overrides) -> int:
    """Train a student on the teacher's soft targets (minillm.distill): --model.* fields of the
    student, --train.* on top of the teacher's training settings, --distill.* of DistillConfig."""
    from minillm import distill

    user, sources = config_io.user_layer(distill.SECTIONS, args.config, overrides)
    data = sorted(key for key in sources if key.startswith("data."))
    if data:
        raise UsageError(f"{data[0]} (set by {sources[data[0]]}): distill reads the teacher's data; it takes "
                         f"model, train and distill settings")
    if "teacher" in user.get("distill", {}):
        raise UsageError("--distill.teacher: give the teacher with --teacher RUN")
    config = config_io.build_config(distill.DistillConfig, {**user.get("distill", {}), "teacher": args.teacher},
                                    "distill")
    _refuse_unused(sources, "distill", config.fields_without_effect())
    distill.distill(config, user.get("model", {}), user.get("train", {}))
    return 0


def cmd_prune(args, overrides) -> int:
    from minillm.prune import PruneConfig, prune_checkpoint
    from minillm.train_config import TrainConfig

    bad = sorted(k for k in overrides if not k.startswith("train."))
    if bad:
        raise UsageError(f"--{bad[0]}: prune takes only --train.* overrides (for --finetune-steps)")
    if overrides and args.finetune_steps == 0:
        raise UsageError(f"--{next(iter(overrides))}: would have no effect without --finetune-steps")
    user, _ = config_io.user_layer({"train": TrainConfig}, None, overrides)
    config = PruneConfig(checkpoint=args.checkpoint, sparsity=args.sparsity, structured=args.structured,
                         scope=args.scope, importance=args.importance, importance_batches=args.importance_batches,
                         finetune_steps=args.finetune_steps)
    given = {"scope": args.scope != "global", "importance": args.importance != "gradient",
             "importance_batches": args.importance_batches != 8}
    for name, why in config.fields_without_effect().items():
        if given.get(name):
            raise UsageError(f"--{name.replace('_', '-')}: would have no effect: {why}")
    prune_checkpoint(config, args.out, overwrite=args.overwrite, train_overrides=user.get("train", {}))
    return 0


def _refuse_unused(sources: dict[str, str], section: str, unused: dict[str, str]) -> None:
    for name, why in unused.items():
        if f"{section}.{name}" in sources:
            raise UsageError(f"{section}.{name} (set by {sources[f'{section}.{name}']}) would have no effect: {why}")


def cmd_quantize(args, overrides) -> int:
    from minillm import checkpoint as ckpt

    _no_overrides("quantize", overrides)
    group_size = DEFAULT_GROUP_SIZE[args.bits] if args.group_size is None else args.group_size
    group_size = None if group_size == "channel" else group_size
    out = ckpt.quantize_checkpoint(args.checkpoint, args.out, args.bits, group_size, args.scheme)
    spec = ckpt.read_configs(out)[ckpt.QUANTIZATION]
    before, after = Path(spec["source"]) / ckpt.WEIGHTS, out / ckpt.WEIGHTS
    grouping = "one group per output channel" if group_size is None else f"groups of {group_size}"
    sizes = f"{after.stat().st_size / 1e6:.2f} MB"
    if before.is_file():
        sizes = f"{before.stat().st_size / 1e6:.2f} MB -> {sizes}"
    print(f"{out}: {len(spec['layers'])} linear layers as {args.bits}-bit {args.scheme} codes, {grouping}; "
          f"{ckpt.WEIGHTS} {sizes}")
    return 0


def cmd_configs(args, overrides) -> int:
    """The shipped configs: name, the command they run, their model, their one-line description."""
    _no_overrides("configs", overrides)
    rows = [("name", "command", "model", "description")]
    for name, path in config_io.shipped_configs().items():
        rows.append((name, *_what_it_runs(path), config_io.config_description(path)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    return 0


def _what_it_runs(path: Path) -> tuple[str, str]:
    """(command, model) of a config file: ``pretrain --model gpt`` and the preset it names, or where
    a fine-tuning config takes its model from."""
    user, sources = config_io.user_layer(recipes.SECTIONS, path, {})
    task = user.get("train", {}).get("task")
    command = "pretrain" if task is None or get_task(task).from_corpus else "finetune"
    recipe = recipes.choose_recipe(command, None, user, sources)
    init_from = user.get("train", {}).get("init_from")
    model = user.get("model", {}).get("preset") or (f"from {init_from}" if init_from else recipe.model["preset"])
    return f"{command} --model {recipe.family}", model


def cmd_bench(args, overrides) -> int:
    _no_overrides("bench", overrides)
    folder = _benchmarks_folder()
    names = BENCHMARKS if args.name == "all" else (args.name,)
    for name in names:
        script = folder / f"{SUITES.get(name, name.replace('-', '_'))}.py"  # make-smaller: make_smaller.py
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


# --group-size when it is not given: per-channel int8, groups of 128 for int4.
DEFAULT_GROUP_SIZE = {8: "channel", 4: 128}


def _group_size(text: str):
    if text == "channel":
        return text
    return _at_least(1)(text)


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="minillm", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pretrain, fine-tune, evaluate and sample small Transformers (BERT, GPT, encoder-decoder).\n"
                    "`python -m minillm` is the same command.",
        epilog="Config overrides: --model.FIELD=V, --data.FIELD=V, --train.FIELD=V (lists: a,b,c; None: none).\n"
               "Fields: ModelConfig (minillm/config.py), DataConfig (minillm/data/config.py), "
               "TrainConfig (minillm/train_config.py).",
    )
    parser.add_argument("--version", action="version", version=f"minillm {__version__}",
                        help="print 'minillm VERSION' and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="one of these (`minillm COMMAND --help` shows its options):")

    def configured(name: str, help: str, description: str, models: str):
        p = sub.add_parser(name, help=help, description=description,
                           epilog="Also: --model.FIELD=V --data.FIELD=V --train.FIELD=V overrides "
                                  "(after the recipe's defaults and --config).")
        p.add_argument("--config", metavar="NAME|FILE.toml",
                       help="a shipped config by name (`minillm configs` lists them) or a TOML file with [model], "
                            "[data], [train] sections")
        p.add_argument("--model", choices=recipes.families("finetune" if name == "finetune" else "pretrain"),
                       default=None, help=models)
        return p

    configured("pretrain", "pretrain a model (default: tiny GPT on the embedded corpus, ~5 min on CPU)",
               "Prepare the corpus, train the tokenizer and the model, report the validation loss next to the "
               "corpus's unigram entropy, print samples, save checkpoint, metrics and plot under runs/.",
               "gpt: tiny preset, causal LM (the default); bert: tiny-bert, MLM + NSP; seq2seq: tiny-seq2seq, span "
               "corruption; t5: tiny-t5, span corruption; xlnet: tiny-xlnet, permutation LM. Without --model, the "
               "task of --config/--train.task picks the recipe")
    configured("finetune", "fine-tune on labelled data (default: classify stdlib docstrings from runs/pretrain-bert)",
               "bert/gpt/xlnet: sequence classification; the default data is the embedded stdlib-package task "
               "(--data.train_file=default), or --data.train_file=train.csv --data.validation_file=dev.csv "
               "[--data.test_file=test.csv]; reports accuracy next to the majority-class baseline. seq2seq/t5: "
               "(source, target) pairs from --data.train_file/--data.validation_file[/--data.test_file], "
               "columns --data.text_field and --data.target_field; reports BLEU and chrF next to copying the source. "
               "Starts from --train.init_from (default runs/pretrain-MODEL when it holds a checkpoint, else from "
               "scratch; --train.init_from=none forces scratch).",
               "bert (the default), gpt, xlnet: classification; seq2seq, t5: pairs. Which pretrained family and "
               "task (see above)")
    configured("prepare", "tokenise a corpus into shards (the data step of pretrain)",
               "Train (or load) the tokenizer and write token shards to data.prepared_dir, with progress.",
               "whose data defaults to use (the same for every family today)")

    p = sub.add_parser("generate", help="sample text from a checkpoint",
                       description="GPT: continue each prompt (past max_seq_len the window slides). Encoder-decoder: "
                                   "the output for each prompt, on a line of its own. Both sample (temperature, "
                                   "top-k, top-p) unless --greedy; --num-beams searches an encoder-decoder's output. "
                                   "BERT: fill [MASK]. A note on stderr says when an output is not plainly what was "
                                   "asked (fewer tokens, a cropped prompt).")
    p.add_argument("--checkpoint", metavar="DIR", required=True,
                   help="checkpoint or run directory (its latest checkpoint)")
    p.add_argument("--prompt", metavar="TEXT", action="append", required=True, help="prompt text (repeat for several)")
    p.add_argument("--max-new-tokens", metavar="N", type=_at_least(1), default=50,
                   help="tokens to generate per prompt (default: %(default)s)")
    p.add_argument("--temperature", metavar="T", type=float, default=0.8,
                   help="sampling temperature (default: %(default)s)")
    p.add_argument("--top-k", metavar="K", type=_at_least(1), default=40,
                   help="sample from the K most likely tokens (default: %(default)s)")
    p.add_argument("--top-p", metavar="P", type=float, default=None,
                   help="sample from the smallest set of tokens holding probability P (default: off)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    p.add_argument("--num-beams", metavar="N", type=_at_least(1), default=1,
                   help="beam search (encoder-decoder, with --greedy; default: %(default)s, no search)")
    p.add_argument("--seed", metavar="N", type=int, default=0, help="seed of the sampling (default: %(default)s)")

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face transformers folder",
                       description="Weights, config.json, generation_config.json (GPT) and the tokenizer "
                                   "(tokenizer.json), so that transformers' Auto classes and pipelines load the "
                                   "folder alone: GPT as GPT2LMHeadModel, BERT as BertForPreTraining / "
                                   "BertForMaskedLM / BertForSequenceClassification. LoRA updates are merged.")
    p.add_argument("--checkpoint", metavar="DIR", required=True, help="checkpoint or run directory (its latest checkpoint)")
    p.add_argument("--out", metavar="DIR", required=True, help="the folder to write (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out (never other files)")

    p = sub.add_parser("evaluate", help="metrics of a checkpoint on held-out data",
                       description="The test split of the checkpoint's task when it has one, else its validation "
                                   "split, from the data config saved with it; --config [data] and --data.* "
                                   "overrides go on top of the saved one.")
    p.add_argument("--checkpoint", metavar="DIR", required=True,
                   help="checkpoint or run directory (its latest checkpoint)")
    p.add_argument("--config", metavar="FILE.toml", help="TOML file with a [data] section")
    p.add_argument("--batch-size", metavar="N", type=_at_least(1), default=32,
                   help="examples per batch (default: %(default)s)")
    p.add_argument("--max-batches", metavar="N", type=_at_least(0), default=0,
                   help="evaluate on the first N batches (default: 0, the whole held-out set)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU when there is one (default: %(default)s)")
    p.add_argument("--label-scoring", action="store_true",
                   help="classify by scoring each label's word with a causal LM, no training (minillm.label_scoring) "
                        "on the classification data (the embedded task unless --data.* says otherwise)")
    p.add_argument("--shots", metavar="N", type=_at_least(0), default=None,
                   help="--label-scoring: labelled examples per class put in the prompt (default: 0, zero-shot)")
    p.add_argument("--verbalizer", metavar="W1,W2,...", default=None,
                   help="--label-scoring: one word per label, in label order (default: the label names)")
    p.add_argument("--template", metavar="TEXT", default=None,
                   help="--label-scoring: the prompt of one example, with {text} (default: 'Text: {text}\\nLabel:')")

    p = sub.add_parser("distill", help="train a smaller student on a teacher's soft targets (Hinton et al., 2015)",
                       description="The student is the teacher's architecture with --model.* changes (fewer layers "
                                   "or narrower), trained on the teacher's task and data with "
                                   "alpha * T^2 * KL(teacher || student) + (1 - alpha) * hard-label loss; "
                                   "--distill.init_from_teacher=true copies the teacher's blocks into a student "
                                   "with fewer layers. Tasks: causal-lm, mlm, mlm-nsp, classification.",
                       epilog="Also: --model.FIELD=V (the student), --train.FIELD=V (on top of the teacher's "
                              "training settings; out_dir defaults to runs/distill), --distill.FIELD=V "
                              "(DistillConfig in minillm/distill.py: temperature, alpha, hidden_weight, "
                              "hidden_layers, init_from_teacher, init_layers).")
    p.add_argument("--teacher", metavar="RUN", required=True, help="the teacher's checkpoint or run directory")
    p.add_argument("--config", metavar="FILE.toml", help="TOML file with [model], [train], [distill] sections")

    p = sub.add_parser("prune", help="prune a checkpoint: magnitude (unstructured), attention heads or MLP channels",
                       description="Unstructured: zero the --sparsity fraction of smallest weights of the blocks' "
                                   "linear layers. --structured heads|mlp: remove that fraction of each block's "
                                   "attention heads or MLP channels, the least important by Michel et al. (2019) "
                                   "(the same number in every block), which shrinks the tensors. Optionally "
                                   "fine-tune afterwards (--finetune-steps, --train.* overrides). Writes a run "
                                   "directory that evaluate and generate read.")
    p.add_argument("--checkpoint", metavar="RUN", required=True, help="checkpoint or run directory to prune")
    p.add_argument("--sparsity", metavar="S", type=float, required=True, help="fraction removed, in [0, 1)")
    p.add_argument("--structured", choices=("heads", "mlp"), default=None,
                   help="remove whole heads or MLP channels (default: unstructured magnitude pruning)")
    p.add_argument("--scope", choices=("global", "layer"), default="global",
                   help="unstructured: rank weights over all layers or within each (default: %(default)s)")
    p.add_argument("--importance", choices=("gradient", "weight"), default="gradient",
                   help="structured: |dL/d gate| over a few batches, or weight norm (default: %(default)s)")
    p.add_argument("--importance-batches", metavar="N", type=_at_least(1), default=8,
                   help="structured, gradient importance: training batches (default: %(default)s)")
    p.add_argument("--finetune-steps", metavar="N", type=_at_least(0), default=0,
                   help="fine-tune this many steps after pruning (default: 0)")
    p.add_argument("--out", metavar="DIR", required=True, help="run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")

    p = sub.add_parser("quantize", help="write an int8/int4 weight-quantized copy of a checkpoint",
                       description="The attention and MLP projections become int8 (per output channel by "
                                   "default) or packed int4 (groups of 128 inputs by default) codes with float32 "
                                   "scales, and zero points with --scheme asymmetric; embeddings, heads and norms "
                                   "stay in floating point. `minillm generate` and `minillm evaluate` load the "
                                   "result; on a GPU the Triton kernel multiplies by it, elsewhere PyTorch "
                                   "dequantizes it first.")
    p.add_argument("--checkpoint", metavar="DIR", required=True,
                   help="checkpoint or run directory (its latest checkpoint)")
    p.add_argument("--bits", type=int, choices=(8, 4), required=True, help="bits per weight")
    p.add_argument("--group-size", metavar="N|channel", type=_group_size, default=None,
                   help="inputs sharing one scale, or 'channel' for a whole output row (default: channel for "
                        "--bits 8, 128 for --bits 4)")
    p.add_argument("--scheme", choices=("symmetric", "asymmetric"), default="symmetric",
                   help="symmetric: absmax scale; asymmetric: min-max scale and a zero point (default: %(default)s)")
    p.add_argument("--out", metavar="DIR", required=True, help="the checkpoint directory to write (new or empty)")

    sub.add_parser("configs", help="list the configs shipped with minillm (for --config NAME)",
                   description="Each config shipped with minillm: its name (for --config NAME), the command and "
                               "model it runs, and what it is for.")

    p = sub.add_parser("bench", help="run a benchmark script from benchmarks/",
                       description="Runs benchmarks/NAME.py with the remaining arguments (their own --help).")
    p.add_argument("name", choices=(*BENCHMARKS, *EXPERIMENTS, *SUITES, "all"), metavar="NAME",
                   help=f"a benchmark ({', '.join(BENCHMARKS)}; all: each of them in turn), an experiment "
                        f"({', '.join(EXPERIMENTS)}: minutes to an hour) or gpu (benchmarks/gpu_suite.py: "
                        f"GPU correctness and speed evidence in one run; --out DIR, --dry on CPU)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script (see its --help)")
    return parser


COMMANDS = {"pretrain": cmd_train, "finetune": cmd_train, "prepare": cmd_prepare, "generate": cmd_generate,
            "evaluate": cmd_evaluate, "export": cmd_export, "distill": cmd_distill, "prune": cmd_prune,
            "quantize": cmd_quantize, "configs": cmd_configs, "bench": cmd_bench}


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"minillm: warning: {' '.join(str(message).split())}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``minillm`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    show = warnings.showwarning
    if not os.environ.get("MINILLM_DEBUG"):
        warnings.showwarning = _one_line_warning
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
    except (UsageError, ValueError, TypeError, OSError, FloatingPointError) as err:
        if os.environ.get("MINILLM_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"minillm: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minillm: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = show


if __name__ == "__main__":
    sys.exit(main())
