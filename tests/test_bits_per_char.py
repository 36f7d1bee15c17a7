"""Per-character figures of a causal LM: nats per character and bits per byte.

Checked against independent computations: the covering windows score each token once (tokens
that name their own position); a model with uniform logits scores log(V) nats per token, so its
nats per character is log(V) * tokens / characters counted from the source text; a text short
enough for one window gives the cross-entropy computed directly from the model's logits; and
``minillm evaluate --data.inputs=FILE`` scores all of FILE and says so.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minillm import recipes
from minillm.config import ModelConfig
from minillm.data import CausalLMCollator, CausalLMDataset, DataConfig, TokenShards, prepare_from_config
from minillm.evaluation import CoveringWindows, evaluate_text, text_size
from minillm.metrics import IGNORE_INDEX
from minillm.tasks import build_model
from minillm.train_config import TrainConfig
from minillm.trainer import Trainer, seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

# Lines of text, each a document (text_split="lines"); accents and CJK make characters != bytes.
LINES = [f"{word} number {i}: café, naïve, 日本語 and a few more words of line {i}." for i, word in
         enumerate(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"] * 5)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpc")
    path = root / "lines.txt"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    data = DataConfig(inputs=[str(path)], text_split="lines", prepared_dir=str(root / "prepared"), vocab_size=320,
                      seq_len=16, val_fraction=0.0)
    tokenizer, _ = prepare_from_config(data, progress=False)
    return root, data, tokenizer


def tiny_lm(vocab_size: int, seed: int = 0):
    seed_everything(seed)
    return build_model(ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=2, max_seq_len=16),
                       "causal-lm").eval()


@pytest.mark.parametrize("n, seq_len", [(1, 8), (7, 8), (8, 8), (37, 8), (50, 16), (5, 16)])
def test_covering_windows_score_every_token_once(n, seq_len):
    eos = 1
    tokens = np.arange(10, 10 + n)  # distinct: a label names the position it scores
    windows = CoveringWindows(tokens, eos, seq_len)
    scored = []
    for k in range(len(windows)):
        item = windows[k]
        assert len(item["input_ids"]) == min(seq_len, n + 1)
        for j in np.flatnonzero(item["labels"] != IGNORE_INDEX):
            assert j >= 1 and item["labels"][j] == item["input_ids"][j]  # the model shifts: t - 1 predicts t
            previous = item["input_ids"][j - 1]
            assert previous == (eos if item["labels"][j] == 10 else item["labels"][j] - 1)  # its real context
            scored.append(int(item["labels"][j]))
    assert sorted(scored) == tokens.tolist()  # each once, none left out
    assert windows.scored_end(len(windows)) == n


def test_covering_windows_refuse_what_they_cannot_score():
    with pytest.raises(ValueError, match="no EOS"):
        CoveringWindows(np.arange(5), None, 8)
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2, got 1"):
        CoveringWindows(np.arange(5), 1, 1)


def test_uniform_model_gives_log_v_times_tokens_per_character(corpus):
    _, data, tokenizer = corpus
    shards = TokenShards(data.prepared_dir, "train")  # val_fraction=0: every line is here
    V = tokenizer.vocab_size
    model = tiny_lm(V)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits 0 everywhere: p = 1 / V for every token
    figures = evaluate_text(model, shards, tokenizer, seq_len=16, batch_size=3)
    # the source text, counted without the tokenizer: each line's characters plus one for its EOS
    chars = sum(len(line) for line in LINES) + len(LINES)
    n_bytes = sum(len(line.encode("utf-8")) for line in LINES) + len(LINES)
    tokens = sum(len(tokenizer.encode(line)) + 1 for line in LINES)
    assert chars < n_bytes and tokens == shards.n_tokens
    assert (figures["scored_tokens"], figures["scored_chars"], figures["scored_bytes"]) == (tokens, chars, n_bytes)
    assert figures["scored_documents"] == len(LINES)
    assert figures["val_loss"] == pytest.approx(math.log(V), rel=1e-6)
    assert figures["nats_per_char"] == pytest.approx(math.log(V) * tokens / chars, rel=1e-6)
    assert figures["bits_per_byte"] == pytest.approx(math.log2(V) * tokens / n_bytes, rel=1e-6)


def test_one_window_matches_the_cross_entropy_of_the_logits(corpus):
    """A text that fits one window: the figure is the model's own cross-entropy of every token,
    the first predicted from an EOS, divided by the characters of the text and its EOS."""
    _, data, tokenizer = corpus
    model = tiny_lm(tokenizer.vocab_size, seed=3)
    text = "beta: café 日本"
    ids = tokenizer.encode(text) + [tokenizer.eos_id]
    stream = torch.tensor([[tokenizer.eos_id] + ids])  # (1, n + 1)
    assert 8 < stream.shape[1] <= 16  # one window, several tokens
    with torch.no_grad():
        logits = model(stream).logits[0, :-1]  # (n, V): position t predicts t + 1
    nats = F.cross_entropy(logits.double(), stream[0, 1:], reduction="sum").item()

    class OneText:  # the two attributes evaluate_text reads from TokenShards
        tokens, eos_id = np.array(ids), tokenizer.eos_id

    figures = evaluate_text(model, OneText, tokenizer, seq_len=16)
    assert figures["nats_per_char"] == pytest.approx(nats / (len(text) + 1), rel=1e-5)
    assert figures["bits_per_byte"] == pytest.approx(nats / math.log(2) / (len(text.encode()) + 1), rel=1e-5)


def test_max_batches_scores_the_start_and_counts_its_characters(corpus):
    _, data, tokenizer = corpus
    shards = TokenShards(data.prepared_dir, "train")
    figures = evaluate_text(tiny_lm(tokenizer.vocab_size), shards, tokenizer, seq_len=16, batch_size=2, max_batches=1)
    assert figures["scored_tokens"] == 2 * 15  # two windows of 15 new tokens each
    assert (figures["scored_chars"], figures["scored_bytes"]) == text_size(shards.tokens[:30], shards.eos_id, tokenizer)
    assert figures["scored_chars"] < sum(len(line) for line in LINES)


def test_evaluate_scores_all_of_a_given_file(corpus, tmp_path):
    root, data, tokenizer = corpus
    run = tmp_path / "run"
    config = TrainConfig(out_dir=str(run), max_steps=1, warmup_steps=0, batch_size=2, eval_every=0, progress=False)
    train = CausalLMDataset(TokenShards(data.prepared_dir, "train"), 16)
    Trainer(tiny_lm(tokenizer.vocab_size), config, train, collate_fn=CausalLMCollator(), tokenizer=tokenizer,
            configs_to_save={"data": DataConfig(**{**data.to_dict(), "val_fraction": 0.1})}).fit()
    other = tmp_path / "other.txt"
    text = ["Une phrase en français, déjà évaluée.", "Another line, never seen."]
    other.write_text("\n".join(text), encoding="utf-8")
    said = []
    manifest = (Path(data.prepared_dir) / "manifest.json").read_text()
    result = recipes.evaluate(run, overrides={"inputs": [str(other)]}, echo=said.append)
    assert result["split"] == "all" and result["scored"].startswith(f"all of {other}, prepared in {data.prepared_dir}")
    assert (Path(data.prepared_dir) / "manifest.json").read_text() == manifest  # the run's own shards untouched
    assert result["scored_chars"] == sum(len(t) for t in text) + 2 and result["scored_documents"] == 2
    printed = "\n".join(said)
    assert f"scored all of {other}" in printed and "nats/char" in printed and "bits/byte" in printed
    # without an inputs override: the validation split of the run's own text
    own = recipes.evaluate(run, overrides={"prepared_dir": str(tmp_path / "own")}, echo=said.append)
    assert own["split"] == "validation" and own["scored"].startswith("the validation split of")
    assert 0 < own["scored_documents"] < len(LINES)
