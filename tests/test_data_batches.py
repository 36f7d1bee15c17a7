"""Pretraining batches: causal windows, MLM masking statistics, NSP pairs, span corruption."""

import random

import numpy as np
import pytest
import torch

from minillm.data.causal import CausalLMCollator, CausalLMDataset
from minillm.data.corpus import Document
from minillm.data.mlm import MLMCollator, MLMDataset
from minillm.data.nsp import NSPCollator, NSPDataset
from minillm.data.prepare import prepare
from minillm.data.seq2seq import Seq2SeqCollator, SpanCorruptionDataset, span_corruption
from minillm.data.shards import TokenShards
from minillm.tokenizer import CLS_ID, EOS_ID, MASK_ID, PAD_ID, SEP_ID, Tokenizer

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
    "tau upsilon phi chi psi omega the of and to in is that for it as with was on be by this "
    "unbelievable internationalisation reconstruction"
).split()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("batches")
    rng = random.Random(0)
    docs = [Document(f"doc-{d}", random_lines(rng, rng.randint(1, 8), 3, 20)) for d in range(300)]
    tok, shards = tokenize_and_shard(docs, root)
    return tok, shards, docs


def random_lines(rng: random.Random, n_lines: int, min_words: int, max_words: int) -> str:
    """`n_lines` lines of `min_words`..`max_words` random words each."""
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n_lines))


def tokenize_and_shard(docs: list[Document], root) -> tuple[Tokenizer, TokenShards]:
    """A 400-piece tokenizer trained on `docs`, and the train-split shards of `docs`."""
    tok = Tokenizer.train(docs, root / "tok", vocab_size=400)
    prepare(docs, tok, root / "out", val_fraction=0.05, progress=False)
    return tok, TokenShards(root / "out", "train")


def test_causal_windows(data):
    tok, shards, _ = data
    seq = CausalLMDataset(shards, 32, mode="sequential")
    assert len(seq) == shards.n_tokens // 32
    batch = CausalLMCollator()([seq[0], seq[1]])
    assert batch["input_ids"].shape == (2, 32) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"])  # the model shifts internally
    assert batch["attention_mask"].all()
    assert torch.equal(batch["input_ids"][1], torch.from_numpy(shards.tokens[32:64].astype(np.int64)))
    rand = CausalLMDataset(shards, 32, mode="random", seed=3, samples=10)
    assert len(rand) == 10 and np.array_equal(rand[4]["input_ids"], rand[4]["input_ids"])
    assert len({rand.start(i) for i in range(10)}) > 1
    other_seed = CausalLMDataset(shards, 32, mode="random", seed=4, samples=10)
    assert [rand.start(i) for i in range(10)] != [other_seed.start(i) for i in range(10)]


def test_random_samples_are_a_pure_function_of_seed_and_index(data):
    """No epoch state: a dataset built afresh, read in another order, gives the same samples."""
    tok, shards, _ = data
    builders = {
        "causal": lambda: CausalLMDataset(shards, 32, mode="random", seed=3, samples=20),
        "nsp": lambda: NSPDataset(shards, tok, 40, seed=3, samples=20),
        "spans": lambda: SpanCorruptionDataset(shards, tok, 32, seed=3),
    }
    for name, build in builders.items():
        first, second = build(), build()
        assert not hasattr(first, "set_epoch"), name  # nothing to call between epochs
        forward = [first[i]["input_ids"] for i in range(20)]
        backward = [second[i]["input_ids"] for i in reversed(range(20))][::-1]
        assert all(np.array_equal(a, b) for a, b in zip(forward, backward)), name


def test_causal_document_mask(data):
    tok, shards, _ = data
    ds = CausalLMDataset(shards, 64, mode="sequential", document_mask=True)
    batch = CausalLMCollator()([ds[i] for i in range(4)])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "position_ids", "document_ids"}
    ids, pos, doc = batch["input_ids"].numpy(), batch["position_ids"].numpy(), batch["document_ids"].numpy()
    assert pos.shape == doc.shape == ids.shape and batch["document_ids"].dtype == torch.long
    for b in range(ids.shape[0]):
        assert doc[b, 0] == 0 and pos[b, 0] == 0  # every row counts its own documents from 0
        for t in range(1, ids.shape[1]):
            starts = ids[b, t - 1] == EOS_ID  # a document starts right after an EOS
            assert doc[b, t] == doc[b, t - 1] + starts
            assert pos[b, t] == (0 if starts else pos[b, t - 1] + 1)
    assert doc.max() > 0  # the windows do hold several documents
    labels = batch["labels"].numpy()
    assert (labels[pos == 0] == -100).all() and (labels[pos > 0] == ids[pos > 0]).all()  # no cross-document target
    # The batch goes straight into a CausalLM; a document inside a window gets its logits alone.
    from minillm import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, max_seq_len=64),
                        "causal-lm").eval()
    with torch.no_grad():
        logits = model(**batch).logits  # (B, T, V)
        b = int(np.flatnonzero(doc.max(axis=1) > 0)[0])
        second = torch.from_numpy(doc[b] == 1)
        alone = model(batch["input_ids"][b, second][None]).logits[0]
    torch.testing.assert_close(logits[b, second], alone, atol=2e-5, rtol=1e-4)
    plain = CausalLMCollator()([CausalLMDataset(shards, 64, mode="sequential")[i] for i in range(4)])
    assert set(plain) == {"input_ids", "attention_mask", "labels"}
    with pytest.raises(ValueError, match="seq_len=100000 is longer than the train split"):
        CausalLMDataset(shards, 100000)


def mask_stats(batch, tok):
    labels, inputs = batch["labels"], batch["input_ids"]
    chosen = labels != -100
    original = torch.where(chosen, labels, inputs)
    special = torch.from_numpy(tok.special)[original] | (batch["attention_mask"] == 0)
    return chosen, original, special, inputs


@pytest.mark.parametrize("whole_word", [False, True])
def test_mlm_statistics_over_10k_samples(data, whole_word):
    tok, shards, _ = data
    ds = MLMDataset(shards, tok, 48)
    collate = MLMCollator(tok, whole_word_mask=whole_word, seed=1)
    samples = [ds[i % len(ds)] for i in range(10_000)]
    batch = collate(samples)
    chosen, original, special, inputs = mask_stats(batch, tok)
    assert not (chosen & special).any()  # special and pad are never chosen
    assert torch.equal(inputs[special], original[special])  # nor changed
    assert (inputs[:, 0] == CLS_ID).all()
    rate = chosen.sum().item() / (~special).sum().item()
    assert abs(rate - 0.15) < 0.01, rate
    n = chosen.sum().item()
    as_mask = (inputs[chosen] == MASK_ID).sum().item() / n
    kept = (inputs[chosen] == original[chosen]).sum().item() / n
    randomised = 1 - as_mask - kept
    assert abs(as_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.02 and abs(randomised - 0.1) < 0.02, (as_mask, kept)
    assert not torch.from_numpy(tok.special)[inputs[chosen & (inputs != MASK_ID)]].any()  # random ids never special
    if whole_word:  # a word is chosen entirely or not at all
        word_start = torch.from_numpy(tok.word_start)[original] | torch.from_numpy(tok.standalone)[original.roll(1, 1)]
        continuation = ~word_start & ~special
        continuation[:, 0] = False
        prev_chosen = chosen.roll(1, 1)
        assert torch.equal(chosen[continuation], prev_chosen[continuation])
        assert continuation[chosen].any()  # multi-piece words were masked (the check is not vacuous)


def test_mlm_padding_and_reproducibility(data):
    tok, shards, _ = data
    ds = MLMDataset(shards, tok, 48)
    samples = [ds[i] for i in range(8)]
    a = MLMCollator(tok, seed=5)(samples)
    b = MLMCollator(tok, seed=5)(samples)
    assert all(torch.equal(a[k], b[k]) for k in a)
    lengths = a["attention_mask"].sum(1)
    assert lengths.max() <= 48 and (a["input_ids"][a["attention_mask"] == 0] == PAD_ID).all()
    with pytest.raises(ValueError, match="mlm_probability"):
        MLMCollator(tok, mlm_probability=1.5)


def test_mlm_masks_differ_across_dataloader_workers(data):
    tok, shards, _ = data
    same = [MLMDataset(shards, tok, 48)[0]] * 8
    loader = torch.utils.data.DataLoader([same, same], batch_size=None, num_workers=2,
                                         collate_fn=MLMCollator(tok, seed=0), multiprocessing_context="fork")
    first, second = list(loader)  # one batch from each worker, same samples, same seed
    assert not torch.equal(first["labels"], second["labels"])


def test_nsp_pairs(data):
    tok, shards, docs = data
    max_len = 40
    ds = NSPDataset(shards, tok, max_len, seed=2, samples=10_000)
    samples = [ds[i] for i in range(len(ds))]
    labels = np.array([s["next_sentence_label"] for s in samples])
    assert abs(labels.mean() - 0.5) < 0.02
    stream = shards.tokens.astype(np.int64).tobytes()
    for s in samples[:2000]:
        ids, types = s["input_ids"], s["token_type_ids"]
        assert len(ids) <= max_len and len(ids) == len(types)
        seps = np.flatnonzero(ids == SEP_ID)
        assert ids[0] == CLS_ID and len(seps) == 2 and seps[1] == len(ids) - 1
        assert (types[: seps[0] + 1] == 0).all() and (types[seps[0] + 1 :] == 1).all()
        a, b = ids[1 : seps[0]], ids[seps[0] + 1 : -1]
        assert len(a) >= 1 and len(b) >= 1
        if s["next_sentence_label"] == 0:  # A then B is a contiguous piece of one document
            assert np.concatenate([a, b]).astype(np.int64).tobytes() in stream
    batch = NSPCollator(tok)(samples[:16])
    assert batch["next_sentence_label"].shape == (16,) and batch["token_type_ids"].shape == batch["input_ids"].shape


@pytest.fixture(scope="module")
def paragraph_data(tmp_path_factory):
    """Documents of 2-6 paragraphs (1-3 lines each) separated by blank lines."""
    root = tmp_path_factory.mktemp("paragraphs")
    rng = random.Random(1)
    docs = []
    for d in range(80):
        paragraphs = [random_lines(rng, rng.randint(1, 3), 2, 8) for _ in range(rng.randint(2, 6))]
        docs.append(Document(f"doc-{d}", "\n\n".join(paragraphs)))
    return tokenize_and_shard(docs, root)


def test_nsp_cuts_at_paragraphs(paragraph_data):
    tok, shards = paragraph_data
    ds = NSPDataset(shards, tok, 64, seed=0, samples=3000)
    newline = ds.newline_id
    assert newline is not None and tok.id_to_piece(newline) == "\n"
    stream = shards.tokens.astype(np.int64)
    stream_bytes = stream.tobytes()
    blank = np.array([newline, newline], dtype=np.int64)
    # where a paragraph may start in the stream: after a blank line or at a document's start
    starts = set(ds.paragraph_starts(stream).tolist()) | {0} | set((np.flatnonzero(stream == EOS_ID) + 1).tolist())
    b_lengths = {0: [], 1: []}
    paragraph_cuts = 0
    for i in range(len(ds)):
        s = ds[i]
        ids = s["input_ids"]
        sep = int(np.flatnonzero(ids == SEP_ID)[0])
        a, b = ids[1:sep], ids[sep + 1 : -1]
        if len(a) < 2 or not np.array_equal(a[-2:], blank):
            continue  # a token cut: a span that is one long paragraph
        paragraph_cuts += 1
        assert b[0] != newline
        b_lengths[s["next_sentence_label"]].append(len(b))
        if s["next_sentence_label"] == 0:  # B is the paragraph that follows A in the same document
            assert np.concatenate([a, b]).tobytes() in stream_bytes
        else:  # B starts at a paragraph start of some document, like a true B does
            where = [k for k in np.flatnonzero(stream == b[0]) if np.array_equal(stream[k : k + len(b)], b)]
            assert any(k in starts for k in where), tok.decode(b.tolist())
    assert paragraph_cuts > 0.9 * len(ds)  # 64 tokens hold several paragraphs of these documents
    # B's length says nothing about the label
    mean_true, mean_random = np.mean(b_lengths[0]), np.mean(b_lengths[1])
    assert abs(mean_true - mean_random) < 0.1 * mean_true, (mean_true, mean_random)


def test_nsp_without_paragraphs_cuts_anywhere(data):
    tok, shards, _ = data  # lines joined by single newlines: no blank lines, no paragraphs
    ds = NSPDataset(shards, tok, 40, seed=0, samples=500)
    assert len(ds.paragraph_starts(shards.tokens.astype(np.int64))) == 0
    cuts = set()
    for i in range(len(ds)):
        ids = ds[i]["input_ids"]
        cuts.add(int(np.flatnonzero(ids == SEP_ID)[0]))
    assert len(cuts) > 10  # random token cuts, not a few fixed places


def test_span_corruption_reconstructs_the_original(data):
    tok, shards, _ = data
    rng = np.random.default_rng(0)
    sentinels = tok.sentinel_ids
    for length in (2, 3, 10, 57, 200):
        tokens = rng.integers(30, tok.vocab_size, size=length)
        source, target = span_corruption(tokens, sentinels, rng, 0.15, 3.0)
        # fill every sentinel of the source with its span from the target
        spans, current = {}, None
        for t in target:
            if t in sentinels:
                current = t
                spans[current] = []
            else:
                spans[current].append(t)
        rebuilt = [x for t in source for x in (spans[t] if t in sentinels else [t])]
        assert rebuilt == tokens.tolist()
        noise = len(target) - len(spans)
        assert noise == min(max(round(0.15 * length), 1), length - 1)
    ds = SpanCorruptionDataset(shards, tok, 32)
    batch = Seq2SeqCollator(tok)([ds[i] for i in range(8)])
    assert batch["input_ids"].shape[1] <= 32
    assert (batch["decoder_input_ids"][:, 0] == tok.bos_id).all()
    real = batch["labels"] != -100
    # decoder input is the target shifted right by one
    assert torch.equal(batch["decoder_input_ids"][:, 1:][real[:, 1:]], batch["labels"][:, :-1][real[:, 1:]])
    assert ((batch["labels"] == EOS_ID).sum(1) == 1).all()
