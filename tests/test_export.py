"""`minillm export`: a folder that transformers loads on its own, and that comes back exactly.

A tiny model with a tokenizer trained here is saved as a minillm checkpoint, exported, then loaded
by transformers from the folder alone, in a fresh process that never imports minillm:
`pipeline("text-generation")` greedy text equals `minillm generate --greedy`, `pipeline("fill-mask")`
top-1 equals minillm's, and minillm -> transformers -> minillm gives the same logits bit for bit
and the same token ids.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from minillm import CausalLM, MaskedLM, build_model, preset
from minillm.checkpoint import save_model
from minillm.export import export
from minillm.generation import generate_text
from minillm.hf_tokenizer import load_tokenizer
from minillm.recipes import fit_to_tokenizer
from minillm.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [f"the {a} cat sat on the {b} mat number {i}.\nA second line, with café and 東京 {i}."
         for i, (a, b) in enumerate(zip(["red", "big", "old", "shy"] * 40, ["blue", "small", "new", "warm"] * 40))]
PROMPTS = ["the red cat", "  spaces at the edges  ", "a line\nand another", "café 東京 ünïcödé ✓ 42"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.train(TEXTS, tmp_path_factory.mktemp("tok") / "tok", vocab_size=400, num_threads=1)


def small(name, tokenizer, task):
    torch.manual_seed(0)
    config = fit_to_tokenizer(preset(name, n_layers=2, d_model=32, n_heads=2, max_seq_len=64), tokenizer)
    return build_model(config, task).eval()


def in_fresh_process(script: str) -> dict:
    """Run `script` in a new Python that imports transformers only; it prints one JSON line."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def gpt_export(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt")
    model = small("tiny", tokenizer, "causal-lm")
    save_model(root / "ckpt", model, tokenizer=tokenizer)
    return model, root / "ckpt", export(root / "ckpt", root / "hf")


@pytest.fixture(scope="module")
def bert_export(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    model = small("tiny-bert", tokenizer, "mlm-nsp")
    with torch.no_grad():  # a trained MLM never predicts a special token; make this random one so too
        model.mlm_head.bias[torch.from_numpy(tokenizer.special)] = -1e4
    save_model(root / "ckpt", model, tokenizer=tokenizer)
    return model, root / "ckpt", export(root / "ckpt", root / "hf")


def test_the_folder_holds_what_transformers_reads(gpt_export, bert_export):
    names = lambda path: sorted(p.name for p in path.iterdir())  # noqa: E731
    tokenizer_files = ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert names(gpt_export[2]) == sorted(["config.json", "generation_config.json", "model.safetensors", *tokenizer_files])
    assert names(bert_export[2]) == sorted(["config.json", "model.safetensors", *tokenizer_files])
    config = json.loads((gpt_export[2] / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]


def test_text_generation_pipeline_equals_minillm_generate(gpt_export, tokenizer):
    model, checkpoint, folder = gpt_export
    theirs = in_fresh_process(f"""
        import json, sys
        from transformers import pipeline
        pipe = pipeline("text-generation", model={str(folder)!r})
        out = [pipe(p, max_new_tokens=12, do_sample=False)[0]["generated_text"] for p in {PROMPTS!r}]
        assert "minillm" not in sys.modules
        print(json.dumps(out))
    """)
    ours = generate_text(model, tokenizer, PROMPTS, max_new_tokens=12, greedy=True)
    assert theirs == [g.prompt + g.text for g in ours]
    assert all(g.new_tokens > 0 for g in ours)  # the comparison is about generated text, not empty strings
    cli = subprocess.run([sys.executable, "-m", "minillm.cli", "generate", "--checkpoint", str(checkpoint),
                          "--prompt", PROMPTS[0], "--greedy", "--max-new-tokens", "12"], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.rstrip("\n") == theirs[0]


def test_fill_mask_pipeline_top1_equals_minillm(bert_export, tokenizer):
    model, _, folder = bert_export
    prompts = ["the [MASK] cat sat", "a second [MASK], with café", "[MASK] on the mat"]
    theirs = in_fresh_process(f"""
        import json
        from transformers import pipeline
        pipe = pipeline("fill-mask", model={str(folder)!r})
        print(json.dumps([pipe(p, top_k=1)[0]["token_str"].strip() for p in {prompts!r}]))
    """)
    ours = [g.text for g in generate_text(model, tokenizer, prompts)]
    assert ours == [p.replace("[MASK]", f"[{word}]") for p, word in zip(prompts, theirs)]


def test_transformers_tokenizer_gives_minillm_ids(gpt_export, bert_export, tokenizer):
    texts = PROMPTS + ["", " ", "\n\n", "tab\there", "emoji 🙂 and ǅ and \x7f"]
    theirs = in_fresh_process(f"""
        import json
        from transformers import AutoTokenizer
        gpt = AutoTokenizer.from_pretrained({str(gpt_export[2])!r})
        bert = AutoTokenizer.from_pretrained({str(bert_export[2])!r})
        texts = {texts!r}
        print(json.dumps({{
            "gpt": [gpt(t)["input_ids"] for t in texts],
            "decoded": [gpt.decode(gpt(t)["input_ids"], skip_special_tokens=True) for t in texts],
            "bert": [bert(t)["input_ids"] for t in texts],
            "pair": dict(bert("first part", "second part")),
            "mask": bert.mask_token_id,
            "gpt_mask_text": gpt("[MASK] is text to a GPT")["input_ids"],
            "bert_mask": bert("a [MASK] b")["input_ids"],
        }}))
    """)
    assert theirs["gpt"] == [tokenizer.encode(t) for t in texts]
    # gpt decoding keeps the dummy prefix's space (what a continuation needs): minillm's text, after
    # one space when the first piece carries it
    assert theirs["decoded"] == [(" " if ids and tokenizer.id_to_piece(ids[0]).startswith("\u2581") else "")
                                 + tokenizer.decode(ids) for ids in map(tokenizer.encode, texts)]
    cls, sep = tokenizer.require("cls"), tokenizer.require("sep")
    assert theirs["bert"] == [[cls, *tokenizer.encode(t), sep] for t in texts]
    a, b = tokenizer.encode("first part"), tokenizer.encode("second part")
    assert theirs["pair"]["input_ids"] == [cls, *a, sep, *b, sep]
    assert theirs["pair"]["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert theirs["mask"] == tokenizer.require("mask")
    assert theirs["gpt_mask_text"] == tokenizer.encode("[MASK] is text to a GPT")
    assert theirs["bert_mask"] == [cls, *tokenizer.encode("a"), tokenizer.require("mask"), *tokenizer.encode("b"), sep]


def test_round_trip_is_exact(gpt_export, bert_export, tokenizer):
    ids = torch.tensor([tokenizer.encode("the red cat sat on the blue mat")])
    for (model, _, folder), cls in ((gpt_export, CausalLM), (bert_export, MaskedLM)):
        back = cls.from_pretrained(folder)
        assert torch.equal(back(ids).logits, model(ids).logits)
        for name, param in model.state_dict().items():
            assert torch.equal(back.state_dict()[name], param), name
        returned = load_tokenizer(folder)
        assert [returned.encode(t) for t in PROMPTS] == [tokenizer.encode(t) for t in PROMPTS]


def test_export_refuses_what_it_cannot_write(tokenizer, tmp_path, gpt_export):
    rope = small("tiny-bert", tokenizer, "mlm").__class__(
        fit_to_tokenizer(preset("tiny-bert", pos_encoding="rope", n_layers=1), tokenizer))
    save_model(tmp_path / "rope", rope, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="pos_encoding.*--model.pos_encoding=learned"):
        export(tmp_path / "rope", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))  # nothing half-written
    seq2seq = small("tiny-seq2seq", tokenizer, "seq2seq")
    save_model(tmp_path / "s2s", seq2seq, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="config.pos_encoding"):  # a Seq2SeqLM exports as T5, this one cannot
        export(tmp_path / "s2s", tmp_path / "out")
    save_model(tmp_path / "notok", small("tiny", tokenizer, "causal-lm"))
    with pytest.raises(ValueError, match="no tokenizer"):
        export(tmp_path / "notok", tmp_path / "out")


def test_export_never_replaces_other_files(gpt_export, tmp_path):
    _, checkpoint, _ = gpt_export
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="not empty"):
        export(checkpoint, tmp_path / "run")
    with pytest.raises(FileExistsError, match="metrics.jsonl"):
        export(checkpoint, tmp_path / "run", overwrite=True)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["metrics.jsonl"]
    export(checkpoint, tmp_path / "hf")
    export(checkpoint, tmp_path / "hf", overwrite=True)  # an earlier export is replaced


def test_export_command(gpt_export, tmp_path):
    _, checkpoint, _ = gpt_export
    run = lambda *args: subprocess.run([sys.executable, "-m", "minillm", "export", *args],  # noqa: E731
                                       capture_output=True, text=True)
    done = run("--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf"))
    assert done.returncode == 0, done.stderr
    assert "AutoModelForCausalLM.from_pretrained" in done.stdout and (tmp_path / "hf" / "tokenizer.json").is_file()
    again = run("--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf"))
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--overwrite" in again.stderr
    assert run("--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf"), "--overwrite").returncode == 0


def test_a_lora_fine_tune_exports_merged(bert_export, tokenizer, tmp_path):
    """minillm finetune with LoRA saves an adapter on its base; export merges it, and transformers'
    BertForSequenceClassification gives minillm's logits."""
    import random

    from minillm import cli
    from minillm.checkpoint import load_model

    _, base, _ = bert_export
    rng = random.Random(0)
    for name in ("train", "dev"):
        rows = ["text,label"] + [f"the {rng.choice(['red', 'big', 'old'])} cat sat on the mat,{rng.choice(['yes', 'no'])}"
                                 for _ in range(24)]
        (tmp_path / f"{name}.csv").write_text("\n".join(rows) + "\n")
    code = cli.main(["finetune", f"--train.init_from={base}", "--train.finetune_mode=lora", "--model.classifier_pooling=auto",
                     f"--data.train_file={tmp_path / 'train.csv'}", f"--data.validation_file={tmp_path / 'dev.csv'}",
                     "--data.seq_len=32", "--train.max_steps=3", "--train.batch_size=4", "--train.eval_every=3",
                     "--train.progress=false", "--train.device=cpu", "--train.probe_steps=0", "--train.lr=1e-2",
                     f"--train.out_dir={tmp_path / 'lora'}"])
    assert code == 0
    from safetensors.torch import load_file

    saved = load_file(next((tmp_path / "lora").glob("step_*")) / "model.safetensors")
    assert saved and all("lora_" in name or name.startswith(("classifier.", "pooler.")) for name in saved)  # the adapter
    folder = export(tmp_path / "lora", tmp_path / "hf")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    ours, _, _ = load_model(tmp_path / "lora")
    ids = torch.tensor([[tokenizer.require("cls"), *tokenizer.encode("the red cat sat"), tokenizer.require("sep")]])
    assert torch.allclose(theirs(ids).logits, ours(ids).logits, atol=1e-5)
    unmerged, _, _ = load_model(tmp_path / "lora", merge_lora=False)
    assert torch.allclose(unmerged(ids).logits, ours(ids).logits, atol=1e-5)


def test_a_t5_exports_and_generates_as_minillm(tokenizer, tmp_path):
    """A tiny T5 (relative position bias, RMS norm): transformers' generate on the exported folder,
    with its own tokenizer (the source ends with EOS), gives minillm's greedy output text."""
    model = small("tiny-t5", tokenizer, "seq2seq")
    save_model(tmp_path / "ckpt", model, tokenizer=tokenizer)
    folder = export(tmp_path / "ckpt", tmp_path / "hf")
    assert json.loads((folder / "generation_config.json").read_text())["decoder_start_token_id"] == model.config.bos_token_id
    sources = ["the red cat sat", "café 東京 a line"]
    theirs = in_fresh_process(f"""
        import json
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(folder)!r})
        model = AutoModelForSeq2SeqLM.from_pretrained({str(folder)!r}).eval()
        out = []
        for s in {sources!r}:
            ids = tok(s, return_tensors="pt")
            gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
            out.append({{"ids": ids["input_ids"][0].tolist(), "text": tok.decode(gen[0], skip_special_tokens=True)}})
        print(json.dumps(out))
    """)
    eos = tokenizer.require("eos")
    assert [t["ids"] for t in theirs] == [tokenizer.encode(s) + [eos] for s in sources]
    ours = generate_text(model, tokenizer, sources, max_new_tokens=8, greedy=True)
    assert [t["text"] for t in theirs] == [g.text for g in ours]
