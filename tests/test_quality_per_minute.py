"""benchmarks/quality_per_minute.py: the text it splits, and its one evaluator (every symbol of the
held-out text scored once, from as much context as the window allows), against hand computation."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("quality_per_minute", ROOT / "benchmarks" / "quality_per_minute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_text_is_normalised_to_paragraphs_and_split_at_one():
    qpm = load_benchmark()
    text = qpm.normalise("\n\nOne  \r\nline two\r\n\n\n\nPara two\t\n\n \nPara three\n\n")
    assert text == "One\nline two\n\nPara two\n\nPara three"
    train, heldout = qpm.split_text(text, 0.5)
    assert train + "\n\n" + heldout == text and heldout == "Para three"
    with pytest.raises(SystemExit, match="no paragraph break"):
        qpm.split_text("a single paragraph", 0.5)


def bigram_logits(table: torch.Tensor):
    """A model whose next-symbol logits depend on the current symbol only: logits_of(ids) (B, T, V)."""
    return lambda input_ids: table[input_ids]


@pytest.mark.parametrize("n, seq_len", [(1, 4), (7, 4), (9, 4), (30, 8), (5, 64)])
def test_total_nats_scores_every_symbol_once(n, seq_len):
    qpm = load_benchmark()
    torch.manual_seed(n)
    vocab, context_id = 6, 5
    table = torch.randn(vocab, vocab)
    tokens = np.random.default_rng(n).integers(0, vocab, size=n)
    # by hand: -ln p(token_i | token_{i-1}), the first from the context symbol
    previous = np.concatenate([[context_id], tokens[:-1]])
    expected = -sum(torch.log_softmax(table[p], -1)[t].item() for p, t in zip(previous, tokens))
    got = qpm.total_nats(bigram_logits(table), tokens, context_id, seq_len, batch_size=2)
    assert got == pytest.approx(expected, rel=1e-6)


def test_the_char_model_is_scored_per_character_of_the_text_plus_its_end(monkeypatch):
    qpm = load_benchmark()
    vocab = sorted(set("ab\n"))
    stoi = {ch: i for i, ch in enumerate(vocab)}
    model = qpm.MinimalGPT(len(vocab), 8, 16, 1, 2)
    uniform = lambda input_ids: torch.zeros(*input_ids.shape, len(vocab))  # noqa: E731  every symbol 1/V
    monkeypatch.setattr(model, "logits", uniform)
    heldout = "abba\nab"
    assert qpm.score_char_model(model, heldout, stoi) == pytest.approx(math.log(len(vocab)))
