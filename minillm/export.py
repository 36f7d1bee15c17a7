"""`minillm export`: a trained model as a folder that Hugging Face transformers loads on its own.

    from minillm.export import export
    export("runs/pretrain-gpt", "exported/gpt")      # a run directory or one checkpoint

    # then, anywhere transformers is installed (no minillm needed):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    model = AutoModelForCausalLM.from_pretrained("exported/gpt")
    tokenizer = AutoTokenizer.from_pretrained("exported/gpt")

The folder holds
    config.json              the transformers config, with model_type ("gpt2" or "bert") and architecture
    model.safetensors        the weights, renamed and reshaped by minillm.convert (tied copies left out)
    generation_config.json   GPT and T5: bos/eos/pad ids (T5: the decoder's start), so generate()
                             starts, stops and pads as minillm does
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
                             the run's tokenizer, giving exactly minillm's token ids and text
                             (minillm.hf_tokenizer); BERT's tokenizer frames text as [CLS] ... [SEP],
                             T5's ends a source with EOS

What exports (minillm.convert says why the rest cannot): a causal LM as GPT2LMHeadModel, an MLM
(with or without NSP) as BertForMaskedLM / BertForPreTraining, an encoder classifier as
BertForSequenceClassification (learned positions, LayerNorm, biases, one key/value head per head);
a T5 (relative position bias, RMS norm, no biases) as T5ForConditionalGeneration.
A LoRA fine-tune is exported with its updates merged into the weights.

The folder is written beside its final place and renamed into it, so a failed export leaves no
half-written folder; an existing non-empty folder is refused unless overwrite=True.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from minillm.checkpoint import load_model
from minillm.convert import hf_config_of, save_hf
from minillm.hf_tokenizer import export_tokenizer


EXPORT_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json")


def generation_config(model_config, family: str) -> dict:
    """What transformers' generate() reads beside config.json: where text starts, ends and is
    padded (and, for T5, the token the decoder starts from: minillm's BOS). Greedy, as
    `model.generate` and `minillm generate --greedy`."""
    ids = {"bos_token_id": model_config.bos_token_id, "eos_token_id": model_config.eos_token_id,
           "pad_token_id": model_config.pad_token_id, "do_sample": False}
    if family == "t5":
        ids["decoder_start_token_id"] = model_config.bos_token_id
    return ids


def export(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the transformers folder of a minillm checkpoint or run directory (module docstring);
    returns out_dir. ValueError naming the config field when the model has no transformers
    equivalent, or when the checkpoint has no tokenizer."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"--out: {out} already exists and is not empty; choose another folder or pass --overwrite")
        others = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES) if out.is_dir() else [out.name]
        if others:  # --overwrite replaces an earlier export, never a run or a dataset
            raise FileExistsError(f"--out: {out} holds files an export does not write ({others[:5]}); "
                                  f"--overwrite only replaces an earlier export")
    model, configs, tokenizer = load_model(checkpoint, merge_lora=True)
    if "quantization" in configs:
        raise ValueError(f"--checkpoint: {checkpoint} is a quantized checkpoint; transformers' GPT-2/BERT/T5 classes "
                         f"hold floating-point weights, so export the checkpoint it was made from "
                         f"({configs['quantization'].get('source')})")
    if tokenizer is None:
        raise ValueError(f"--checkpoint: {checkpoint} has no tokenizer; transformers needs one to read and write text")
    family = hf_config_of(model)["model_type"]  # refuses, naming the field, what transformers cannot express

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        save_hf(model, staging)
        if family in ("gpt2", "t5"):
            (staging / "generation_config.json").write_text(
                json.dumps(generation_config(model.config, family), indent=2) + "\n")
        export_tokenizer(tokenizer, staging, template={"gpt2": "gpt", "bert": "bert", "t5": "t5"}[family],
                         model_max_length=model.config.max_seq_len)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
