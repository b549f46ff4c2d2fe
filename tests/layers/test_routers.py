import math

import pytest
import torch
from torch import nn

from neuroplex.layers.moe import MoE
from neuroplex.layers.routers import (
    ROUTERS,
    DTSActivationRouter,
    DTSTemperatureRouter,
    NoisyTopKRouter,
    RouterOutput,
    SoftmaxTopKRouter,
)

F64 = torch.float64


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_router_returns_consistent_shapes_in_float64(name):
    torch.manual_seed(0)
    router = ROUTERS[name](5, 4, 2, dtype=F64)
    for training in (True, False):
        out = router.train(training)(torch.randn(7, 5, dtype=F64))
        assert isinstance(out, RouterOutput)
        assert out.logits.shape == out.probs.shape == (7, 4) and out.load.shape == (4,)
        assert out.indices.shape == out.gates.shape and out.indices.shape[0] == 7
        assert out.gates.dtype == F64 and out.indices.dtype == torch.long
        torch.testing.assert_close(out.probs.sum(1), torch.ones(7, dtype=F64))
        assert len(set(out.indices[0].tolist())) == out.indices.shape[1]  # distinct experts


def test_noisy_topk_starts_at_zero_and_is_noisy_only_in_training():
    router = NoisyTopKRouter(3, 5, 2)
    assert not router.w_gate.any() and not router.w_noise.any()
    x = torch.randn(10, 3)
    a, b = router.eval()(x), router(x)
    assert torch.equal(a.logits, b.logits) and not a.logits.any()
    torch.testing.assert_close(a.gates, torch.full((10, 2), 0.5))  # softmax of 2 equal logits
    train = router.train()(x)
    assert train.logits.std() > 0.1  # noise std softplus(0) + 0.01 ≈ 0.70


def test_noisy_topk_gates_are_softmax_of_the_top_logits_and_load_is_smooth():
    torch.manual_seed(1)
    router = NoisyTopKRouter(3, 5, 2, dtype=F64)
    with torch.no_grad():
        router.w_gate.normal_()
        router.w_noise.normal_()
    x = torch.randn(6, 3, dtype=F64)
    torch.manual_seed(7)
    out = router(x)
    torch.manual_seed(7)
    eps = torch.randn(6, 5, dtype=F64)
    clean = x @ router.w_gate
    std = nn.functional.softplus(x @ router.w_noise) + 1e-2
    logits = clean + eps * std
    torch.testing.assert_close(out.logits, logits)
    top = logits.topk(2, dim=1)
    assert torch.equal(out.indices, top.indices)
    torch.testing.assert_close(out.gates, top.values.softmax(1))
    load = torch.zeros(5, dtype=F64)  # Shazeer eq. 9: P(clean_i + noise > kth of the others)
    for t in range(6):
        for i in range(5):
            others = torch.cat([logits[t, :i], logits[t, i + 1 :]]).sort(descending=True).values
            load[i] += torch.special.ndtr((clean[t, i] - others[1]) / std[t, i])
    torch.testing.assert_close(out.load, load)
    (grad,) = torch.autograd.grad(out.load.var(), router.w_noise)
    assert grad.abs().sum() > 0  # the smooth load trains the noise weights


def test_softmax_topk_renormalises_the_top_probabilities():
    torch.manual_seed(0)
    router = SoftmaxTopKRouter(4, 6, 3)
    assert router.w_gate.std() > 0  # small random init: experts differ from the start
    x = torch.randn(5, 4)
    out = router(x)
    probs = torch.softmax(x @ router.w_gate, 1)
    top = probs.topk(3, dim=1)
    assert torch.equal(out.indices, top.indices)
    torch.testing.assert_close(out.gates, top.values / top.values.sum(1, keepdim=True))
    torch.testing.assert_close(out.load, torch.bincount(top.indices.flatten(), minlength=6).float())


def test_dts_temperature_is_dense_at_progress_0_and_exactly_topk_at_1():
    torch.manual_seed(0)
    router = DTSTemperatureRouter(3, 5, 2, tau_start=2.0, tau_end=0.3).eval()
    with torch.no_grad():
        router.w_gate.normal_()
    x = torch.randn(8, 3)
    score = x @ router.w_gate

    dense = router(x)  # progress starts at 0
    assert dense.indices.shape == (8, 5) and (dense.gates > 0).all()
    torch.testing.assert_close(dense.gates.sum(1), torch.ones(8))
    torch.testing.assert_close(dense.probs, torch.softmax(score / 2.0, 1))

    router.set_progress(1.0)
    sparse = router(x)
    probs = torch.softmax(score / 0.3, 1)
    top = probs.topk(2, dim=1)
    assert torch.equal(sparse.indices, top.indices)
    torch.testing.assert_close(sparse.gates, top.values)  # not renormalised
    assert router.schedule() == (pytest.approx(0.3), 2)


def test_dts_schedule_anneals_temperature_and_experts():
    router = DTSTemperatureRouter(2, 6, 2, tau_start=2.0, tau_end=0.5)
    got = []
    for p in (0.0, 0.25, 0.5, 0.9, 1.0):
        router.set_progress(p)
        got.append(router.schedule())
    assert [k for _, k in got] == [6, 5, 4, 2, 2]  # k + floor(4 * (1 - p) + 1/2)
    assert [t for t, _ in got] == pytest.approx([2.0 * 0.25**p for p in (0, 0.25, 0.5, 0.9, 1)])


def test_dts_progress_is_a_buffer_in_state_dict():
    a = DTSTemperatureRouter(3, 4, 1)
    a.set_progress(0.6)
    state = a.state_dict()
    assert "progress" in state and state["progress"].item() == pytest.approx(0.6)
    b = DTSTemperatureRouter(3, 4, 1)
    b.load_state_dict(state)
    assert b.schedule() == a.schedule()
    moe = MoE(3, 3, 4, 1, 5, router="dts_temperature")
    assert "router.progress" in moe.state_dict()


def test_dts_noise_only_in_training():
    torch.manual_seed(0)
    router = DTSTemperatureRouter(3, 4, 1, noise=1.0)
    x = torch.randn(6, 3)
    router.eval()
    assert torch.equal(router(x).logits, router(x).logits)
    router.train()
    assert not torch.equal(router(x).logits, router(x).logits)
    quiet = DTSTemperatureRouter(3, 4, 1, noise=0.0)
    assert torch.equal(quiet(x).logits, quiet(x).logits)


def test_dts_activation_applies_the_activation_before_the_temperature():
    torch.manual_seed(0)
    router = DTSActivationRouter(3, 4, 2, act_layer=nn.Tanh).eval()
    with torch.no_grad():
        router.w_gate.normal_(0, 10.0)
    x = torch.randn(20, 3)
    out = router(x)
    torch.testing.assert_close(out.logits, torch.tanh(x @ router.w_gate) / 2.0)
    assert out.logits.abs().max() <= 1 / 2.0 + 1e-6  # tanh bounds the scores


def test_moe_with_dts_at_progress_0_is_the_dense_mixture():
    torch.manual_seed(0)
    moe = MoE(3, 2, 4, 1, 5, router="dts_temperature", drop="zero", dtype=F64).eval()
    x = torch.randn(6, 3, dtype=F64)
    probs = torch.softmax(x @ moe.router.w_gate / 2.0, dim=1)
    hidden = moe.act(torch.einsum("bd,edh->beh", x, moe.w1) + moe.b1)
    experts = torch.einsum("beh,eho->beo", hidden, moe.w2) + moe.b2  # [b, e, d_out]
    torch.testing.assert_close(moe(x), (probs[:, :, None] * experts).sum(1))
    torch.testing.assert_close(moe.stats["load"], torch.full((4,), 0.25, dtype=F64))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: NoisyTopKRouter(4, 3, 4), "k must be between 1 and n_experts=3, got 4"),
        (lambda: SoftmaxTopKRouter(4, 3, 0), "k must be between 1 and n_experts=3, got 0"),
        (lambda: DTSTemperatureRouter(4, 3, 1, tau_end=0), "must be positive, got 2.0 and 0"),
        (lambda: DTSTemperatureRouter(4, 3, 1, noise=-1), "noise must be at least 0, got -1"),
        (lambda: DTSTemperatureRouter(4, 3, 1).set_progress(1.5), "in \\[0, 1\\], got 1.5"),
    ],
)
def test_bad_router_arguments_raise_value_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_registry_names():
    assert set(ROUTERS) == {"noisy_topk", "softmax_topk", "dts_temperature", "dts_activation"}
    assert math.isclose(DTSActivationRouter(2, 3, 1).tau_end, 0.3)
