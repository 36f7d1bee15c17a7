"""minillm's prefix tuning, P-tuning v2 and prompt tuning against peft's (a test-only dependency).

The same base weights (minillm.convert.to_hf) and the same method parameters, copied from peft's
prompt encoder, give the same logits or hidden states (fp32, <= 1e-5), and the same number of
trainable parameters. peft's versions (0.21) and their task types used here:

- GPT-2, task_type="CAUSAL_LM": PrefixTuningConfig without prefix_projection (P-tuning v2,
  minillm's "deep-prompt"), with it ("prefix", the MLP reparameterisation) and PromptTuningConfig
  ("prompt"). peft returns logits for the virtual positions too (prompt tuning): compared on the
  real ones.
- BERT, task_type="FEATURE_EXTRACTION" on the bare BertModel: the encoder's hidden states, for
  all three. (peft's SEQ_CLS prefix tuning on BertForSequenceClassification is refused by
  transformers 5: "Model does not support past key values".)
- BERT, SEQ_CLS prompt tuning: there peft's BertForSequenceClassification pools the first
  virtual token; minillm pools [CLS], the first real one (minillm.prompts): checked as such.

Houlsby adapters have no peft counterpart: tests/test_adapters_prompts.py checks them against
the paper's parameter count and the identity at initialisation.
"""

from __future__ import annotations

import copy

import pytest
import torch

from minillm.config import ModelConfig
from minillm.convert import to_hf
from minillm.lora import apply_finetune_mode, count_parameters
from minillm.tasks import build_model
from minillm.train_config import TrainConfig
from minillm.trainer import seed_everything

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

V, C, L, P, HIDDEN = 101, 48, 2, 5, 16
MODES = ("deep-prompt", "prefix", "prompt")


def gpt2_like():
    seed_everything(0)
    return build_model(ModelConfig(
        arch="decoder", vocab_size=V, d_model=C, n_layers=L, n_heads=4, max_seq_len=40, pos_encoding="learned",
        norm="layernorm", norm_placement="pre", activation="gelu_tanh", embed_dropout=0.0, attn_dropout=0.0,
        resid_dropout=0.0, init_std=0.1), "causal-lm").eval()


def bert_like():
    seed_everything(0)
    return build_model(ModelConfig(
        arch="encoder", vocab_size=V, d_model=C, n_layers=L, n_heads=4, max_seq_len=40, pos_encoding="learned",
        norm="layernorm", norm_placement="post", norm_eps=1e-12, activation="gelu", type_vocab_size=2,
        embed_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0, init_std=0.1, num_labels=3), "classification").eval()


def peft_config(mode: str, task_type: str):
    if mode == "prompt":
        return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=P)
    return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=P, prefix_projection=mode == "prefix",
                                   encoder_hidden_size=HIDDEN)


def with_peft_parameters(base, mode: str, peft_model):
    """A copy of `base` with `mode`'s virtual tokens holding the parameters of peft's prompt encoder."""
    ours = copy.deepcopy(base)
    length = {"prefix_length": P} if mode == "prefix" else {"prompt_length": P}
    apply_finetune_mode(ours, TrainConfig(finetune_mode=mode, init_from="base", prefix_hidden=HIDDEN, **length))
    stack = ours.decoder if hasattr(ours, "decoder") else ours.body
    encoder = peft_model.prompt_encoder["default"]
    with torch.no_grad():
        for p in encoder.parameters():  # away from peft's initialisation, so that every number counts
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        if mode == "prompt":
            stack.prompt.embeddings.copy_(encoder.embedding.weight)  # (P, C)
        elif mode == "deep-prompt":
            stack.prefix.key_values.copy_(encoder.embedding.weight)  # (P, 2 L C)
        else:
            stack.prefix.prefix_tokens.copy_(encoder.embedding.weight)  # (P, C)
            stack.prefix.mlp.load_state_dict(encoder.transform.state_dict())  # C -> HIDDEN -> 2 L C
    return ours


def batch(T: int = 7):
    ids = torch.randint(3, V, (3, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, T - 3:] = 0  # right padding: Hugging Face's positions ignore the mask, ours count real tokens
    return ids, mask


@pytest.mark.parametrize("mode", MODES)
def test_gpt2_causal_lm_logits_and_trainable_counts_equal_pefts(mode):
    base = gpt2_like()
    theirs = peft.get_peft_model(to_hf(base).eval(), peft_config(mode, "CAUSAL_LM")).eval()
    ours = with_peft_parameters(base, mode, theirs)
    ids, mask = batch()
    expected = theirs(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:]  # (B, T, V): real positions
    got = ours(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-5, atol=1e-5)
    assert (got - base(ids, attention_mask=mask).logits)[keep].abs().max() > 1e-2  # the virtual tokens count
    trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert count_parameters(ours)["trainable"] == trainable
    formula = {"deep-prompt": P * 2 * L * C, "prompt": P * C,
               "prefix": P * C + C * HIDDEN + HIDDEN + HIDDEN * 2 * L * C + 2 * L * C}[mode]
    assert trainable == formula


@pytest.mark.parametrize("mode", MODES)
def test_bert_hidden_states_and_trainable_counts_equal_pefts(mode):
    base = bert_like()
    theirs = peft.get_peft_model(to_hf(base).bert.eval(), peft_config(mode, "FEATURE_EXTRACTION")).eval()
    ours = with_peft_parameters(base, mode, theirs)
    ids, mask = batch()
    expected = theirs(input_ids=ids, attention_mask=mask).last_hidden_state[:, -ids.shape[1]:]  # (B, T, C)
    got = ours(ids, attention_mask=mask).hidden_states
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-5, atol=1e-5)
    trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    head = sum(p.numel() for p in ours.classifier.parameters())
    assert count_parameters(ours)["trainable"] == trainable + head  # ours trains the classifier too


def test_bert_classification_pools_cls_where_peft_pools_the_first_virtual_token():
    base = bert_like()
    hf = to_hf(base).eval()
    theirs = peft.get_peft_model(hf, peft_config("prompt", "SEQ_CLS")).eval()
    ours = with_peft_parameters(base, "prompt", theirs)
    ids, mask = batch()
    with torch.no_grad():
        hidden = theirs.base_model.bert(inputs_embeds=torch.cat((
            theirs.prompt_encoder["default"].embedding.weight.expand(3, -1, -1), hf.bert.embeddings.word_embeddings(ids)), 1),
            attention_mask=torch.cat((torch.ones(3, P, dtype=torch.long), mask), 1)).last_hidden_state  # (B, P + T, C)
        cls_logits = hf.classifier(hf.bert.pooler(hidden[:, P:]))  # [CLS], the first real token
        first_virtual_logits = hf.classifier(hf.bert.pooler(hidden))  # peft's choice
        torch.testing.assert_close(theirs(input_ids=ids, attention_mask=mask).logits, first_virtual_logits,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits, cls_logits, rtol=1e-5, atol=1e-5)
