import copy

import pytest
import torch
import torch.nn.functional as F

from neuroplex.config import load_config
from neuroplex.files import read_jsonl
from neuroplex.methods.aux import MomentumAux, augmented_depth, augmented_picks
from neuroplex.methods.local import Local
from neuroplex.network import build_network
from neuroplex.train import loop
from neuroplex.train.memory import ActivationMeter

STAGES = (
    "model.stages=[{kind: dense, width: 32}, {kind: dense, width: 24, layers: 2},"
    " {kind: dense, width: 16}]"
)


def local_config(kind: str, *extra: str):
    return load_config(
        None,
        [
            "data.name=digits",
            STAGES,
            "train.method=local",
            f"train.aux.kind={kind}",
            "train.epochs=3",
            "train.batch_size=64",
            "train.lr=0.01",
            *extra,
        ],
    )


def make_local(kind: str, *extra: str):
    cfg = local_config(kind, *extra)
    torch.manual_seed(0)
    model = build_network(cfg.model, in_shape=10, n_classes=4)
    return model, Local(model, cfg)


def batch(n: int = 16):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 10, generator=gen), torch.randint(0, 4, (n,), generator=gen)


@pytest.mark.parametrize("kind", ["linear", "mlp", "augmented", "momentum"])
def test_no_gradient_crosses_a_stage_boundary(kind):
    model, method = make_local(kind)
    current = {"stage": -1}
    for s, stage in enumerate(model.stages):
        stage.register_forward_pre_hook(lambda mod, args, s=s: current.update(stage=s))
    owners = {}
    for s, stage in enumerate(model.stages):
        for name, p in stage.named_parameters():
            owners[f"stage{s}.{name}"] = (s, p)
    for s, aux in enumerate(method.aux):
        for name, p in aux.named_parameters():
            owners[f"aux{s}.{name}"] = (s, p)
    for name, p in model.head.named_parameters():
        owners[f"head.{name}"] = (len(model.stages) - 1, p)
    seen: dict[str, set[int]] = {name: set() for name in owners}
    for name, (_, p) in owners.items():
        if p.requires_grad:  # MAN's EMA copy is not trained by gradient
            p.register_hook(lambda grad, name=name: seen[name].add(current["stage"]))
    method.step(*batch(), lr=0.01)
    for name, (owner, p) in owners.items():
        if p.requires_grad:
            assert seen[name] == {owner}, f"{name} got gradient while training stage {seen[name]}"


def stage_alone_bytes(model, method, x, y) -> list[int]:
    """Saved bytes of each stage + its aux net + loss, measured one stage at a time."""
    sizes, h = [], x
    heads = [*method.aux, model.head]
    for stage, head in zip(model.stages, heads, strict=True):
        meter = ActivationMeter([*model.parameters(), *method.aux.parameters()])
        with meter.track():
            out = stage(h.detach())
            loss = F.cross_entropy(head(out), y)
        sizes.append(meter.peak)
        loss.backward()
        h = out.detach()
    return sizes


def test_local_peak_memory_is_the_largest_single_stage_plus_its_aux():
    model, method = make_local("mlp", "train.aux.hidden=8")
    x, y = batch(32)
    expected = max(stage_alone_bytes(copy.deepcopy(model), copy.deepcopy(method), x, y))
    meter = ActivationMeter([*model.parameters(), *method.aux.parameters()])
    with meter.track():
        method.step(x, y, lr=0.0)
    assert meter.peak == expected
    bp_model = copy.deepcopy(model)
    bp_meter = ActivationMeter(bp_model.parameters())
    with bp_meter.track():
        F.cross_entropy(bp_model(x), y).backward()
    assert meter.peak < 0.7 * bp_meter.peak  # the largest stage holds 2 of the 4 layers


# AugLocal's depth (aux_depth_list in its resnet.py), computed by hand for max_depth 3:
# t = s * c / (K - 2), depth = max(1, round(3 * (1 - t) + t)), Python's round half to even.
DEPTHS = {
    (8, 0.5): [3, 3, 3, 2, 2, 2, 2],  # 3 - s/6: 3, 2.83, 2.67, 2.5 -> 2, 2.33, 2.17, 2
    (8, 1.0): [3, 3, 2, 2, 2, 1, 1],  # 3 - s/3: 3, 2.67, 2.33, 2, 1.67, 1.33, 1
    (4, 0.5): [3, 2, 2],  # 3, 2.5 -> 2, 2
    (6, 1.0): [3, 2, 2, 2, 1],  # 3, 2.5 -> 2, 2, 1.5 -> 2, 1
}


@pytest.mark.parametrize(("n_stages", "coeff"), list(DEPTHS))
def test_augmented_depth_follows_the_reference_formula(n_stages, coeff):
    depths = [augmented_depth(s, n_stages, 3, coeff) for s in range(n_stages - 1)]
    assert depths == DEPTHS[n_stages, coeff]


# (layer, n_layers, depth) -> picks. end: round(l + (n - 1 - l) / depth * i), i = 1..depth
# (AugLocal's unifSamp rule); spread: evenly spaced from l + 1 to n - 1.
PICKS = {
    "end": {
        (0, 16, 3): [5, 10, 15],
        (0, 16, 1): [15],
        (0, 16, 2): [8, 15],  # 7.5 -> 8, 15
        (3, 16, 3): [7, 11, 15],  # 7.33, 11.67, 15
        (0, 8, 3): [2, 5, 7],  # 2.33, 4.67, 7
        (12, 16, 5): [13, 14, 15],  # depth covers every later layer
    },
    "spread": {
        (0, 16, 3): [1, 8, 15],
        (0, 16, 1): [1],
        (0, 16, 2): [1, 15],
        (3, 16, 3): [4, 10, 15],  # 4 + round(0, 5.5 -> 6, 11)
        (0, 8, 3): [1, 4, 7],
        (12, 16, 5): [13, 14, 15],
    },
}


@pytest.mark.parametrize("rule", list(PICKS))
def test_augmented_picks_match_a_hand_computed_table(rule):
    for (layer, n_layers, depth), want in PICKS[rule].items():
        assert augmented_picks(layer, n_layers, depth, rule) == want, (layer, n_layers, depth)


def test_augmented_aux_nets_follow_depth_and_picks():
    # layers: stage 0 = [0], stage 1 = [1, 2], stage 2 = [3]; stage 1's last layer is 2
    _, method = make_local("augmented", "train.aux.max_depth=2", "train.aux.width=8")
    blocks = [
        sum(1 for m in aux.modules() if type(m).__name__ == "DenseBlock") for aux in method.aux
    ]
    assert blocks == [2, 1]  # stage 0: depth 2 of the three later layers; stage 1: one
    assert all(aux[0].linear.out_features == 8 for aux in method.aux)


def dense_block_ref(block, h):
    """linear -> layernorm -> GELU of a DenseBlock (no dropout), written out."""
    z = F.linear(h, block.linear.weight, block.linear.bias)
    return F.gelu(F.layer_norm(z, z.shape[-1:], block.norm.weight, block.norm.bias))


def test_momentum_aux_holds_a_trainable_copy_and_an_ema_of_the_next_first_layer():
    model, method = make_local("momentum", "train.aux.momentum=0.9", "train.aux.hidden=12")
    aux, nxt = method.aux[0], model.stages[1][0]  # stage 1 has two layers: copy the first
    assert isinstance(aux, MomentumAux)
    shapes = [p.shape for p in nxt.parameters()]
    assert (
        [p.shape for p in aux.lb.parameters()] == shapes == [p.shape for p in aux.ema.parameters()]
    )
    assert all(p.requires_grad for p in aux.lb.parameters())
    assert not any(p.requires_grad for p in aux.ema.parameters())
    in_opt = {id(p) for g in method.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in aux.lb.parameters()} <= in_opt
    assert not {id(p) for p in aux.ema.parameters()} & in_opt
    assert not torch.equal(aux.lb.linear.weight, nxt.linear.weight)  # own draw, as in MAN's code

    h = torch.randn(8, 32)
    head = aux.head
    mixed = dense_block_ref(aux.lb, h) + dense_block_ref(aux.ema, h)
    want = F.linear(
        F.gelu(F.linear(mixed, head[0].weight, head[0].bias)), head[2].weight, head[2].bias
    )
    torch.testing.assert_close(aux(h), want)

    F.cross_entropy(aux(h), torch.arange(8) % 4).backward()
    assert all(p.grad is None for p in model.stages[1].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in aux.lb.parameters())
    for p in [*model.parameters(), *method.aux.parameters()]:
        p.grad = None

    ema_old = [p.clone() for p in aux.ema.parameters()]
    live_old = [p.clone() for p in nxt.parameters()]  # the next layer before this batch's step
    lb_old = [p.clone() for p in aux.lb.parameters()]
    method.step(*batch(), lr=0.05)
    for ema, old, live in zip(aux.ema.parameters(), ema_old, live_old, strict=True):
        torch.testing.assert_close(ema, 0.9 * old + 0.1 * live)
    assert not all(torch.equal(a, b) for a, b in zip(live_old, nxt.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(lb_old, aux.lb.parameters(), strict=True))


@pytest.mark.parametrize("kind", ["linear", "mlp", "augmented", "momentum"])
def test_each_aux_kind_trains_above_chance(kind, tmp_path):
    summary = loop.train(local_config(kind), tmp_path / kind)
    assert summary["method"] == "local"
    assert summary["test_acc"] > 0.6  # 10 classes: chance is 0.1
    row = read_jsonl(tmp_path / kind / "metrics.jsonl")[-1]
    assert {"local.stage0_loss", "local.stage1_loss", "local.stage2_loss"} <= set(row)


def test_local_resume_is_exact(tmp_path):
    cfg = local_config("momentum")
    loop.train(cfg, tmp_path / "full")
    loop.train(cfg, tmp_path / "split", stop_after_epoch=1)
    loop.train(cfg, tmp_path / "split", resume=True)

    def strip(rows):
        return [
            {k: v for k, v in r.items() if k not in ("samples_per_s", "wall_time")} for r in rows
        ]

    full = strip(read_jsonl(tmp_path / "full" / "metrics.jsonl"))
    assert strip(read_jsonl(tmp_path / "split" / "metrics.jsonl")) == full


def test_both_pick_rules_build_the_same_aux_nets_for_four_one_layer_stages():
    # docs/benchmarks.md relies on this: at 4 stages `end, 0.5` and `spread, 1.0` coincide
    stages = "model.stages=[" + ", ".join(["{kind: dense, width: 16}"] * 4) + "]"

    def aux_nets(picks, coeff):
        cfg = load_config(
            None,
            [
                stages,
                "train.method=local",
                f"train.aux.picks={picks}",
                f"train.aux.depth_coeff={coeff}",
            ],
        )
        torch.manual_seed(0)
        model = build_network(cfg.model, in_shape=10, n_classes=4)
        return Local(model, cfg).aux.state_dict()

    a, b = aux_nets("end", 0.5), aux_nets("spread", 1.0)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
