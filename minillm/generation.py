"""Text generation: greedy and sampled decoding for GPT; greedy, sampled and beam search decoding
for encoder-decoders; and `generate_text`, which takes strings and returns strings for any
language model (GPT, encoder-decoder, BERT mask filling).

Decoding is a loop: run the model, look at the logits of the last position, pick a token, append
it, repeat. The KV cache makes each step cost one token instead of the whole prefix: the keys and
values of earlier positions never change in a causal model, so each block keeps them
(`LayerCache`) and the next step feeds only the new token.

Padding: rows of a batch have different prompt lengths. Generation needs every row's last real
token at the same column, so prompts are left-padded (right-padded ones are moved to the left
here). Position ids count only real tokens, so padding never changes what a row generates.

Context window: a GPT has max_seq_len positions, and each step conditions on at most
max_seq_len - 1 tokens. A longer sequence slides: each further step recomputes the last
max_seq_len - 1 tokens without the cache (see `generate`), so a prompt near the limit still gets
every token asked for.

A model wrapped by peft (LoRA and other adapters that replace layers) is unwrapped
(`minillm.lora.unwrap_model`): the minillm model inside runs its adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from minillm.lora import unwrap_model
from minillm.model import CausalLM, LayerCache, MaskedLM, Seq2SeqLM

if TYPE_CHECKING:
    from minillm.tokenizer import Tokenizer


def _check_decoding_args(max_new_tokens, temperature, top_k, top_p) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an integer >= 1, got {max_new_tokens!r}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected None or an integer >= 1, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected None or a value in (0, 1], got {top_p!r}")


def _check_prompt(input_ids, attention_mask) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids: expected a (B, T) tensor of token ids with T >= 1, got {shape}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask: expected the shape of input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )


def context_window(model: CausalLM) -> int:
    """Most tokens one decoding step conditions on: max_seq_len - 1.

    Training windows of max_seq_len tokens drop the last position's prediction (it has no next
    token), so position max_seq_len - 1 never learnt to predict; the newest token of a context of
    max_seq_len - 1 tokens sits at position max_seq_len - 2, which did. A soft prompt or prefix
    (minillm.prompts) takes the first P positions: the window is P shorter.
    """
    window = model.config.max_seq_len - 1 - model.decoder.virtual_tokens
    if window < 1:
        raise ValueError(f"model.config.max_seq_len: generation needs at least 2 positions besides the "
                         f"{model.decoder.virtual_tokens} virtual tokens, got {model.config.max_seq_len}")
    return window


def left_pad(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's padding to the left, keeping the order of its real tokens."""
    order = torch.argsort(attention_mask.long(), dim=1, stable=True)  # pads (0) first, tokens in order
    return input_ids.gather(1, order), attention_mask.gather(1, order)


def sample_next_token(
    logits: torch.Tensor,  # (B, V) logits of the last position
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # (B,)
    """Greedy: argmax. Sampling: softmax(logits / temperature), restricted to the k most likely
    tokens (top-k) and/or to the smallest set whose probability reaches p (top-p, nucleus)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_best = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_index = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach p; the best token always stays.
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop = drop_sorted.scatter(1, sorted_index, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: CausalLM,
    input_ids: torch.Tensor,  # (B, T) prompt
    attention_mask: torch.Tensor | None = None,  # (B, T), 1 = token, 0 = pad
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # (B, T + new), prompt (left-padded) followed by the generated tokens
    """Continue each prompt by `max_new_tokens` tokens (fewer only once every row has ended).

    A row that produces `eos_token_id` is finished: it gets `pad_token_id` from then on, and the
    loop stops once every row is finished. With `use_cache=False` every step recomputes the
    context (slow; it exists to check the cache).

    Context window (W = `context_window(model)` = max_seq_len - 1 tokens):

    - while the sequence has at most W tokens, each step sees all of it (with the cache, one new
      token per step);
    - once it has more, the window slides: each step recomputes the last W tokens without the
      cache. Learned and sinusoidal positions are absolute, so after a shift every cached key
      would sit at the wrong position; and a dropped token changes the hidden states of every
      later token in the upper layers, RoPE or not. Each such step costs a W-token forward;
    - a prompt longer than W: the first step already sees only its last W tokens. The returned
      tensor still starts with the whole prompt.

    In a padded batch every row keeps the same last W columns. Padding is on the left, so a row
    loses its padding before any of its tokens: each row conditions on its own last
    min(length, W) tokens, with positions counted from the first of them, as it would alone.
    """
    model = unwrap_model(model)  # a peft-wrapped model runs its adapters inside
    if not isinstance(model, CausalLM):
        raise TypeError(f"model: generate() needs a CausalLM, got {type(model).__name__}")
    _check_decoding_args(max_new_tokens, temperature, top_k, top_p)
    _check_prompt(input_ids, attention_mask)
    window = context_window(model)
    pad_token_id = model.config.pad_token_id if pad_token_id is None else pad_token_id
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    ids, mask = left_pad(input_ids, attention_mask.long())  # (B, T) each, growing by one column a step
    was_training = model.training
    model.eval()
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    cache: list[LayerCache] | None = None  # keys/values of ids[:, :-1], while they fit in the window
    for _ in range(max_new_tokens):
        if cache is not None and ids.shape[1] <= window:
            out = model(ids[:, -1:], attention_mask=mask, cache=cache)  # feed only the newest token
        else:  # first step, no cache, or a sequence longer than the window: the last `window` tokens
            out = model(ids[:, -window:], attention_mask=mask[:, -window:])
        next_token = sample_next_token(out.logits[:, -1], do_sample, temperature, top_k, top_p, generator)  # (B,)
        if eos_token_id is not None:
            next_token = next_token.masked_fill(finished, pad_token_id)
            finished |= next_token == eos_token_id
        ids = torch.cat((ids, next_token[:, None]), dim=1)
        mask = torch.cat((mask, torch.ones_like(next_token[:, None])), dim=1)
        cache = out.cache if use_cache else None
        if eos_token_id is not None and bool(finished.all()):
            break
    model.train(was_training)
    return ids


def _reorder_cache(cache: list[LayerCache], index: torch.Tensor) -> list[LayerCache]:
    """Select batch rows of every cached tensor (beam search keeps the surviving beams)."""

    def pick(kv):
        return None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))

    return [LayerCache(self_kv=pick(c.self_kv), cross_kv=pick(c.cross_kv)) for c in cache]


@torch.no_grad()
def generate_seq2seq(
    model: Seq2SeqLM,
    input_ids: torch.Tensor,  # (B, Ts) source
    attention_mask: torch.Tensor | None = None,  # (B, Ts)
    max_new_tokens: int = 32,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # (B, 1 + new): decoder start token, then the output
    """Greedy decoding or sampling (num_beams=1), or beam search, for an encoder-decoder.

    With num_beams=1 each step picks one token per row by `sample_next_token` (argmax, or a draw
    shaped by temperature / top-k / top-p with `do_sample=True`); a row that produces EOS gets
    `pad_token_id` from then on.

    Beam search keeps the `num_beams` best partial outputs by total log-probability. A beam that
    emits EOS becomes a finished hypothesis, scored as sum(log p) / length^length_penalty; a row
    stops once it has `num_beams` finished hypotheses, and the best one is returned. It looks for
    the most likely output, so it does not sample: `do_sample=True` with num_beams > 1 is refused.

    The decoder cannot slide like a GPT's: 1 + max_new_tokens must fit in max_seq_len.
    """
    model = unwrap_model(model)
    if not isinstance(model, Seq2SeqLM):
        raise TypeError(f"model: generate_seq2seq() needs a Seq2SeqLM, got {type(model).__name__}")
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams: expected an integer >= 1, got {num_beams!r}")
    if do_sample and num_beams > 1:
        raise ValueError(
            f"do_sample: sampling draws one output per source and cannot be combined with beam search "
            f"(num_beams={num_beams}); use num_beams=1 to sample, or do_sample=False for beam search"
        )
    _check_decoding_args(max_new_tokens, temperature, top_k, top_p)
    _check_prompt(input_ids, attention_mask)
    if input_ids.shape[1] > model.config.max_seq_len:
        raise ValueError(f"input_ids: source length {input_ids.shape[1]} exceeds max_seq_len={model.config.max_seq_len}")
    if max_new_tokens + 1 > model.config.max_seq_len:
        raise ValueError(f"max_new_tokens: {max_new_tokens} + 1 exceeds max_seq_len={model.config.max_seq_len}")
    pad_token_id = model.config.pad_token_id if pad_token_id is None else pad_token_id
    was_training = model.training
    model.eval()
    encoder_hidden = model.encode(input_ids, attention_mask)  # (B, Ts, C)
    if num_beams == 1:
        result = _decode_one_output(
            model, encoder_hidden, attention_mask, max_new_tokens, eos_token_id, pad_token_id,
            do_sample, temperature, top_k, top_p, generator,
        )
    else:
        result = _beam_search(
            model, encoder_hidden, attention_mask, max_new_tokens, num_beams, length_penalty, eos_token_id, pad_token_id
        )
    model.train(was_training)
    return result


def _decode_one_output(
    model: Seq2SeqLM,
    encoder_hidden: torch.Tensor,  # (B, Ts, C)
    source_mask: torch.Tensor | None,  # (B, Ts)
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:  # (B, 1 + new)
    """Greedy or sampled decoding: one token per row and step, fed through the decoder's cache."""
    B = encoder_hidden.shape[0]
    tokens = torch.full((B, 1), model.config.bos_token_id, dtype=torch.long, device=encoder_hidden.device)
    finished = torch.zeros(B, dtype=torch.bool, device=encoder_hidden.device)
    cache = None
    for _ in range(max_new_tokens):
        out = model(
            attention_mask=source_mask, decoder_input_ids=tokens[:, -1:], encoder_hidden=encoder_hidden, cache=cache
        )
        next_token = sample_next_token(out.logits[:, -1], do_sample, temperature, top_k, top_p, generator)  # (B,)
        if eos_token_id is not None:
            next_token = next_token.masked_fill(finished, pad_token_id)
            finished |= next_token == eos_token_id
        tokens = torch.cat((tokens, next_token[:, None]), dim=1)
        cache = out.cache
        if eos_token_id is not None and bool(finished.all()):
            break
    return tokens


def _beam_search(
    model: Seq2SeqLM,
    encoder_hidden: torch.Tensor,  # (B, Ts, C)
    attention_mask: torch.Tensor | None,  # (B, Ts)
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float,
    eos_token_id: int | None,
    pad_token_id: int,
) -> torch.Tensor:  # (B, 1 + new)
    """The `num_beams` best partial outputs per row, by total log-probability (see generate_seq2seq)."""
    B, K = encoder_hidden.shape[0], num_beams
    device = encoder_hidden.device
    # Every row is searched with K beams side by side: (B, ...) -> (B * K, ...)
    encoder_hidden = encoder_hidden.repeat_interleave(K, dim=0)
    source_mask = attention_mask.repeat_interleave(K, dim=0) if attention_mask is not None else None
    tokens = torch.full((B * K, 1), model.config.bos_token_id, dtype=torch.long, device=device)
    beam_scores = torch.zeros(B, K, device=device)
    beam_scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    hypotheses: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(B)]
    done = [False] * B
    cache = None
    for step in range(max_new_tokens):
        out = model(
            attention_mask=source_mask, decoder_input_ids=tokens[:, -1:], encoder_hidden=encoder_hidden, cache=cache
        )
        log_probs = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B * K, V)
        V = log_probs.shape[-1]
        candidates = (beam_scores.reshape(B * K, 1) + log_probs).reshape(B, K * V)
        # 2K candidates guarantee K that do not end in EOS.
        top_scores, top_index = torch.topk(candidates, 2 * K, dim=-1)  # (B, 2K)
        next_scores = torch.full((B, K), float("-inf"), device=device)
        # Rows that are done keep pointing at their own first beam; their scores stay -inf.
        next_source = torch.arange(B, device=device)[:, None].repeat(1, K) * K
        next_token = torch.full((B, K), pad_token_id, dtype=torch.long, device=device)
        for b in range(B):
            filled = 0
            for score, index in zip(top_scores[b].tolist(), top_index[b].tolist()):
                if done[b] or filled == K or score == float("-inf"):
                    break
                beam, token = divmod(index, V)
                if eos_token_id is not None and token == eos_token_id:
                    output = torch.cat((tokens[b * K + beam], tokens.new_tensor([token])))
                    hypotheses[b].append((score / (step + 1) ** length_penalty, output))
                    continue
                next_scores[b, filled], next_source[b, filled], next_token[b, filled] = score, b * K + beam, token
                filled += 1
            if len(hypotheses[b]) >= K:
                done[b] = True
        if all(done):
            break
        source = next_source.reshape(-1)
        tokens = torch.cat((tokens.index_select(0, source), next_token.reshape(-1, 1)), dim=1)
        cache = _reorder_cache(out.cache, source)
        beam_scores = next_scores
    for b in range(B):  # rows that ran out of steps: their live beams are hypotheses too
        if not done[b]:
            for k in range(K):
                if beam_scores[b, k] > float("-inf"):
                    length = tokens.shape[1] - 1
                    hypotheses[b].append((float(beam_scores[b, k]) / length**length_penalty, tokens[b * K + k]))
    best = [max(h, key=lambda pair: pair[0])[1] for h in hypotheses]
    result = torch.full((B, max(len(t) for t in best)), pad_token_id, dtype=torch.long, device=device)
    for b, t in enumerate(best):
        result[b, : len(t)] = t
    return result


# =============================================================================================
# Text in, text out
# =============================================================================================

MASK_TEXT = "[MASK]"  # where a BERT prompt asks for a word


@dataclass
class Generation:
    """What `generate_text` made of one prompt."""

    prompt: str
    text: str  # the output only: a continuation (GPT), the output (encoder-decoder), the filled prompt (BERT)
    new_tokens: int  # tokens produced, EOS not counted (BERT: the masks filled)
    note: str | None = None  # one line when the output is not plainly what was asked: fewer tokens, a crop, a slide


@torch.no_grad()
def generate_text(
    model: CausalLM | Seq2SeqLM | MaskedLM,
    tokenizer: Tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 50,
    temperature: float = 0.8,
    top_k: int | None = 40,
    top_p: float | None = None,
    greedy: bool = False,
    seed: int = 0,
    num_beams: int = 1,
) -> list[Generation]:
    """Text for each prompt, by the kind of model:

    - CausalLM (GPT): the continuation of the prompt, sampled (or argmax with `greedy=True`), of
      `max_new_tokens` tokens or fewer when the model ends it with EOS. Near max_seq_len the
      window slides and a long prompt keeps its last max_seq_len - 1 tokens (see `generate`).
    - Seq2SeqLM: the output for the prompt as source, sampled, greedy, or by beam search
      (`num_beams` > 1 with `greedy=True`). A source longer than max_seq_len keeps its first
      max_seq_len - 1 tokens and EOS (as training sources are cut); the decoder holds at most
      max_seq_len - 1 new tokens.
    - MaskedLM (BERT): the prompt with every ``[MASK]`` replaced by the model's most likely
      word, shown as ``[word]``; the decoding options do not apply.

    Prompts run one at a time and draw from one generator seeded with `seed`, so a seed always
    gives the same texts. `Generation.note` says in one line why an output has fewer tokens than
    asked, or that the prompt was cropped or the window slid; it is None otherwise.
    """
    model = unwrap_model(model)
    if not isinstance(model, (CausalLM, Seq2SeqLM, MaskedLM)):
        raise TypeError(f"model: generate_text() needs a CausalLM, Seq2SeqLM or MaskedLM, got {type(model).__name__}")
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        got = type(prompts).__name__ if not isinstance(prompts, (list, tuple)) else "a list with a non-string item"
        raise TypeError(f"prompts: expected a list of strings (one prompt is [prompt]), got {got}")
    _check_decoding_args(max_new_tokens, temperature, top_k, top_p)
    if not isinstance(seed, int):
        raise TypeError(f"seed: expected an integer, got {seed!r}")
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams: expected an integer >= 1, got {num_beams!r}")
    if num_beams > 1 and not isinstance(model, Seq2SeqLM):
        raise ValueError(f"num_beams: beam search is for encoder-decoders, got num_beams={num_beams} for a {type(model).__name__}")
    if num_beams > 1 and not greedy:
        raise ValueError(
            f"num_beams: beam search looks for the most likely output and does not sample; "
            f"pass greedy=True with num_beams={num_beams}"
        )
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    sampling = dict(do_sample=not greedy, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    was_training = model.training
    model.eval()  # dropout off, also for mask filling
    try:
        if isinstance(model, MaskedLM):
            return [
                Generation(p, _fill_masks(model, tokenizer, p, device, model.config.max_seq_len), p.count(MASK_TEXT))
                for p in prompts
            ]
        if isinstance(model, Seq2SeqLM):
            return [_seq2seq_output(model, tokenizer, p, max_new_tokens, num_beams, sampling, device) for p in prompts]
        return [_continuation(model, tokenizer, p, max_new_tokens, sampling, device) for p in prompts]
    finally:
        model.train(was_training)


def _until_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    """The tokens before the first EOS (all of them when there is none)."""
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


def _continuation(
    model: CausalLM, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, sampling: dict, device
) -> Generation:
    """One GPT prompt, continued (see generate_text)."""
    ids = tokenizer.encode(prompt) or [tokenizer.require("eos")]  # an empty prompt starts a new document
    out = generate(model, torch.tensor([ids], device=device), max_new_tokens=max_new_tokens,
                   eos_token_id=tokenizer.eos_id, **sampling)
    steps = out.shape[1] - len(ids)  # decoding steps taken, an EOS included
    new = _until_eos(out[0, len(ids):].tolist(), tokenizer.eos_id)
    # Decoded with the prompt: a piece's leading space ("▁the") survives only inside a sequence.
    text = tokenizer.decode(ids + new)[len(tokenizer.decode(ids)):]
    window = context_window(model)
    limit = "max_seq_len - 1" + (f" - {model.decoder.virtual_tokens} virtual" if model.decoder.virtual_tokens else "")
    notes = []
    if len(ids) > window:
        notes.append(f"prompt cropped: its {len(ids)} tokens exceed the {window}-token window ({limit}), "
                     f"so every step saw only the last {window} tokens")
    elif len(ids) + steps - 1 > window:  # steps condition on len(ids), len(ids) + 1, ... tokens
        notes.append(f"window slid: after {window - len(ids) + 1} new tokens the sequence outgrew the {window}-token "
                     f"window ({limit}), so each later token saw only the last {window}")
    if len(new) < max_new_tokens:
        notes.append(f"ended at EOS after {len(new)} of {max_new_tokens} tokens")
    return Generation(prompt, text, len(new), "; ".join(notes) or None)


def _seq2seq_output(
    model: Seq2SeqLM, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, num_beams: int, sampling: dict, device
) -> Generation:
    """One encoder-decoder source, decoded (see generate_text)."""
    eos, limit = tokenizer.require("eos"), model.config.max_seq_len
    source = tokenizer.encode(prompt)
    notes = []
    if len(source) + 1 > limit:  # + 1: the EOS that ends every source
        notes.append(f"source cropped: its {len(source)} tokens and EOS exceed max_seq_len {limit}, "
                     f"so the encoder read its first {limit - 1}")
        source = source[: limit - 1]  # the beginning, as Seq2SeqPairDataset cuts training sources
    steps = min(max_new_tokens, limit - 1)  # the decoder's start token takes one of its positions
    out = generate_seq2seq(model, torch.tensor([source + [eos]], device=device), max_new_tokens=steps,
                           num_beams=num_beams, eos_token_id=eos, **sampling)
    new = _until_eos(out[0, 1:].tolist(), eos)
    if len(new) == steps < max_new_tokens:
        notes.append(f"decoder full: {steps} new tokens fill max_seq_len {limit} (asked for {max_new_tokens})")
    elif len(new) < max_new_tokens:
        notes.append(f"ended at EOS after {len(new)} of {max_new_tokens} tokens")
    return Generation(prompt, tokenizer.decode(new), len(new), "; ".join(notes) or None)


def _fill_masks(model, tokenizer: Tokenizer, prompt: str, device, max_len: int | None = None) -> str:
    """`prompt` with each [MASK] replaced by the model's most likely non-special token, as [word]."""
    parts = prompt.split(MASK_TEXT)
    if len(parts) == 1:
        raise ValueError(f"prompts: a BERT prompt needs at least one {MASK_TEXT} to fill, got {prompt!r}")
    mask_id = tokenizer.require("mask")
    ids, masked = [tokenizer.require("cls")], []
    for k, part in enumerate(parts):
        # Strip the spaces around a mask: the dummy prefix gives each part its leading "▁", and a
        # masked word carries its own, so "a [MASK] b" reads as it did in training, not "a ▁ [MASK]".
        ids += tokenizer.encode(part.strip()) if part.strip() else []
        if k < len(parts) - 1:
            masked.append(len(ids))
            ids.append(mask_id)
    ids.append(tokenizer.require("sep"))
    if max_len is not None and len(ids) > max_len:
        raise ValueError(f"prompts: {prompt!r} is {len(ids)} tokens with [CLS] and [SEP], more than "
                         f"max_seq_len={max_len}; a BERT prompt cannot be cropped around its masks")
    logits = model(torch.tensor([ids], device=device)).logits[0]  # (T, V)
    logits[:, torch.from_numpy(tokenizer.special).to(device)] = float("-inf")  # predict words, not specials
    for position in masked:
        ids[position] = int(logits[position].argmax())

    def shown(i: int) -> str:  # the word, or the piece itself for whitespace ("▁", newline)
        return tokenizer.decode([i]).strip() or repr(tokenizer.id_to_piece(i))

    return "".join(parts[k] + (f"[{shown(ids[masked[k]])}]" if k < len(masked) else "") for k in range(len(parts)))
