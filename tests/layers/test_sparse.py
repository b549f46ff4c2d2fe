import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from neuroplex import wiring as W
from neuroplex.layers import sparse_kernels
from neuroplex.layers.sparse import SparseLinear, choose_path
from neuroplex.wiring import Wiring, WiringError

F64 = torch.float64


@st.composite
def wirings(draw) -> Wiring:
    """A small wiring from every builder (sizes may be uneven, so blocks get padded)."""
    kind = draw(st.sampled_from(["dense", "ring", "random", "shuffle", "unit", "hypergraph"]))
    seed = draw(st.integers(0, 100))
    if kind == "dense":
        return W.dense(draw(st.integers(1, 8)), draw(st.integers(1, 8)))
    if kind in ("ring", "random", "shuffle"):
        g = draw(st.integers(1, 5))
        m = draw(st.integers(0, g - 1))
        n_in, n_out = draw(st.integers(g, 3 * g + 2)), draw(st.integers(g, 3 * g + 2))
        return W.modular(n_in, n_out, g, m, kind, seed=seed)
    if kind == "unit":
        eps = draw(st.floats(0.2, 3.0))
        return W.random(draw(st.integers(1, 10)), draw(st.integers(1, 10)), eps, seed=seed)
    in_sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    out_sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    ensemble = st.integers(0, len(in_sizes) - 1)
    incidence = []
    for j in range(len(out_sizes)):
        sets = st.lists(st.frozensets(ensemble, min_size=1), min_size=1, max_size=3, unique=True)
        incidence += [(sorted(s), j) for s in draw(sets)]
    return W.hypergraph(in_sizes, out_sizes, incidence)


def paths_for(wiring: Wiring) -> list[str]:
    """Every path that can run ``wiring`` (so the block kernels run on small cases too)."""
    paths = ["auto", "masked-dense"]
    if wiring.is_block:
        paths.append("block-gather")
        try:
            SparseLinear(wiring, path="block-window")
            paths.append("block-window")
        except WiringError:
            pass
    return paths


def dense_view(layer: SparseLinear, weight: torch.Tensor) -> torch.Tensor:
    """``layer.dense_weight()`` evaluated at another ``weight`` (e.g. its gradient)."""
    saved = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.copy_(weight)
        out = layer.dense_weight().clone()
        layer.weight.copy_(saved)
    return out


@settings(max_examples=40, deadline=None)
@given(wiring=wirings(), batch=st.integers(1, 4), bias=st.booleans())
def test_matches_masked_linear_with_gradients(wiring, batch, bias):
    mask = torch.as_tensor(wiring.to_mask())
    for path in paths_for(wiring):
        layer = SparseLinear(wiring, bias=bias, path=path, dtype=F64)
        params = [p for p in (layer.weight, layer.bias) if p is not None]
        x = torch.randn(batch, wiring.n_in, dtype=F64, requires_grad=True)
        dense = layer.dense_weight()
        assert dense.shape == mask.shape and (dense[~mask] == 0).all()
        y = layer(x)
        gy = torch.randn_like(y)
        grads = torch.autograd.grad(y, [x, *params], gy)
        y_ref = F.linear(x, dense, layer.bias)  # dense is W * mask
        ref = torch.autograd.grad(y_ref, [x, *params], gy)
        torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=0)
        for got, want in zip(grads, ref, strict=True):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
        # the weight gradient, seen as a dense matrix, is (gy^T x) * mask
        grad_w = dense_view(layer, grads[1])
        torch.testing.assert_close(grad_w, (gy.t() @ x.detach()) * mask, atol=1e-10, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [2, 256])  # 5 rows: chunks of 2, 2, 1, or one chunk
def test_gather_in_several_chunks(monkeypatch, bias, rows):
    monkeypatch.setattr(sparse_kernels, "GATHER_BYTES", 1)  # one ensemble per chunk
    monkeypatch.setattr(sparse_kernels, "GATHER_ROWS", rows)
    wiring = W.hypergraph([3, 4, 2], [2, 5], [([0, 2], 0), ([1], 1), ([0], 1), ([2], 1)])
    layer = SparseLinear(wiring, bias=bias, path="block-gather", dtype=F64)
    assert layer.geo["k"] == 3  # output 0 has 2 input ensembles + 1 dummy block
    x = torch.randn(5, 9, dtype=F64, requires_grad=True)
    params = [x, *layer.parameters()]
    y = layer(x)
    gy = torch.randn_like(y)
    y_ref = F.linear(x, layer.dense_weight(), layer.bias)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=0)
    grads = torch.autograd.grad(y, params, gy)
    for got, want in zip(grads, torch.autograd.grad(y_ref, params, gy), strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("pattern", ["ring", "shuffle"])
def test_window_weight_gradient_summed_over_several_batch_chunks(monkeypatch, pattern):
    monkeypatch.setattr(sparse_kernels, "CHUNK_ROWS", 2)  # 5 rows: chunks 2, 2, 1
    wiring = W.modular(10, 15, 5, 2, pattern, seed=3)  # k 3: two windows wrap around
    layer = SparseLinear(wiring, path="block-window", dtype=F64)
    assert (layer.geo["k"], getattr(layer, "order", None) is None) == (3, pattern == "ring")
    x = torch.randn(5, 10, dtype=F64, requires_grad=True)
    y = layer(x)
    gy = torch.randn_like(y)
    (grad_w,) = torch.autograd.grad(y, [layer.weight], gy)
    mask = torch.as_tensor(wiring.to_mask())
    torch.testing.assert_close(
        dense_view(layer, grad_w), (gy.t() @ x.detach()) * mask, atol=1e-10, rtol=0
    )


def test_gather_with_an_unread_input_ensemble_and_unequal_fan_outs():
    # input 1 feeds no output (zero gradient); inputs 0, 2, 3 are read 3, 2 and 1 times
    wiring = W.hypergraph([2, 3, 2, 1], [2] * 3, [([0, 2], 0), ([0], 1), ([0, 2, 3], 2)])
    layer = SparseLinear(wiring, path="block-gather", dtype=F64)
    x = torch.randn(4, 8, dtype=F64, requires_grad=True)
    y = layer(x)
    gy = torch.randn_like(y)
    y_ref = F.linear(x, layer.dense_weight(), layer.bias)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=0)
    (gx,) = torch.autograd.grad(y, [x], gy)
    (gx_ref,) = torch.autograd.grad(y_ref, [x], gy)
    torch.testing.assert_close(gx, gx_ref, atol=1e-10, rtol=0)
    assert (gx[:, 2:5] == 0).all() and (gx[:, :2] != 0).all()


def test_dense_wiring_equals_nn_linear():
    layer = SparseLinear(W.dense(6, 5), dtype=F64)
    assert layer.path == "dense"
    ref = nn.Linear(6, 5, dtype=F64)
    ref.load_state_dict({"weight": layer.weight.detach(), "bias": layer.bias.detach()})
    x = torch.randn(3, 6, dtype=F64, requires_grad=True)
    y, y_ref = layer(x), ref(x)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    y.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    y_ref.sum().backward()
    torch.testing.assert_close(gx, x.grad, atol=0, rtol=0)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, atol=0, rtol=0)


@pytest.mark.parametrize("path", ["auto", "masked-dense", "block-gather"])
def test_init_bound_uses_each_units_real_fan_in(path):
    # output ensemble 0 reads 8 units, ensemble 1 reads 8 + 200 units
    wiring = W.hypergraph([8, 200], [60, 60], [([0], 0), ([0, 1], 1)])
    layer = SparseLinear(wiring, path=path)
    dense, bias = layer.dense_weight().detach(), layer.bias.detach()
    for rows, fan_in in ((slice(0, 60), 8), (slice(60, 120), 208)):
        bound = fan_in**-0.5
        w = dense[rows][torch.as_tensor(wiring.to_mask())[rows]]
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
        assert bias[rows].abs().max() <= bound


def test_init_of_a_unit_mask_and_of_a_unit_with_no_input():
    mask = torch.zeros(3, 50, dtype=torch.bool)
    mask[0, :4] = mask[1, :] = True  # fan-in 4, 50, 0
    layer = SparseLinear(Wiring((50,), (3,), unit_mask=mask.numpy()))
    dense = layer.dense_weight().detach()
    assert dense[0].abs().max() <= 0.5 and dense[1].abs().max() <= 50**-0.5
    assert (dense[2] == 0).all() and layer.bias[2] == 0


@pytest.mark.parametrize(
    ("wiring", "path", "buffers"),
    [
        (W.random(12, 10, 2.0), "auto", {"mask"}),
        (W.modular(16, 16, 4, 1), "block-window", {"block_in", "block_out"}),
        (W.modular(16, 16, 4, 1, "random"), "block-gather", {"block_in", "block_out"}),
        (W.modular(15, 17, 4, 1, "random"), "block-gather", {"block_in", "block_out"}),
        (W.dense(4, 4), "auto", set()),
    ],
    ids=["unit-mask", "window", "gather", "padded", "dense"],
)
def test_structure_is_in_the_state_dict_and_round_trips(wiring, path, buffers):
    a = SparseLinear(wiring, path=path, dtype=F64)
    assert set(a.state_dict()) == {"weight", "bias"} | buffers
    b = SparseLinear(wiring, path=path, dtype=F64)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = torch.randn(5, wiring.n_in, dtype=F64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_loading_a_checkpoint_of_another_wiring_fails_with_a_sentence():
    a = SparseLinear(W.modular(16, 16, 4, 1, "random", seed=0), path="block-gather")
    b = SparseLinear(W.modular(16, 16, 4, 1, "random", seed=1), path="block-gather")
    with pytest.raises(RuntimeError, match="saved from another wiring"):
        b.load_state_dict(a.state_dict())


def test_no_grad_eval_3d_input_and_non_contiguous_input():
    layer = SparseLinear(W.modular(12, 8, 4, 1, "ring"), dtype=F64).eval()
    x = torch.randn(2, 3, 12, dtype=F64)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (2, 3, 8) and not y.requires_grad
    torch.testing.assert_close(y, F.linear(x, layer.dense_weight(), layer.bias))
    xt = torch.randn(12, 5, dtype=F64).t()  # non-contiguous [5, 12]
    torch.testing.assert_close(layer(xt), F.linear(xt, layer.dense_weight(), layer.bias))


def test_float32_default_dtype_and_extra_repr():
    layer = SparseLinear(W.modular(64, 64, 4, 1, "ring"), bias=False)
    assert layer.weight.dtype == torch.float32 and layer.bias is None
    assert layer(torch.randn(2, 64)).dtype == torch.float32
    text = repr(layer)
    for part in ("in_features=64", "out_features=64", "density=0.5", "ensembles=(4, 4)"):
        assert part in text
    assert "path=block-window" in text
    assert "path=masked-dense" in repr(SparseLinear(W.random(8, 8, 1.0)))


def test_path_rule():
    assert choose_path(W.dense(8, 8)) == "dense"
    assert choose_path(W.modular(8, 8, 4, 3)) == "dense"  # m = g - 1 connects everything
    assert choose_path(W.random(64, 64, 4.0)) == "masked-dense"
    assert choose_path(W.modular(4096, 4096, 64, 5, "ring")) == "block-window"
    assert choose_path(W.modular(4096, 4096, 64, 5, "shuffle")) == "block-window"
    assert choose_path(W.modular(4096, 4096, 64, 5, "random")) == "block-gather"
    assert choose_path(W.modular(4096, 4096, 256, 127, "random")) == "masked-dense"
    assert choose_path(W.modular(4096, 4096, 256, 63, "random")) == "block-gather"  # 16s, 0.25
    assert choose_path(W.modular(4096, 4096, 128, 63, "random")) == "masked-dense"  # 32s, 0.5
    assert choose_path(W.modular(4096, 4096, 64, 31, "random")) == "block-gather"  # 64s, 0.5
    assert choose_path(W.modular(4096, 4096, 64, 47, "random")) == "masked-dense"  # 64s, 0.75
    assert choose_path(W.modular(4096, 4096, 32, 15, "random")) == "block-gather"  # 128s, 0.5
    assert choose_path(W.modular(4096, 4096, 32, 23, "random")) == "masked-dense"  # 128s, 0.75


SKIP_ONE = W.hypergraph([2] * 4, [2] * 4, [([j, (j + 2) % 4], j) for j in range(4)])


@pytest.mark.parametrize(
    ("wiring", "path", "phrase"),
    [
        (W.random(8, 8, 1.0), "block-gather", "needs a block wiring"),
        (SKIP_ONE, "block-window", "use 'block-gather'"),
        (W.modular(16, 16, 4, 1), "dense", "needs density 1"),
        (W.dense(2, 2), "fast", "path 'fast' is unknown"),
    ],
)
def test_forcing_a_path_that_cannot_run_is_a_clear_error(wiring, path, phrase):
    with pytest.raises(WiringError, match=phrase):
        SparseLinear(wiring, path=path)


def rewired(wiring: Wiring, seed: int) -> Wiring:
    """Another wiring of the same widths: a random unit mask, or random block pairs."""
    gen = np.random.default_rng(seed)
    if seed % 2:
        return Wiring(
            wiring.in_sizes,
            wiring.out_sizes,
            unit_mask=gen.random((wiring.n_out, wiring.n_in)) < 0.5,
        )
    g_in, g_out = len(wiring.in_sizes), len(wiring.out_sizes)
    pairs = [((int(gen.integers(g_in)),), j) for j in range(g_out)]  # every output fed
    pairs += [((i,), j) for i in range(g_in) for j in range(g_out) if gen.random() < 0.4]
    return Wiring(wiring.in_sizes, wiring.out_sizes, tuple(dict.fromkeys(pairs)))


@settings(max_examples=30, deadline=None)
@given(wiring=wirings(), seed=st.integers(0, 1000))
def test_set_wiring_keeps_shared_weights_zeroes_new_ones_and_runs_like_a_fresh_layer(wiring, seed):
    new = rewired(wiring, seed)
    layer = SparseLinear(wiring, dtype=F64)
    weight, old = layer.weight, layer.dense_weight().detach().clone()
    torch.testing.assert_close(layer.to_dense(layer.from_dense(old)), old, atol=0, rtol=0)
    layer.set_wiring(new)
    assert layer.weight is weight and layer.wiring == new and layer.path == choose_path(new)
    mask = torch.as_tensor(new.to_mask())
    torch.testing.assert_close(layer.dense_weight().detach(), old * mask, atol=0, rtol=0)
    fresh = SparseLinear(new, dtype=F64)
    fresh.load_state_dict(layer.state_dict())  # same structure: buffers and shapes agree
    x = torch.randn(3, wiring.n_in, dtype=F64)
    torch.testing.assert_close(fresh(x), F.linear(x, old * mask, layer.bias), atol=1e-10, rtol=0)
    torch.testing.assert_close(layer(x), fresh(x), atol=0, rtol=0)


def test_set_wiring_refuses_other_widths():
    layer = SparseLinear(W.modular(8, 8, 2, 1))
    with pytest.raises(WiringError, match="same widths"):
        layer.set_wiring(W.dense(8, 9))


# ---- what the layer saves for backward -----------------------------------------------------
def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for ``module(x)``'s backward, leaving out
    the module's parameters and buffers (they live anyway)."""
    state = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in state:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum().backward()
    return sum(seen.values())


@pytest.mark.parametrize(
    ("wiring", "path"),
    [
        (W.random(96, 64, 8.0, seed=0), "auto"),  # unit mask (after SET): masked-dense
        (W.modular(96, 64, 8, 1, "ring"), "masked-dense"),
        (W.modular(96, 64, 8, 1, "ring"), "block-window"),
        (W.modular(96, 64, 8, 1, "random"), "block-gather"),
    ],
)
@pytest.mark.parametrize("lead", [(16,), (2, 3, 5)])
def test_saves_no_more_for_backward_than_nn_linear(wiring, path, lead):
    layer = SparseLinear(wiring, path=path)
    x = torch.randn(*lead, wiring.n_in, requires_grad=True)
    linear = nn.Linear(wiring.n_in, wiring.n_out)
    assert saved_bytes(layer, x) <= saved_bytes(linear, x)
    if layer.path == "masked-dense":  # x only: no [n_out, n_in] product of weight and mask
        assert saved_bytes(layer, x) == x.numel() * x.element_size()


@pytest.mark.parametrize(
    ("pattern", "path"),
    [("ring", "masked-dense"), ("ring", "block-window"), ("random", "block-gather")],
)
def test_saves_its_input_itself_not_a_copy_of_it(pattern, path):
    # after a ReLU, which saves its output, nn.Linear saves nothing more: nor may the layer
    wiring = W.modular(96, 64, 8, 1, pattern, seed=0)
    x = torch.randn(16, wiring.n_in, requires_grad=True)
    ours = nn.Sequential(nn.ReLU(), SparseLinear(wiring, path=path))
    linear = nn.Sequential(nn.ReLU(), nn.Linear(wiring.n_in, wiring.n_out))
    assert saved_bytes(ours, x) == saved_bytes(linear, x) == x.numel() * x.element_size()


@pytest.mark.parametrize("path", ["block-window", "block-gather"])
def test_padded_block_paths_save_only_the_padded_input(path):
    wiring = W.modular(13, 11, 3, 1, "ring")  # ensembles of 5, 4, 4 -> 4, 4, 3 units
    layer = SparseLinear(wiring, path=path)
    assert layer.padded
    x = torch.randn(6, 13, requires_grad=True)
    padded_input = 6 * 3 * 5 * 4  # [b, g_in * s_in] float32: no weight-sized product saved
    assert saved_bytes(layer, x) == padded_input


def test_masked_linear_gradients_equal_autograd_of_the_masked_product():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, dtype=F64, generator=gen, requires_grad=True)
    w = torch.randn(4, 7, dtype=F64, generator=gen, requires_grad=True)
    b = torch.randn(4, dtype=F64, generator=gen, requires_grad=True)
    mask = (torch.rand(4, 7, generator=gen) < 0.5).to(F64)
    kernel = sparse_kernels.MaskedLinear.apply
    assert torch.autograd.gradcheck(lambda x, w, b: kernel(x, w, mask, b), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: kernel(x, w, mask, None), (x, w))
    g = torch.randn(5, 4, dtype=F64, generator=gen)
    ours = torch.autograd.grad(kernel(x, w, mask, b), (x, w, b), g)
    ref = torch.autograd.grad(x @ (w * mask).t() + b, (x, w, b), g)  # autograd of (W * mask)
    for a, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, r)


def test_masked_dense_layer_on_leading_dims_matches_the_masked_product():
    layer = SparseLinear(W.random(9, 6, 2.0, seed=1), dtype=F64)
    x = torch.randn(2, 3, 9, dtype=F64, requires_grad=True)
    y = layer(x)
    assert layer.path == "masked-dense" and y.shape == (2, 3, 6)
    g = torch.randn_like(y)
    ours = torch.autograd.grad(y, (x, layer.weight, layer.bias), g)
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    ref_y = x @ (w * layer.mask).t() + b
    torch.testing.assert_close(y, ref_y)
    ref = torch.autograd.grad(ref_y, (x, w, b), g)
    for a, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, r)


QUARTERS = W.modular(64, 64, 4, 1, "random")  # blocks of 16 at density 0.5: auto runs masked-dense
REASONS = {
    "unit": "masked-dense: unit-level mask (not block-structured)",
    "window": "block-window: 8 blocks of 5x32, up to 1 per output",
    "too dense": "masked-dense: block-gather with blocks of 16x16 would",
    "forced": "masked-dense (forced by path='masked-dense')",
    "gather": "block-gather: 8 blocks of 16x16, up to 2 per output ensemble (forced",
    "dummies": "masked-dense: block-gather with blocks of 8x8 would execute density 0.375 "
    "(7 dummy blocks pad unequal fan-in to 3), above 0.25",
}
# 8 ensembles of 8, fan-in 3 for one output ensemble and 2 for the others (Hebbian can leave it)
UNEQUAL_FAN_IN = W.hypergraph(
    [8] * 8, [8] * 8, [([0, 1, 2], 0)] + [([j, (j + 1) % 8], j) for j in range(1, 8)]
)


@pytest.mark.parametrize(
    ("wiring", "path", "reason"),
    [
        (W.random(8, 8, 1.0, seed=0), "auto", REASONS["unit"]),
        (W.modular(40, 256, 8, 0, "random"), "auto", REASONS["window"]),
        (QUARTERS, "auto", REASONS["too dense"]),
        (QUARTERS, "masked-dense", REASONS["forced"]),
        (QUARTERS, "block-gather", REASONS["gather"]),
        (W.dense(16, 16), "auto", "dense: density 1"),
        (UNEQUAL_FAN_IN, "auto", REASONS["dummies"]),
    ],
)
def test_the_layer_says_which_path_it_runs_and_why(wiring, path, reason):
    layer = SparseLinear(wiring, path=path)
    assert layer.path_reason.startswith(reason)
    assert f"path={layer.path_reason}" in repr(layer)
    layer.set_wiring(W.random(wiring.n_in, wiring.n_out, 2.0, seed=3))  # a rewired unit mask
    assert layer.path_reason == "masked-dense: unit-level mask (not block-structured)"
