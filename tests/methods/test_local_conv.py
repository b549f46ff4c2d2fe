"""Local learning on feature-map stages (conv, residual, pool): gradient isolation against an
independent autograd computation, the activation meter against a hand count, the aux nets'
shapes on 1-D and 2-D maps, AugLocal's depth and widths on conv networks, early exit."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuroplex.config import load_config
from neuroplex.layers.conv import BasicBlock, ConvBlock
from neuroplex.methods.aux import MomentumAux
from neuroplex.methods.exits import exit_outputs, train_correctness_gates
from neuroplex.methods.local import Local
from neuroplex.network import build_network, stage_out_shape
from neuroplex.train import loop
from neuroplex.train.memory import ActivationMeter
from neuroplex.train.runs import evaluate_exits

KINDS = ["linear", "mlp", "augmented", "momentum"]
CLASSES = 5
CONV = (
    "model.stages=[{kind: conv, channels: 6}, {kind: conv, channels: 8, pool: max},"
    " {kind: residual, channels: 10, blocks: 1, stride: 2}, {kind: pool}]"
)
# one sample's shape after each stage of CONV, by hand: conv keeps the size, max pool halves it,
# the stride-2 residual block halves it, the global pool leaves the channels
SHAPES = {
    (3, 8, 8): [(6, 8, 8), (8, 4, 4), (10, 2, 2), (10,)],
    (3, 16): [(6, 16), (8, 8), (10, 4), (10,)],
}


def make(stages: str, in_shape, kind: str, *extra: str):
    cfg = load_config(
        None,
        [stages, "train.method=local", f"train.aux.kind={kind}", "train.grad_clip=null", *extra],
    )
    torch.manual_seed(0)
    model = build_network(cfg.model, in_shape, n_classes=CLASSES)
    return model, Local(model, cfg)


def batch(in_shape, n: int = 12):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, *in_shape, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)


def trained(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


@pytest.mark.parametrize("in_shape", list(SHAPES))
@pytest.mark.parametrize("kind", KINDS)
def test_each_stage_gets_exactly_the_gradient_of_its_own_aux_loss(kind, in_shape):
    model, method = make(CONV, in_shape, kind, "train.aux.widen=0.5")
    ref_stages, ref_heads = copy.deepcopy(model.stages), copy.deepcopy([*method.aux, model.head])
    current = {"stage": -1}
    for s, stage in enumerate(model.stages):
        stage.register_forward_pre_hook(lambda mod, args, s=s: current.update(stage=s))
    heads = [*method.aux, model.head]
    arrivals: dict[int, set[int]] = {}
    for stage, head in zip(model.stages, heads, strict=True):
        for p in [*trained(stage), *trained(head)]:
            key = id(p)
            arrivals[key] = set()
            p.register_hook(lambda g, key=key: arrivals[key].add(current["stage"]))
    x, y = batch(in_shape)
    method.step(x, y, lr=0.0)  # lr 0: the weights stay as the reference copies them

    # Independent computation: each stage on the detached output of the one before, its own
    # classifier's cross-entropy, torch.autograd.grad over that stage's and classifier's weights.
    h = x
    for s, (stage, head) in enumerate(zip(ref_stages, ref_heads, strict=True)):
        out = stage(h.detach())
        params = [*trained(stage), *trained(head)]
        want = torch.autograd.grad(F.cross_entropy(head(out), y), params)
        got = [*trained(model.stages[s]), *trained(heads[s])]
        for p, g in zip(got, want, strict=True):
            assert arrivals[id(p)] == {s}, f"stage {s}: gradient while training {arrivals[id(p)]}"
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
        assert any(g.abs().sum() > 0 for g in want)
        h = out


def test_local_peak_on_a_conv_stage_matches_a_hand_count():
    stages = (
        "model.stages=[{kind: conv, channels: 4, norm: none, pool: max},"
        " {kind: conv, channels: 3, norm: none}, {kind: pool}]"
    )
    b, c, n = 10, 2, 6
    model, method = make(stages, (c, n, n), "linear")
    x, y = batch((c, n, n), b)
    meter = ActivationMeter([*model.parameters(), *method.aux.parameters()])
    with meter.track():
        method.step(x, y, lr=0.0)
    # Stage 0 + its aux net set the peak (stage 1 reads a 4x smaller map). By hand: the conv
    # saves its input [b, c, n, n]; ReLU saves its output [b, 4, n, n], which max pool saves
    # again (same storage) with its int64 indices [b, 4, n/2, n/2]; the aux net's global
    # average pool saves nothing (a mean's backward needs only the shape), its linear layer its
    # input [b, 4]; cross-entropy the log-probabilities [b, 5], the int64 targets [b] and a
    # float32 total weight.
    f32, i64 = 4, 8
    stage0 = b * c * n * n * f32 + b * 4 * n * n * f32 + b * 4 * (n // 2) ** 2 * i64
    aux0 = b * 4 * f32 + b * CLASSES * f32 + b * i64 + f32
    assert meter.peak == stage0 + aux0
    assert meter.current == 0  # every stage's graph is freed after its step


@pytest.mark.parametrize("in_shape", list(SHAPES))
@pytest.mark.parametrize("kind", KINDS)
def test_every_aux_kind_maps_a_feature_map_to_class_logits(kind, in_shape):
    model, method = make(CONV, in_shape, kind)
    assert [stage_out_shape(stage) for stage in model.stages] == SHAPES[in_shape]
    assert len(method.aux) == len(model.stages) - 1  # the last stage trains through the head
    for aux, shape in zip(method.aux, SHAPES[in_shape], strict=False):
        assert aux(torch.randn(4, *shape)).shape == (4, CLASSES)


def test_momentum_aux_copies_the_next_conv_block_and_pools_before_its_head():
    model, method = make(CONV, (3, 8, 8), "momentum")
    aux, nxt = method.aux[1], model.stages[2][0]  # the residual stage's first block
    assert isinstance(aux, MomentumAux) and isinstance(aux.lb, BasicBlock)
    assert [p.shape for p in aux.lb.parameters()] == [p.shape for p in nxt.parameters()]
    h = torch.randn(4, 8, 4, 4)
    aux.eval()
    mixed = aux.lb(h) + aux.ema(h)  # [4, 10, 2, 2]
    torch.testing.assert_close(aux(h), aux.head[1](mixed.mean(dim=(2, 3))))


POOL = {nn.MaxPool2d: "max", nn.AvgPool2d: "avg", nn.Identity: "none"}


def auglocal_reference(
    stage: int, n_stages: int, last_layers: list[int], n_layers: int, max_depth: int = 3
):
    """AugLocal's rule written out (resnet.py aux_depth_list, auxiliary_nets.py unifSamp):
    depth max(1, round(D (1 - t) + t)), t = s c / (K - 2), c = 0.5; layers round(l + (n - 1 - l)
    / depth i), i = 1..depth, or every later layer when the depth covers them."""
    t = stage * 0.5 / (n_stages - 2)
    depth = max(1, round(max_depth * (1 - t) + t))
    last = last_layers[stage]
    remaining = n_layers - 1 - last
    if depth >= remaining:
        return depth, list(range(last + 1, n_layers))
    return depth, [round(last + remaining / depth * i) for i in range(1, depth + 1)]


def test_augmented_conv_aux_nets_follow_auglocals_depth_picks_and_widths():
    stages = (
        "model.stages=[{kind: conv, channels: 4}, {kind: conv, channels: 8, kernel: 5, pool: max},"
        " {kind: conv, channels: 8, layers: 2}, {kind: conv, channels: 16, kernel: 5, pool: avg},"
        " {kind: conv, channels: 16}, {kind: pool}]"
    )
    # the network's layers: (channels, kernel, pool); stage s ends at layer last_layers[s];
    # layers 1 and 4 halve the map (2x2 pools)
    layers = [(4, 3, "none"), (8, 5, "max"), (8, 3, "none"), (8, 3, "none"), (16, 5, "avg"),
              (16, 3, "none")]  # fmt: skip
    last_layers = [0, 1, 3, 4, 5]
    _, method = make(stages, (2, 8, 8), "augmented", "train.aux.widen=0.5")
    for s, aux in enumerate(method.aux):
        depth, picks = auglocal_reference(s, 6, last_layers, len(layers))
        blocks = [m for m in aux if isinstance(m, ConvBlock)]
        # a skipped pooling layer's downsampling becomes the next copy's stride
        previous = [last_layers[s], *picks]  # each pick's predecessor (zip drops the last)
        strides = [2 ** sum(layers[j][2] != "none" for j in range(p + 1, i))
                   for p, i in zip(previous, picks, strict=False)]  # fmt: skip
        want = [
            (layers[i][0] // 2, layers[i][1], layers[i][2], st)
            for i, st in zip(picks, strides, strict=True)
        ]
        got = [
            (b.conv.out_channels, b.conv.kernel_size[0], POOL[type(b.pool)], b.conv.stride[0])
            for b in blocks
        ]
        assert got == want, s
        has_bn = any(isinstance(m, nn.BatchNorm1d) for m in aux)
        assert has_bn == (depth <= 1)
        assert aux[-1].in_features == (want[-1][0] if want else 16)
    # by hand: stage 0 depth 3 -> layers 2, 3, 5 (strides 2, 1, 2: layers 1 and 4 skipped);
    # stage 1 depth 3 -> 2, 4, 5; stage 2 depth 2 -> 4, 5; stage 3 -> 5; stage 4: none left
    counts = [sum(isinstance(m, ConvBlock) for m in aux) for aux in method.aux]
    assert counts == [3, 3, 2, 1, 0]
    assert [b.conv.stride[0] for b in method.aux[0] if isinstance(b, ConvBlock)] == [2, 1, 2]
    assert method.aux[0][2](torch.randn(1, 4, 4, 4)).shape == (1, 8, 2, 2)  # the net's 2x2


def test_augmented_residual_aux_net_copies_the_blocks_strides():
    stages = (
        "model.stages=[{kind: conv, channels: 4}, {kind: residual, channels: 8, blocks: 2,"
        " stride: 2}, {kind: residual, channels: 16, blocks: 1, stride: 2}, {kind: pool}]"
    )
    _, method = make(stages, (1, 8, 8), "augmented", "train.aux.widen=0.5")
    blocks = [m for m in method.aux[0] if isinstance(m, BasicBlock)]
    # stage 0 (layer 0 of 4), depth 3: every later block, strides 2, 1, 2, channels halved
    assert [b.conv1.stride[0] for b in blocks] == [2, 1, 2]
    assert [b.conv2.out_channels for b in blocks] == [4, 4, 8]
    assert method.aux[0](torch.randn(3, 4, 8, 8)).shape == (3, CLASSES)


def test_augmented_reaches_a_later_dense_layer_through_the_networks_flatten():
    stages = (
        "model.stages=[{kind: conv, channels: 4, pool: max}, {kind: flatten},"
        " {kind: dense, width: 12}]"
    )
    _, method = make(stages, (1, 6, 6), "augmented", "train.aux.width=7")
    aux = method.aux[0]
    assert [type(m).__name__ for m in aux] == ["Flatten", "DenseBlock", "Linear"]
    assert aux[1].linear.in_features == 4 * 3 * 3 and aux[1].linear.out_features == 7


def test_exit_classifiers_on_a_conv_network_are_the_aux_nets():
    model, method = make(CONV, (3, 8, 8), "linear")
    x, y = batch((3, 8, 8), 40)
    heads = [*method.aux, model.head]
    out = exit_outputs(model, heads, x)
    model.eval()
    h = x
    with torch.no_grad():
        for s, stage in enumerate(model.stages):
            h = stage(h)
            torch.testing.assert_close(out.features[s], h)
            torch.testing.assert_close(out.probs[s], F.softmax(heads[s](h), dim=-1))
    gates = train_correctness_gates(out, y, steps=5)
    assert [g.net[0].in_features for g in gates] == [6 + 2, 8 + 2, 10 + 2, 10 + 2]


def test_early_exit_on_a_local_conv_run(tmp_path):
    cfg = load_config(
        None,
        [
            "data.name=digits",
            "data.shape=image",
            "model.stages=[{kind: conv, channels: 8, pool: max}, {kind: conv, channels: 12},"
            " {kind: pool}]",
            "train.method=local",
            "train.aux.kind=augmented",
            "train.epochs=3",
            "train.batch_size=64",
            "train.lr=0.01",
        ],
    )
    summary = loop.train(cfg, tmp_path / "run")
    assert summary["test_acc"] > 0.3  # 3 epochs of a tiny CNN on 8x8 digits; chance is 0.1
    fast = ["train.exits.steps=40", "train.exits.phase_steps=10", "train.exits.lambdas=[0, 0.5]"]
    report = evaluate_exits(tmp_path / "run", overrides=fast)
    assert report["stages"] == 3
    assert report["confidence"][-1]["mean_stages"] == 3.0
    assert report["confidence"][0]["mean_stages"] == 1.0  # threshold 0: everyone exits first
    assert report["per_stage_acc"][-1] == report["full"]["acc"]
    for policy in ("jei", "correctness"):
        assert all(1.0 <= p["mean_stages"] <= 3.0 for p in report[policy])


@pytest.mark.parametrize(("reduce", "ends"), [("network", "Flatten"), ("avg", "GlobalPool")])
def test_augmented_aux_nets_make_a_vector_as_the_network_does(reduce, ends):
    stages = (
        "model.stages=[{kind: conv, channels: 4, pool: max}, {kind: conv, channels: 6, pool: max},"
        " {kind: flatten}]"
    )
    model, method = make(stages, (1, 8, 8), "augmented", "train.aux.widen=0.5",
                         f"train.aux.reduce={reduce}")  # fmt: skip
    # stage 0: a copy of layer 1 (3 channels, 8x8 -> 4x4 -> 2x2 map), then the vector
    assert [type(m).__name__ for m in method.aux[0]] == ["ConvBlock", ends, "Linear"]
    assert method.aux[0][-1].in_features == (3 * 2 * 2 if reduce == "network" else 3)
    # stage 1 has no later layer: with `network` its aux net is shaped as the network's head
    want = model.head.in_features if reduce == "network" else 6
    assert method.aux[1][-1].in_features == want == (24 if reduce == "network" else 6)
