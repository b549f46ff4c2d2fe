import json

import pytest
import torch
from typer.testing import CliRunner

from neuroplex.bench.moe import build_mixture_of_experts, build_st_moe, peer, peer_dispatch_gib, run
from neuroplex.cli import app


def skewed_input(tokens: int, d: int) -> torch.Tensor:
    """Inputs that all look alike, so a random gate sends most of them to the same expert."""
    torch.manual_seed(0)
    return torch.randn(1, d).repeat(tokens, 1) + 0.01 * torch.randn(tokens, d)


def dispatched(module, x: torch.Tensor) -> float:
    """Number of (token, expert) assignments a peer's gate actually dispatches."""
    module.train()
    dispatch = module.gate(x.unsqueeze(0))[0]  # [1, tokens, experts, capacity]
    return float(dispatch.detach().sum())


@pytest.mark.parametrize("k", [1, 2])
def test_mixture_of_experts_no_drop_config_dispatches_every_choice(k):
    x = skewed_input(64, 16)
    assert dispatched(build_mixture_of_experts(16, 32, 4, k, no_drop=True), x) == 64 * k
    # the same skewed batch at the peer's default capacity loses assignments
    assert dispatched(build_mixture_of_experts(16, 32, 4, k, no_drop=False), x) < 64 * k


def test_st_moe_no_drop_config_dispatches_every_choice():
    x = skewed_input(64, 16)
    assert dispatched(build_st_moe(16, 32, 4, 2, no_drop=True), x) == 64 * 2
    assert dispatched(build_st_moe(16, 32, 4, 2, no_drop=False), x) < 64 * 2


def test_peer_outputs_have_the_token_shape():
    cand = peer("st-moe-pytorch", 16, 32, 4, 2, 10, no_drop=True, max_gib=1.0)
    out, aux = cand.call(torch.randn(10, 16))
    assert out.shape == (10, 16) and aux.ndim == 0


def test_peer_is_skipped_with_a_reason_when_unsupported_or_too_big():
    assert peer("st-moe-pytorch", 8, 8, 4, 1, 16, True, 1.0).skip == "k=1 not supported"
    gib = peer_dispatch_gib(16384, 8, None)
    assert gib == pytest.approx(8.0)  # 16384 * 8 * 16384 floats
    too_big = peer("mixture-of-experts", 8, 8, 8, 2, 16384, True, max_gib=1.0)
    assert too_big.skip == "one-hot dispatch 8.0 GiB"


def test_run_times_every_implementation_and_writes_json_and_table(tmp_path):
    out = tmp_path / "moe.json"
    result = run([4], [2], [32], d=8, h=16, repeats=1, warmup=0, threads=1, out=out, echo=print)
    names = {r["impl"] for r in result["rows"]}
    assert {"neuroplex", "dense FFN"} < names and len(names) == 6
    assert all(r["fwd"] > 0 and r["fwd_bwd"] > 0 for r in result["rows"] if r["skip"] is None)
    assert json.loads(out.read_text()) == result
    md = out.with_suffix(".md").read_text()
    assert "**Forward + backward**" in md and "| 4 | 2 | 32 |" in md


def test_cli_rejects_a_non_positive_size(tmp_path):
    result = CliRunner().invoke(
        app, ["bench", "moe", "--tokens", "0", "--out", str(tmp_path / "m.json")]
    )
    assert result.exit_code != 0
    assert "--tokens [0]: every value must be at least 1" in result.output


def test_bf16_and_compiled_rows_sit_beside_float32(tmp_path, monkeypatch):
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m: real(m, backend="aot_eager"))  # no codegen
    result = run(
        [2], [1], [16], d=8, h=16, repeats=1, warmup=1, threads=1, dtypes=("float32", "bfloat16"),
        compiled=True, out=tmp_path / "m.json", echo=print,
    )  # fmt: skip
    rows = {(r["dtype"], r["impl"]): r for r in result["rows"]}
    assert rows["bfloat16", "neuroplex (compiled)"]["fwd_bwd"] > 0
    assert rows["float32", "dense FFN (compiled)"]["fwd_bwd"] > 0
    assert rows["bfloat16", "mixture-of-experts (no drop)"]["skip"] == "float32 on CPU only"
    assert result["router"] == "noisy_topk" and result["clock"] == "process CPU time"
    md = (tmp_path / "m.md").read_text()
    assert "| bfloat16 | 2 | 1 | 16 |" in md and "compiled vs dense" in md


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
def test_cuda_rows_record_peak_memory(tmp_path):
    result = run([2], [1], [64], d=8, h=16, repeats=1, warmup=0, threads=1, device="cuda")
    ours = next(r for r in result["rows"] if r["impl"] == "neuroplex")
    assert ours["peak_mib"] > 0 and result["clock"] == "CUDA wall time"


def test_cli_rejects_a_missing_device_and_an_unknown_dtype(tmp_path):
    out = ["--out", str(tmp_path / "m.json")]
    bad = CliRunner().invoke(app, ["bench", "moe", "--dtype", "int8", *out])
    assert bad.exit_code != 0 and "--dtype 'int8': expected one of float32" in bad.output
    if not torch.cuda.is_available():
        gone = CliRunner().invoke(app, ["bench", "moe", "--device", "cuda", *out])
        assert "--device cuda: no CUDA device is available" in gone.output
