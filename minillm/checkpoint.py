"""Checkpoints: atomic save, exact resume state, a run directory that a new run replaces safely,
and loading a model back for use.

A run directory looks like this:

    out_dir/
        step_000100/            one complete checkpoint
            model.safetensors   weights; tied weights stored once (names of the ties in the metadata)
            state.pt            optimizer, scaler, RNG and data position; torch.load(weights_only=True)
            config.json         {"task", "model", "train", "data", ...}: the resolved configs
            tokenizer.model     the run's tokenizer, when it has one
        step_000200/
        latest                  text file naming the last complete checkpoint ("step_000200")
        best -> step_000100     symlink to the checkpoint with the best early-stopping metric
        metrics.jsonl, metrics.csv, metrics.png, tensorboard/
        config.toml             the run's resolved configs: what every checkpoint's config.json holds
        probe/                  LP-FT's probe stage (minillm finetune), itself a run directory
        .previous-run/          only while an overwrite=True run has no checkpoint yet: the run it replaces

Atomicity. A checkpoint is written into ``.tmp-step_000200/`` in the same directory, every file
fsync'ed, then renamed to ``step_000200/`` (a rename within one filesystem is atomic), then
``latest`` is replaced atomically (temporary file, fsync, ``os.replace``) and ``best`` likewise (a
temporary symlink renamed over the old one). A process killed at any point leaves ``latest``
naming a complete checkpoint: either the previous one or the new one. A save that fails (full
disk, read-only filesystem) deletes what it wrote and raises RunDirError, an OSError naming the
checkpoint and the previous one, which is intact. Each file is serialised in memory and written
with Python's file I/O, because safetensors and torch.save report a failed write as their own
exceptions (torch.save without the OS error): saving costs one in-memory copy of a file.

Starting a run (prepare_run_dir). out_dir is checked (a directory, or creatable, and writable),
and what a killed save left (``.tmp-step_*``, ``.latest.tmp``, ``.best.tmp``) is deleted. A run
that replaces another (overwrite=True) does not delete it: it moves the previous run's entries
(RUN_ENTRIES) into ``.previous-run/`` and deletes that once ``latest`` names a checkpoint of its own
(finish_replacement, after every save). A run that ends before its first checkpoint deletes its
own entries and moves the previous ones back, byte for byte (restore_previous_run). A run's
``probe/`` stage is trained after its directory is prepared, so a ``probe/`` found there belongs to
the previous run.

Moving several entries is not atomic, so the moves follow two rules that make a SIGKILL at any
point recoverable; the next prepare_run_dir applies them before anything else:

* ``.previous-run.tmp/`` means "move these back": entries go in through it (renamed to
  ``.previous-run/`` once all are in, before the new run writes anything) and come back out of it
  (``.previous-run/`` is renamed to it once the new run's entries are deleted). Either way none of
  the new run's entries can be in the way.
* ``.previous-run/`` next to a ``latest`` means the new run has a complete checkpoint: the previous
  run is deleted. Without one, the new run ended before its first checkpoint: its entries are
  deleted (a kill midway leaves this same state), then ``.previous-run/`` is renamed to
  ``.previous-run.tmp/`` and emptied by the first rule, with a warning.

LoRA runs (TrainConfig.finetune_mode="lora"; the same holds for "adapter", "prefix",
"deep-prompt" and "prompt", whose `Adapter` names the method: their modules are added back by
load_adapter, and stay modules, since they do not merge into weights; a prefix run saves the
keys and values its MLP makes, never the MLP). A LoRA run's model.safetensors holds the adapter
alone: what the run can have changed, on top of its base model (TrainConfig.init_from). That is
the LoRA factors A and B, the trainable task head, and any frozen tensor the base does not give
(a fresh pooler, a norm that LP-FT's probe trained); for the tiny presets a few hundred KB instead
of the full weights. Its safetensors metadata ("adapter", see `Adapter`) names the rank, alpha,
the wrapped layers, the base (init_from as given and the checkpoint it resolved to) and a SHA-256
fingerprint of every base tensor, so an adapter is never put on another base: loading it onto
weights with another fingerprint is a ValueError. `load_model` finds the base, applies the
adapter and merges it (merge_lora=True: plain weights, e.g. for export); `load_adapter` applies
it to a base model you already hold; `load_weights` into a LoRA-wrapped model (resume) loads the
adapter's tensors after the same check. Checkpoints of older minillm versions, which held every
weight under LoRA's names, still load. An AdaLoRA run (finetune_mode="adalora") is saved the same
way: its adapter says method "adalora" and holds P, Λ (lora_E, masked values zero) and Q, with
the rank pattern in its description; its state.pt keeps the rank allocator's averages for resuming.

Quantized checkpoints (`quantize_checkpoint`, `minillm quantize`). One directory, like save_model's:
model.safetensors holds the attention and MLP projections as int8 or packed int4 codes with
their scales (and zero points) (minillm.quantize has the format), everything else as it was;
config.json keeps the task, model and data configs and adds "quantization" (bits, group_size,
scheme, the quantized layers, the source checkpoint). `load_model` builds QuantizedLinear layers
from it, so generate and evaluate load it; it is for inference only: init_from, save_model and
export refuse it.

Only tensors, numbers, strings, lists, tuples and dicts go into state.pt, so it loads with
``torch.load(weights_only=True)``: loading a checkpoint never runs pickled code. A checkpoint file
that does not decode (cut short, overwritten) is a ValueError naming the file, from every loader.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import random
import shutil
import signal
import tempfile
import warnings
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn as nn
from safetensors import safe_open

from minillm.adapters import AdaptedSublayer, add_adapters
from minillm.adalora import AdaLoRALinear
from minillm.config import ModelConfig
from minillm.distributed import seed_everything
from minillm.lora import LoRALinear, add_lora, unwrap_model
from minillm.lora import merge_lora as merge
from minillm.prompts import (KeyValuePrefix, SoftPrompt, add_virtual_tokens, fold_prefixes, folded_tensors,
                             reparameterisations)
from minillm.quantized import QuantizedLinear, make_quantized_layers, quantize_model
from minillm.tasks import build_model, upgrade_saved_configs
from minillm.train_config import resume_differences

WEIGHTS, STATE, CONFIG, TOKENIZER = "model.safetensors", "state.pt", "config.json", "tokenizer.model"
# A checkpoint carries its tokenizer as a sentencepiece model (trained here) or as the files of a
# Hugging Face tokenizer (a fine-tune of a Hugging Face model): any one of these names says which.
TOKENIZER_FILES = (TOKENIZER, "tokenizer.json", "vocab.json", "vocab.txt")
ADAPTER = "adapter"  # the safetensors metadata key of a LoRA run's adapter description
QUANTIZATION = "quantization"  # config.json entry of a quantized checkpoint (quantize_checkpoint)
LATEST, BEST = "latest", "best"
PROBE = "probe"  # LP-FT's probe stage (minillm finetune): a run directory inside the run's
# What a run writes into out_dir: moved aside together when an overwrite=True run replaces it.
RUN_ENTRIES = ("step_*", LATEST, BEST, "metrics.*", "tensorboard", "config.toml", PROBE)
# What a process killed while saving leaves behind; deleted when the next run starts.
LEFTOVERS = (".tmp-step_*", f".{LATEST}.tmp", f".{BEST}.tmp")
PREVIOUS_RUN = ".previous-run"
# ModelConfig fields that change how a model runs but not which weights it has.
RUNTIME_FIELDS = ("attn_backend", "norm_backend", "embed_dropout", "attn_dropout", "resid_dropout", "init_std")
# Fields of a task's head, which a new task replaces: pretrained weights load whatever they are.
HEAD_FIELDS = ("num_labels", "classifier_pooling")


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


class RunDirError(OSError):
    """out_dir cannot hold a run, or a checkpoint could not be written into it. str(err) is one
    line naming the path, what happened and what is intact; err.errno is the OS error's."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.errno = code


# =============================================================================================
# Atomic file-system helpers
# =============================================================================================


def _crash_point(name: str) -> None:
    """Test hook: MINILLM_CHECKPOINT_CRASH_AT=<name> kills the process here (atomicity tests)."""
    if os.environ.get("MINILLM_CHECKPOINT_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_pointer(directory: Path, name: str, target: str) -> None:
    """Atomically make ``directory/name`` a text file holding ``target``."""
    tmp = directory / f".{name}.tmp"
    with open(tmp, "w") as f:
        f.write(target + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / name)
    _fsync(directory)


def _point_symlink(directory: Path, name: str, target: str) -> None:
    """Atomically make ``directory/name`` a relative symlink to ``target``."""
    tmp = directory / f".{name}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, directory / name)
    _fsync(directory)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _entries(directory: Path, patterns: tuple[str, ...]) -> list[Path]:
    """The entries of `directory` whose names match a pattern (dangling symlinks and hidden names too)."""
    return sorted(p for p in directory.iterdir() if any(fnmatchcase(p.name, pattern) for pattern in patterns))


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``out_dir/latest`` names, or None when the run has none yet."""
    pointer = Path(out_dir) / LATEST
    if not pointer.is_file():
        return None
    path = Path(out_dir) / pointer.read_text().strip()
    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"checkpoint: {pointer} names {path}, which holds no {WEIGHTS}")
    return path


def _in_use(out: Path) -> set[Path]:
    """The checkpoints `latest` and `best` name (resolved): never replaced or deleted."""
    return {p.resolve() for p in (latest_checkpoint(out), out / BEST) if p is not None and p.exists()}


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a checkpoint directory, a run directory (its latest
    checkpoint) or the ``best`` link; FileNotFoundError naming the path otherwise."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is not None:
            return latest
        raise FileNotFoundError(f"checkpoint: {path} holds neither {WEIGHTS} nor a '{LATEST}' file")
    raise FileNotFoundError(f"checkpoint: no checkpoint at {path} (the path does not exist)")


# =============================================================================================
# Saving
# =============================================================================================


def _weights_for_saving(model: nn.Module, names: list[str] | None = None
                        ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """state_dict (only `names`, when given) with every shared tensor kept once, plus {alias: kept
    name}.

    safetensors refuses tensors that share storage (tied embeddings); the model re-ties them
    itself when it is built, so loading only has to fill both names from the one copy.
    """
    tensors, ties, seen = {}, {}, {}
    state = {**model.state_dict(), **folded_tensors(model)}  # a prefix's MLP is saved as its output
    for name, tensor in (state.items() if names is None else ((n, state[n]) for n in names)):
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            ties[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors, ties


def _as_plain(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    state: dict,
    configs: dict,
    tokenizer=None,
    adapter: Adapter | None = None,
) -> Path:
    """Write ``out_dir/step_XXXXXX`` atomically and point ``latest`` at it (module docstring).

    state: what resuming needs (optimizer, RNG, data position...), tensors and plain values only.
    configs: saved as config.json; dataclasses and objects with ``to_dict`` are converted.
    adapter: a LoRA run's (plan_adapter): only its tensors are saved, and it goes into the metadata.
    Refuses to save non-finite weights: a checkpoint must always be a good one to go back to.
    A failed write (OSError: full disk, read-only filesystem...) deletes what it wrote and raises
    RunDirError naming the checkpoint, the OS error and the previous checkpoint, which is intact.
    """
    out = Path(out_dir)
    name = checkpoint_name(step)
    tensors, ties = _weights_for_saving(model, adapter.tensors if adapter is not None else None)
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise FloatingPointError(f"save_checkpoint: refusing to save non-finite weights at step {step}: {bad[:5]}")

    final, tmp = out / name, out / f".tmp-{name}"
    # Only a checkpoint no pointer names may be replaced: one whose rename finished just before a
    # crash, before `latest` was updated.
    if final.exists() and final.resolve() in _in_use(out):
        raise FileExistsError(f"save_checkpoint: {final} already exists and is in use")
    previous = latest_checkpoint(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left over from a process killed mid-save
            shutil.rmtree(tmp)
        tmp.mkdir()
        metadata = {"format": "pt", "ties": json.dumps(ties)}
        if adapter is not None:
            metadata[ADAPTER] = json.dumps(dataclasses.asdict(adapter))
        (tmp / WEIGHTS).write_bytes(safetensors.torch.save(tensors, metadata=metadata))
        _crash_point("after_weights")
        buffer = io.BytesIO()
        torch.save(state, buffer)
        (tmp / STATE).write_bytes(buffer.getbuffer())
        config_dict = {key: _as_plain(value) for key, value in configs.items()}
        (tmp / CONFIG).write_text(json.dumps(config_dict, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        for file in tmp.iterdir():
            _fsync(file)
        _fsync(tmp)
        _crash_point("before_rename")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(out)
        _crash_point("before_latest")
        _write_pointer(out, LATEST, name)
    except OSError as err:
        _discard_failed_save(out, tmp, final)
        intact = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint was saved"
        raise RunDirError(f"checkpoint: could not write {final} ({err}); {intact}", err.errno) from None
    return final


def save_model(directory: str | os.PathLike, model: nn.Module, *, task: str | None = None, tokenizer=None) -> Path:
    """Write one checkpoint directory (config.json, model.safetensors, tokenizer.model when given)
    that `load_model` and `Model.from_pretrained` read: the weights of a model, without a run.

    task: the task it is saved under; default `tasks.task_of(model)`. The directory is written
    beside its final place and renamed into it; an existing directory is replaced only when it
    holds a saved model and nothing else (never a run directory or other files).
    """
    from minillm.lora import LoRALinear
    from minillm.tasks import get_task, task_of

    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("save_model: the model has LoRA layers; merge them first (minillm.lora.merge_lora(model))")
    if _adapter_targets(model):
        raise ValueError(f"save_model: the model has adapters or virtual tokens ({_adapter_targets(model)[0]}...), "
                         f"which a plain checkpoint cannot describe; save the run's adapter checkpoint instead")
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError("save_model: the model has quantized layers, which need their settings saved too; "
                         "write it with quantize_checkpoint(path, out, bits, group_size, scheme)")
    task = task_of(model) if task is None else task
    get_task(task, "task").check_model(model)
    target = Path(directory)
    if target.exists():
        if not target.is_dir():
            raise NotADirectoryError(f"save_model: {target} is a file, not a directory")
        saved = (WEIGHTS, CONFIG, *TOKENIZER_FILES, "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
        others = sorted(p.name for p in target.iterdir() if p.name not in saved)
        if others:
            raise FileExistsError(f"save_model: {target} holds other files ({others[:5]}); save into a new or empty directory")
    tensors, ties = _weights_for_saving(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    old = target.parent / f".{target.name}.old"
    try:
        (tmp / WEIGHTS).write_bytes(safetensors.torch.save(tensors, metadata={"format": "pt", "ties": json.dumps(ties)}))
        configs = {"task": task, "model": model.config.to_dict()}
        (tmp / CONFIG).write_text(json.dumps(configs, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        for file in tmp.iterdir():
            _fsync(file)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target


def quantize_checkpoint(path: str | os.PathLike, out: str | os.PathLike, bits: int, group_size: int | None = None,
                        scheme: str = "symmetric") -> Path:
    """Write a weight-quantized copy of a checkpoint (or a run's latest one) into `out`, a new or empty
    directory; returns it. The attention and MLP projections become int8 or packed int4 codes with
    float32 scales (and zero points) (minillm.quantized.quantize_model; group_size None: one group per
    output channel); everything else is copied as it is. config.json keeps the task, model and data
    configs and adds {"quantization": {bits, group_size, scheme, layers, source}}, which `load_model`
    reads to build QuantizedLinear layers, so `minillm generate` and `minillm evaluate` load it.
    The directory is written beside `out` and renamed into place: a failure leaves no half of it.
    """
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"quantize_checkpoint: out {target} exists and is not an empty directory; choose a new one")
    model, configs, tokenizer = load_model(path)
    if QUANTIZATION in configs:
        raise ValueError(f"quantize_checkpoint: {path} is quantized already ({configs[QUANTIZATION]['bits']}-bit); quantize "
                         f"the checkpoint it was made from")
    source = Path(path) if is_hf_directory(Path(path)) else resolve_checkpoint(path)
    layers = quantize_model(model, bits, group_size, scheme)
    tensors, ties = _weights_for_saving(model)
    spec = {"bits": bits, "group_size": group_size, "scheme": scheme, "layers": layers,
            "source": str(source.resolve())}
    saved = {key: configs[key] for key in ("task", "model", "data") if key in configs}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        metadata = {"format": "pt", "ties": json.dumps(ties), QUANTIZATION: json.dumps(spec)}
        (tmp / WEIGHTS).write_bytes(safetensors.torch.save(tensors, metadata=metadata))
        (tmp / CONFIG).write_text(json.dumps({**saved, QUANTIZATION: spec}, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        for file in tmp.iterdir():
            _fsync(file)
        _fsync(tmp)
        os.replace(tmp, target)  # onto a missing or empty directory: atomic
        _fsync(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _discard_failed_save(out: Path, tmp: Path, final: Path) -> None:
    """Delete what a failed save wrote, as far as the filesystem still allows (prepare_run_dir
    deletes the rest when the next run starts)."""
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (out / f".{LATEST}.tmp").unlink(missing_ok=True)
        if final.exists() and final.resolve() not in _in_use(out):  # renamed, but `latest` never named it
            shutil.rmtree(final)
    except OSError:
        pass


def mark_best(out_dir: str | os.PathLike, checkpoint: str | os.PathLike) -> None:
    """Point ``out_dir/best`` at a saved checkpoint (atomically)."""
    _point_symlink(Path(out_dir), BEST, Path(checkpoint).name)


def run_to_resume(out_dir: str | os.PathLike, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint a run in out_dir continues from (resume=True), or None for a fresh run.
    Only looks: prepare_run_dir is what a run calls before it starts.

    Errors (before any work is done): resume=True with nothing to resume; a fresh run into an
    out_dir that already holds one, unless overwrite=True (a finished run is never replaced by
    accident).
    """
    out = Path(out_dir)
    latest = latest_checkpoint(out)
    if resume:
        if latest is None:
            raise FileNotFoundError(f"TrainConfig.resume: no checkpoint to resume in {out} (no '{LATEST}' file there)")
        return latest
    if latest is not None and not overwrite:
        raise FileExistsError(
            f"TrainConfig.out_dir: {out} already holds a run (latest checkpoint {latest.name}); "
            f"set resume=true to continue it, overwrite=true to replace it, or choose another out_dir"
        )
    return None


def prepare_run_dir(out_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> Path | None:
    """Make out_dir ready for a run; returns the checkpoint to resume (resume=True) or None.

    1. RunDirError when out_dir is a file, is under a file, or cannot be created or written into.
    2. A replacement that a killed process left half-done is settled (restore_previous_run).
    3. What a killed save left (LEFTOVERS) is deleted.
    4. resume=True: the latest checkpoint, FileNotFoundError when there is none. A fresh run into an
       out_dir holding one: FileExistsError, unless overwrite=True; then the previous run's entries
       move into .previous-run/, until the new run's first checkpoint (finish_replacement) or its
       failure (restore_previous_run).
    """
    out = Path(out_dir)
    _check_writable(out)
    restore_previous_run(out)
    for path in _entries(out, LEFTOVERS):
        _remove(path)
    resume_from = run_to_resume(out, resume, overwrite)
    if resume_from is None and latest_checkpoint(out) is not None:  # overwrite=True: run_to_resume let it through
        _keep_previous_run(out)
    return resume_from


def check_out_dir_path(out: Path) -> None:
    """RunDirError when out_dir is a file or sits under a file. Only looks."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"TrainConfig.out_dir: {out} is a file, not a directory", errno.ENOTDIR)
    if not out.exists():
        above = next((p for p in out.parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise RunDirError(f"TrainConfig.out_dir: {out} is under {above}, which is a file, not a directory",
                              errno.ENOTDIR)


def _check_writable(out: Path) -> None:
    check_out_dir_path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()  # a file created and removed: can this run write here?
    except OSError as err:
        raise RunDirError(f"TrainConfig.out_dir: cannot write into {out} ({err.strerror})", err.errno) from None


def _keep_previous_run(out: Path) -> None:
    """Move the run in out_dir (its RUN_ENTRIES) into .previous-run/, through .previous-run.tmp/."""
    tmp = out / f"{PREVIOUS_RUN}.tmp"
    tmp.mkdir()
    for path in _entries(out, RUN_ENTRIES):
        os.replace(path, tmp / path.name)
        _crash_point("keeping_previous_run")
    _fsync(tmp)
    os.replace(tmp, out / PREVIOUS_RUN)
    _fsync(out)


def finish_replacement(out_dir: str | os.PathLike) -> bool:
    """After a save: once `latest` names a checkpoint of the new run, delete the previous run it
    replaces (kept in .previous-run/). True when there was one; otherwise a cheap no-op."""
    out = Path(out_dir)
    kept = out / PREVIOUS_RUN
    if not (kept.is_dir() and (out / LATEST).is_file()):
        return False
    shutil.rmtree(kept)
    _fsync(out)
    return True


def restore_previous_run(out_dir: str | os.PathLike) -> Path | None:
    """A run that replaces another has ended (or was killed) before its first checkpoint: delete
    what it wrote and move the previous run back exactly as it was; returns its latest checkpoint,
    with a warning. None when there is nothing to put back: no previous run kept, or the new run has
    a checkpoint already, in which case the replacement is complete (finish_replacement).
    Safe to repeat after a kill at any point of it or of the move aside (module docstring)."""
    out = Path(out_dir)
    kept, tmp = out / PREVIOUS_RUN, out / f"{PREVIOUS_RUN}.tmp"
    if kept.is_dir():
        if finish_replacement(out):
            return None
        clear_run(out)  # the new run's entries; it has no `latest`
        os.replace(kept, tmp)
        _fsync(out)
    if not tmp.is_dir():
        return None
    for path in sorted(tmp.iterdir()):
        os.replace(path, out / path.name)
        _crash_point("restoring_previous_run")
    tmp.rmdir()
    _fsync(out)
    latest = latest_checkpoint(out)
    warnings.warn(
        f"TrainConfig.out_dir: the run replacing the one in {out} ended before its first checkpoint; "
        f"the previous run is back in place (latest checkpoint {latest.name if latest else None})",
        stacklevel=2,
    )
    return latest


def clear_run(out_dir: str | os.PathLike) -> list[Path]:
    """Delete what a run wrote into out_dir (RUN_ENTRIES and LEFTOVERS); nothing else."""
    out = Path(out_dir)
    removed = _entries(out, RUN_ENTRIES + LEFTOVERS)
    for path in removed:
        _remove(path)
    return removed


def prune_checkpoints(out_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete step checkpoints beyond the newest `keep`, never the latest or the best one."""
    out = Path(out_dir)
    steps = sorted(p for p in out.glob("step_*") if p.is_dir())
    if keep == 0 or len(steps) <= keep:
        return []
    protected = _in_use(out)
    removed = []
    for path in steps[:-keep]:
        if path.resolve() not in protected:
            shutil.rmtree(path)
            removed.append(path)
    return removed


# =============================================================================================
# RNG state: Python, numpy, torch (CPU and CUDA), as tensors and plain values
# =============================================================================================


def rng_state() -> dict:
    """Every random generator's state, in a form torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [list(t) if isinstance(t, tuple) else t for t in random.getstate()],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# =============================================================================================
# A training run: taking its directory, and the state that resumes it exactly
# =============================================================================================


def take_run_dir(out_dir: str | os.PathLike, *, resume: bool, overwrite: bool, rank: int, world: int) -> Path | None:
    """prepare_run_dir for a run of ``world`` processes: rank 0 prepares out_dir; every rank gets
    the checkpoint to resume from (None for a fresh run), or rank 0's error, so that no rank waits
    at a barrier the others never reach."""
    outcome = None
    if rank == 0:
        try:
            outcome = prepare_run_dir(out_dir, resume=resume, overwrite=overwrite)
        except Exception as err:
            if world == 1:
                raise
            outcome = err
    if world > 1:
        shared = [outcome]
        torch.distributed.broadcast_object_list(shared, src=0)  # also the barrier: out_dir is ready for all
        outcome = shared[0]
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def check_resume_changes(checkpoint: Path, configs: dict, *, allow: bool, say: bool = True) -> None:
    """A resumed run's configs against those it was saved with (TrainConfig.resume): a change that
    alters what it learns is a ValueError listing each one unless ``allow``; what is applied is said."""
    harmless, refused = resume_differences(read_configs(checkpoint), configs)
    if refused and not allow:
        raise ValueError(
            f"TrainConfig.resume: these settings differ from the run saved in {checkpoint} and change what it "
            f"learns: {'; '.join(refused)}. Drop them to continue the run as it was, or pass "
            f"resume_changes='allow' (--train.resume_changes=allow) to apply them"
        )
    if (harmless or refused) and say:
        warnings.warn(f"resume: applying {'; '.join(harmless + refused)}", stacklevel=3)


def training_state(trainer) -> dict:
    """What resuming a Trainer needs besides the weights: optimizer and scaler state, its counters,
    the data position and every rank's RNG state (a collective under DDP: each rank calls it)."""
    rngs = [rng_state()]
    if trainer.world > 1:
        rngs = [None] * trainer.world
        torch.distributed.all_gather_object(rngs, rng_state())
    return {
        "step": trainer.step, "tokens_seen": trainer.tokens_seen,
        # training time, resumes included: the time budget and a time-fitted schedule go on from here
        "train_seconds": trainer.train_seconds, "step_seconds": trainer.step_seconds,
        "optimizer": trainer.optimizer.state_dict(), "scaler": trainer.scaler.state_dict(), "rng": rngs,
        "best_value": trainer.best_value, "best_step": trainer.best_step, "evals_since_best": trainer.evals_since_best,
        "data": {"micro_batches": trainer.micro_batches, "world": trainer.world, "batch_size": trainer.config.batch_size},
        # a prefix run's MLP (minillm.prompts): its weights file holds only the folded prefix
        "prefix_reparameterisation": reparameterisations(trainer.raw_model),
        **({"adalora": trainer.rank_allocator.state_dict()} if getattr(trainer, "rank_allocator", None) else {}),
    }


def restore_training_state(trainer, checkpoint: Path) -> None:
    """Put a Trainer back where ``checkpoint`` left it (the inverse of training_state)."""
    state = load_state(checkpoint)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.step, trainer.tokens_seen = state["step"], state["tokens_seen"]
    # older checkpoints lack these: their training time starts again at 0
    trainer.train_seconds = float(state.get("train_seconds", 0.0))
    trainer.step_seconds = float(state.get("step_seconds", 0.0))
    trainer.micro_batches = state["data"]["micro_batches"]
    trainer.best_value, trainer.best_step = state["best_value"], state["best_step"]
    trainer.evals_since_best = state["evals_since_best"]
    trainer.last_saved_step = trainer.step
    if getattr(trainer, "rank_allocator", None) is not None:  # AdaLoRA: its importance averages and rank pattern
        trainer.rank_allocator.load_state_dict(state["adalora"])
    saved = state["data"]
    if saved["world"] != trainer.world or saved["batch_size"] != trainer.config.batch_size:
        warnings.warn(
            f"resume: the run was saved with world={saved['world']}, batch_size={saved['batch_size']}; now "
            f"world={trainer.world}, batch_size={trainer.config.batch_size}: batches will differ from an uninterrupted run"
        )
    rngs = state["rng"]
    if len(rngs) == trainer.world:
        set_rng_state(rngs[trainer.rank])
    else:  # another number of processes: a fresh, reproducible draw per rank
        seed_everything(trainer.config.seed + trainer.rank + trainer.step)


# =============================================================================================
# Loading
# =============================================================================================


def _decode(path: Path, load):
    """load(path) for a checkpoint file. A file that is there but does not decode (cut short by a
    full disk or a copy, overwritten) is a ValueError naming it: each format fails its own way
    (SafetensorError; RuntimeError, OSError or EOFError from torch's zip reader; UnpicklingError;
    JSONDecodeError)."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {path} is missing")
    try:
        return load(path)
    except Exception as err:
        cause = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:200]  # the first sentence
        raise ValueError(f"checkpoint: {path} is truncated or corrupt ({type(err).__name__}: {cause})") from None


def _read_json(path: Path) -> dict:
    values = _decode(path, lambda p: json.loads(p.read_text()))
    if not isinstance(values, dict):
        raise ValueError(f"checkpoint: {path} holds a JSON {type(values).__name__}, not an object")
    return values


def read_configs(path: str | os.PathLike) -> dict:
    """The config.json of a checkpoint (or of a run's latest checkpoint), in today's terms when an
    older minillm wrote it (minillm.tasks.upgrade_saved_configs)."""
    checkpoint = resolve_checkpoint(path)
    return upgrade_saved_configs(_read_json(checkpoint / CONFIG))


def saved_architecture(path: str | os.PathLike, config: ModelConfig) -> ModelConfig:
    """The architecture saved with a checkpoint (or a run's latest one), with the runtime and head
    fields (RUNTIME_FIELDS, HEAD_FIELDS) taken from `config`: how a model built to start from it is set up."""
    ours = {name: getattr(config, name) for name in RUNTIME_FIELDS + HEAD_FIELDS}
    return ModelConfig.from_dict({**read_configs(path)["model"], **ours})


def load_state(path: str | os.PathLike) -> dict:
    """state.pt of a checkpoint, loaded with weights_only=True."""
    checkpoint = resolve_checkpoint(path)
    return _decode(checkpoint / STATE, lambda p: torch.load(p, map_location="cpu", weights_only=True))


def _resolved(values: dict) -> dict:
    """Config fields with their defaults resolved (d_ff None and 4 * d_model are the same model)."""
    values = dict(values)
    if values.get("d_model") is not None:
        values["d_ff"] = values.get("d_ff") or 4 * values["d_model"]
    values["n_kv_heads"] = values.get("n_kv_heads") or values.get("n_heads")
    values["n_decoder_layers"] = values.get("n_decoder_layers") or values.get("n_layers")
    return values


def architecture_mismatch(saved: dict, config: ModelConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """'field: checkpoint X, model Y' for every weight-defining field that differs. A field the
    saved config lacks was written by an older minillm, before the field existed: it had the
    field's default behaviour (no relative bias, no T5 dropouts...), so it counts as the default."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING}
    saved, current = _resolved({**defaults, **saved}), _resolved(config.to_dict())
    return [
        f"{key}: checkpoint {saved.get(key)!r}, model {value!r}"
        for key, value in current.items()
        if key not in RUNTIME_FIELDS and key not in ignore and saved.get(key) != value
    ]


def check_vocab(model_config: ModelConfig, tokenizer, where: str) -> None:
    """ValueError when the tokenizer's vocabulary does not fit the model's embeddings."""
    if tokenizer is not None and tokenizer.vocab_size != model_config.vocab_size:
        raise ValueError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is "
            f"{model_config.vocab_size}; use the tokenizer the model was trained with"
        )


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint, with the tied aliases filled in again."""
    checkpoint = resolve_checkpoint(path)
    tensors, ties = _decode(checkpoint / WEIGHTS, _tensors_and_ties)
    for alias, target in ties.items():
        tensors[alias] = tensors[target]
    return tensors


def _tensors_and_ties(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, framework="pt") as f:
        ties = json.loads((f.metadata() or {}).get("ties", "{}"))
        return {name: f.get_tensor(name) for name in f.keys()}, ties


def load_weights(model: nn.Module, path: str | os.PathLike) -> Path:
    """Load a checkpoint's weights into `model` (same architecture, same task; a peft-wrapped model
    is unwrapped); returns the checkpoint directory. ValueError naming the fields when the
    architecture differs. A LoRA run's adapter loads into a LoRA-wrapped model holding its base."""
    model = unwrap_model(model)
    checkpoint = resolve_checkpoint(path)
    saved = _read_json(checkpoint / CONFIG).get("model", {})
    mismatch = architecture_mismatch(saved, model.config)
    if mismatch:
        raise ValueError(f"load_weights: {checkpoint} is a different architecture: " + "; ".join(mismatch))
    adapter = read_adapter(checkpoint)
    if adapter is not None:
        if not _adapter_targets(model):
            kind = "LoRA" if adapter.method == "lora" else adapter.method
            raise ValueError(f"load_weights: {checkpoint} holds a {kind} adapter and this model has no {kind} "
                             f"{'layers' if kind == 'LoRA' else 'modules'}; "
                             f"use load_adapter(model, path) on its base model, or load_model(path)")
        if adapter.method == "prefix":  # the checkpoint holds the folded keys and values, not the MLP
            fold_prefixes(model)
        _load_adapter_tensors(model, checkpoint, adapter, "load_weights")
        return checkpoint
    tensors = read_weights(checkpoint)
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise ValueError(
            f"load_weights: {checkpoint} does not fit this {type(model).__name__}: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}; unexpected {extra[:8]}{'...' if len(extra) > 8 else ''}"
        )
    for name, param in model.state_dict().items():
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise ValueError(
                f"load_weights: {checkpoint}: {name} has shape {tuple(tensors[name].shape)}, "
                f"the model expects {tuple(param.shape)}"
            )
    model.load_state_dict(tensors, strict=True)
    return checkpoint


# =============================================================================================
# LoRA adapters: what a LoRA run saves, on top of its base (module docstring, "LoRA runs")
# =============================================================================================


@dataclasses.dataclass(kw_only=True)
class Adapter:
    """What an adapter run saves on top of its base (LoRA, Houlsby adapters, prefix, deep-prompt,
    prompt), as its model.safetensors metadata describes it."""

    method: str = "lora"  # TrainConfig.finetune_mode of the run (adapters written before this field: LoRA)
    rank: int | None = None  # LoRA: rank, alpha, dropout
    alpha: float | None = None
    dropout: float | None = None
    settings: dict = dataclasses.field(default_factory=dict)  # other methods: {"adapter_size": m}, {"length": P}
    targets: list[str]  # the wrapped layers (LoRALinear, AdaptedSublayer) or virtual tokens' modules, in order
    tensors: list[str]  # the state_dict names saved: the method's own, the trainable head, what the base lacks
    base: str  # TrainConfig.init_from, as given
    base_checkpoint: str  # the checkpoint (or Hugging Face directory) it resolved to, absolute
    base_sha256: str  # fingerprint of every other tensor (_fingerprint)
    rank_pattern: dict | None = None  # AdaLoRA: {layer: [kept?] per triplet}; masked λ are saved as 0


def _adapter_targets(model: nn.Module) -> list[str]:
    """Names of the modules an adapter run added: wrapped layers and virtual tokens, in model order."""
    kinds = (LoRALinear, AdaptedSublayer, KeyValuePrefix, SoftPrompt)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


def _attach(model: nn.Module, adapter: Adapter) -> None:
    """Add to a plain base model the modules `adapter` describes (its tensors are loaded after)."""
    if adapter.method in ("lora", "adalora"):  # AdaLoRA: lora_E (the singular values) between A and B
        leaves = tuple(sorted({name.rpartition(".")[2] for name in adapter.targets}))  # "q_proj", "fc_in"...
        layer = AdaLoRALinear if adapter.method == "adalora" else LoRALinear
        add_lora(model, adapter.rank, adapter.alpha, adapter.dropout, targets=leaves, layer=layer)
    elif adapter.method == "adapter":
        add_adapters(model, adapter.settings["adapter_size"])
    elif adapter.method in ("prefix", "deep-prompt", "prompt"):
        # A prefix run saves its folded keys and values: they load as a deep prompt (no MLP).
        mode = "prompt" if adapter.method == "prompt" else "deep-prompt"
        add_virtual_tokens(model, mode, adapter.settings["length"])
    else:
        raise ValueError(f"load_adapter: unknown adapter method {adapter.method!r}")


def _digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)  # (N,): any dtype reads as N * itemsize bytes
    digest = hashlib.sha256(f"{tensor.dtype} {tuple(tensor.shape)}".encode())
    digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def tensor_digests(model: nn.Module, names: list[str] | None = None) -> dict[str, str]:
    """{state_dict name: _digest} of `model` (only `names`, when given)."""
    state = model.state_dict()
    return {name: _digest(state[name]) for name in (state if names is None else names)}


def _fingerprint(digests: dict[str, str]) -> str:
    """One SHA-256 over {name: digest}, in name order."""
    return hashlib.sha256("".join(f"{name} {d}\n" for name, d in sorted(digests.items())).encode()).hexdigest()


def _plain_name(name: str, targets: set[str]) -> str:
    """A wrapped layer's tensor by its name in the plain model: "<layer>.base.<rest>" -> "<layer>.<rest>"."""
    parts = name.split(".")
    for i in range(1, len(parts) - 1):
        if parts[i] == "base" and ".".join(parts[:i]) in targets:
            return ".".join(parts[:i] + parts[i + 1:])
    return name


def _base_fingerprint(model: nn.Module, adapter: Adapter) -> str:
    """The fingerprint of `model`'s tensors that `adapter` does not hold, by their plain names:
    the same for the plain base model and for the base inside the LoRA-wrapped one."""
    targets = set(adapter.targets)
    saved = {_plain_name(name, targets) for name in adapter.tensors}
    state = {_plain_name(name, targets): tensor for name, tensor in model.state_dict().items()}
    return _fingerprint({name: _digest(tensor) for name, tensor in state.items() if name not in saved})


def plan_adapter(model: nn.Module, config, base_digests: dict[str, str]) -> Adapter:
    """What a fresh LoRA run saves (the Trainer calls it once LoRA is applied). `base_digests`
    (tensor_digests, by plain names): the tensors init_from loaded, as it loaded them. Saved:
    every trainable tensor, and every other one that is not the base's as loaded (init_from left
    it fresh, or before_training changed it); the rest is the base, fingerprinted."""
    targets = _adapter_targets(model)
    trainable = {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    folded = folded_tensors(model)  # a prefix's MLP is saved as the keys and values it makes ...
    reparameterised = tuple(name.removesuffix("key_values") for name in folded)  # ... "<stack>.prefix."
    saved, base = [], {}
    for name, tensor in model.state_dict().items():
        plain = _plain_name(name, set(targets))
        if name not in trainable and plain in base_digests and _digest(tensor) == base_digests[plain]:
            base[plain] = base_digests[plain]
        elif not name.startswith(reparameterised):  # ... not as the MLP itself
            saved.append(name)
    saved += sorted(folded)
    source = Path(config.init_from)
    resolved = source if is_hf_directory(source) else resolve_checkpoint(source)
    method = config.finetune_mode
    if method in ("lora", "adalora"):
        rank = config.adalora_init_rank if method == "adalora" else config.lora_rank
        described = dict(rank=rank, alpha=config.lora_alpha, dropout=config.lora_dropout)
    elif method == "adapter":
        described = dict(settings={"adapter_size": config.adapter_size})
    else:
        described = dict(settings={"length": config.prefix_length if method == "prefix" else config.prompt_length})
    return Adapter(method=method, **described, targets=targets, tensors=saved, base=config.init_from,
                   base_checkpoint=str(resolved.resolve()), base_sha256=_fingerprint(base))


def read_adapter(path: str | os.PathLike) -> Adapter | None:
    """The adapter a checkpoint (or a run's latest one) holds; None for full weights."""
    checkpoint = resolve_checkpoint(path)

    def metadata(file: Path) -> dict:
        with safe_open(file, framework="pt") as f:
            return f.metadata() or {}

    described = _decode(checkpoint / WEIGHTS, metadata).get(ADAPTER)
    return None if described is None else Adapter(**json.loads(described))


def _check_base(model: nn.Module, adapter: Adapter, checkpoint: Path, where: str) -> None:
    fingerprint = _base_fingerprint(model, adapter)
    if fingerprint != adapter.base_sha256:
        raise ValueError(
            f"{where}: {checkpoint} is a {'LoRA' if adapter.method == 'lora' else adapter.method} adapter for the "
            f"base {adapter.base_checkpoint} (weights sha256 "
            f"{adapter.base_sha256[:16]}...), but this model's base weights hash to {fingerprint[:16]}...: a different "
            f"base model. Load the adapter on top of the base it was trained on"
        )


def _load_adapter_tensors(model: nn.Module, checkpoint: Path, adapter: Adapter, where: str) -> None:
    """Copy the adapter's tensors into a model that has its modules and the right base (checked first)."""
    wrapped = _adapter_targets(model)
    if wrapped != adapter.targets:
        raise ValueError(f"{where}: the model's adapted modules {wrapped[:4]}... are not the adapter's "
                         f"{adapter.targets[:4]}... ({len(wrapped)} against {len(adapter.targets)})")
    _check_base(model, adapter, checkpoint, where)
    tensors, state = read_weights(checkpoint), model.state_dict()
    for name in adapter.tensors:
        if name not in state or name not in tensors or tuple(tensors[name].shape) != tuple(state[name].shape):
            raise ValueError(f"{where}: {checkpoint}: the adapter's {name} does not fit this {type(model).__name__}")
    with torch.no_grad():
        for name in adapter.tensors:
            state[name].copy_(tensors[name])  # state_dict tensors share the parameters' storage


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Put the adapter of an adapter run (LoRA, Houlsby adapters, prefix, deep-prompt, prompt; its
    checkpoint, or the run directory) on `model`, a plain task model that holds the run's base
    weights: checks the base's fingerprint, adds the method's modules (_attach) and loads its
    tensors. In place; returns `model`, LoRA unmerged (merge_lora merges). ValueError when
    `model` is another architecture, has adapted modules already, or another base."""
    checkpoint = resolve_checkpoint(path)
    adapter = read_adapter(checkpoint)
    if adapter is None:
        raise ValueError(f"load_adapter: {checkpoint} holds full weights, not an adapter; use load_weights")
    if _adapter_targets(model):
        raise ValueError("load_adapter: the model has adapted modules (LoRA, adapters, virtual tokens) already; "
                         "pass the plain base model")
    mismatch = architecture_mismatch(read_configs(checkpoint).get("model", {}), model.config)
    if mismatch:
        raise ValueError(f"load_adapter: {checkpoint} is a different architecture: " + "; ".join(mismatch))
    _check_base(model, adapter, checkpoint, "load_adapter")
    _attach(model, adapter)
    _load_adapter_tensors(model, checkpoint, adapter, "load_adapter")
    return model


def is_hf_directory(path: Path) -> bool:
    """A Hugging Face model directory: its config.json has "model_type" (ours has "task")."""
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    values = _read_json(config)
    return "model_type" in values and "task" not in values


def has_tokenizer(directory: Path) -> bool:
    """Whether a checkpoint or Hugging Face folder carries a tokenizer (see TOKENIZER_FILES)."""
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def read_tokenizer(directory: Path):
    """The tokenizer a checkpoint or Hugging Face folder carries (sentencepiece or Hugging Face,
    through hf_tokenizer.load_tokenizer), or None when it has none."""
    from minillm.hf_tokenizer import load_tokenizer

    return load_tokenizer(directory) if has_tokenizer(directory) else None


def load_model(path: str | os.PathLike, merge_lora: bool = True, **runtime) -> tuple[nn.Module, dict, object]:
    """(model in eval mode, configs, tokenizer or None) from a minillm checkpoint or run directory,
    or from a Hugging Face GPT-2/BERT directory (through `minillm.convert.from_hf`).

    A LoRA run: its base (the checkpoint that init_from resolved to) is loaded, the adapter put on
    it (load_adapter) and, with merge_lora=True, merged into plain weights. A run trained wrapped by
    peft is refused (its weights have peft's names).
    runtime: ModelConfig runtime fields to override (attn_backend, norm_backend, dropouts).
    """
    bad = sorted(set(runtime) - set(RUNTIME_FIELDS))
    if bad:
        raise ValueError(f"load_model: only runtime fields {RUNTIME_FIELDS} may be overridden, got {bad}")
    path = Path(path)
    if is_hf_directory(path):
        from minillm.convert import from_hf

        model = from_hf(path, **runtime)
        task = {"CausalLM": "causal-lm", "SequenceClassifier": "classification"}.get(type(model).__name__)
        if task is None:
            task = "mlm-nsp" if getattr(model, "nsp_head", None) is not None else "mlm"
        tokenizer = read_tokenizer(path)  # the folder's own: GPT-2's byte-level BPE, BERT's WordPiece, an export
        if tokenizer is not None:
            check_vocab(model.config, tokenizer, f"load_model({path})")
        return model, {"task": task, "model": model.config.to_dict(), "source": str(path)}, tokenizer

    checkpoint = resolve_checkpoint(path)
    configs = read_configs(checkpoint)
    if "peft" in configs:
        raise ValueError(f"load_model: {checkpoint} was trained wrapped by peft ({configs['peft']}); build the model, "
                         f"wrap it with the same get_peft_model and call load_weights(model, path)")
    try:
        model_config = ModelConfig.from_dict({**configs["model"], **runtime})
        task = configs["task"]
    except KeyError as err:
        raise ValueError(f"load_model: {checkpoint / CONFIG} lacks the {err} entry") from None
    tokenizer = read_tokenizer(checkpoint)
    if tokenizer is not None:
        check_vocab(model_config, tokenizer, f"load_model({checkpoint})")
    model = build_model(model_config, task)
    adapter = read_adapter(checkpoint)
    if QUANTIZATION in configs:  # quantize_checkpoint's: int8/int4 layers in place of the projections
        spec = configs[QUANTIZATION]
        make_quantized_layers(model, spec["layers"], spec["bits"], spec["group_size"], spec["scheme"])
        load_weights(model, checkpoint)
    elif adapter is not None:
        base = Path(adapter.base_checkpoint)
        if not base.exists():
            raise FileNotFoundError(f"load_model: {checkpoint} is a LoRA adapter on the base {base}, which is not "
                                    f"there; load the base model and call load_adapter(model, {str(checkpoint)!r})")
        init_from(model, base)
        load_adapter(model, checkpoint)
    else:
        train = configs.get("train", {})
        if train.get("finetune_mode") == "lora":  # written by an older minillm: every weight, LoRA's names
            add_lora(model, train["lora_rank"], train["lora_alpha"])
        load_weights(model, checkpoint)
    if merge_lora:
        merge(model)
    return model.eval(), configs, tokenizer


# The body of each task model, so that pretrained weights move between tasks:
# MaskedLM.encoder -> SequenceClassifier.body, CausalLM.decoder -> SequenceClassifier.body.
_BODY_PREFIXES = ("encoder.", "decoder.", "body.")


def _body_key(name: str) -> str | None:
    for prefix in _BODY_PREFIXES:
        if name.startswith(prefix):
            return "body." + name[len(prefix):]
    return None


def init_from(model: nn.Module, path: str | os.PathLike, tokenizer=None) -> dict:
    """Initialise `model` from pretrained weights: a minillm checkpoint (or run directory), or a
    Hugging Face GPT-2/BERT directory. Returns {"loaded": [...], "fresh": [...]} parameter names.

    Same task: every weight is loaded. Another task (an MLM or causal LM checkpoint into a
    classifier): the body (embeddings and blocks) and, where present, the pooler are loaded; the
    new head keeps its initialisation. Errors name the architecture fields that differ, or the
    vocabulary mismatch with `tokenizer`.
    """
    path = Path(path)
    if is_hf_directory(path):
        source, _, saved_tokenizer = load_model(path)
        saved_config, tensors = source.config.to_dict(), dict(source.state_dict())
    else:
        checkpoint = resolve_checkpoint(path)
        configs = read_configs(checkpoint)
        if QUANTIZATION in configs:
            raise ValueError(f"init_from: {checkpoint} is a quantized checkpoint, for inference only; start from the "
                             f"checkpoint it was made from ({configs[QUANTIZATION].get('source')})")
        saved_config, tensors = configs.get("model", {}), read_weights(checkpoint)
        adapter = read_adapter(checkpoint)
        if adapter is not None and adapter.method != "lora":
            raise ValueError(f"init_from: {path} is a {adapter.method!r} run's adapter, which does not merge into "
                             f"plain weights; start from its base {adapter.base_checkpoint}, or load it with load_model")
        if any(".lora_A" in name for name in tensors):  # a LoRA fine-tune: start from its merged weights
            tensors = dict(load_model(checkpoint)[0].state_dict())
        saved_tokenizer = read_tokenizer(checkpoint)
    mismatch = architecture_mismatch(saved_config, model.config, ignore=HEAD_FIELDS)
    if mismatch:
        raise ValueError(f"init_from: {path} is a different architecture: " + "; ".join(mismatch))
    check_vocab(model.config, tokenizer, f"init_from({path})")
    if tokenizer is not None and saved_tokenizer is not None and tokenizer.fingerprint != saved_tokenizer.fingerprint:
        raise ValueError(f"init_from: the tokenizer differs from the one saved in {path}; fine-tune with that tokenizer")

    target = model.state_dict()
    if set(target) <= set(tensors) and all(tensors[k].shape == target[k].shape for k in target):
        model.load_state_dict({k: tensors[k] for k in target}, strict=True)
        return {"loaded": sorted(target), "fresh": []}
    by_body = {}
    for name, tensor in tensors.items():
        key = _body_key(name) if not name.startswith("pooler.") else name
        if key is not None:
            by_body.setdefault(key, tensor)
    loaded, fresh = [], []
    with torch.no_grad():
        for name, param in target.items():
            key = _body_key(name) or name
            source = by_body.get(key)
            if source is not None and source.shape == param.shape:
                param.copy_(source)
                loaded.append(name)
            else:
                fresh.append(name)
    body_missing = [n for n in fresh if _body_key(n) is not None]
    if body_missing:
        raise ValueError(f"init_from: {path} lacks body weights this model needs: {body_missing[:8]}")
    return {"loaded": loaded, "fresh": fresh}
