"""SparseLinear as a drop-in layer: any leading dims, dtypes and autocast, the meta device,
``torch.compile(fullgraph=True)`` and ``torch.export``, on every path, each against a float64
reference computed here from the layer's masked dense weight."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuroplex import wiring as W
from neuroplex.layers.sparse import SparseLinear

F64 = torch.float64

# (wiring, path): every path, with equal and unequal (padded) ensembles and dummy blocks
CASES = {
    "dense": (W.dense(12, 10), "dense"),
    "masked-dense": (W.random(24, 20, 2.0, seed=0), "masked-dense"),
    "window-ring": (W.modular(24, 24, 4, 1, "ring"), "block-window"),
    "window-shuffle-padded": (W.modular(26, 23, 4, 2, "shuffle", seed=3), "block-window"),
    "gather-random": (W.modular(24, 24, 4, 2, "random", seed=1), "block-gather"),
    "gather-padded-dummies": (
        W.hypergraph([3, 2, 3], [2, 3], [([0], 0), ([1], 0), ([2], 0), ([1], 1)]),
        "block-gather",
    ),
}
LEADS = [(), (5,), (2, 3), (2, 1, 3)]


def layer_for(case: str, dtype=torch.float32, seed: int = 0) -> SparseLinear:
    wiring, path = CASES[case]
    torch.manual_seed(seed)
    layer = SparseLinear(wiring, path=path, dtype=dtype)
    assert layer.path == path
    return layer


def reference(layer: SparseLinear, x: torch.Tensor, gy: torch.Tensor) -> tuple:
    """Float64 ``x @ (W * mask)^T + b`` and its gradients w.r.t. x, the dense weight, bias;
    the mask comes from the wiring, not from the layer."""
    mask = torch.as_tensor(layer.wiring.to_mask(), dtype=F64)
    w = (layer.dense_weight().detach().to(F64) * mask).requires_grad_()
    b = layer.bias.detach().to(F64).requires_grad_()
    x = x.detach().to(F64).requires_grad_()
    y = x @ (w * mask).t() + b  # [*, n_out]
    grads = torch.autograd.grad(y, [x, w, b], gy.to(F64))
    return y, *grads


def run(layer: nn.Module, sparse: SparseLinear, x: torch.Tensor, gy: torch.Tensor) -> tuple:
    """Output and gradients (input, dense-view weight, bias) of ``layer`` (``sparse`` or a
    compiled copy of it)."""
    x = x.detach().requires_grad_()
    y = layer(x)
    gx, gw, gb = torch.autograd.grad(y, [x, sparse.weight, sparse.bias], gy.to(y.dtype))
    return y, gx, sparse.to_dense(gw), gb


def assert_near(got: tuple, want: tuple, tol: float) -> None:
    """Each tensor within ``tol`` of the reference, relative to the reference's largest
    entry (a bf16 result carries ~3 significant digits, so an elementwise rtol would fail on
    entries near zero)."""
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        scale = w.abs().max().clamp(min=1e-12)
        assert ((g.to(F64) - w).abs().max() / scale).item() <= tol


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("lead", LEADS)
def test_every_path_matches_float64_on_any_leading_dims(case, lead):
    layer = layer_for(case, F64)
    x = torch.randn(*lead, layer.in_features, dtype=F64)
    gy = torch.randn(*lead, layer.out_features, dtype=F64)
    got = run(layer, layer, x, gy)
    assert got[0].shape == (*lead, layer.out_features)
    assert_near(got, reference(layer, x, gy), 1e-12)


# tolerance relative to the largest entry: bf16 has an 8-bit mantissa (2^-8 ≈ 4e-3 per
# rounding, a few roundings per dot product), fp16 10 bits, float32 24 bits
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-5, F64: 1e-12}


@pytest.mark.parametrize("case", CASES)
def test_an_empty_batch_gives_an_empty_output_and_zero_gradients_like_nn_linear(case):
    layer = layer_for(case)
    x = torch.randn(2, 0, layer.in_features, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 0, layer.out_features)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert (layer.weight.grad == 0).all() and (layer.bias.grad == 0).all()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, F64])
def test_plain_dtypes_forward_and_backward_match_float64(case, dtype):
    layer = layer_for(case, dtype)
    x = torch.randn(4, 3, layer.in_features)
    gy = torch.randn(4, 3, layer.out_features)
    got = run(layer, layer, x.to(dtype), gy.to(dtype))
    assert all(t.dtype == dtype for t in got)
    assert_near(got, reference(layer, x, gy), TOLERANCE[dtype])


@pytest.mark.parametrize("case", CASES)
def test_cpu_bf16_autocast_like_nn_linear(case):
    layer = layer_for(case)
    x = torch.randn(6, layer.in_features)
    gy = torch.randn(6, layer.out_features)
    with torch.autocast("cpu", torch.bfloat16):
        got = run(layer, layer, x, gy)
        linear = F.linear(x, layer.dense_weight(), layer.bias)
    assert got[0].dtype == linear.dtype == torch.bfloat16
    assert got[1].dtype == torch.float32  # the input's gradient in the input's dtype
    assert layer.weight.dtype == got[2].dtype == got[3].dtype == torch.float32
    assert_near(got, reference(layer, x, gy), TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("case", CASES)
def test_builds_and_infers_shapes_on_the_meta_device(case):
    wiring, path = CASES[case]
    with torch.device("meta"):
        layer = SparseLinear(wiring, path=path)
        y = layer(torch.empty(2, 7, wiring.n_in))
    assert y.device.type == "meta" and y.shape == (2, 7, wiring.n_out)
    assert layer.weight.is_meta and layer.path == path
    assert (
        SparseLinear(wiring, path=path, device="meta").num_connections() == wiring.to_mask().sum()
    )


def mlp(case: str) -> nn.Sequential:
    """Two layers of one case (square wirings) around a GELU."""
    first, second = layer_for(case, seed=0), layer_for(case, seed=1)
    return nn.Sequential(first, nn.GELU(), second)


SQUARE = ["dense", "window-ring", "gather-random"]


@pytest.mark.parametrize("case", [*SQUARE, "masked-dense", "window-shuffle-padded"])
def test_compiles_fullgraph_forward_and_backward_like_eager(case):
    torch._dynamo.reset()
    layer = layer_for(case)
    x, gy = torch.randn(3, 5, layer.in_features), torch.randn(3, 5, layer.out_features)
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    # aot_eager traces forward and backward through AOTAutograd without code generation
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert_near(run(compiled, layer, x, gy), run(layer, layer, x, gy), 1e-6)


def test_inductor_compiled_mlp_matches_eager_outputs_and_gradients():
    torch._dynamo.reset()
    model = nn.Sequential(layer_for("window-ring"), nn.GELU(), layer_for("gather-random"))
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(8, 24)
    outs = []
    for m in (compiled, model):
        y = m(x)
        grads = torch.autograd.grad(y.square().sum(), list(model.parameters()))
        outs.append((y, *grads))
    for got, want in zip(*outs, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_compiled_under_bf16_autocast():
    torch._dynamo.reset()
    layer = layer_for("gather-random")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x, gy = torch.randn(6, 24), torch.randn(6, 24)
    with torch.autocast("cpu", torch.bfloat16):
        got = run(compiled, layer, x, gy)
    assert got[0].dtype == torch.bfloat16
    assert_near(got, reference(layer, x, gy), TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("case", CASES)
def test_exports_for_inference(case):
    layer = layer_for(case).eval()
    x = torch.randn(4, 3, layer.in_features)
    program = torch.export.export(layer, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), layer(x), atol=0, rtol=0)
