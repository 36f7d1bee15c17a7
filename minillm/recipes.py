"""Recipes: the library API behind the ``minillm`` command line.

Each command of the CLI is one function here, so a notebook runs exactly what the command runs::

    from minillm.config import preset
    from minillm.data import DataConfig
    from minillm.train_config import TrainConfig
    from minillm import recipes

    result = recipes.train(preset("tiny"), DataConfig(vocab_size=4096), TrainConfig(max_steps=300))
    result["metrics"]["val_loss"], result["unigram_entropy"], result["checkpoint"]

==================  ===========================================================================
``RECIPES``         what ``minillm pretrain|finetune --model gpt|bert|seq2seq|t5|xlnet`` start from: a
                    task and the defaults of the run (the only defaults besides the config
                    dataclasses' and the model presets)
``configs``         defaults, a TOML file and command-line overrides -> the run's three configs
``prepare_data``    corpus -> tokenizer + token shards (cached; see minillm.data.prepare)
``resolve``         everything a run depends on, fixed once: the model from the tokenizer or the
                    pretrained checkpoint, the datasets, the number of labels
``train``           the one road, for every task: resolve, build the model, train, report
``pretrain``,       ``train`` for a task that learns from the corpus / from labelled files
``finetune``
``evaluate``        a checkpoint's metrics on held-out data
==================  ===========================================================================

What a task does (its model, batches, metrics and report) is its task object's
(:mod:`minillm.tasks`); nothing here compares task names. Text from a checkpoint is
:func:`minillm.generation.generate_text`. Output goes through ``echo`` (``print`` by default) so
callers can silence it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minillm import checkpoint as ckpt
from minillm import config_io, distributed
from minillm.batches import eval_batches
from minillm.config import ModelConfig, preset
from minillm.data import DataConfig, TokenShards, prepare_from_config
from minillm.data.corpus import describe_duplicates
from minillm.distributed import seed_everything
from minillm.evaluation import evaluate as evaluate_model
from minillm.evaluation import evaluate_text
from minillm.generation import generate_text
from minillm.model import MaskedLM
from minillm.optim import schedule_summary
from minillm.prompts import check_virtual_length
from minillm.tasks import CORPUS_DATA_FIELDS, Task, TaskData, get_task, text_figures
from minillm.tasks import unigram_entropy as _unigram_entropy
from minillm.hf_tokenizer import load_tokenizer
from minillm.tokenizer import Tokenizer
from minillm.train_config import TrainConfig
from minillm.trainer import Trainer

SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
# Fields of the model that the tokenizer fixes: a value given for them would be overwritten.
TOKENIZER_FIELDS = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")


def _say(echo, *lines: str) -> None:
    if echo is not None:
        for line in lines:
            echo(line)


# =============================================================================================
# Recipes: the named starting points of the CLI
# =============================================================================================


@dataclass(frozen=True)
class Recipe:
    """``minillm COMMAND --model FAMILY``: the task it trains and the defaults of the run."""

    command: str  # "pretrain" or "finetune"
    family: str  # "gpt", "bert", "seq2seq", "t5" or "xlnet"
    task: str
    model: dict
    data: dict
    train: dict
    from_pretrained: bool = False  # start from `minillm pretrain --model FAMILY`'s run when it exists

    @property
    def arch(self) -> str:
        """The architecture of the recipe's model."""
        return _asked_arch({"model": self.model})

    def serves(self, task: str | None, arch: str | None) -> bool:
        """Whether this recipe's model can train ``task`` and is of architecture ``arch`` (None: any)."""
        return (task is None or self.arch in get_task(task).architectures) and (arch is None or arch == self.arch)

    def defaults(self) -> config_io.Layer:
        """The layer under --config and the overrides."""
        train = {**self.train, "task": self.task, "out_dir": f"runs/{self.command}-{self.family}"}
        if self.from_pretrained:
            pretrained = pretrain_dir(self.family)
            train["init_from"] = pretrained if (Path(pretrained) / ckpt.LATEST).is_file() else None
        return {"model": dict(self.model), "data": dict(self.data), "train": train}


def pretrain_dir(family: str) -> str:
    return f"runs/pretrain-{family}"


# The embedded corpus: a tokenizer sized for the tiny presets, 5% of documents held out, shards
# under runs/ (never in the source tree).
CORPUS = {"inputs": ["default"], "vocab_size": 4096, "seq_len": 128, "val_fraction": 0.05,
          "prepared_dir": "runs/data/default"}
# The main job's budget: ~5 minutes on 2 CPU cores, preparation included. max_minutes caps the
# training loop on slower machines; the learning-rate schedule's horizon is max_steps, except in the
# GPT pretraining recipe, whose horizon is the time itself (max_steps=0: "time-fitted", see
# minillm.optim): its schedule ends decayed at max_minutes on any machine, for any --train.max_minutes.
SHORT_RUN = {"batch_size": 16, "max_minutes": 4.5, "eval_every": 100, "checkpoint_every": 0, "log_every": 10}
# Fine-tuning: about 3 epochs of the stdlib task's 6,355 training docstrings; probe_steps: LP-FT
# from a pretrained checkpoint (README, "Does pretraining pay?"); MCC picks the best checkpoint,
# since accuracy favours the majority class of an imbalanced task.
FINETUNE = {**SHORT_RUN, "batch_size": 32, "max_steps": 600, "lr": 1e-3, "warmup_steps": 60, "probe_steps": 600,
            "eval_batches": 0, "weight_decay": 0.01, "early_stopping_metric": "mcc"}

RECIPES = {
    # Windows of 64 tokens, 8 to a batch: at equal compute, more and smaller steps beat longer windows and
    # bigger batches at this size (docs/measured/defaults_sweep_cpu*.md, README "Quality per minute").
    ("pretrain", "gpt"): Recipe(
        "pretrain", "gpt", "causal-lm", {"preset": "tiny", "max_seq_len": 64}, {**CORPUS, "seq_len": 64},
        {**SHORT_RUN, "batch_size": 8, "max_steps": 0, "max_minutes": 4.0, "lr": 2e-3, "warmup_steps": 30,
         "eval_every": 400, "eval_batches": 0, "weight_decay": 0.1}),
    ("pretrain", "bert"): Recipe(
        "pretrain", "bert", "mlm-nsp", {"preset": "tiny-bert"}, CORPUS,
        {**SHORT_RUN, "max_steps": 1000, "lr": 1e-3, "warmup_steps": 50, "eval_batches": 20, "weight_decay": 0.01}),
    ("pretrain", "seq2seq"): Recipe(
        "pretrain", "seq2seq", "span-corruption", {"preset": "tiny-seq2seq"}, CORPUS,
        {**SHORT_RUN, "max_steps": 600, "lr": 1e-3, "warmup_steps": 30, "eval_batches": 20}),
    # XLNet: the tiny BERT's budget and learning rate; each window predicts 1 token in 6 (K = 6).
    ("pretrain", "xlnet"): Recipe(
        "pretrain", "xlnet", "permutation-lm", {"preset": "tiny-xlnet"}, CORPUS,
        {**SHORT_RUN, "max_steps": 1000, "lr": 1e-3, "warmup_steps": 50, "eval_batches": 20, "weight_decay": 0.01}),
    # Docstrings average ~55 tokens: 64 keeps most of each and halves the padded batch. The
    # classifier reads the mean of the hidden states: from scratch, a [CLS] summary is slow to learn.
    ("finetune", "bert"): Recipe(
        "finetune", "bert", "classification", {"preset": "tiny-bert", "classifier_pooling": "mean"},
        {**CORPUS, "train_file": "default", "seq_len": 64}, FINETUNE, from_pretrained=True),
    ("finetune", "gpt"): Recipe(
        "finetune", "gpt", "classification", {"preset": "tiny", "classifier_pooling": "mean"},
        {**CORPUS, "train_file": "default", "seq_len": 64}, FINETUNE, from_pretrained=True),
    # XLNet reads the last real token through its tanh summary, as transformers' XLNet classifier.
    ("finetune", "xlnet"): Recipe(
        "finetune", "xlnet", "classification", {"preset": "tiny-xlnet"},
        {**CORPUS, "train_file": "default", "seq_len": 64}, FINETUNE, from_pretrained=True),
    # The embedded seq2seq task (docstring first lines, said backwards) unless --data.train_file says;
    # from scratch the encoder-decoder needs ~2000 steps at 2e-3 to learn where each word goes.
    ("finetune", "seq2seq"): Recipe(
        "finetune", "seq2seq", "seq2seq", {"preset": "tiny-seq2seq"}, {**CORPUS, "train_file": "default", "seq_len": 64},
        {**FINETUNE, "max_steps": 2000, "lr": 2e-3, "warmup_steps": 100, "eval_every": 250, "probe_steps": 0,
         "early_stopping_metric": "val_loss"}, from_pretrained=True),
}
# T5 (Raffel et al., 2020): the same two tasks as seq2seq, on the tiny-t5 preset (relative position
# bias, RMSNorm, no biases, ReLU MLP, tied head). Listed after seq2seq, which stays the recipe that
# a bare --train.task=span-corruption or seq2seq picks.
RECIPES[("pretrain", "t5")] = dataclasses.replace(RECIPES[("pretrain", "seq2seq")], family="t5",
                                                  model={"preset": "tiny-t5"})
RECIPES[("finetune", "t5")] = dataclasses.replace(RECIPES[("finetune", "seq2seq")], family="t5",
                                                  model={"preset": "tiny-t5"})
DEFAULT_FAMILY = {"pretrain": "gpt", "finetune": "bert"}


def families(command: str) -> list[str]:
    return sorted(family for cmd, family in RECIPES if cmd == command)


def choose_recipe(command: str, family: str | None, user: config_io.Layer, sources: dict[str, str]) -> Recipe:
    """The recipe of ``minillm COMMAND --model FAMILY``. Without --model: the recipe of the task the
    config file or overrides name, else one whose model suits the task or architecture they ask
    for, else the command's default. A --model whose model cannot serve the task or architecture
    the user's config asks for is refused, never silently overridden (either way)."""
    task, arch = user.get("train", {}).get("task"), _asked_arch(user)
    if task is not None:
        get_task(task, sources["train.task"])  # a task of that name exists
    default = RECIPES[(command, DEFAULT_FAMILY[command])]
    if family is None:
        candidates = [r for (cmd, _), r in RECIPES.items() if cmd == command and r.serves(task, arch)]
        same_task = [r for r in candidates if task is not None and get_task(r.task) is get_task(task)]
        return (same_task or candidates or [default])[0] if (task, arch) != (None, None) else default
    recipe = RECIPES[(command, family)]
    if not recipe.serves(task, None):
        raise ValueError(f"--model {family}: `minillm {command} --model {family}` trains a model of arch "
                         f"{recipe.arch!r}, but {sources['train.task']} sets train.task = {task!r}, which trains "
                         f"{' or '.join(get_task(task).architectures)}; drop one of the two")
    if not recipe.serves(None, arch):
        where = sources.get("model.arch") or sources.get("model.preset")
        raise ValueError(f"--model {family}: `minillm {command} --model {family}` trains a model of arch "
                         f"{recipe.arch!r}, but {where} asks for arch {arch!r}; drop one of the two")
    return recipe


def _asked_arch(layer: config_io.Layer) -> str | None:
    """The architecture a [model] layer asks for (its arch, or its preset's), None if neither."""
    model = layer.get("model", {})
    if "arch" in model:
        return model["arch"]
    return preset(model["preset"]).arch if "preset" in model else None


def configs(command: str, family: str | None, config_file: str | None, overrides: dict[str, str]):
    """(configs {"model", "data", "train"}, sources {"section.field": where the user set it}).

    Layers, later winning: the recipe's defaults, the TOML file, the overrides. When the layers
    ask to resume a run, the run's saved config takes the place of the defaults, so flags left
    off the command line keep the values the run was started with."""
    user, sources = config_io.user_layer(SECTIONS, config_file, overrides)
    recipe = choose_recipe(command, family, user, sources)
    base = recipe.defaults()
    train = {**base["train"], **user.get("train", {})}
    if train.get("resume"):
        base = _saved_layer(Path(train["out_dir"]))
    return config_io.build_configs(SECTIONS, config_io.merge(base, user)), sources


def _saved_layer(out_dir: Path) -> config_io.Layer:
    """The config a run was saved with, as a base layer for resuming it."""
    try:
        saved = ckpt.read_configs(out_dir)
    except FileNotFoundError:
        raise FileNotFoundError(f"TrainConfig.resume: no checkpoint to resume in {out_dir} (no '{ckpt.LATEST}' file "
                                f"there)") from None
    return {section: saved[section] for section in SECTIONS if isinstance(saved.get(section), dict)}


# =============================================================================================
# Data
# =============================================================================================


def prepare_data(data: DataConfig, progress: bool = True) -> tuple[Tokenizer, dict]:
    """Tokenizer and token shards for ``data`` (cached: a rerun with the same inputs is instant).

    Returns (tokenizer, summary) with summary = {prepared_dir, skipped, seconds, documents and
    tokens per split, vocab_size, duplicates (a line saying which inputs were dropped as repeats)}.
    """
    tokenizer, result = prepare_from_config(data, progress=progress)
    splits = result.manifest["splits"]
    return tokenizer, {
        "prepared_dir": str(result.out_dir), "skipped": result.skipped, "seconds": result.seconds,
        "duplicates": describe_duplicates(result.duplicates),
        "vocab_size": tokenizer.vocab_size, "tokenizer": str(tokenizer.path),
        **{f"{split}_{key}": value for split, info in splits.items() for key, value in info.items()},
    }


def unigram_entropy(prepared_dir: str | Path, split: str = "train") -> float:
    """Entropy in nats of the token unigram distribution of a prepared split (see minillm.tasks)."""
    return _unigram_entropy(TokenShards(prepared_dir, split))


def fit_to_tokenizer(model: ModelConfig, tokenizer: Tokenizer) -> ModelConfig:
    """The model config with the tokenizer's vocabulary size and special ids."""
    return dataclasses.replace(
        model, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.require("pad"),
        bos_token_id=tokenizer.require("bos"), eos_token_id=tokenizer.require("eos"),
    )


# =============================================================================================
# Resolving a run: every setting fixed once, before anything is trained
# =============================================================================================


@dataclass
class Run:
    """A run with everything resolved: what is trained, on what, from where."""

    task: Task
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    tokenizer: Tokenizer
    start: str  # where the weights come from, in words
    task_data: TaskData

    def configs(self) -> dict:
        """The configs saved as config.toml and in every checkpoint's config.json."""
        return {"model": self.model, "data": self.data, "train": self.train}


def resolve(model: ModelConfig, data: DataConfig, train: TrainConfig, *, sources: dict[str, str] | None = None,
            progress: bool = True) -> Run:
    """Fix everything the run depends on, in one place.

    - Where the architecture and the tokenizer come from: a resumed run's own checkpoint; the
      pretrained checkpoint of ``train.init_from`` (its architecture, with this config's runtime
      and head fields); a Hugging Face directory (with ``data.tokenizer``); or ``model`` from
      scratch, with the vocabulary and special ids of the tokenizer (``data.tokenizer``, or one
      trained on the corpus).
    - What the data fixes: the task's datasets, and e.g. the number of labels.
    - ``sources`` ({"section.field": where the user set it}): a field the user set but the run
      would not use (another task's data field, LoRA's rank without LoRA, an architecture field
      that differs from the checkpoint's) is an error naming it, never silently dropped.
    - What the Trainer would refuse is refused here, before any work: a device or precision this
      machine lacks, an out_dir that cannot hold the run or already holds one (without resume or
      overwrite), and a resumed run's changes that alter what it learns (without
      resume_changes="allow"). So a run that cannot start says so before its config is printed.
    """
    for name, value, cls in (("model", model, ModelConfig), ("data", data, DataConfig), ("train", train, TrainConfig)):
        if not isinstance(value, cls):
            raise TypeError(f"{name}: expected a {cls.__name__}, got {type(value).__name__}")
    sources = sources or {}
    task = get_task(train.task)
    _check_run_can_start(train)
    pretrained = _pretrained_source(train)
    tokenizer_path, start = None, "scratch (random initialisation)"
    if pretrained is not None:
        model, tokenizer_path, start = _pretrained_start(pretrained, model, data, task, sources)
        start = f"resuming the run's own {start}" if train.resume else start
    tokenizer_from_corpus = tokenizer_path is None and data.tokenizer is None
    _refuse_unused(task, data, sources, tokenizer_from_corpus=tokenizer_from_corpus,
                   tokenizer_given=tokenizer_path is not None, train=train)
    if task.from_corpus or tokenizer_from_corpus:
        corpus = data if tokenizer_path is None else dataclasses.replace(data, tokenizer=str(tokenizer_path))
        tokenizer, _ = prepare_data(corpus, progress)
    else:
        tokenizer = load_tokenizer(tokenizer_path or data.tokenizer)
    if pretrained is None:
        model = fit_to_tokenizer(model, tokenizer)
    task.check(model, data)
    if train.virtual_tokens is not None:  # the prompt or prefix and the sequence share max_seq_len
        field, length = train.virtual_tokens
        check_virtual_length(model.max_seq_len, field, length)
        if data.seq_len + length > model.max_seq_len:
            raise ValueError(f"DataConfig.seq_len: got {data.seq_len}, but the {length} virtual tokens of "
                             f"TrainConfig.{field} come first and both must fit in ModelConfig.max_seq_len="
                             f"{model.max_seq_len}; lower --data.seq_len to {model.max_seq_len - length} or less")
    samples = train.max_steps * train.batch_size * train.grad_accum_steps * distributed.world_size()
    task_data = task.datasets(data, tokenizer, model, samples)
    run = Run(task, task.configure_model(model, task_data), data, train, tokenizer, start, task_data)
    if train.resume:  # the Trainer checks again, and says what it applies
        ckpt.check_resume_changes(pretrained, run.configs(), allow=train.resume_changes == "allow", say=False)
    return run


def _check_run_can_start(train: TrainConfig) -> None:
    """The Trainer's refusals of the device, the precision and out_dir, found by looking only
    (nothing is created or moved): a run that cannot start fails before its data is prepared."""
    distributed.pick_dtype(train.precision, distributed.pick_device(train.device, local_rank=0))
    out = Path(train.out_dir)
    ckpt.check_out_dir_path(out)
    ckpt.run_to_resume(out, train.resume, train.overwrite)


def _pretrained_source(train: TrainConfig) -> Path | None:
    """Where the architecture and tokenizer come from: the run's own checkpoint when resuming
    one, else init_from; None from scratch."""
    if train.resume and ckpt.latest_checkpoint(train.out_dir) is not None:
        return ckpt.latest_checkpoint(train.out_dir)
    return Path(train.init_from) if train.init_from is not None else None


def _pretrained_start(source: Path, model: ModelConfig, data: DataConfig, task: Task, sources: dict):
    """(model config, tokenizer path or None, description) when starting from pretrained weights."""
    if ckpt.is_hf_directory(source):
        from minillm.convert import config_from_hf

        hf = json.loads((source / "config.json").read_text())
        saved = config_from_hf(hf, task.name)
        config = dataclasses.replace(saved, **{f: getattr(model, f) for f in ckpt.RUNTIME_FIELDS + ckpt.HEAD_FIELDS})
        _refuse_architecture_changes(saved.to_dict(), model, sources, f"the Hugging Face model {source}")
        if ckpt.has_tokenizer(source):  # its own tokenizer: GPT-2's byte-level BPE, BERT's WordPiece, an export
            return config, source, f"Hugging Face checkpoint {source}"
        if data.tokenizer is None:
            raise ValueError(f"TrainConfig.init_from: the Hugging Face model {source} has no tokenizer (none of "
                             f"{', '.join(ckpt.TOKENIZER_FILES[1:])}); add its tokenizer files to the folder, or name "
                             f"one with its vocabulary in DataConfig.tokenizer")
        return config, None, f"Hugging Face checkpoint {source}"
    try:
        checkpoint = ckpt.resolve_checkpoint(source)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"TrainConfig.init_from: {err}") from None
    if not ckpt.has_tokenizer(checkpoint):
        raise ValueError(f"TrainConfig.init_from: {checkpoint} has no tokenizer; it cannot be trained on here")
    _refuse_architecture_changes(ckpt.read_configs(checkpoint)["model"], model, sources, f"checkpoint {checkpoint}")
    return ckpt.saved_architecture(checkpoint, model), checkpoint, f"checkpoint {checkpoint}"


def _refuse_architecture_changes(saved: dict, model: ModelConfig, sources: dict, where: str) -> None:
    """The architecture comes from the checkpoint: a model field the user set to something else
    would be ignored. A preset counts as setting every architecture field."""
    ignore = ckpt.HEAD_FIELDS + TOKENIZER_FIELDS
    differ = {line.split(":")[0]: line for line in ckpt.architecture_mismatch(saved, model, ignore=ignore)}
    preset_source = sources.get("model.preset")
    given = {name: sources.get(f"model.{name}", preset_source) for name in differ}
    given = {name: source for name, source in given.items() if source is not None}
    if given:
        details = "; ".join(f"{differ[name]} (from {source})" for name, source in given.items())
        raise ValueError(f"ModelConfig: the architecture comes from {where}, but the config asks for another: "
                         f"{details}. Drop these fields, or train from scratch (--train.init_from=none)")


def _refuse_unused(task: Task, data: DataConfig, sources: dict, *, tokenizer_from_corpus: bool,
                   tokenizer_given: bool, train: TrainConfig | None = None) -> None:
    """ValueError for a field the user set, to another value than its default, that this run
    would not read (see resolve): ``tokenizer_from_corpus``, a tokenizer is trained here;
    ``tokenizer_given``, a checkpoint brings it. Setting an unused field to its default changes
    nothing either way (``--train.probe_steps=0`` from scratch), so it passes."""
    reads = task.data_fields_read(data, tokenizer_from_corpus)
    unused_train = train.fields_without_effect() if train is not None else {}
    configs = {"model": None, "data": data, "train": train}
    for key, source in sources.items():
        section, name = key.split(".", 1)
        why = None
        if section == "data" and (name not in reads or (name == "tokenizer" and tokenizer_given)):
            why = (f"task {task.name!r} does not read it" if name not in CORPUS_DATA_FIELDS | {"tokenizer"}
                   else "the tokenizer comes from the checkpoint" if tokenizer_given
                   else "the tokenizer comes from data.tokenizer")
        elif section == "train" and name in unused_train:
            why = unused_train[name]
        elif section == "model" and name in TOKENIZER_FIELDS:
            why = "the vocabulary and special ids are the tokenizer's (set data.vocab_size to train another)"
        if why is not None and (configs[section] is None or _differs_from_default(configs[section], name)):
            raise ValueError(f"{section}.{name} (set by {source}) would have no effect: {why}; remove it")


def _differs_from_default(config, name: str) -> bool:
    field = next(f for f in dataclasses.fields(config) if f.name == name)
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    return getattr(config, name) != default


# =============================================================================================
# The one road: train a task and report
# =============================================================================================


def train(model: ModelConfig, data: DataConfig, train: TrainConfig, *, echo=print, hooks=None, num_samples: int = 3,
          sources: dict[str, str] | None = None, show_config: bool = False, clock=time.perf_counter) -> dict:
    """Resolve the run, train it, report its figures next to the task's baseline.

    ``hooks`` and ``clock`` go to the Trainer (``clock``: what measures the training time that
    ``max_minutes`` budgets, e.g. ``time.process_time`` for a budget of CPU time). ``sources`` ({"section.field": where the user set it}) lets
    :func:`resolve` refuse settings that would have no effect. ``show_config`` prints the
    resolved config, which is what <out_dir>/config.toml and every checkpoint save.

    Returns {"task", "metrics" (the report's figures), "split" ("test" or "validation"),
    "summary" (Trainer.fit), "checkpoint", "out_dir", "start", "samples", "seconds",
    "model_config", "parameters", "n_train", the task's baselines (e.g. "unigram_entropy",
    "majority_baseline"), "labels" (classification), "val_loss", and "test" (the metrics, when
    the split is the test split)}.
    """
    started = time.perf_counter()
    run = resolve(model, data, train, sources=sources, progress=train.progress)
    task, task_data = run.task, run.task_data
    if show_config:
        _say(echo, f"# resolved config (saved as {Path(train.out_dir) / 'config.toml'})", config_io.to_toml(run.configs()))
    _say(echo, task_data.summary, f"start: {run.start}")
    seed_everything(train.seed)  # the initial weights (from scratch, or a new head) are the seed's
    net = task.build_model(run.model)
    _say(echo, f"model: {type(net).__name__} ({run.model.arch}), {net.num_parameters():,} parameters; task {task.name}")
    saved = {"data": run.data} | ({"labels": task_data.labels} if task_data.labels is not None else {})
    probing = bool(train.probe_steps) and train.init_from is not None and task.new_head
    trainer = Trainer(net, run.train, task_data.train, task_data.validation, collate_fn=task_data.collate,
                      configs_to_save=saved, tokenizer=run.tokenizer, hooks=hooks, clock=clock,
                      before_training=(lambda body: _probe_head(body, run, saved, echo)) if probing else None)
    _say(echo, f"device: {trainer.device}, precision {train.precision} -> "
               f"{'fp32' if trainer.dtype == torch.float32 else str(trainer.dtype).removeprefix('torch.') + ' autocast'}")
    summary = trainer.fit()
    best = trainer.out_dir / ckpt.BEST
    if task.keep_best and best.exists():  # the best checkpoint on validation is the one reported
        ckpt.load_weights(trainer.raw_model, best)

    split = task_data.report_split
    metrics = task.final_metrics(trainer.raw_model, task_data, run.tokenizer, summary,
                                 lambda: _evaluate_split(trainer.raw_model, task, task_data, split, train.batch_size,
                                                         train.seed))
    if task.scores_text and not getattr(task_data.validation, "document_mask", True):
        metrics |= _held_out_text(trainer.raw_model, task_data.validation, run.tokenizer, train.batch_size)
    checkpoint = best if task.keep_best and best.exists() else ckpt.latest_checkpoint(trainer.out_dir)
    _say(echo, f"trained {summary['steps']} steps ({summary['stopped']}), {summary['tokens']:,} tokens in "
               f"{summary['elapsed_s']:.0f} s, {summary['tokens_per_s']:,.0f} tokens/s; best "
               f"{summary['best_metric']} {summary['best_value']:.4f} at step {summary['best_step']}",
         *([schedule_summary(run.train, summary["last_lr"], summary["train_seconds"], summary["steps"])] if summary["last_lr"] is not None
           else []),
         *task.report(metrics, task_data, split))
    samples = _show_samples(trainer.raw_model, run.tokenizer, task.sample_prompts[:num_samples], train.seed, echo)
    seconds = time.perf_counter() - started
    _say(echo, f"checkpoint: {checkpoint}  metrics: {trainer.out_dir / 'metrics.jsonl'}  plot: "
               f"{trainer.out_dir / 'metrics.png'}  ({seconds:.0f} s in all)")
    return {
        "task": task.name, "metrics": metrics, "split": split, "summary": summary, "checkpoint": str(checkpoint),
        "out_dir": str(trainer.out_dir), "start": run.start, "samples": samples, "seconds": seconds,
        "model_config": run.model, "parameters": net.num_parameters(), "n_train": len(task_data.train),
        "labels": task_data.labels, "val_loss": metrics.get("val_loss"), **task_data.baselines,
        **({"test": metrics} if split == "test" else {}),
    }


def _evaluate_split(model, task: Task, task_data: TaskData, split: str, batch_size: int, seed: int,
                    max_batches: int = 0) -> dict:
    """The task's metrics of ``model`` on one split ("validation" or "test") of ``task_data``, whole."""
    dataset = task_data.test if split == "test" else task_data.validation
    batches = eval_batches(dataset, task_data.collate, batch_size=batch_size, seed=seed, rank=0, world=1)
    return evaluate_model(model, task, batches, max_batches=max_batches)


def _held_out_text(model, validation, tokenizer: Tokenizer, batch_size: int) -> dict:
    """The per-character figures of the whole validation split (a CausalLMDataset's shards), every
    token scored once (:func:`minillm.evaluation.evaluate_text`); its loss per token is "text_loss",
    beside the trainer's last val_loss, which may cover only eval_batches batches of windows."""
    text = evaluate_text(model, validation.shards, tokenizer, seq_len=validation.seq_len, batch_size=batch_size)
    return {"text_loss": text["val_loss"], **{k: v for k, v in text.items() if k.startswith(("nats_", "bits_", "scored_"))}}


def pretrain(model: ModelConfig, data: DataConfig, train_config: TrainConfig, **options) -> dict:
    """:func:`train` for a task that learns from the corpus (causal-lm, mlm, mlm-nsp, span-corruption)."""
    if not get_task(train_config.task).from_corpus:
        raise ValueError(f"TrainConfig.task: {train_config.task!r} learns from labelled files; use finetune() / "
                         f"`minillm finetune`")
    return train(model, data, train_config, **options)


def finetune(model: ModelConfig, data: DataConfig, train_config: TrainConfig, **options) -> dict:
    """:func:`train` for a task that learns from labelled files (classification, seq2seq): weights
    from ``train.init_from`` (a minillm checkpoint or run directory, or a Hugging Face GPT-2/BERT
    directory with ``data.tokenizer``), or from scratch when it is None."""
    if get_task(train_config.task).from_corpus:
        raise ValueError(f"TrainConfig.task: {train_config.task!r} learns from the corpus; use pretrain() / "
                         f"`minillm pretrain`")
    return train(model, data, train_config, **options)


def _probe_head(net, run: Run, saved: dict, echo) -> None:
    """LP-FT's first stage (TrainConfig.probe_steps): train only the new head of `net`, on the
    frozen pretrained weights, in out_dir/probe. The fine-tuning Trainer then applies
    train.finetune_mode, so what trains after the probe is exactly what train asks for."""
    train = run.train
    probe = dataclasses.replace(
        train, finetune_mode="freeze", freeze_layers=net.config.n_layers, lr=train.probe_lr, init_from=None,
        max_steps=train.probe_steps, warmup_steps=min(train.warmup_steps, train.probe_steps), probe_steps=0,
        early_stopping_patience=0, resume=False, overwrite=True, out_dir=str(Path(train.out_dir) / "probe"),
    )
    data = run.task_data
    summary = Trainer(net, probe, data.train, data.validation, collate_fn=data.collate, configs_to_save=saved,
                      tokenizer=run.tokenizer).fit()
    final = summary["final"] or {}
    _say(echo, f"probe: the head alone ({summary['trainable_parameters']:,} parameters) trained "
               f"{summary['steps']} steps at lr {train.probe_lr:g}; validation {train.early_stopping_metric} "
               f"{final.get(train.early_stopping_metric, float('nan')):.4f}; fine-tuning ({train.finetune_mode}) starts from it")


def _show_samples(model, tokenizer: Tokenizer, prompts: tuple[str, ...], seed: int, echo) -> list[str]:
    if not prompts:
        return []
    outputs = [g.text for g in generate_text(model, tokenizer, list(prompts), max_new_tokens=40, seed=seed)]
    kind = "MLM predictions" if isinstance(model, MaskedLM) else "samples"
    _say(echo, f"{kind}:", *(f"  {p!r} -> {o!r}" for p, o in zip(prompts, outputs)))
    return outputs


# =============================================================================================
# Evaluation of a saved checkpoint
# =============================================================================================


def _checkpoint_dir(path: str | Path) -> Path:
    """The folder a model was loaded from: a Hugging Face folder, or the checkpoint a run names."""
    path = Path(path)
    return path if ckpt.is_hf_directory(path) else ckpt.resolve_checkpoint(path)


def evaluate(checkpoint: str | Path, *, data: DataConfig | None = None, overrides: dict | None = None,
             sources: dict[str, str] | None = None, batch_size: int = 16, max_batches: int = 0, device: str = "auto",
             echo=print) -> dict:
    """Metrics of a checkpoint on held-out data: the test split of its task when it has one, else
    the validation split. The data is ``data``, or the DataConfig saved with the checkpoint with
    ``overrides`` ({field: value}) on top; an override the task would not read is refused
    (``sources`` names where each came from).

    A causal LM (``Task.scores_text``) is scored on every token of its text, once, with the
    per-character figures of :func:`minillm.evaluation.evaluate_text` (nats per character, bits per
    byte). Its text is the validation split of the inputs, or all of the inputs when
    ``data.val_fraction`` is 0, which is what an ``inputs`` override means unless ``val_fraction``
    is overridden too: ``minillm evaluate --checkpoint RUN --data.inputs=FILE`` scores the whole
    FILE. Other inputs than the saved ones are prepared in ``<prepared_dir>/evaluate-<hash of the
    inputs>`` unless ``prepared_dir`` is overridden too, so the run's own shards stay as they are.
    Returns {"task", "split" ("test", "validation" or "all"), "scored" (what text, in words), metrics}."""
    for name, value, low in (("batch_size", batch_size, 1), ("max_batches", max_batches, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    model, configs, tokenizer = ckpt.load_model(checkpoint)
    if tokenizer is None:
        raise ValueError(f"evaluate: {checkpoint} has no tokenizer (none of {', '.join(ckpt.TOKENIZER_FILES)}) "
                         f"to read the data with")
    task = get_task(configs["task"], f"{checkpoint}: task")
    overrides = overrides or {}
    if data is None:
        # A Hugging Face folder saved no data config: DataConfig's defaults (the embedded corpus,
        # the embedded classification task) with the overrides on top.
        data = DataConfig.from_dict({**configs.get("data", {}), **overrides})
        if task.scores_text and "inputs" in overrides and "val_fraction" not in overrides:
            data = dataclasses.replace(data, val_fraction=0.0)  # other text than the run's: score all of it
        if "inputs" in overrides and "prepared_dir" not in overrides:  # leave the run's own shards as they are
            key = hashlib.sha256("\n".join(data.inputs).encode()).hexdigest()[:12]
            data = dataclasses.replace(data, prepared_dir=str(Path(data.prepared_dir) / f"evaluate-{key}"))
    _refuse_unused(task, data, sources or {}, tokenizer_from_corpus=False, tokenizer_given=True)
    if task.from_corpus:  # the checkpoint's tokenizer: shards are rebuilt only if they are missing
        prepare_data(dataclasses.replace(data, tokenizer=str(_checkpoint_dir(checkpoint))),
                     progress=False)
    task.check(model.config, data)
    model.to(distributed.pick_device(device, 0))
    where = f"{_checkpoint_dir(checkpoint)} ({task.name})"
    if task.scores_text and not data.document_mask:
        split = "all" if data.val_fraction == 0 else "validation"
        inputs = ", ".join(data.inputs)
        scored = (f"all of {inputs}" if split == "all" else
                  f"the validation split of {inputs} (val_fraction={data.val_fraction:g})")
        scored += f", prepared in {data.prepared_dir}"
        if max_batches:
            scored += f", its first {max_batches} batches of {batch_size} windows"
        shards = TokenShards(data.prepared_dir, "train" if split == "all" else "val")
        metrics = evaluate_text(model, shards, tokenizer, seq_len=data.seq_len, batch_size=batch_size,
                                max_batches=max_batches)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        _say(echo, f"{where}, scored {scored}: {shown}",
             f"every token scored once: {text_figures({**metrics, 'text_loss': metrics['val_loss']})}")
        return {"task": task.name, "split": split, "scored": scored, **metrics}
    task_data = task.datasets(data, tokenizer, model.config, samples=0)
    split = task_data.report_split
    metrics = _evaluate_split(model, task, task_data, split, batch_size, data.seed, max_batches)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    _say(echo, f"{where}, {split} split: {shown}")
    return {"task": task.name, "split": split, "scored": f"the {split} split", **metrics}
