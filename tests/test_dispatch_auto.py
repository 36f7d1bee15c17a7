"""`auto` picks Triton only where a committed GPU measurement shows it winning (minillm/measured.py).

The measurements here are hand-made result files in the suite's format: no GPU is needed to check
the rule, only tensors that say they are on CUDA (a stand-in with the attributes the choice reads).
"""

import json

import pytest
import torch

from minillm import dispatch, measured


class CudaLike:
    """What the choice reads of a tensor: device, shape, dtype, requires_grad."""

    is_cuda = True
    device = torch.device("cuda", 0)

    def __init__(self, *shape, dtype=torch.bfloat16, requires_grad=True):
        self.shape, self.dtype, self.requires_grad = torch.Size(shape), dtype, requires_grad


def _attention_row(provider, seq, ms, head_dim=128, causal=True, mode="fwd+bwd", dtype="bf16"):
    return dict(provider=provider, seq=seq, ms=ms, head_dim=head_dim, causal=causal, mode=mode, dtype=dtype,
                batch=16384 // seq, heads=16, status="ok")


def _result(capability="9.0", dry=False, device_type="cuda"):
    """Ours faster than SDPA at seq >= 2048 with D=128 (causal, fwd+bwd, bf16), slower below and at D=64;
    ours faster than torch's LayerNorm at hidden >= 4096 (fwd+bwd, bf16), slower at 1024."""
    attention = []
    for seq in (512, 1024, 2048, 4096):
        attention += [_attention_row("minillm", seq, 1.0 if seq >= 2048 else 1.2), _attention_row("sdpa", seq, 1.1),
                      _attention_row("minillm", seq, 2.0, head_dim=64), _attention_row("sdpa", seq, 1.0, head_dim=64),
                      _attention_row("sdpa-flash", seq, 0.1)]  # a forced backend is not the baseline
    attention.append(_attention_row("minillm", 8192, None) | {"status": "skipped: budget"})
    norms = []
    for hidden in (1024, 4096, 16384):
        for provider, ms in (("minillm (Triton)", 1.0 if hidden >= 4096 else 2.0), ("torch", 1.5),
                             ("torch.compile", 0.1)):
            norms.append(dict(provider=provider, op="layer_norm", dtype="bf16", mode="fwd+bwd", hidden=hidden, ms=ms))
    return {"dry": dry, "device_type": device_type, "environment": {"capability": capability},
            "attention": {"rows": attention}, "norms": {"rows": norms}}


@pytest.fixture
def measured_on(tmp_path, monkeypatch):
    """Install hand-made result files as the committed measurements; the device's capability is an argument."""

    def install(capability, *results):
        paths = []
        for i, result in enumerate(results):
            path = tmp_path / f"gpu_suite_{i}" / "gpu_suite.json"
            path.parent.mkdir()
            path.write_text(json.dumps(result))
            paths.append(path)
        assert measured.result_files(tmp_path) == paths
        monkeypatch.setattr(measured, "committed", lambda: measured.load(measured.result_files(tmp_path)))
        monkeypatch.setattr(measured, "capability", lambda index: capability)
        monkeypatch.setattr(dispatch, "triton_available", lambda: True)

    return install


def _attn(seq, head_dim=128, **kw):
    q = CudaLike(16384 // seq, 16, seq, head_dim)
    return dispatch.resolve_attention_backend("auto", q, kw.pop("key", None), is_causal=kw.pop("causal", True), **kw)


def test_auto_picks_triton_only_where_measured_faster_on_that_generation(measured_on):
    measured_on("9.0", _result("9.0"))
    assert [_attn(seq) for seq in (2048, 4096, 3000, 1500, 8192)] == ["triton"] * 5
    assert [_attn(seq) for seq in (512, 1024, 1400, 16384 + 1, 200)] == ["sdpa"] * 5  # slower, or no bucket
    assert _attn(4096, head_dim=64) == "sdpa"
    assert _attn(4096, causal=False) == "sdpa"  # not measured
    assert _attn(4096, attn_mask=torch.ones(1, dtype=torch.bool)) == "sdpa"
    assert _attn(4096, dropout_p=0.1) == "sdpa"
    assert _attn(4096, key=CudaLike(4, 4, 4096, 128)) == "sdpa"  # grouped-query heads
    q = CudaLike(4, 16, 4096, 128, requires_grad=False)  # inference: the fwd rows, not measured here
    assert dispatch.resolve_attention_backend("auto", q, is_causal=True) == "sdpa"
    fp16 = CudaLike(4, 16, 4096, 128, dtype=torch.float16)
    assert dispatch.resolve_attention_backend("auto", fp16, is_causal=True) == "sdpa"


def test_auto_keeps_sdpa_on_another_generation(measured_on):
    measured_on("8.0", _result("9.0"))
    assert [_attn(seq) for seq in (512, 2048, 4096, 8192)] == ["sdpa"] * 4
    assert not dispatch._use_triton_norm(CudaLike(8, 1024, 4096), "auto")


def test_auto_norms_follow_the_measurement(measured_on):
    measured_on("9.0", _result("9.0"))
    assert dispatch._use_triton_norm(CudaLike(8, 1024, 4096), "auto")
    assert dispatch._use_triton_norm(CudaLike(8, 1024, 12000), "auto")
    assert not dispatch._use_triton_norm(CudaLike(8, 1024, 1024), "auto")
    assert not dispatch._use_triton_norm(CudaLike(8, 1024, 4096), "auto", "rms_norm")  # not measured
    assert not dispatch._use_triton_norm(CudaLike(8, 1024, 4096, requires_grad=False), "auto")  # fwd not measured
    assert not dispatch._use_triton_norm(torch.zeros(2, 4096), "auto")  # CPU: torch, whatever the files say


def test_files_must_agree_and_dry_runs_are_no_evidence(measured_on):
    slower = _result("9.0")
    for row in slower["attention"]["rows"]:
        if row["provider"] == "minillm" and row["seq"] == 4096:
            row["ms"] = 5.0
    measured_on("9.0", _result("9.0"), slower)
    assert (_attn(2048), _attn(4096)) == ("triton", "sdpa")


@pytest.mark.parametrize("dry,device_type", [(True, "cpu"), (True, "cuda"), (False, "cpu")])
def test_dry_or_cpu_results_are_ignored(measured_on, dry, device_type):
    measured_on("9.0", _result("9.0", dry=dry, device_type=device_type))
    assert _attn(4096) == "sdpa"
    assert measured.committed().files == []


def test_without_committed_measurements_auto_is_sdpa_and_torch(monkeypatch):
    """Today's repository: no GPU result file, so auto is SDPA / torch on every shape."""
    monkeypatch.setattr(measured, "capability", lambda index: "9.0")
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert measured.result_files() == [] and measured.committed().wins == {}
    assert {_attn(seq, d) for seq in (512, 2048, 16384) for d in (64, 128)} == {"sdpa"}
    assert not dispatch._use_triton_norm(CudaLike(8, 1024, 4096), "auto")
