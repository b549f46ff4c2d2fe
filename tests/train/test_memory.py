import gc

import torch
import torch.nn.functional as F
from torch import nn

from neuroplex.train.memory import ActivationMeter, peak_rss_bytes

B, D, H, C = 8, 40, 64, 10


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, C))


def test_meter_matches_hand_count_for_mlp_with_cross_entropy():
    model = mlp()
    meter = ActivationMeter(model.parameters())
    x, y = torch.randn(B, D), torch.zeros(B, dtype=torch.long)
    with meter.track():
        loss = F.cross_entropy(model(x), y)
    # By hand: addmm saves its input x; ReLU saves its output, which the second addmm saves
    # again (same storage, counted once); weights are parameters (not counted); log_softmax
    # saves its output, which nll_loss saves again; nll_loss saves the int64 target and a
    # float32 scalar total weight.
    expected = B * D * 4 + B * H * 4 + B * C * 4 + B * 8 + 4
    assert meter.current == expected
    assert meter.peak == expected
    loss.backward()
    assert meter.current == 0  # graph freed -> every saved tensor released
    assert meter.peak == expected


def test_peak_tracks_two_graphs_alive_at_once_and_one_at_a_time():
    model = mlp()
    x, y = torch.randn(B, D), torch.zeros(B, dtype=torch.long)
    single = ActivationMeter(model.parameters())
    with single.track():
        F.cross_entropy(model(x), y).backward()
    together = ActivationMeter(model.parameters())
    with together.track():
        first = F.cross_entropy(model(x), y)
        second = F.cross_entropy(model(x + 1), y)
    assert together.peak == 2 * single.peak - B * 8  # both graphs save the same target y
    first.backward()
    second.backward()
    sequential = ActivationMeter(model.parameters())
    with sequential.track():
        for shift in range(3):
            F.cross_entropy(model(x + shift), y).backward()
    assert sequential.peak == single.peak
    assert sequential.current == 0


def test_parameters_are_excluded_but_counted_without_exclusion():
    w = nn.Parameter(torch.randn(D, H))
    x = torch.randn(B, D, requires_grad=True)
    excluded = ActivationMeter([w])
    with excluded.track():
        out = (x @ w).sum()
    assert excluded.current == B * D * 4  # mm saves x (for dW) and w (for dx); w excluded
    out.backward()
    counted = ActivationMeter()
    with counted.track():
        (x @ w).sum().backward()
    assert counted.peak == B * D * 4 + D * H * 4


def test_reset_peak_and_rss():
    model = mlp()
    meter = ActivationMeter(model.parameters())
    with meter.track():
        model(torch.randn(B, D)).sum().backward()
    assert meter.peak > 0
    meter.reset_peak()
    assert meter.peak == 0
    assert peak_rss_bytes() > 10 * 2**20  # torch alone is far above 10 MiB


def test_a_parameter_whose_data_is_replaced_stays_excluded():
    model = mlp()
    meter = ActivationMeter(model.parameters())
    x, y = torch.randn(B, D), torch.zeros(B, dtype=torch.long)
    with meter.track():
        F.cross_entropy(model(x), y).backward()
    first = meter.peak
    with torch.no_grad():
        model[2].weight.data = model[2].weight.data.clone()  # new storage, as rewiring does
    meter.reset_peak()
    with meter.track():
        F.cross_entropy(model(x), y).backward()
    assert meter.peak == first


def test_an_op_saving_its_output_off_the_backward_path_is_released():
    # softmax saves its output; held as-is, a graph that backward never runs (a statistic
    # computed with grad, like MoE's gate entropy) would leak one tensor per step
    w = torch.randn(6, 4, requires_grad=True)
    x = torch.randn(10, 6)
    expected = torch.autograd.grad((x @ w).softmax(1).square().sum(), w)[0]
    meter = ActivationMeter([w])
    for _ in range(3):
        with meter.track():
            side = (x @ w).softmax(1)  # never back-propagated
            grad = torch.autograd.grad((x @ w).softmax(1).square().sum(), w)[0]
            del side
        assert torch.equal(grad, expected)
    gc.collect()
    assert meter.current == 0 and meter.peak > 0


class Scale(nn.Module):
    """``x * scale``: autograd saves the ``scale`` buffer (for x's gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.full((D,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_buffers_of_the_given_modules_are_not_counted_even_once_replaced():
    module = Scale()
    x = torch.randn(B, D, requires_grad=True)
    meter = ActivationMeter(modules=[module])
    with meter.track():
        y = module(x)
    assert meter.current == 0  # x * scale saves only the buffer (x's gradient needs it)
    del y
    module.scale = torch.full((D,), 3.0)  # a rebuilt layer registers a new buffer
    with meter.track():
        y = module(x)
    assert meter.current == 0
    counted = ActivationMeter()
    with counted.track():
        y = module(x)
    assert counted.current == D * 4 and y.requires_grad  # y keeps the graph alive


def test_meter_matches_hand_count_for_a_conv_stage():
    from neuroplex.layers.conv import ConvStage

    b, c, h, k = 4, 3, 10, 6
    x = torch.randn(b, c, h, h)
    counts = {}
    for name, norm in (("none", None), ("batchnorm", nn.BatchNorm2d)):
        stage = ConvStage((c, h, h), k, kernel=3, pool="max", norm=norm, act_layer=nn.ReLU)
        meter = ActivationMeter(stage.parameters())
        with meter.track():
            stage(x).sum().backward()
        counts[name] = meter.peak
    # By hand: the conv saves its input x (its weight is a parameter); ReLU saves its output
    # [b, k, h, h], which max-pool saves again (same storage, counted once) with its int64
    # indices [b, k, h/2, h/2]; sum saves no tensor.
    no_norm = b * c * h * h * 4 + b * k * h * h * 4 + b * k * (h // 2) ** 2 * 8
    assert counts["none"] == no_norm
    # Batch norm also saves its input (the conv output, [b, k, h, h]) and four float32 [k]
    # vectors: running mean and variance (buffers, not parameters), batch mean and 1/std.
    assert counts["batchnorm"] == no_norm + b * k * h * h * 4 + 4 * k * 4
