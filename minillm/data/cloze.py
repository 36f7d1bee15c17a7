"""PET-style cloze classification data (Schick & Schütze, 2021) for a masked LM.

A pattern turns an example into a cloze question, and a verbalizer maps each label to one word:

    pattern "{text} This is about [MASK]."      verbalizer  json -> "data", email -> "mail", ...

The masked LM reads ``[CLS] <pattern with the text> [SEP]`` and its MLM head gives logits at the
[MASK] position; the class scores are the logits of the K verbalizer tokens, so training is

    p(y | x) = softmax_k( logits[mask position, v_k] ),     loss = -log p(y | x)

and the prediction is the label whose word scores highest. Nothing new is learnt from scratch:
the MLM head that pretraining trained does the classifying, which is why PET needs few labels.

Patterns. ``{text}`` (and ``{text_pair}`` for text pairs, e.g. ``"{text} ? [MASK], {text_pair}"``)
and exactly one ``[MASK]``; the rest is literal text. Each part is tokenised on its own; when the
whole does not fit ``max_len``, the texts lose their last tokens (the longest first), never the
pattern's words or the mask. Verbalizer words must each be one token of the tokenizer (a word of
several pieces is refused, naming the pieces): the cloze has one blank. With a tokenizer that
writes a space as its own piece (minillm's), that piece comes from the pattern's space before
[MASK] and the word's token is the piece after it (`verbalizer_ids`).

Batches: ``input_ids``, ``attention_mask``, ``token_type_ids`` (B, T); ``mlm_labels`` (B, T),
IGNORE_INDEX except the [MASK] position, which holds the true label's token (the model then runs
its head on that position only); ``labels`` (B,) label ids; ``verbalizer_ids`` (K,) token ids.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from minillm.data.classification import ClassificationExamples, pad_id_of
from minillm.data.collate import to_tensors
from minillm.metrics import IGNORE_INDEX

MASK = "[MASK]"
_PARTS = re.compile(r"(\{text\}|\{text_pair\}|\[MASK\])")


def parse_verbalizer(value: str | None, label_names: list[str]) -> list[str]:
    """One word per label id from ``"label=word,label=word"`` (None: the label names themselves).
    ValueError naming DataConfig.cloze_verbalizer for a label without a word or an unknown label."""
    if value is None:
        return list(label_names)
    words = {}
    for item in value.split(","):
        label, sep, word = item.partition("=")
        if not sep or not label.strip() or not word.strip():
            raise ValueError(f"DataConfig.cloze_verbalizer: got {value!r}, expected 'label=word,label=word,...'")
        words[label.strip()] = word.strip()
    unknown = sorted(set(words) - set(label_names))
    if unknown:
        raise ValueError(f"DataConfig.cloze_verbalizer: labels {unknown} are not in the data's labels {label_names}")
    missing = [name for name in label_names if name not in words]
    if missing:
        raise ValueError(f"DataConfig.cloze_verbalizer: labels {missing} have no word; give one for every label "
                         f"of {label_names}")
    return [words[name] for name in label_names]


def check_pattern(pattern: str, pairs: bool | None = None) -> None:
    """ValueError naming DataConfig.cloze_pattern unless it has {text}, exactly one [MASK], and
    {text_pair} exactly when the examples are pairs (`pairs` None: not known yet)."""
    if pattern.count(MASK) != 1:
        raise ValueError(f"DataConfig.cloze_pattern: got {pattern!r}, expected exactly one {MASK} (the blank the "
                         f"verbalizer's words fill)")
    if pattern.count("{text}") != 1:
        raise ValueError(f"DataConfig.cloze_pattern: got {pattern!r}, expected {{text}} once (where the example goes)")
    if pairs is not None and pairs != ("{text_pair}" in pattern):
        need = "a {text_pair} for the second text" if pairs else "no {text_pair} (the examples are single texts)"
        raise ValueError(f"DataConfig.cloze_pattern: got {pattern!r}, expected {need}")


def verbalizer_ids(tokenizer, words: list[str]) -> list[int]:
    """The one token of each word; ValueError naming the word and its pieces when it has several.
    A tokenizer that writes a space as a piece of its own (``splits_on_spaces``: minillm's own)
    encodes a word as that piece and the word's: the word's token is the one after it, and the
    space before [MASK] in the pattern gives the question that same space piece."""
    space = list(tokenizer.space_ids) if getattr(tokenizer, "splits_on_spaces", False) else []
    ids = []
    for word in words:
        pieces = tokenizer.encode(word)
        if space and pieces[:len(space)] == space:
            pieces = pieces[len(space):]
        if len(pieces) != 1:
            shown = [tokenizer.id_to_piece(i) for i in pieces]
            raise ValueError(f"DataConfig.cloze_verbalizer: the word {word!r} is {len(pieces)} tokens {shown}, not "
                             f"one; the cloze has one blank: choose a word the tokenizer keeps whole")
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"DataConfig.cloze_verbalizer: two labels share a token ({words})")
    return ids


class ClozeDataset(torch.utils.data.Dataset):
    """Examples as cloze questions (module docstring): ``[CLS] pattern [SEP]`` with one [MASK]."""

    def __init__(self, examples: ClassificationExamples, tokenizer, max_len: int, pattern: str, words: list[str]):
        check_pattern(pattern, examples.text_pairs is not None)
        cls_id, sep_id, mask_id = tokenizer.require("cls"), tokenizer.require("sep"), tokenizer.require("mask")
        self.verbalizer = verbalizer_ids(tokenizer, words)
        parts = [p for p in _PARTS.split(pattern) if p]
        literal = {p: tokenizer.encode(p) for p in parts if p not in ("{text}", "{text_pair}", MASK)}
        fixed = 2 + 1 + sum(len(ids) for ids in literal.values())  # [CLS] [SEP], the mask, the pattern's words
        if fixed >= max_len:
            raise ValueError(f"DataConfig.cloze_pattern: its {fixed} tokens leave no room for the text in "
                             f"seq_len={max_len}")
        texts = {"{text}": tokenizer.encode_batch(examples.texts)}
        if examples.text_pairs is not None:
            texts["{text_pair}"] = tokenizer.encode_batch(examples.text_pairs)
        self.items = []
        for k in range(len(examples)):
            filled = {name: list(ids[k]) for name, ids in texts.items()}
            while fixed + sum(map(len, filled.values())) > max_len:  # cut the longest text's last token
                longest = max(filled, key=lambda name: len(filled[name]))
                filled[longest].pop()
            ids = [cls_id]
            for part in parts:
                if part == MASK:
                    mask_position = len(ids)
                    ids.append(mask_id)
                else:
                    ids += filled[part] if part in filled else literal[part]
            ids.append(sep_id)
            item = {"input_ids": np.array(ids, dtype=np.int64), "mask_position": mask_position}
            if examples.labels is not None:
                item["label"] = examples.labels[k]
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class ClozeCollator:
    """Right-pad cloze questions into the batch of the module docstring."""

    def __init__(self, tokenizer, verbalizer: list[int]):
        self.pad_id = pad_id_of(tokenizer)
        self.verbalizer = np.array(verbalizer, dtype=np.int64)

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(s["input_ids"]) for s in samples)
        ids = np.full((len(samples), width), self.pad_id, dtype=np.int64)  # (B, T)
        attention = np.zeros((len(samples), width), dtype=np.int64)
        mlm_labels = np.full((len(samples), width), IGNORE_INDEX, dtype=np.int64)
        for i, sample in enumerate(samples):
            n = len(sample["input_ids"])
            ids[i, :n], attention[i, :n] = sample["input_ids"], 1
            # the MLM head runs where the label is set: the mask; the true word there (unused by the loss)
            mlm_labels[i, sample["mask_position"]] = self.verbalizer[sample.get("label", 0)]
        batch = {"input_ids": ids, "attention_mask": attention, "token_type_ids": np.zeros_like(ids),
                 "mlm_labels": mlm_labels, "verbalizer_ids": self.verbalizer}
        if "label" in samples[0]:
            batch["labels"] = np.array([s["label"] for s in samples], dtype=np.int64)
        return to_tensors(batch)
