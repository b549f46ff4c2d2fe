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
