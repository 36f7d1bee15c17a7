"""Zero-shot and few-shot classification with a causal LM, by scoring each label (no training).

A GPT reads a prompt and is asked how likely each label's word is as its continuation
(Brown et al., 2020; "in-context learning"). For an input x, labels 1..K with verbalizer words
v_1..v_K (each one or more tokens v_k = (v_k,1 .. v_k,m)) and a prompt built from a template,

    score_k(x) = log p(v_k | prompt(x)) = Σ_t log p(v_k,t | prompt(x), v_k,<t)     prediction = argmax_k score_k

Few-shot: `shots` labelled training examples per class ("demonstrations", the same ones for
every input, in a seeded random order) are written before the input with their label's word, in
the same template: ``"Text: <a>\\nLabel: <word>\\n\\nText: <b>\\nLabel: <word>\\n\\nText: <x>\\nLabel:"``.

Tokens. The prompt and each continuation (" " + word) are encoded separately and concatenated,
so every label is scored on the very same prompt tokens. A prompt longer than max_seq_len minus
the continuation loses its *first* tokens (the oldest demonstrations go first); how many inputs
were cut is returned and reported, never hidden. Scores are sums over a label's tokens: a
label of several tokens is not normalised by its length (say so in a verbalizer by choosing
one-token words where the tokenizer has them).

Not supported: calibration of the label priors (Zhao et al., 2021), demonstrations chosen per
input, encoder-decoder models.
"""

from __future__ import annotations

import random
import string

import torch
import torch.nn.functional as F

from minillm import checkpoint as ckpt
from minillm.data import DataConfig
from minillm.data.pipeline import classification_examples
from minillm.distributed import pick_device
from minillm.metrics import classification_metrics, confusion_matrix

TEMPLATE = "Text: {text}\nLabel:"
PAIR_TEMPLATE = "Text: {text}\nSecond text: {text_pair}\nLabel:"
SEPARATOR = "\n\n"  # between demonstrations


def continuation_log_likelihoods(model, prompts: list[list[int]], continuations: list[list[int]],
                                 batch_size: int = 16) -> tuple[torch.Tensor, int]:
    """(scores (N, K), prompts cut): score[n, k] = Σ_t log p(continuations[k][t] | prompts[n],
    continuations[k][:t]) under the causal LM `model` (module docstring; over-long prompts lose
    their first tokens)."""
    if not continuations or any(len(c) == 0 for c in continuations):
        raise ValueError("continuation_log_likelihoods: every continuation needs at least one token")
    max_len = model.config.max_seq_len
    longest = max(len(c) for c in continuations)
    if longest >= max_len:
        raise ValueError(f"continuation_log_likelihoods: a continuation of {longest} tokens leaves no room for the "
                         f"prompt in max_seq_len={max_len}")
    device = next(model.parameters()).device
    rows, cut = [], 0  # (n, k, ids, where the continuation starts)
    for n, prompt in enumerate(prompts):
        cut += len(prompt) + longest > max_len
        kept = prompt[-(max_len - longest):] if prompt else prompt
        if not kept:
            raise ValueError(f"continuation_log_likelihoods: prompt {n} is empty (a causal LM needs a first token)")
        rows += [(n, k, kept + cont, len(kept)) for k, cont in enumerate(continuations)]
    scores = torch.empty(len(prompts), len(continuations), dtype=torch.float64)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(len(ids) for _, _, ids, _ in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)  # (B, T), right-padded: causal, so padding
            for i, (_, _, row_ids, _) in enumerate(chunk):             # never reaches the real tokens
                ids[i, :len(row_ids)] = torch.tensor(row_ids)
            log_probs = F.log_softmax(model(ids.to(device)).logits.float(), dim=-1)  # (B, T, V)
            for i, (n, k, row_ids, begin) in enumerate(chunk):
                targets = torch.tensor(row_ids[begin:], device=device)  # (m,)
                # token t of the continuation is predicted at position begin + t - 1
                predicted = log_probs[i, begin - 1:len(row_ids) - 1]  # (m, V)
                scores[n, k] = predicted.gather(-1, targets[:, None]).sum().item()
    model.train(was_training)
    return scores, cut


def pick_demonstrations(labels: list[int], shots: int, num_labels: int, seed: int) -> list[int]:
    """Indices of `shots` examples of every label (seeded), in a shuffled order; ValueError when a
    label has fewer than `shots` examples."""
    rng = random.Random(seed)
    chosen = []
    for label in range(num_labels):
        pool = [i for i, y in enumerate(labels) if y == label]
        if len(pool) < shots:
            raise ValueError(f"shots: {shots} demonstrations per class asked, but label {label} has only {len(pool)} "
                             f"training examples")
        chosen += rng.sample(pool, shots)
    rng.shuffle(chosen)
    return chosen


def _fill(template: str, text: str, text_pair: str | None) -> str:
    return template.format(text=text, text_pair=text_pair) if text_pair is not None else template.format(text=text)


def check_template(template: str, pairs: bool) -> None:
    """ValueError unless `template` has {text} (and {text_pair} for text pairs) and no other field."""
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    allowed = {"text", "text_pair"} if pairs else {"text"}
    if "text" not in fields or (pairs and "text_pair" not in fields) or fields - allowed:
        raise ValueError(f"template: got {template!r}, expected a string with {{text}}"
                         f"{' and {text_pair}' if pairs else ''} and no other {{field}}")


def score_labels(model, tokenizer, examples, verbalizer: list[str], *, train=None, shots: int = 0, seed: int = 0,
                 template: str | None = None, batch_size: int = 16) -> dict:
    """Classify `examples` (minillm.data.classification.ClassificationExamples) by label scoring.

    verbalizer: one word (or phrase) per label id. train: the examples the demonstrations come
    from (`shots` per class, 0: zero-shot). template: TEMPLATE, or PAIR_TEMPLATE for text pairs.
    Returns {"scores" (N, K), "predictions" (N,), "accuracy", "macro_f1", "f1", "mcc", "cut"
    (prompts that lost their first tokens), "prompt" (the first input's prompt, for a look)}.
    """
    pairs = examples.text_pairs is not None
    template = template or (PAIR_TEMPLATE if pairs else TEMPLATE)
    check_template(template, pairs)
    num_labels = len(verbalizer)
    if examples.labels is not None and max(examples.labels) >= num_labels:
        raise ValueError(f"verbalizer: {num_labels} words for labels up to {max(examples.labels)}")
    if any(not word.strip() for word in verbalizer):
        raise ValueError(f"verbalizer: every label needs a non-empty word, got {verbalizer}")
    if shots < 0 or (shots and train is None):
        raise ValueError(f"shots: got {shots}, expected 0 or a positive number with training examples to draw from")
    prefix = ""
    if shots:
        chosen = pick_demonstrations(train.labels, shots, num_labels, seed)
        prefix = "".join(_fill(template, train.texts[i], train.text_pairs[i] if pairs else None)
                         + f" {verbalizer[train.labels[i]]}" + SEPARATOR for i in chosen)
    texts = [prefix + _fill(template, text, examples.text_pairs[i] if pairs else None)
             for i, text in enumerate(examples.texts)]
    prompts = [tokenizer.encode(text) for text in texts]
    continuations = [tokenizer.encode(f" {word}") for word in verbalizer]
    scores, cut = continuation_log_likelihoods(model, prompts, continuations, batch_size)
    predictions = scores.argmax(dim=-1)
    result = {"scores": scores, "predictions": predictions, "cut": cut, "prompt": texts[0] if texts else ""}
    if examples.labels is not None:
        matrix = confusion_matrix(predictions, torch.tensor(examples.labels), num_labels)
        result.update(classification_metrics(matrix))
    return result


def evaluate_checkpoint(checkpoint, data_fields: dict | None = None, *, shots: int = 0, verbalizer: list[str] | None = None,
                        template: str | None = None, seed: int = 0, batch_size: int = 16, device: str = "auto",
                        echo=print) -> dict:
    """`minillm evaluate --label-scoring`: score the labels of a classification data set (DataConfig
    fields `data_fields` on top of the embedded stdlib task, train_file="default") with a causal-LM
    checkpoint; the test split when there is one, else validation. The verbalizer defaults to the
    label names. Returns score_labels' figures (without the score tensors) with "split", "shots",
    "majority_baseline"."""
    model, configs, tokenizer = ckpt.load_model(checkpoint)
    if configs.get("task") != "causal-lm":
        raise ValueError(f"--label-scoring: {checkpoint} is a {configs.get('task')!r} model; label scoring needs a "
                         f"causal LM (a 'causal-lm' checkpoint)")
    if tokenizer is None:
        raise ValueError(f"--label-scoring: {checkpoint} has no tokenizer to write the prompts with")
    data = DataConfig.from_dict({"train_file": "default", **(data_fields or {})})
    splits = classification_examples(data)
    split = "test" if splits["test"] is not None else "validation"
    held_out, names = splits[split], splits["train"].label_map.names
    words = list(verbalizer) if verbalizer else list(names)
    if len(words) != len(names):
        raise ValueError(f"--verbalizer: got {len(words)} words {words}, expected one per label {names}")
    model.to(pick_device(device, 0))
    result = score_labels(model, tokenizer, held_out, words, train=splits["train"], shots=shots, seed=seed,
                          template=template, batch_size=batch_size)
    majority = max(set(splits["train"].labels), key=splits["train"].labels.count)
    baseline = sum(label == majority for label in held_out.labels) / len(held_out.labels)
    figures = {k: v for k, v in result.items() if k not in ("scores", "predictions")}
    cut = f"; {result['cut']} of {len(held_out)} prompts lost their first tokens to max_seq_len" if result["cut"] else ""
    echo(f"{checkpoint}: label scoring, {shots}-shot, {split} split ({len(held_out)} examples, words {words}): "
         f"accuracy {result['accuracy']:.1%}, MCC {result['mcc']:.3f} vs majority-class baseline {baseline:.1%}{cut}")
    return {"split": split, "shots": shots, "majority_baseline": baseline, **figures}
