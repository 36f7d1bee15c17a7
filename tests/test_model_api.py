"""The Hugging Face-shaped model API: ModelOutput read like transformers' outputs,
`from_pretrained` / `save_pretrained` on every task model, `model.generate` as a method.

Each is checked against what it stands for: transformers' own ModelOutput for indexing, the
function forms (`checkpoint.load_model`, `generation.generate`) for the methods, and bit-exact
logits for the round trip.
"""

import pytest
import torch

from minillm import CausalLM, MaskedLM, Seq2SeqLM, SequenceClassifier, build_model, preset
from minillm.checkpoint import load_model
from minillm.convert import to_hf
from minillm.generation import generate, generate_seq2seq

transformers = pytest.importorskip("transformers")

CASES = {  # task -> (preset, class)
    "causal-lm": ("tiny", CausalLM),
    "mlm": ("tiny-bert", MaskedLM),
    "mlm-nsp": ("tiny-bert", MaskedLM),
    "classification": ("tiny-bert", SequenceClassifier),
    "seq2seq": ("tiny-seq2seq", Seq2SeqLM),
}


def tiny(task):
    name, _ = CASES[task]
    torch.manual_seed(0)
    return build_model(preset(name, vocab_size=97, n_layers=2, d_model=32, n_heads=2), task).eval()


def batch():
    return torch.randint(7, 97, (2, 6), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    if isinstance(model, Seq2SeqLM):
        return model(ids, decoder_input_ids=ids[:, :3]).logits
    return model(ids).logits


def test_model_output_reads_like_transformers():
    model, ids = tiny("causal-lm"), batch()
    ours = model(ids, labels=ids)
    hf = transformers.modeling_outputs.CausalLMOutput(loss=ours.loss, logits=ours.logits)
    assert ours[0] is ours.loss and hf[0] is ours.loss  # the loss comes first, as in transformers
    assert ours[1] is ours.logits and hf[1] is ours.logits
    assert ours["logits"] is ours.logits and ours["loss"] is ours.loss
    without_labels = model(ids)
    assert without_labels[0] is without_labels.logits  # no loss: logits first, as transformers does
    loss, logits_ = ours.to_tuple()[:2]
    assert loss is ours.loss and logits_ is ours.logits
    with pytest.raises(KeyError, match="nsp_logits"):
        without_labels["nsp_logits"]  # unset fields are absent, as in transformers


@pytest.mark.parametrize("task", sorted(CASES))
def test_save_pretrained_round_trip_is_exact(task, tmp_path):
    model, ids = tiny(task), batch()
    model.save_pretrained(tmp_path / "saved")
    loaded = CASES[task][1].from_pretrained(tmp_path / "saved")
    assert type(loaded) is type(model) and not loaded.training
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    _, configs, _ = load_model(tmp_path / "saved")
    assert configs["task"] == task  # what the function form reads back


def test_from_pretrained_reads_a_hugging_face_folder(tmp_path):
    model, ids = tiny("causal-lm"), batch()
    to_hf(model, tmp_path / "hf")
    loaded = CausalLM.from_pretrained(tmp_path / "hf")
    assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


def test_classifier_from_a_language_model_keeps_the_body(tmp_path):
    mlm = tiny("mlm")
    mlm.save_pretrained(tmp_path / "mlm")
    classifier = SequenceClassifier.from_pretrained(tmp_path / "mlm", num_labels=3)
    assert classifier.config.num_labels == 3
    for name, param in mlm.encoder.state_dict().items():
        assert torch.equal(classifier.body.state_dict()[name], param), name


def test_from_pretrained_refuses_another_model(tmp_path):
    tiny("causal-lm").save_pretrained(tmp_path / "gpt")
    with pytest.raises(TypeError, match="holds a CausalLM.*CausalLM.from_pretrained"):
        MaskedLM.from_pretrained(tmp_path / "gpt")
    with pytest.raises(ValueError, match="num_labels.*CausalLM has none"):
        CausalLM.from_pretrained(tmp_path / "gpt", num_labels=3)


def test_save_pretrained_never_overwrites_other_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="metrics.jsonl"):
        tiny("causal-lm").save_pretrained(run)
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
    model = tiny("causal-lm")
    model.save_pretrained(tmp_path / "again")
    model.save_pretrained(tmp_path / "again")  # an earlier save is replaced
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["config.json", "model.safetensors"]


def test_generate_method_equals_the_function():
    model, ids = tiny("causal-lm"), batch()
    eos = model.config.eos_token_id
    assert torch.equal(model.generate(ids, max_new_tokens=5),
                       generate(model, ids, max_new_tokens=5, eos_token_id=eos))
    sampled = model.generate(ids, max_new_tokens=5, do_sample=True, generator=torch.Generator().manual_seed(3))
    again = generate(model, ids, max_new_tokens=5, do_sample=True, eos_token_id=eos,
                     generator=torch.Generator().manual_seed(3))
    assert torch.equal(sampled, again)
    seq2seq = tiny("seq2seq")
    assert torch.equal(seq2seq.generate(ids, max_new_tokens=4, num_beams=2),
                       generate_seq2seq(seq2seq, ids, max_new_tokens=4, num_beams=2,
                                        eos_token_id=seq2seq.config.eos_token_id))
    with pytest.raises(TypeError, match="max_length"):
        model.generate(ids, max_length=10)  # an option minillm does not have is refused, not ignored


def test_rope_model_export_says_why_and_what_to_use():
    model = build_model(preset("tiny-bert", pos_encoding="rope"), "mlm-nsp")
    with pytest.raises(ValueError, match=r"pos_encoding.*rotary.*--model.pos_encoding=learned"):
        to_hf(model)


def test_default_bert_preset_exports():
    hf = to_hf(build_model(preset("tiny-bert"), "mlm-nsp"))
    assert type(hf).__name__ == "BertForPreTraining"
