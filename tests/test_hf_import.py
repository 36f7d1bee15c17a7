"""Hugging Face GPT-2 and BERT folders, with their own tokenizers, through minillm's commands.

Each folder is made here as transformers writes it (a tiny random model with save_pretrained, and
its tokenizer: a byte-level BPE as GPT-2 ships it, vocab.json + merges.txt + tokenizer.json; BERT's
WordPiece vocab.txt), then used where a minillm checkpoint goes: `minillm generate` and
`minillm evaluate --checkpoint DIR`, `minillm finetune --train.init_from=DIR`. transformers itself
is the reference for what the folder means: its greedy generation, its fill-mask pipeline, its
tokenizer's ids.
"""

import contextlib
import io
import json
import random

import numpy as np
import pytest
import torch

from minillm import cli
from minillm.checkpoint import load_model
from minillm.data.shards import TokenShards
from minillm.hf_tokenizer import HFTokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ("the a module function returns value list string file path object class method error raises if when "
         "with for each new name data").split()
TRAIN = ["--train.max_steps=4", "--train.warmup_steps=1", "--train.batch_size=4", "--train.eval_every=2",
         "--train.eval_batches=2", "--train.progress=false", "--train.lr=3e-3", "--train.device=cpu",
         "--train.probe_steps=0"]


def run(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))).capitalize() + "." for _ in range(n)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-import")
    rng = random.Random(1)
    (root / "corpus").mkdir()
    for d in range(30):
        (root / "corpus" / f"doc{d:02d}.txt").write_text(" ".join(sentences(8, seed=d)) + "\n")
    for name, n in (("train", 80), ("dev", 24)):
        rows = ["text,label"]
        for _ in range(n):
            label = rng.choice(["yes", "no"])
            words = [rng.choice(WORDS) for _ in range(6)] + ["good" if label == "yes" else "bad"]
            rng.shuffle(words)
            rows.append(f"{' '.join(words)},{label}")
        (root / f"{name}.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def gpt2_folder(work):
    """A GPT-2 folder: random GPT2LMHeadModel and a byte-level BPE, as GPT-2 ships them."""
    folder = work / "gpt2"
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(sentences(300) + ["good bad yes no"], vocab_size=320, min_frequency=1,
                            special_tokens=["<|endoftext|>"])
    end = "<|endoftext|>"
    transformers.GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=end, eos_token=end,
                                   unk_token=end).save_pretrained(folder)
    bpe.save_model(str(folder))  # vocab.json + merges.txt, as GPT-2 ships them beside tokenizer.json
    eos = bpe.token_to_id(end)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=bpe.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=eos, eos_token_id=eos)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_folder(work):
    """A BERT folder: random BertForMaskedLM and a WordPiece vocab.txt (lower-cased, as bert-base-uncased)."""
    folder = work / "bert"
    folder.mkdir()
    pieces = sorted({w.lower() for w in WORDS} | {"good", "bad", "yes", "no", ".", ",", "##s", "##ed"})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces, *sorted(set("abcdefghijklmnopqrstuvwxyz") - set(pieces))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=64, pad_token_id=0)
    model = transformers.BertForMaskedLM(config)
    with torch.no_grad():  # a trained MLM never predicts [PAD], [CLS]...: make this random one so too
        model.cls.predictions.bias[:5] = -1e4
    model.save_pretrained(folder)
    return folder


def test_generate_from_a_gpt2_folder_equals_transformers(gpt2_folder):
    prompt = "The module returns"
    code, out, err = run("generate", "--checkpoint", gpt2_folder, "--prompt", prompt, "--greedy", "--max-new-tokens", 10)
    assert code == 0, err
    tokenizer = transformers.AutoTokenizer.from_pretrained(gpt2_folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder)
    ids = tokenizer(prompt, return_tensors="pt")
    theirs = model.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.rstrip("\n") == tokenizer.decode(theirs[0], skip_special_tokens=True)
    assert len(theirs[0]) > ids["input_ids"].shape[1]


def test_fill_mask_from_a_bert_folder_equals_transformers(bert_folder):
    prompts = ["the [MASK] returns a value", "each new [MASK] raises"]
    code, out, err = run("generate", "--checkpoint", bert_folder, *[a for p in prompts for a in ("--prompt", p)])
    assert code == 0, err
    pipe = transformers.pipeline("fill-mask", model=str(bert_folder))
    words = [pipe(p, top_k=1)[0]["token_str"] for p in prompts]
    assert out.splitlines() == [p.replace("[MASK]", f"[{w}]") for p, w in zip(prompts, words)]


def test_evaluate_a_gpt2_folder_on_a_corpus_reads_it_with_its_tokenizer(gpt2_folder, work):
    prepared = work / "prep-gpt2"
    code, out, err = run("evaluate", "--checkpoint", gpt2_folder, f"--data.inputs={work / 'corpus'}",
                         f"--data.prepared_dir={prepared}", "--data.val_fraction=0.2", "--data.seq_len=32")
    assert code == 0, err
    assert "(causal-lm)" in out and "loss" in out
    theirs = transformers.AutoTokenizer.from_pretrained(gpt2_folder)
    shards = TokenShards(prepared, "val")
    texts = {p.name: p.read_text() for p in (work / "corpus").iterdir()}
    documents = [shards.document(i, with_eos=True).tolist() for i in range(len(shards))]
    expected = {tuple(theirs(t)["input_ids"] + [theirs.eos_token_id]) for t in texts.values()}
    assert documents and all(tuple(d) in expected for d in documents)  # GPT-2's own ids, EOS after each


def test_finetune_from_a_bert_folder_keeps_its_wordpiece(bert_folder, work):
    out_dir = work / "clf-bert"
    code, out, err = run("finetune", f"--train.init_from={bert_folder}", f"--data.train_file={work / 'train.csv'}",
                         f"--data.validation_file={work / 'dev.csv'}", "--data.seq_len=24", *TRAIN,
                         f"--train.out_dir={out_dir}")
    assert code == 0, err
    assert f"Hugging Face checkpoint {bert_folder}" in out
    model, configs, tokenizer = load_model(out_dir)
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.fingerprint == HFTokenizer.load(bert_folder).fingerprint
    theirs = transformers.AutoTokenizer.from_pretrained(bert_folder)
    assert tokenizer.encode("The Module RETURNS value") == theirs("The Module RETURNS value", add_special_tokens=False)["input_ids"]
    hf = transformers.BertForMaskedLM.from_pretrained(bert_folder)
    moved = (model.body.embeddings.token.weight - hf.bert.embeddings.word_embeddings.weight).abs().max()
    assert 0 < moved < 0.1  # started from the folder's weights, then trained
    code, out, err = run("evaluate", "--checkpoint", out_dir)
    assert code == 0, err
    assert "accuracy" in out


def test_a_folder_without_a_tokenizer_says_what_it_needs(bert_folder, tmp_path, work):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((bert_folder / name).read_bytes())
    code, out, err = run("finetune", f"--train.init_from={bare}", f"--data.train_file={work / 'train.csv'}",
                         f"--data.validation_file={work / 'dev.csv'}", *TRAIN, f"--train.out_dir={tmp_path / 'x'}")
    assert code == 2 and out == ""
    assert "has no tokenizer" in err and "tokenizer.json" in err and err.count("\n") == 1
    code, out, err = run("generate", "--checkpoint", bare, "--prompt", "a [MASK]")
    assert code == 2 and "has no tokenizer" in err


def test_finetune_a_gpt2_folder_as_a_classifier(gpt2_folder, work):
    """GPT-2's tokenizer has no [CLS], [SEP] or [PAD]: each text ends with EOS, as GPT-2 ends a
    document, the classifier reads that last token, and EOS pads."""
    out_dir = work / "clf-gpt2"
    code, out, err = run("finetune", "--model", "gpt", f"--train.init_from={gpt2_folder}",
                         f"--data.train_file={work / 'train.csv'}", f"--data.validation_file={work / 'dev.csv'}",
                         "--data.seq_len=24", *TRAIN, f"--train.out_dir={out_dir}")
    assert code == 0, err
    from minillm.data.classification import ClassificationCollator, ClassificationDataset, read_classification

    model, _, tokenizer = load_model(out_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(gpt2_folder)
    examples = read_classification(work / "dev.csv", "text", "label")
    dataset = ClassificationDataset(examples, tokenizer, max_len=24)
    assert [list(item["input_ids"]) for item in dataset] == [
        theirs(t)["input_ids"][:23] + [theirs.eos_token_id] for t in examples.texts]
    batch = ClassificationCollator(tokenizer, segments=False)([dataset[0], dataset[1]])
    assert set(batch["input_ids"][batch["attention_mask"] == 0].tolist()) <= {theirs.eos_token_id}
    code, out, err = run("evaluate", "--checkpoint", out_dir)
    assert code == 0 and "accuracy" in out, err
