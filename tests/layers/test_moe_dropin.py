"""MoE as a drop-in layer: any leading dimensions, nn.Sequential, side results left on the layer,
dtypes and autocast, meta tensors, torch.compile and torch.export."""

import copy
import inspect
import io

import pytest
import torch
from torch import nn

from neuroplex.config import MoEStageConfig
from neuroplex.layers import moe_kernels
from neuroplex.layers.moe import MoE, moe_aux_loss, moe_stats
from neuroplex.layers.routers import RouterOutput
from neuroplex.layers.stages import GatedStage
from neuroplex.network import run_stage

F64 = torch.float64


def _dense_mixture(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """k = e with the softmax router: every expert, weighted by the full softmax, ``[*, d_out]``."""
    probs = torch.softmax(x @ moe.router.w_gate, dim=-1)  # [*, e]
    hidden = moe.act(torch.einsum("...d,edh->...eh", x, moe.w1) + moe.b1)  # [*, e, h]
    experts = torch.einsum("...eh,eho->...eo", hidden, moe.w2) + moe.b2  # [*, e, d_out]
    return (probs[..., None] * experts).sum(-2)


@pytest.mark.parametrize("shape", [(5,), (7, 5), (3, 4, 5), (2, 3, 2, 5)])
def test_any_leading_dimensions_give_the_per_token_mixture(shape):
    torch.manual_seed(0)
    moe = MoE(5, 3, 4, 4, 6, router="softmax_topk", dtype=F64)
    x = torch.randn(*shape, dtype=F64, requires_grad=True)
    y = moe(x)
    assert y.shape == (*shape[:-1], 3)
    want = _dense_mixture(moe, x)
    torch.testing.assert_close(y, want)
    cot = torch.randn_like(y)
    got_g = torch.autograd.grad((y * cot).sum(), [x, moe.w1, moe.router.w_gate])
    want_g = torch.autograd.grad((want * cot).sum(), [x, moe.w1, moe.router.w_gate])
    for g, w in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(g, w)


class ToExpertZero(nn.Module):
    """Routes every token to expert 0 (top-1, gate 1)."""

    n_experts, k = 4, 1

    def forward(self, x):
        b = x.shape[0]
        logits = torch.zeros(b, 4, dtype=x.dtype)
        load = torch.tensor([float(b), 0, 0, 0], dtype=x.dtype)
        idx = torch.zeros(b, 1, dtype=torch.long)
        return RouterOutput(idx, torch.ones(b, 1, dtype=x.dtype), logits, logits.softmax(1), load)


def test_capacity_counts_tokens_over_every_leading_dimension():
    # [2, 4, d]: 8 tokens; capacity ceil(1 * 1 * 8 / 4) = 2, so only x[0, 0] and x[0, 1] are kept
    moe = MoE(2, 2, 4, 1, 3, router=ToExpertZero(), capacity_factor=1.0, drop="residual")
    x = torch.randn(2, 4, 2)
    y = moe(x)
    expert0 = moe.act(x @ moe.w1[0] + moe.b1[0]) @ moe.w2[0] + moe.b2[0]
    torch.testing.assert_close(y[0, :2], expert0[0, :2])
    torch.testing.assert_close(y[0, 2:], x[0, 2:])
    torch.testing.assert_close(y[1], x[1])
    assert moe.stats["dropped_frac"].item() == 6 / 8


def test_works_in_sequential_with_the_config_defaults():
    torch.manual_seed(0)
    net = nn.Sequential(MoE(64, 32, 4, 2, 16), nn.GELU(), nn.Linear(32, 8))
    assert net(torch.randn(8, 16, 64)).shape == (8, 16, 8)
    layer = inspect.signature(MoE).parameters
    config = MoEStageConfig()
    for name, field in [
        ("router", "router"),
        ("capacity_factor", "capacity_factor"),
        ("eval_capacity_factor", "eval_capacity_factor"),
        ("drop", "drop"),
        ("balance", "balance"),
        ("balance_weight", "balance_weight"),
        ("z_loss_weight", "z_loss_weight"),
        ("expert_dropout", "expert_dropout"),
    ]:
        assert layer[name].default == getattr(config, field), name


class Block(nn.Module):
    """A user's residual block with two MoE layers."""

    def __init__(self):
        super().__init__()
        self.ffn1 = MoE(6, 6, 4, 2, 8, router="softmax_topk")
        self.ffn2 = nn.Sequential(nn.LayerNorm(6), MoE(6, 6, 3, 1, 8))

    def forward(self, x):
        return x + self.ffn2(x + self.ffn1(x))


def test_aux_losses_and_stats_are_collected_over_a_model():
    torch.manual_seed(0)
    block = Block()
    assert moe_aux_loss(block).item() == 0 and moe_stats(block) == {}
    y = block(torch.randn(2, 5, 6))
    first, second = block.ffn1, block.ffn2[1]
    total = moe_aux_loss(block)
    torch.testing.assert_close(total, first.aux_loss + second.aux_loss)
    assert first.aux_loss.item() > 0 and second.aux_loss.item() > 0
    stats = moe_stats(block)
    assert set(stats) == {"ffn1", "ffn2.1"}
    torch.testing.assert_close(stats["ffn1"]["load"].sum(), torch.tensor(1.0))
    assert stats["ffn2.1"]["load"].shape == (3,)
    (y.square().mean() + total).backward()  # the aux loss reaches the routers
    assert first.router.w_gate.grad.abs().sum() > 0
    assert second.router.w_noise.grad.abs().sum() > 0
    again = copy.deepcopy(block)  # the stored graph is not copied
    assert again.ffn1.aux_loss is None and again.ffn1.stats is None
    torch.save(block, io.BytesIO())


def test_run_stage_reads_the_side_results_of_a_tensor_stage():
    torch.manual_seed(0)
    stage = GatedStage(MoE(4, 4, 4, 2, 8), norm_layer=None).eval()  # eval: no router noise
    x = torch.randn(10, 4)
    assert isinstance(stage(x), torch.Tensor)
    left = stage.moe.aux_loss
    out = run_stage(stage, x)
    torch.testing.assert_close(out.aux_loss, left)  # eval: the same call, the same loss
    assert out.stats is stage.moe.stats
    # run_stage takes the loss over: the layer keeps no graph alive until its next call (a
    # kept graph pins the parameters' shapes, which a rewiring changes)
    assert stage.moe.aux_loss is None and out.aux_loss.grad_fn is not None
    torch.testing.assert_close(out.x, stage.moe(x))
    assert set(out.stats) >= {"load", "dropped_frac", "balance_loss", "z_loss"}
    two = nn.Sequential(MoE(4, 4, 2, 1, 8), MoE(4, 4, 2, 1, 8)).eval()
    two(x)
    want = two[0].aux_loss + two[1].aux_loss
    many = run_stage(two, x)
    assert {"0.load", "1.load"} <= set(many.stats)
    torch.testing.assert_close(many.aux_loss, want)


# ---------------------------------------------------------------- precision


def _pair(dtype, **kwargs):
    """An fp32 layer and a copy in ``dtype``, eval mode (no router noise)."""
    torch.manual_seed(0)
    ref = MoE(16, 16, 4, 2, 32, **kwargs).eval()
    with torch.no_grad():
        ref.router.w_gate.normal_(0.0, 1.0)
    return ref, copy.deepcopy(ref).to(dtype)


def _separated_tokens(ref: MoE, n: int = 32) -> torch.Tensor:
    """``[4, n // 4, 16]`` tokens whose router logits differ by > 0.3 between every two experts,
    so a lower precision cannot flip the routing (which would be a different function)."""
    x = torch.randn(40 * n, 16)
    logits = (x @ ref.router.w_gate).sort(dim=1).values  # [b, e]
    ok = (logits.diff(dim=1) > 0.3).all(dim=1)
    return x[ok][:n].reshape(4, n // 4, 16).requires_grad_()


def _grads(moe, x):
    y = moe(x)
    loss = y.float().square().mean() + moe.aux_loss.float()
    return [y, *torch.autograd.grad(loss, [x, moe.w1, moe.w2, moe.router.w_gate])]


TOL = {torch.bfloat16: 4e-2, torch.float16: 4e-3, F64: 1e-6}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, F64])
@pytest.mark.parametrize("cap", [None, 1.0])
@pytest.mark.parametrize("dispatch", ["loop", "fused"])  # CPU bf16/fp16: padded slices
def test_plain_dtypes_match_float32(dtype, cap, dispatch):
    ref, low = _pair(dtype, capacity_factor=cap, eval_capacity_factor=cap, dispatch=dispatch)
    x = _separated_tokens(ref)
    xl = x.detach().to(dtype).requires_grad_()
    with torch.no_grad():
        assert torch.equal(ref.route(x).indices, low.route(xl).indices)  # same routing
    got, want = _grads(low, xl), _grads(ref, x)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w, atol=TOL[dtype], rtol=TOL[dtype])


def test_autocast_bf16_runs_experts_in_bf16_and_matches_float32():
    ref, _ = _pair(torch.float32)
    moe = copy.deepcopy(ref).train()
    ref.train()
    x = _separated_tokens(ref)
    torch.manual_seed(1)
    with torch.autocast("cpu", torch.bfloat16):
        y = moe(x)
        aux = moe.aux_loss
    assert y.dtype == torch.bfloat16 and aux.dtype == torch.float32
    torch.manual_seed(1)  # the same router noise: the router runs in float32 under autocast
    want = ref(x)
    torch.testing.assert_close(y.float(), want, atol=4e-2, rtol=4e-2)
    torch.testing.assert_close(aux, ref.aux_loss, atol=1e-6, rtol=1e-6)
    got_g = torch.autograd.grad(y.float().square().mean() + aux, [moe.w1, moe.router.w_gate])
    want_g = torch.autograd.grad(want.square().mean() + ref.aux_loss, [ref.w1, ref.router.w_gate])
    for g, w in zip(got_g, want_g, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=4e-2, rtol=4e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_path_equals_the_loop(dtype):
    torch.manual_seed(0)
    loop = MoE(8, 8, 4, 2, 16, router="softmax_topk", capacity_factor=0.75, dispatch="loop")
    grouped = copy.deepcopy(loop)
    grouped.dispatch = "grouped"
    loop, grouped = loop.to(dtype), grouped.to(dtype)
    x = torch.randn(30, 8, dtype=dtype, requires_grad=True)
    for g, w in zip(_grads(grouped, x), _grads(loop, x), strict=True):
        torch.testing.assert_close(g, w, atol=1e-2 if dtype != torch.float32 else 1e-5, rtol=1e-2)
    with pytest.raises(ValueError, match='dispatch="grouped" runs float32, bfloat16 or float16'):
        grouped.to(F64)(x.detach().to(F64))


# ---------------------------------------------------------------- meta, compile, export


@pytest.mark.parametrize("cap", [None, 1.25])
def test_builds_and_infers_shapes_on_the_meta_device(cap):
    moe = MoE(8, 6, 4, 2, 16, capacity_factor=cap, device="meta")
    x = torch.empty(3, 5, 8, device="meta", requires_grad=True)
    y = moe(x)
    assert y.shape == (3, 5, 6) and y.is_meta and moe.aux_loss.shape == ()
    (y.sum() + moe.aux_loss).backward()
    assert x.grad.shape == x.shape and moe.w1.grad.is_meta


def _compile_pair(cap, dispatch="auto"):
    torch.manual_seed(0)
    moe = MoE(8, 8, 4, 2, 16, router="softmax_topk", capacity_factor=cap, dispatch=dispatch)
    return moe, torch.randn(2, 6, 8, requires_grad=True)


def test_compile_fullgraph_with_a_capacity_matches_eager():
    # the suite's one inductor compile (about 20 s); the other compile tests trace only
    moe, x = _compile_pair(0.75)
    torch._dynamo.reset()
    compiled = torch.compile(moe, fullgraph=True)
    got = _grads(compiled, x)
    assert moe.stats["dropped_frac"].item() > 0  # the capacity really drops
    for g, w in zip(got, _grads(moe, x), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("cap", "breaks"), [(0.75, 0), (None, 1)])
def test_graph_breaks_none_with_a_capacity_one_without(cap, breaks):
    moe, x = _compile_pair(cap)
    torch._dynamo.reset()
    assert torch._dynamo.explain(moe)(x).graph_break_count == breaks


@pytest.mark.parametrize(("dispatch", "breaks"), [("loop", 1), ("fused", 1), ("bmm", 0)])
def test_dropless_compiles_around_at_most_one_break_and_matches_eager(dispatch, breaks):
    moe, x = _compile_pair(None, dispatch)
    torch._dynamo.reset()
    assert torch._dynamo.explain(moe)(x).graph_break_count == breaks
    torch._dynamo.reset()
    compiled = torch.compile(moe, backend="aot_eager")  # dynamo + autograd tracing, no codegen
    got = _grads(compiled, x)
    moe.dispatch = "loop"  # the eager reference
    for g, w in zip(got, _grads(moe, x), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_compiled_dropless_auto_picks_and_runs_its_kernel_behind_the_break(monkeypatch):
    moe, x = _compile_pair(None)
    monkeypatch.setattr("neuroplex.layers.moe.SLAB_MAX_PADDING", float(moe.n_experts))  # bmm
    compiling = []
    slab = moe_kernels._slab

    def spy(*args):
        compiling.append(torch.compiler.is_compiling())
        return slab(*args)

    monkeypatch.setattr(moe_kernels, "_slab", spy)
    torch._dynamo.reset()
    got = _grads(torch.compile(moe, backend="aot_eager"), x)
    assert compiling and not any(compiling)  # bmm's slab of the largest count, run eagerly
    moe.dispatch = "loop"
    for g, w in zip(got, _grads(moe, x), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cap", [None, 1.0])
def test_export_for_inference_matches_eager(cap):
    torch.manual_seed(0)
    moe = MoE(8, 6, 4, 2, 16, eval_capacity_factor=cap).eval()
    with torch.no_grad():
        moe.router.w_gate.normal_()
    program = torch.export.export(moe, (torch.randn(3, 5, 8),))
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), moe(x))
    if cap is not None:
        assert moe.stats["dropped_frac"].item() > 0
