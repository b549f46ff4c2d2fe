"""Plasticity on a sparse_conv stage (channel ensembles): block_rigl, block_set and hebbian
against rules recomputed here from the layer's dense weight, gradient and activations;
optimizer state carried; exact resume; the plasticity log and report."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neuroplex.analysis.run import analyze_run
from neuroplex.config import load_config
from neuroplex.errors import ConfigError
from neuroplex.files import read_jsonl
from neuroplex.plasticity.rewiring import sparse_layers
from neuroplex.plasticity.schedule import LOG
from neuroplex.report.html import render
from neuroplex.train import loop
from neuroplex.train.checkpoint import load_checkpoint
from neuroplex.train.setup import build_setup

NAME = "stages.1.0.conv"  # the sparse conv: 8 -> 8 channels, 4 ensembles of 2, m 0
TIMING = {"samples_per_s", "wall_time"}


def conv_config(kind: str, *extra: str):
    return load_config(
        None,
        [
            "name=tinyconv",
            "data.name=digits",
            "data.shape=image",
            "model.stages=[{kind: conv, channels: 8}, {kind: sparse_conv, channels: 8, "
            "ensembles: 4, m: 0, pool: max}, {kind: pool}]",
            "train.epochs=2",
            "train.batch_size=64",
            "train.lr=0.01",
            "train.grad_clip=null",
            f"train.plasticity={{kind: {kind}, every: 5, fraction: 0.5}}",
            *extra,
        ],
    )


def train_steps(s, first: int, last: int, run_dir) -> list[dict]:
    events = []
    for step in range(first, last + 1):
        idx = torch.arange(64) + 64 * step
        s.method.step(s.data.train.inputs(idx), s.data.train.y[idx], 0.01)
        events += s.plasticity.after_step(step, run_dir)
    return events


def block_scores(dense: np.ndarray) -> np.ndarray:
    """RMS over each (output ensemble, input ensemble) block of 2 x 2 channels and its taps:
    ``[c_out, c_in, 3, 3] -> [4, 4]``."""
    return np.sqrt((dense**2).reshape(4, 2, 4, 2, -1).mean(axis=(1, 3, 4)))


def pairs(layer) -> set[tuple[int, int]]:
    return set(layer.wiring.block_pairs)


def expected_swap(connected, prune, grow, n, regrow):
    """The rule: drop the n weakest connected pairs (prune score), each replaced in its own
    output ensemble by the best free pair (grow score); free includes the dropped with
    ``regrow``. Pairs are (input ensemble, output ensemble)."""
    order = sorted(connected, key=lambda p: prune[p[1], p[0]])[:n]
    free = {(i, j) for i in range(4) for j in range(4)} - connected
    if regrow:
        free |= set(order)
    new = set(connected) - set(order)
    for _, j in order:
        best = max((p for p in free if p[1] == j), key=lambda p: grow[p[1], p[0]])
        free.discard(best)
        new.add(best)
    return new


def zeta_at(s, step: int) -> float:
    return 0.5 * 0.5 * (1 + math.cos(math.pi * step / s.plasticity.end_step))


def test_block_rigl_on_channel_ensembles_matches_the_rule_and_carries_adam_state(tmp_path):
    s = build_setup(conv_config("block_rigl"))
    layer = sparse_layers(s.model)[NAME]
    assert layer.path == "grouped"
    train_steps(s, 1, 4, tmp_path)
    seen = {}

    def keep(module, args, out) -> None:  # the layer's input and output gradient
        seen["x"] = args[0].detach()
        out.register_hook(lambda g: seen.update(g=g.detach()))

    hook = layer.register_forward_hook(keep)
    idx = torch.arange(64) + 64 * 5
    s.method.step(s.data.train.inputs(idx), s.data.train.y[idx], 0.01)
    hook.remove()
    dense = layer.dense_weight().detach().clone()
    leaf = dense.clone().requires_grad_()  # every channel pair, connected or not
    out = F.conv2d(seen["x"], leaf, padding=1)
    (grad,) = torch.autograd.grad((out * seen["g"]).sum(), leaf)
    state = s.plasticity.owners[NAME].state[layer.weight]
    moments = {k: layer.to_dense(state[k]).clone() for k in ("exp_avg", "exp_avg_sq")}
    before = pairs(layer)
    n = math.ceil(zeta_at(s, 5) * len(before))
    want = expected_swap(before, block_scores(dense.numpy()), block_scores(grad.numpy()), n, True)

    (event,) = s.plasticity.after_step(5, tmp_path)
    assert pairs(layer) == want != before
    assert layer.path == "gathered"  # ensembles now read another ensemble than their own
    mask = torch.as_tensor(layer.wiring.to_mask())[:, :, None, None].expand_as(dense)
    kept = torch.as_tensor(
        np.array([[(i // 2, o // 2) in want & before for i in range(8)] for o in range(8)])
    )[:, :, None, None].expand_as(dense)
    assert torch.equal(layer.dense_weight()[kept], dense[kept])
    assert (layer.dense_weight()[mask & ~kept] == 0).all()  # grown at zero
    for key, full in moments.items():
        new = layer.to_dense(s.plasticity.owners[NAME].state[layer.weight][key])
        assert torch.equal(new[kept], full[kept]) and (new[mask & ~kept] == 0).all()
    assert event["pruned"] == event["grown"] == 4 * len(want - before)  # channel pairs
    assert event["path"] == "gathered" and event["density_after"] == 0.25
    assert read_jsonl(tmp_path / LOG) == [event]
    train_steps(s, 6, 6, tmp_path)  # trains on after rewiring
    assert torch.isfinite(s.model(s.data.test.inputs(slice(0, 8)))).all()


def test_block_set_drops_the_lowest_block_rms_within_output_ensembles(tmp_path):
    s = build_setup(conv_config("block_set"))
    layer = sparse_layers(s.model)[NAME]
    train_steps(s, 1, 4, tmp_path)
    dense = layer.dense_weight().detach().numpy()
    before = pairs(layer)
    n = math.ceil(zeta_at(s, 5) * len(before))
    weakest = sorted(before, key=lambda p: block_scores(dense)[p[1], p[0]])[:n]
    (event,) = s.plasticity.after_step(5, tmp_path)
    dropped = [tuple(p) for p in event["pruned_pairs"]]
    put_back = [p for p in weakest if p in pairs(layer)]
    assert sorted(dropped + put_back) == sorted(weakest)  # a swap may regrow a dropped pair
    fan_in = [sum(1 for _, j in pairs(layer) if j == out) for out in range(4)]
    assert fan_in == [1, 1, 1, 1] and layer.wiring.density == 0.25


def test_hebbian_swaps_by_spatially_pooled_channel_coactivation(tmp_path):
    s = build_setup(conv_config("hebbian"))
    layer = sparse_layers(s.model)[NAME]
    train_steps(s, 1, 4, tmp_path)
    x, y = s.plasticity._probe(5)[NAME]
    block = s.model.stages[1][0]
    s.model.eval()
    with torch.no_grad():  # post-synaptic: the block's activation (after its norm)
        torch.testing.assert_close(y, F.relu(block.norm(layer(x))))
    xp, yp = x.flatten(2).mean(2).double().numpy(), y.flatten(2).mean(2).double().numpy()
    corr = np.corrcoef(np.concatenate([yp, xp], 1).T)[:8, 8:]  # [out channel, in channel]
    coact = np.abs(np.nan_to_num(corr)).reshape(4, 2, 4, 2).mean(axis=(1, 3))
    before = pairs(layer)
    n = math.ceil(zeta_at(s, 5) * len(before))
    want = expected_swap(before, coact, coact, n, regrow=False)
    s.plasticity.after_step(5, tmp_path)
    assert pairs(layer) == want


def test_rewired_conv_run_resumes_exactly_and_reports(tmp_path):
    cfg = conv_config("block_rigl")
    loop.train(cfg, tmp_path / "full")
    loop.train(cfg, tmp_path / "split", stop_after_epoch=1)
    loop.train(cfg, tmp_path / "split", resume=True)
    for name in ("metrics.jsonl", LOG):
        strip = [
            [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(run / name)]
            for run in (tmp_path / "split", tmp_path / "full")
        ]
        assert strip[0] == strip[1]
    full, split = (load_checkpoint(tmp_path / r, "last") for r in ("full", "split"))
    assert split.state["wirings"] == full.state["wirings"]
    assert NAME in full.state["wirings"]
    for key, value in full.tensors.items():
        assert torch.equal(split.tensors[key], value), key
    analysis = analyze_run(tmp_path / "full", probe=64, which="last")
    (entry,) = analysis["plasticity"]["layers"]
    assert entry["layer"] == NAME and entry["swapped"] > 0
    assert NAME in " ".join(row["text"] for row in analysis["sparse_layers"])
    page = render(tmp_path / "full")
    assert "Plasticity" in page and "Wiring" in page


@pytest.mark.parametrize("kind", ["set", "rigl"])
def test_unit_level_kinds_on_a_sparse_conv_stage_are_a_config_error(kind):
    with pytest.raises(ConfigError, match="sparse_conv stage, which rewires channel ensembles"):
        conv_config(kind)
