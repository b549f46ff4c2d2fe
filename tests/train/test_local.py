import copy

import pytest
import torch
import torch.nn.functional as F

from neuroplex.config import load_config
from neuroplex.files import read_jsonl
from neuroplex.network import build_network
from neuroplex.train import loop
from neuroplex.train.local import Local, MomentumAux, augmented_depth
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


def test_augmented_depth_decays_linearly_and_aux_nets_follow_it():
    depths = [augmented_depth(s, 6, 3) for s in range(5)]
    assert depths[0] == 3 and depths[-1] == 1
    assert depths == sorted(depths, reverse=True)
    _, method = make_local("augmented", "train.aux.max_depth=2", "train.aux.width=8")
    blocks = [
        sum(1 for m in aux.modules() if type(m).__name__ == "DenseBlock") for aux in method.aux
    ]
    assert blocks == [2, 1]  # stage 0: two of the three later layers; stage 1: one
    assert all(aux[0].linear.out_features == 8 for aux in method.aux)


def test_momentum_aux_is_an_ema_of_the_next_stage():
    model, method = make_local("momentum", "train.aux.momentum=0.9")
    aux = method.aux[0]
    assert isinstance(aux, MomentumAux)
    before = [p.clone() for p in aux.ema.parameters()]
    method.step(*batch(), lr=0.05)
    for ema, old, live in zip(
        aux.ema.parameters(), before, model.stages[1].parameters(), strict=True
    ):
        assert not ema.requires_grad
        torch.testing.assert_close(ema, 0.9 * old + 0.1 * live)


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
