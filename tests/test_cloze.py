"""PET-style cloze classification (task "cloze", minillm.data.cloze): the questions it builds, the
loss over the verbalizer's logits at the mask, and its errors (`minillm finetune --train.task=cloze`
end to end: tests/test_finetune_methods.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minillm.config import ModelConfig
from minillm.data import DataConfig
from minillm.data.classification import ClassificationExamples, examples_from_pairs
from minillm.data.cloze import ClozeCollator, ClozeDataset, parse_verbalizer
from minillm.metrics import IGNORE_INDEX
from minillm.tasks import build_model, get_task
from minillm.trainer import seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

CLS, SEP, MASK, PAD = 1, 2, 3, 0


class WordTokenizer:
    """One token per word: ids 10, 11, ... in order of first sight; "zzz" is split in two pieces."""

    cls_id, sep_id, mask_id, pad_id, eos_id = CLS, SEP, MASK, PAD, None

    def __init__(self):
        self.vocab = {}

    def require(self, name):
        return getattr(self, f"{name}_id")

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            pieces = [word[:1], word[1:]] if word == "zzz" else [word]
            ids += [self.vocab.setdefault(p, 10 + len(self.vocab)) for p in pieces]
        return ids

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def id_to_piece(self, i: int) -> str:
        return {v: k for k, v in self.vocab.items()}[i]


def examples(pairs, labels=("neg", "pos")):
    return examples_from_pairs(pairs, list(labels), "test")


def test_a_cloze_question_is_the_pattern_with_the_text_and_one_mask():
    tok = WordTokenizer()
    data = examples([("a b c d e f", 1), ("g", 0)])
    dataset = ClozeDataset(data, tok, max_len=8, pattern="{text} it was [MASK] .", words=["bad", "good"])
    w = tok.vocab
    # 2 specials + "it was" + mask + "." = 6: the first text keeps its first 2 tokens of 6
    assert dataset[0]["input_ids"].tolist() == [CLS, w["a"], w["b"], w["it"], w["was"], MASK, w["."], SEP]
    assert dataset[1]["input_ids"].tolist() == [CLS, w["g"], w["it"], w["was"], MASK, w["."], SEP]
    assert (dataset[0]["mask_position"], dataset[1]["mask_position"]) == (5, 4)
    batch = ClozeCollator(tok, dataset.verbalizer)([dataset[0], dataset[1]])
    assert batch["verbalizer_ids"].tolist() == [w["bad"], w["good"]] and batch["labels"].tolist() == [1, 0]
    assert batch["input_ids"][1].tolist()[-1] == PAD and batch["attention_mask"].sum().item() == 15
    expected = torch.full((2, 8), IGNORE_INDEX)
    expected[0, 5], expected[1, 4] = w["good"], w["bad"]
    assert torch.equal(batch["mlm_labels"], expected)


def test_a_pair_pattern_cuts_the_longest_text_first():
    tok = WordTokenizer()
    pairs = ClassificationExamples(["a b c d e", "f"], ["g h", "i j k l m n"], [0, 1], None, "t")
    dataset = ClozeDataset(pairs, tok, max_len=9, pattern="{text} ? [MASK] , {text_pair}", words=["no", "yes"])
    w = tok.vocab
    # 2 specials + "?" + mask + "," = 5: 4 tokens left for the two texts, the longer one cut first
    assert dataset[0]["input_ids"].tolist() == [CLS, w["a"], w["b"], w["?"], MASK, w[","], w["g"], w["h"], SEP]
    assert dataset[1]["input_ids"].tolist() == [CLS, w["f"], w["?"], MASK, w[","], w["i"], w["j"], w["k"], SEP]


def test_the_loss_is_cross_entropy_over_the_verbalizer_logits_at_the_mask():
    seed_everything(0)
    tok = WordTokenizer()
    data = examples([("a b", 1), ("c", 0), ("d e f", 1)])
    dataset = ClozeDataset(data, tok, max_len=12, pattern="{text} [MASK] !", words=["bad", "good"])
    batch = ClozeCollator(tok, dataset.verbalizer)([dataset[i] for i in range(3)])
    model = build_model(ModelConfig(arch="encoder", vocab_size=40, d_model=32, n_layers=1, n_heads=2,
                                    max_seq_len=16, type_vocab_size=2), "cloze").eval()
    out, losses = get_task("cloze").forward(model, batch)
    full = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    rows = torch.arange(3)
    positions = torch.tensor([dataset[i]["mask_position"] for i in range(3)])
    by_hand = full[rows, positions][:, batch["verbalizer_ids"]]  # (B, K)
    torch.testing.assert_close(out.logits, by_hand, rtol=1e-5, atol=1e-5)
    expected = F.cross_entropy(by_hand, batch["labels"], reduction="sum")
    torch.testing.assert_close(losses["loss"], expected, rtol=1e-5, atol=1e-5)


def test_errors_name_the_setting():
    tok = WordTokenizer()
    data = examples([("a b", 1), ("c", 0)])
    with pytest.raises(ValueError, match=r"the word 'zzz' is 2 tokens \['z', 'zz'\], not one"):
        ClozeDataset(data, tok, 16, "{text} [MASK]", ["zzz", "good"])
    with pytest.raises(ValueError, match=r"DataConfig.cloze_verbalizer: labels \['pos'\] have no word"):
        parse_verbalizer("neg=bad", ["neg", "pos"])
    with pytest.raises(ValueError, match=r"labels \['maybe'\] are not in the data's labels"):
        parse_verbalizer("neg=bad,pos=good,maybe=so", ["neg", "pos"])
    with pytest.raises(ValueError, match=r"DataConfig.cloze_pattern: got '\{text\} is good', expected a pattern"):
        DataConfig(cloze_pattern="{text} is good")
    with pytest.raises(ValueError, match=r"DataConfig.cloze_pattern: got '\[MASK\] news', expected a pattern"):
        DataConfig(cloze_pattern="[MASK] news")
    pairs = ClassificationExamples(["a", "b"], ["c", "d"], [0, 1], None, "t")
    with pytest.raises(ValueError, match=r"expected a \{text_pair\} for the second text"):
        ClozeDataset(pairs, tok, 16, "{text} [MASK]", ["x", "y"])
    assert parse_verbalizer("pos=good, neg=bad", ["neg", "pos"]) == ["bad", "good"]
    assert parse_verbalizer(None, ["neg", "pos"]) == ["neg", "pos"]

