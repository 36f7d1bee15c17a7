"""Zero-/few-shot label scoring with a causal LM (minillm.label_scoring): the log-likelihoods
against a hand computation, one token at a time, on a tiny random GPT (C=32, 2 blocks, V=50)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minillm.config import ModelConfig
from minillm.data.classification import examples_from_pairs
from minillm.label_scoring import continuation_log_likelihoods, score_labels
from minillm.tasks import build_model
from minillm.trainer import seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

V = 50


def gpt(max_seq_len: int = 32):
    seed_everything(0)
    config = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=max_seq_len, init_std=0.1)
    return build_model(config, "causal-lm").eval()


class CharTokenizer:
    """One token per character (code point mod V): enough to build prompts."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % V for c in text]


def by_hand(model, prompt: list[int], continuation: list[int]) -> float:
    """Σ_t log p(c_t | prompt, c_<t), one forward per token, on the unpadded sequence."""
    total = 0.0
    for t, token in enumerate(continuation):
        ids = torch.tensor([prompt + continuation[:t]])  # (1, T)
        with torch.no_grad():
            log_probs = F.log_softmax(model(ids).logits[0, -1].double(), dim=-1)  # (V,) at the last position
        total += log_probs[token].item()
    return total


def test_log_likelihoods_equal_a_hand_computation():
    model = gpt()
    prompts = [[3, 4, 5, 6, 7], [9], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
    continuations = [[30], [31, 32], [33, 34, 35]]
    scores, cut = continuation_log_likelihoods(model, prompts, continuations, batch_size=4)  # rows split in batches
    assert scores.shape == (3, 3) and cut == 0
    expected = torch.tensor([[by_hand(model, p, c) for c in continuations] for p in prompts], dtype=torch.float64)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    assert len(set(scores.flatten().tolist())) == 9  # no two the same: a mixed-up row would show


def test_a_prompt_too_long_loses_its_first_tokens_and_is_counted():
    model = gpt(max_seq_len=8)
    prompt, continuation = list(range(1, 13)), [40, 41]  # 12 + 2 tokens > 8
    scores, cut = continuation_log_likelihoods(model, [prompt], [continuation])
    assert cut == 1
    assert scores[0, 0].item() == pytest.approx(by_hand(model, prompt[-6:], continuation), abs=1e-5)
    with pytest.raises(ValueError, match="a continuation of 8 tokens leaves no room"):
        continuation_log_likelihoods(model, [prompt], [list(range(8))])


def examples(pairs, labels=("no", "yes")):
    return examples_from_pairs(pairs, list(labels), "test")


def test_few_shot_prompts_hold_the_demonstrations_and_predict_the_best_score():
    model, tokenizer = gpt(max_seq_len=256), CharTokenizer()
    train = examples([("bad film", 0), ("awful", 0), ("fine film", 1), ("great", 1), ("dull", 0)])
    test = examples([("good", 1), ("poor", 0), ("nice", 1)])
    zero = score_labels(model, tokenizer, test, ["no", "yes"])
    assert zero["prompt"] == "Text: good\nLabel:"
    few = score_labels(model, tokenizer, test, ["no", "yes"], train=train, shots=2, seed=1)
    demonstrations = few["prompt"].split("\n\n")[:-1]
    assert len(demonstrations) == 4 and few["prompt"].endswith("\n\nText: good\nLabel:")
    assert sorted(d.rsplit(" ", 1)[1] for d in demonstrations) == ["no", "no", "yes", "yes"]
    for d in demonstrations:  # each with its own label's word
        text = d.removeprefix("Text: ").split("\nLabel:")[0]
        assert d.endswith([" no", " yes"][dict(zip(train.texts, train.labels))[text]])
    for result in (zero, few):
        assert torch.equal(result["predictions"], result["scores"].argmax(-1))
        assert result["accuracy"] == pytest.approx((result["predictions"] == torch.tensor(test.labels)).double().mean())
    # the score of the first example's "yes" is the log-likelihood of " yes" after its prompt
    expected = by_hand(model, tokenizer.encode(few["prompt"]), tokenizer.encode(" yes"))
    assert few["scores"][0, 1].item() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(template="Label:"), r"template: got 'Label:', expected a string with \{text\}"),
    (dict(template="{text} {other}"), r"and no other \{field\}"),
    (dict(verbalizer=["no", " "]), "verbalizer: every label needs a non-empty word"),
    (dict(verbalizer=["no"]), "verbalizer: 1 words for labels up to 1"),
    (dict(shots=3), "shots: 3 demonstrations per class asked, but label 0 has only 2"),
])
def test_bad_settings_name_the_argument(kwargs, message):
    train = examples([("a", 0), ("b", 0), ("c", 1), ("d", 1), ("e", 1)])
    settings = {"verbalizer": ["no", "yes"], "train": train, **kwargs}
    with pytest.raises(ValueError, match=message):
        score_labels(gpt(), CharTokenizer(), examples([("x", 1)]), **settings)


