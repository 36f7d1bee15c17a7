"""Pruning (minillm.prune): exact sparsity, 0% changes nothing, structured pruning shrinks the
tensors and removes only what the outputs do not need, `minillm prune` end to end, refusals."""


import pytest
import torch

from minillm import checkpoint as ckpt
from minillm.config import preset
from minillm.prune import (
    PruneConfig,
    magnitude_prune,
    keep_pruned,
    prunable_linears,
    prune_units,
    sparsity_of,
    structured_prune,
    unit_importance,
)
from minillm.tasks import build_model, get_task
from test_cli import one_line_error, run  # the CLI helpers every CLI test shares

TINY = dict(vocab_size=50, d_model=24, n_layers=2, n_heads=4, d_ff=40, max_seq_len=16)


def gpt(**fields):
    torch.manual_seed(0)
    return build_model(preset("tiny", **{**TINY, **fields}), "causal-lm").eval()


def batch(seed: int = 0) -> dict:
    ids = torch.randint(7, 50, (3, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.37])
def test_global_magnitude_pruning_zeroes_exactly_the_asked_fraction_smallest_first(sparsity):
    model = gpt()
    weights = [layer.weight for layer in prunable_linears(model).values()]
    n = sum(w.numel() for w in weights)
    before = torch.cat([w.detach().abs().flatten() for w in weights])
    magnitude_prune(model, sparsity, "global")
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(sparsity * n)
    after = torch.cat([w.detach().flatten() for w in weights])
    assert before[after == 0].max() <= before[after != 0].min()  # the smallest went
    assert model.decoder.embeddings.token.weight.ne(0).all()  # embeddings stay dense


def test_per_layer_pruning_hits_the_fraction_in_every_layer():
    model = gpt()
    magnitude_prune(model, 0.25, "layer")
    for name, layer in prunable_linears(model).items():
        assert int((layer.weight == 0).sum()) == round(0.25 * layer.weight.numel()), name
    assert sparsity_of(model) == pytest.approx(0.25, abs=1e-3)


def test_pruning_to_zero_percent_changes_nothing():
    model, x = gpt(), batch()["input_ids"]
    reference = model(x).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    magnitude_prune(model, 0.0)
    assert torch.equal(model(x).logits, reference)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    for structure in ("heads", "mlp"):
        prune_units(model, structure, 0.0, unit_importance(model, structure, importance="weight"))
        assert torch.equal(model(x).logits, reference)


def test_pruned_weights_stay_zero_through_training():
    model = gpt()
    masks = magnitude_prune(model, 0.5)
    keep_pruned(model, masks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        model(**batch(), loss_reduction="mean").loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert sparsity_of(model) == pytest.approx(0.5, abs=1e-3)


def test_heads_whose_output_is_zeroed_are_the_unimportant_ones_and_removing_them_changes_nothing():
    model, x = gpt(), batch()["input_ids"]
    D = model.config.head_dim
    with torch.no_grad():
        for block, dead in zip(model.decoder.blocks, ((0, 2), (1, 3))):
            for h in dead:  # out_proj never reads these heads: they contribute nothing
                block.attn.out_proj.weight[:, h * D:(h + 1) * D] = 0
    reference = model(x).logits
    params_before = model.num_parameters()
    scores = structured_prune(model, "heads", 0.5, get_task("causal-lm"), [batch(1), batch(2)])
    assert scores[0, 0] == 0 and scores[0, 2] == 0 and scores[1, 1] == 0 and scores[1, 3] == 0
    assert (scores[0, [1, 3]] > 0).all() and (scores[1, [0, 2]] > 0).all()
    assert model.config.n_heads == 2 and model.config.d_head == D
    assert model.decoder.blocks[0].attn.q_proj.weight.shape == (2 * D, model.config.d_model)
    assert model.num_parameters() < params_before
    torch.testing.assert_close(model(x).logits, reference, rtol=1e-5, atol=1e-5)


def test_mlp_channels_whose_output_is_zeroed_go_first_and_the_outputs_stay():
    model, x = gpt(), batch()["input_ids"]
    with torch.no_grad():
        for block in model.decoder.blocks:
            block.mlp.fc_out.weight[:, 10:] = 0  # channels 10..39 are never read
    reference = model(x).logits
    params_before = model.num_parameters()
    structured_prune(model, "mlp", 0.75, get_task("causal-lm"), [batch(1)])
    assert model.config.d_ff == 10
    assert model.decoder.blocks[1].mlp.fc_in.weight.shape == (10, model.config.d_model)
    assert model.num_parameters() == params_before - 2 * 30 * (2 * model.config.d_model + 1)
    torch.testing.assert_close(model(x).logits, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call, needle", [
    (lambda m: magnitude_prune(m, 1.0), "sparsity: got 1.0, expected a number in [0, 1)"),
    (lambda m: magnitude_prune(m, -0.1), "sparsity: got -0.1"),
    (lambda m: magnitude_prune(m, 0.5, scope="row"), "scope: got 'row'"),
    (lambda m: structured_prune(m, "layers", 0.5), "structured: got 'layers'"),
    (lambda m: structured_prune(m, "heads", 0.5), "importance='gradient': needs the task"),
    (lambda m: unit_importance(m, "heads", importance="random"), "importance: got 'random'"),
])
def test_bad_arguments_name_themselves(call, needle):
    with pytest.raises(ValueError) as err:
        call(gpt())
    assert needle in str(err.value)


def test_grouped_query_attention_heads_are_refused():
    with pytest.raises(ValueError, match="n_kv_heads=2 for n_heads=4"):
        structured_prune(gpt(n_kv_heads=2), "heads", 0.5, importance="weight")


@pytest.mark.parametrize("field, value, needle", [
    ("sparsity", 1.0, "PruneConfig.sparsity: got 1.0"),
    ("structured", "rows", "PruneConfig.structured"),
    ("finetune_steps", -1, "PruneConfig.finetune_steps"),
    ("importance_batches", 0, "PruneConfig.importance_batches"),
])
def test_prune_config_refusals(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        PruneConfig(checkpoint="x", **{field: value})


# ----------------------------------------------------------------------------- the command


@pytest.fixture
def source_run(tiny_gpt_run):
    return tiny_gpt_run


def test_prune_command_unstructured_then_evaluate(source_run, one_thread):
    root, source = source_run
    out = root / "pruned"
    code, stdout, err = run("prune", "--checkpoint", source, "--sparsity", "0.5", "--out", out)
    assert code == 0, err
    model, configs, tokenizer = ckpt.load_model(out)
    assert sparsity_of(model) == pytest.approx(0.5, abs=1e-3) and tokenizer is not None
    assert configs["prune"]["sparsity"] == 0.5 and configs["prune"]["structured"] is None
    code, stdout, err = run("evaluate", "--checkpoint", out, "--max-batches", "1")
    assert code == 0 and "val_loss" in stdout, err


def test_prune_command_heads_with_a_short_finetune(source_run, one_thread):
    root, source = source_run
    out = root / "heads"
    code, stdout, err = run("prune", "--checkpoint", source, "--sparsity", "0.5", "--structured", "heads",
                            "--importance-batches", "2", "--finetune-steps", "2", "--train.batch_size=4",
                            "--train.progress=false", "--out", out)
    assert code == 0, err
    before, _, _ = ckpt.load_model(source)
    model, configs, _ = ckpt.load_model(out)
    assert model.config.n_heads == 2 and model.num_parameters() < before.num_parameters()
    assert configs["train"]["max_steps"] == 2 and configs["prune"]["structured"] == "heads"


@pytest.mark.parametrize("argv, needles", [
    (["--sparsity", "1.5"], ["PruneConfig.sparsity: got 1.5"]),
    (["--sparsity", "0.5", "--structured", "heads", "--scope", "layer"], ["--scope", "no effect"]),
    (["--sparsity", "0.5", "--train.lr=1"], ["--train.lr", "--finetune-steps"]),
    (["--sparsity", "0.5", "--model.n_heads=2"], ["--model.n_heads", "only --train"]),
])
def test_prune_refusals_are_one_line(source_run, argv, needles):
    root, source = source_run
    one_line_error(*run("prune", "--checkpoint", source, *argv, "--out", root / "refused")[::2], *needles)
    assert not (root / "refused").exists()


def test_a_missing_checkpoint_and_an_occupied_out_are_one_line(source_run, tmp_path):
    root, source = source_run
    one_line_error(*run("prune", "--checkpoint", tmp_path / "nowhere", "--sparsity", "0.5", "--out",
                        tmp_path / "o")[::2], "PruneConfig.checkpoint", "nowhere")
    one_line_error(*run("prune", "--checkpoint", source, "--sparsity", "0.5", "--out", source)[::2], str(source))
