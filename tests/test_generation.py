"""Generation: the KV cache changes nothing, padding changes nothing, sampling honours its knobs,
the window slides past max_seq_len, beam search finds the true best sequence when it is wide
enough, encoder-decoders sample, and generate_text turns prompts into texts for every model."""

import itertools
import random

import pytest
import torch

from minillm import ModelConfig, build_model
from minillm.generation import Generation, generate, generate_seq2seq, generate_text, left_pad, sample_next_token


def gpt(**overrides):
    torch.manual_seed(0)
    config = ModelConfig(arch="decoder", vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=40, **overrides)
    model = build_model(config, "causal-lm").eval()
    with torch.no_grad():  # sharper distributions than the 0.02 init, so greedy choices are not ties
        model.decoder.embeddings.token.weight.mul_(20)
    return model


@pytest.mark.parametrize(
    "overrides", [dict(), dict(pos_encoding="rope", n_kv_heads=1), dict(pos_encoding="sinusoidal", norm_placement="post")]
)
def test_cached_decoding_equals_full_recompute(overrides):
    model = gpt(**overrides)
    prompt = torch.randint(7, 61, (3, 6))
    cached = generate(model, prompt, max_new_tokens=12)
    recomputed = generate(model, prompt, max_new_tokens=12, use_cache=False)
    assert torch.equal(cached, recomputed)
    # And the logits of one cached step equal the logits of the full sequence at that position.
    full = model(cached).logits
    out = model(cached[:, :10])
    step = model(cached[:, 10:11], attention_mask=torch.ones(3, 11, dtype=torch.long), cache=out.cache)
    torch.testing.assert_close(step.logits[:, 0], full[:, 10], atol=1e-5, rtol=1e-5)


def test_padded_batch_generates_what_each_prompt_generates_alone():
    model = gpt(pos_encoding="rope")
    prompts = [torch.randint(7, 61, (n,)) for n in (5, 2, 8)]
    T = 8
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0, :5], mask[0, :5] = prompts[0], 1  # right padding: moved to the left by generate()
    ids[1, T - 2 :], mask[1, T - 2 :] = prompts[1], 1  # left padding
    ids[2], mask[2] = prompts[2], 1
    batched = generate(model, ids, mask, max_new_tokens=7)
    for i, prompt in enumerate(prompts):
        alone = generate(model, prompt[None], max_new_tokens=7)
        assert torch.equal(batched[i, -7:], alone[0, -7:]), i


def test_left_pad_keeps_token_order():
    ids = torch.tensor([[1, 2, 3, 0], [0, 0, 4, 5]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    new_ids, new_mask = left_pad(ids, mask)
    assert new_ids[0, 1:].tolist() == [1, 2, 3] and new_mask[0].tolist() == [0, 1, 1, 1]
    assert new_ids[1].tolist() == [0, 0, 4, 5]


def test_eos_stops_a_row_and_pads_after_it():
    model = gpt()
    prompt = torch.randint(7, 61, (2, 4))
    free = generate(model, prompt, max_new_tokens=10)
    eos = int(free[0, 6])  # the token row 0 produces at its third step
    stopped = generate(model, prompt, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    first_eos = (stopped[0, 4:] == eos).nonzero()[0].item() + 4
    assert torch.all(stopped[0, first_eos + 1 :] == 0)
    assert torch.equal(stopped[0, : first_eos + 1], free[0, : first_eos + 1])


def test_sampling_knobs():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    top1 = sample_next_token(logits, True, top_k=1, generator=gen)
    assert torch.all(top1 == 0)
    top2 = sample_next_token(logits, True, top_k=2, generator=gen)
    assert set(top2.tolist()) == {0, 1}
    # top-p: probabilities are ~[.61, .22, .14, .03, .004]; p=0.8 keeps the first two only.
    nucleus = sample_next_token(logits, True, top_p=0.8, generator=gen)
    assert set(nucleus.tolist()) == {0, 1}
    # Plain sampling follows softmax: check the frequency of the top token.
    plain = sample_next_token(logits, True, generator=gen)
    expected = logits[0].softmax(-1)[0].item()
    assert abs((plain == 0).float().mean().item() - expected) < 0.03
    # Low temperature approaches greedy.
    cold = sample_next_token(logits, True, temperature=0.05, generator=gen)
    assert torch.all(cold == 0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_bad_generation_arguments_name_the_argument(kwargs, match):
    model = gpt()
    with pytest.raises(ValueError, match=match):
        generate(model, torch.ones(1, 4, dtype=torch.long), **kwargs)


def short_gpt(**overrides):
    """A GPT of 16 positions: its context window is 15 tokens."""
    torch.manual_seed(0)
    config = ModelConfig(arch="decoder", vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, **overrides)
    model = build_model(config, "causal-lm").eval()
    with torch.no_grad():
        model.decoder.embeddings.token.weight.mul_(20)
    return model


def greedy_over_the_window(model, prompt, n):
    """n greedy tokens, each from a no-cache forward over (at most) the last max_seq_len - 1 tokens."""
    window = model.config.max_seq_len - 1
    seq = prompt
    for _ in range(n):
        next_token = model(seq[:, -window:]).logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        seq = torch.cat((seq, next_token), dim=1)
    return seq


@pytest.mark.parametrize("overrides", [dict(), dict(pos_encoding="rope"), dict(pos_encoding="sinusoidal")])
def test_generation_past_max_seq_len_slides_the_window(overrides):
    model = short_gpt(**overrides)
    prompt = torch.randint(7, 64, (2, 12))
    cached = generate(model, prompt, max_new_tokens=10)  # 12 + 10 tokens on a 16-position model
    assert cached.shape == (2, 22) and torch.equal(cached[:, :12], prompt)
    assert torch.equal(generate(model, prompt, max_new_tokens=10, use_cache=False), cached)
    # Every step, slid or not, is the argmax of a no-cache forward over the cropped window.
    assert torch.equal(cached, greedy_over_the_window(model, prompt, 10))
    # While the sequence fits (12 + 4 tokens, 15 seen at most), nothing changes.
    assert torch.equal(generate(model, prompt, max_new_tokens=4), cached[:, :16])


def test_a_prompt_longer_than_the_window_keeps_its_last_tokens():
    model = short_gpt()
    prompt = torch.randint(7, 64, (1, 20))
    out = generate(model, prompt, max_new_tokens=5)
    assert out.shape == (1, 25) and torch.equal(out[:, :20], prompt)  # the whole prompt is returned
    assert torch.equal(out[:, 20:], generate(model, prompt[:, -15:], max_new_tokens=5)[:, 15:])


def test_a_padded_batch_slides_each_row_as_it_would_alone():
    model = short_gpt(pos_encoding="rope")
    prompts = [torch.randint(7, 64, (n,)) for n in (13, 6, 15)]
    ids = torch.zeros(3, 15, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0, :13], mask[0, :13] = prompts[0], 1  # right padding
    ids[1, 9:], mask[1, 9:] = prompts[1], 1  # left padding
    ids[2], mask[2] = prompts[2], 1
    batched = generate(model, ids, mask, max_new_tokens=9)
    for i, prompt in enumerate(prompts):
        alone = generate(model, prompt[None], max_new_tokens=9)
        assert torch.equal(batched[i, -9:], alone[0, -9:]), i


def seq2seq_model():
    torch.manual_seed(0)
    config = ModelConfig(
        arch="encoder-decoder", vocab_size=9, d_model=32, n_layers=2, n_heads=4, max_seq_len=16,
        pos_encoding="sinusoidal", pad_token_id=0, bos_token_id=5, eos_token_id=6,
    )
    model = build_model(config, "seq2seq").eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(3)  # sharper, but not so sharp that greedy is always optimal
    return model


def all_sequence_scores(model, source, length):
    """Total log-probability of every possible output of `length` tokens, in one batch."""
    V = model.config.vocab_size
    outputs = torch.tensor(list(itertools.product(range(V), repeat=length)))  # (V^n, n)
    decoder_input = torch.cat((torch.full((len(outputs), 1), 5), outputs[:, :-1]), dim=1)
    log_probs = model(source.expand(len(outputs), -1), decoder_input_ids=decoder_input).logits.log_softmax(-1)
    return outputs, log_probs.gather(-1, outputs[..., None]).squeeze(-1).sum(-1)


def test_beam_search_wide_enough_finds_the_exhaustive_best():
    model = seq2seq_model()
    source = torch.randint(7, 9, (2, 5))
    beam = generate_seq2seq(model, source, max_new_tokens=3, num_beams=81, eos_token_id=None)
    greedy = generate_seq2seq(model, source, max_new_tokens=3, num_beams=1, eos_token_id=None)
    found_better_than_greedy = False
    for b in range(2):
        outputs, scores = all_sequence_scores(model, source[b : b + 1], 3)
        best = outputs[scores.argmax()]
        assert beam[b, 1:].tolist() == best.tolist()
        greedy_score = scores[(outputs == greedy[b, 1:]).all(-1)].item()
        found_better_than_greedy |= scores.max().item() > greedy_score + 1e-6
    assert beam.shape == (2, 4) and torch.all(beam[:, 0] == 5)
    # Not required by correctness, but makes sure this test exercises a case greedy gets wrong.
    assert found_better_than_greedy


def test_seq2seq_greedy_equals_step_by_step_argmax_and_cache_matches():
    model = seq2seq_model()
    source = torch.randint(7, 9, (3, 6))
    mask = torch.ones_like(source)
    mask[2, 4:] = 0
    greedy = generate_seq2seq(model, source, mask, max_new_tokens=5, eos_token_id=None)
    tokens = torch.full((3, 1), 5)
    for _ in range(5):
        logits = model(source, mask, decoder_input_ids=tokens).logits[:, -1]
        tokens = torch.cat((tokens, logits.argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(greedy, tokens)


def test_generate_rejects_the_wrong_model_type():
    with pytest.raises(TypeError, match="model: generate\\(\\) needs a CausalLM"):
        generate(seq2seq_model(), torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="num_beams"):
        generate_seq2seq(seq2seq_model(), torch.ones(1, 2, dtype=torch.long), num_beams=0)


def test_seq2seq_sampling_is_seeded_and_differs_from_greedy():
    model = seq2seq_model()
    source = torch.randint(7, 9, (3, 6))

    def sampled(seed, **kwargs):
        generator = torch.Generator().manual_seed(seed)
        return generate_seq2seq(model, source, max_new_tokens=8, do_sample=True, generator=generator, **kwargs)

    greedy = generate_seq2seq(model, source, max_new_tokens=8)
    assert torch.equal(sampled(0), sampled(0))
    assert not torch.equal(sampled(0), greedy) and not torch.equal(sampled(0), sampled(1))
    assert torch.equal(sampled(0, top_k=1), greedy)  # only the best token left to draw
    assert torch.equal(sampled(0, temperature=1e-4), greedy)
    with pytest.raises(ValueError, match="do_sample: sampling .* cannot be combined with beam search \\(num_beams=2\\)"):
        generate_seq2seq(model, source, do_sample=True, num_beams=2)
    with pytest.raises(ValueError, match="top_p"):
        generate_seq2seq(model, source, do_sample=True, top_p=0.0)


# ---------------------------------------------------------------------------------------------
# Text in, text out
# ---------------------------------------------------------------------------------------------

WORDS = "the cat sat on a mat and then it ran to the red door of our old house by the sea".split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from minillm.tokenizer import Tokenizer

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) for _ in range(200)]
    return Tokenizer.train(texts, tmp_path_factory.mktemp("tok") / "tok", vocab_size=300, n_sentinels=0, num_threads=1)


def text_model(tokenizer, arch, task, max_seq_len=16):
    torch.manual_seed(0)
    config = ModelConfig(
        arch=arch, vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=2, max_seq_len=max_seq_len,
        pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
    )
    model = build_model(config, task).eval()
    with torch.no_grad():  # a sharper random model: fewer near-ties between tokens
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5)
    return model


def continuations(model, tokenizer, prompts: list[str], greedy: bool, seed: int) -> list[str]:
    """What generate() gives each prompt in turn (one seeded generator), as text after the prompt."""
    generator, texts = torch.Generator().manual_seed(seed), []
    for prompt in prompts:
        ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
        out = generate(model, torch.tensor([ids]), max_new_tokens=6, do_sample=not greedy, temperature=0.8, top_k=40,
                       eos_token_id=tokenizer.eos_id, generator=generator)[0, len(ids):].tolist()
        new = [t for t in out if t not in (tokenizer.eos_id, tokenizer.pad_id)]
        texts.append(tokenizer.decode(ids + new)[len(tokenizer.decode(ids)):])  # "▁the" keeps its space
    return texts


@pytest.mark.parametrize("greedy", [True, False])
def test_generate_text_continues_gpt_prompts(tokenizer, greedy):
    model = text_model(tokenizer, "decoder", "causal-lm", max_seq_len=32)
    prompts = ["the cat sat", "a red door", ""]
    results = generate_text(model, tokenizer, prompts, max_new_tokens=6, greedy=greedy, seed=3)
    assert [r.text for r in results] == continuations(model, tokenizer, prompts, greedy, seed=3)
    for prompt, r in zip(prompts, results):
        assert isinstance(r, Generation) and r.prompt == prompt
        assert r.new_tokens == 6 and r.note is None or r.new_tokens < 6 and "EOS" in r.note


def test_generate_text_near_max_seq_len_gets_every_token_and_says_the_window_slid(tokenizer):
    model = text_model(tokenizer, "decoder", "causal-lm")
    prompt = " ".join(["the", "cat"] * 6)  # 12 tokens of a 15-token window
    ids = tokenizer.encode(prompt)
    assert len(ids) == 12
    [result] = generate_text(model, tokenizer, [prompt], max_new_tokens=10, greedy=True)
    expected = generate(model, torch.tensor([ids]), max_new_tokens=10)[0, 12:].tolist()
    assert tokenizer.eos_id not in expected  # this model does not stop early: the slide is exercised
    assert result.new_tokens == 10
    assert result.text == tokenizer.decode(ids + expected)[len(tokenizer.decode(ids)):]
    assert result.note.startswith("window slid: after 4 new tokens") and "EOS" not in result.note
    [long] = generate_text(model, tokenizer, [" ".join(["the", "cat"] * 9)], max_new_tokens=3, greedy=True)
    assert long.note.startswith("prompt cropped: its 18 tokens exceed the 15-token window")


def test_generate_text_for_an_encoder_decoder_samples_and_notes_the_decoder_limit(tokenizer):
    model = text_model(tokenizer, "encoder-decoder", "seq2seq", max_seq_len=16)
    prompts = ["the cat sat on a mat", "a red door"]
    greedy = generate_text(model, tokenizer, prompts, max_new_tokens=8, greedy=True)
    eos = tokenizer.eos_id
    outputs = [generate_seq2seq(model, torch.tensor([tokenizer.encode(p) + [eos]]), max_new_tokens=8,
                                eos_token_id=eos)[0, 1:].tolist() for p in prompts]
    assert [g.text for g in greedy] == [tokenizer.decode([t for t in out if t not in (eos, tokenizer.pad_id)])
                                        for out in outputs]
    sampled = generate_text(model, tokenizer, prompts, max_new_tokens=8, temperature=1.5, top_k=None, seed=1)
    again = generate_text(model, tokenizer, prompts, max_new_tokens=8, temperature=1.5, top_k=None, seed=1)
    assert sampled == again and [s.text for s in sampled] != [g.text for g in greedy]
    beams = generate_text(model, tokenizer, prompts, max_new_tokens=8, greedy=True, num_beams=3)
    assert all(isinstance(b.text, str) for b in beams)
    [capped] = generate_text(model, tokenizer, prompts[:1], max_new_tokens=40, greedy=True)
    assert capped.note == "decoder full: 15 new tokens fill max_seq_len 16 (asked for 40)" or "EOS" in capped.note
    long_source = " ".join(WORDS)
    [cropped] = generate_text(model, tokenizer, [long_source], max_new_tokens=3, greedy=True)
    assert cropped.note.startswith(f"source cropped: its {len(tokenizer.encode(long_source))} tokens and EOS")


def test_generate_text_fills_bert_masks(tokenizer):
    model = text_model(tokenizer, "encoder", "mlm", max_seq_len=24)
    prompt = "the cat [MASK] on a [MASK]."
    [result] = generate_text(model, tokenizer, [prompt])
    ids = [tokenizer.require("cls"), *tokenizer.encode("the cat"), tokenizer.require("mask"),
           *tokenizer.encode("on a"), tokenizer.require("mask"), *tokenizer.encode("."), tokenizer.require("sep")]
    masks = [i for i, t in enumerate(ids) if t == tokenizer.require("mask")]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]  # (T, V)
    logits[:, torch.from_numpy(tokenizer.special)] = float("-inf")  # words, never special tokens
    words = [tokenizer.decode([int(logits[m].argmax())]).strip() for m in masks]
    assert result.text == f"the cat [{words[0]}] on a [{words[1]}]."
    assert result.text.startswith("the cat [") and result.new_tokens == 2 and result.note is None
    with pytest.raises(ValueError, match="prompts: a BERT prompt needs at least one \\[MASK\\]"):
        generate_text(model, tokenizer, ["no mask here"])
    with pytest.raises(ValueError, match="prompts: .* more than max_seq_len=24"):
        generate_text(model, tokenizer, [" ".join(WORDS) + " [MASK]"])


def test_generate_text_checks_its_arguments(tokenizer):
    gpt_model = text_model(tokenizer, "decoder", "causal-lm")
    with pytest.raises(TypeError, match="prompts: expected a list of strings .* got str"):
        generate_text(gpt_model, tokenizer, "the cat")
    with pytest.raises(ValueError, match="num_beams: beam search is for encoder-decoders"):
        generate_text(gpt_model, tokenizer, ["the"], num_beams=2, greedy=True)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_text(gpt_model, tokenizer, ["the"], max_new_tokens=0)
    seq2seq = text_model(tokenizer, "encoder-decoder", "seq2seq")
    with pytest.raises(ValueError, match="num_beams: beam search .* does not sample; pass greedy=True"):
        generate_text(seq2seq, tokenizer, ["the"], num_beams=2)
    classifier = build_model(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=2), "classification")
    with pytest.raises(TypeError, match="model: generate_text\\(\\) needs a CausalLM, Seq2SeqLM or MaskedLM"):
        generate_text(classifier, tokenizer, ["the"])
