import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from neuroplex.analysis.run import analyze_run
from neuroplex.config import BLOCK_KINDS, load_config
from neuroplex.errors import ConfigError
from neuroplex.files import read_jsonl
from neuroplex.layers.sparse_plan import choose_path
from neuroplex.network import build_network
from neuroplex.plasticity.rewiring import sparse_layers, wiring_state
from neuroplex.plasticity.schedule import LOG
from neuroplex.train import loop
from neuroplex.train.checkpoint import load_checkpoint
from neuroplex.train.runs import evaluate_run
from neuroplex.train.setup import build_setup

KINDS = ["set", "rigl", "hebbian", "block_set", "block_rigl"]
TIMING = {"samples_per_s", "wall_time"}


def sparse_config(kind: str, *extra: str):
    """Two 4-ensemble ring-wired sparse stages (density 0.5) on digits, rewired every 5 steps."""
    return load_config(
        None,
        [
            "name=tiny",
            "data.name=digits",
            "model.stages=[{kind: sparse, width: 32, ensembles: 4, m: 1, dropout: 0.1}, "
            "{kind: sparse, width: 16, ensembles: 4, m: 1}]",
            "train.epochs=3",
            "train.batch_size=64",
            "train.lr=0.01",
            f"train.plasticity={{kind: {kind}, every: 5, fraction: 0.3}}",
            *extra,
        ],
    )


def run_steps(s, steps: int, run_dir, first: int = 1) -> list[dict]:
    events = []
    for step in range(first, first + steps):
        idx = torch.arange(64) + 64 * step
        s.method.step(s.data.train.x[idx], s.data.train.y[idx], 0.01)
        events += s.plasticity.after_step(step, run_dir)
    return events


@pytest.mark.parametrize("method", ["backprop", "local"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_keeps_density_stays_in_the_layer_and_logs(kind, method, tmp_path):
    s = build_setup(sparse_config(kind, f"train.method={method}", "train.aux.kind=linear"))
    layers = sparse_layers(s.model)
    initial = {name: layer.wiring for name, layer in layers.items()}
    events = run_steps(s, 5, tmp_path)
    # an event may put a dropped connection straight back (RigL), so a small layer can keep
    # its wiring; hebbian always replaces what it drops
    changed = [layer.wiring != initial[name] for name, layer in layers.items()]
    assert all(changed) if kind == "hebbian" else any(changed)
    events += run_steps(s, 5, tmp_path, first=6)
    assert [(e["step"], e["layer"]) for e in events] == [(t, n) for t in (5, 10) for n in layers]
    assert read_jsonl(tmp_path / LOG) == events
    for event in events:
        assert event["kind"] == kind and event["pruned"] == event["grown"]
        assert event["pruned"] + event["regrown"] > 0
        assert event["density_before"] == event["density_after"] == 0.5
        assert ("pruned_pairs" in event) == (kind in BLOCK_KINDS)
    for name, layer in layers.items():
        wiring, mask = layer.wiring, torch.as_tensor(layer.wiring.to_mask())
        assert wiring.density == initial[name].density
        dense = layer.dense_weight().detach()
        assert dense.shape == (layer.out_features, layer.in_features)
        assert (dense[~mask] == 0).all()  # nothing outside the wiring, nothing outside the layer
        if kind in BLOCK_KINDS:
            assert wiring.is_block and layer.path == choose_path(wiring)
        else:
            assert not wiring.is_block and layer.path == "masked-dense"
    assert torch.isfinite(s.model(s.data.test.x)).all()


@pytest.mark.parametrize("kind", ["rigl", "block_rigl"])
@pytest.mark.parametrize("method", ["backprop", "local"])
def test_rigl_grows_at_the_largest_dense_gradient_with_zero_weight_and_moments(
    kind, method, tmp_path
):
    s = build_setup(sparse_config(kind, f"train.method={method}", "train.grad_clip=null"))
    layers = sparse_layers(s.model)
    run_steps(s, 4, tmp_path)
    idx = torch.arange(64)
    s.method.step(s.data.train.x[idx], s.data.train.y[idx], 0.01)
    before = {}
    for name, layer in layers.items():
        mask = torch.as_tensor(layer.wiring.to_mask())
        grad = s.plasticity.capture.dense_grad(name, layer)
        # on connections, the captured dense gradient is autograd's weight gradient
        torch.testing.assert_close(grad * mask, layer.to_dense(layer.weight.grad))
        before[name] = (mask, grad.abs())
    assert s.plasticity.after_step(5, tmp_path)
    for name, layer in layers.items():
        old, score = before[name]
        new = torch.as_tensor(layer.wiring.to_mask())
        grown, missed = new & ~old, ~new & ~old
        assert grown.any() and (layer.dense_weight()[grown] == 0).all()
        assert score[grown].min() >= score[missed].max() or kind == "block_rigl"
        state = s.plasticity.owners[name].state[layer.weight]
        for key in ("exp_avg", "exp_avg_sq"):
            assert (layer.to_dense(state[key])[grown] == 0).all()
            assert layer.to_dense(state[key])[new & old].abs().sum() > 0
    s.method.step(s.data.train.x[idx], s.data.train.y[idx], 0.01)  # trains on after rewiring


def test_fraction_is_cosine_annealed_to_zero_at_end_step(tmp_path):
    extra = ("train.plasticity.end_step=10", "train.plasticity.prune_rule=magnitude")
    s = build_setup(sparse_config("set", *extra))
    p = s.plasticity
    assert p.fraction_at(0) == 0.3 and p.fraction_at(5) == pytest.approx(0.15)
    assert p.fraction_at(10) == 0.0 and p.after_step(10, tmp_path) == []
    events = run_steps(s, 5, tmp_path)
    dropped = [e["pruned"] + e["regrown"] for e in events]
    assert dropped == [math.ceil(0.15 * 1024), math.ceil(0.15 * 256)]


def test_set_drops_zeta_of_the_positive_and_of_the_negative_weights(tmp_path):
    s = build_setup(sparse_config("set", "train.plasticity.end_step=10"))
    layers = s.plasticity.layers
    run_steps(s, 4, tmp_path)
    before = {n: (m.dense_weight().detach().clone(), m.wiring.to_mask()) for n, m in layers.items()}
    events = s.plasticity.after_step(5, tmp_path)
    for event, (name, layer) in zip(events, layers.items(), strict=True):
        weight, mask = before[name]
        w = weight[torch.as_tensor(mask)]
        pos, neg = w[w > 0].sort().values, w[w < 0].sort(descending=True).values
        n_pos, n_neg = math.ceil(0.15 * len(pos)), math.ceil(0.15 * len(neg))
        assert event["pruned"] + event["regrown"] == n_pos + n_neg  # no weight is exactly 0
        removed = weight[torch.as_tensor(mask & ~layer.wiring.to_mask())]
        assert len(removed) == event["pruned"] > 0
        # every removed weight is among its sign's closest to zero
        assert (((removed > 0) & (removed <= pos[n_pos - 1])) | (removed >= neg[n_neg - 1])).all()


def final_state(run_dir):
    ckpt = load_checkpoint(run_dir, "last")
    return ckpt.tensors, ckpt.state["wirings"]


@pytest.mark.parametrize(
    ("kind", "method"), [("set", "backprop"), ("hebbian", "backprop"), ("block_rigl", "local")]
)
def test_resume_in_the_middle_of_rewiring_is_bit_identical(kind, method, tmp_path, kill_at):
    cfg = sparse_config(kind, f"train.method={method}", "train.aux.kind=mlp")
    loop.train(cfg, tmp_path / "full")
    loop.train(cfg, tmp_path / "split", stop_after_epoch=1)
    stopped_wirings = load_checkpoint(tmp_path / "split").state["wirings"]
    assert stopped_wirings != wiring_state(
        build_setup(cfg).model
    )  # the checkpoint holds a rewired structure
    with pytest.raises(KeyboardInterrupt):  # killed in epoch 2, after a few more events
        loop.train(cfg, tmp_path / "split", resume=True, progress=kill_at(21 + 12))
    assert read_jsonl(tmp_path / "split" / LOG)[-1]["step"] == 30
    loop.train(cfg, tmp_path / "split", resume=True)
    for name in ("metrics.jsonl", LOG):
        full, split = read_jsonl(tmp_path / "full" / name), read_jsonl(tmp_path / "split" / name)
        strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
        assert strip(split) == strip(full)
    (tensors, wirings), (ref_tensors, ref_wirings) = map(
        final_state, (tmp_path / "split", tmp_path / "full")
    )
    assert wirings == ref_wirings and tensors.keys() == ref_tensors.keys()
    for key, value in ref_tensors.items():
        assert torch.equal(tensors[key], value), key


def test_a_rewired_run_loads_for_evaluation_and_analysis(tmp_path):
    summary = loop.train(sparse_config("set"), tmp_path / "run")
    result = evaluate_run(tmp_path / "run", which="last")  # the structure came from rewiring
    assert result["acc"] == pytest.approx(summary["test_acc"])
    analysis = analyze_run(tmp_path / "run", probe=64)
    assert len(analysis["stages"]) == 2


def test_the_modular_config_is_75_percent_sparse_at_the_dense_width():
    cfg = load_config(Path(__file__).parents[2] / "configs" / "mnist1d_modular.yaml")
    dense = load_config(Path(__file__).parents[2] / "configs" / "mnist1d_mlp.yaml")
    model = build_network(cfg.model, 40, 10)
    layers = sparse_layers(model)
    assert len(layers) == len(dense.model.stages) == 4
    assert [m.out_features for m in layers.values()] == [s.width for s in dense.model.stages]
    assert all(m.wiring.density == 0.25 for m in layers.values())
    assert cfg.train.plasticity.kind == "hebbian" and cfg.train.steps == dense.train.steps


def test_hebbian_correlates_input_activations_with_output_activations(tmp_path):
    for output in ("activation", "linear"):
        s = build_setup(sparse_config("hebbian", f"train.plasticity.hebbian_output={output}"))
        acts = s.plasticity._probe(5)
        blocks = [s.model.stages[0][0], s.model.stages[1][0]]
        s.model.eval()  # no dropout, as in the probe
        with torch.no_grad():
            for block, name in zip(blocks, ("stages.0.0.linear", "stages.1.0.linear"), strict=True):
                x, y = acts[name]
                z = block.linear(x)
                want = F.gelu(F.layer_norm(z, z.shape[-1:], block.norm.weight, block.norm.bias))
                torch.testing.assert_close(y, want if output == "activation" else z)
            # the second layer's input is the first block's activation
            x0, _ = acts["stages.0.0.linear"]
            torch.testing.assert_close(acts["stages.1.0.linear"][0], blocks[0](x0))


def planted_probe(layers, p: int = 200) -> dict:
    """Probe activations where output ensemble ``j`` copies the mean of the first input ensemble
    it is not wired to (``targets[name][j]``); returns (activations, targets)."""
    gen = torch.Generator().manual_seed(0)
    acts, targets = {}, {}
    for name, layer in layers.items():
        w = layer.wiring
        wired = {(i, j) for i, j in w.block_pairs}
        targets[name] = [
            next(i for i in range(len(w.in_sizes)) if (i, j) not in wired)
            for j in range(len(w.out_sizes))
        ]
        x = torch.randn(p, w.n_in, generator=gen)
        y = 0.1 * torch.randn(p, w.n_out, generator=gen)
        for j, i in enumerate(targets[name]):
            lo, hi = w.in_offsets[i], w.in_offsets[i + 1]
            y[:, w.out_offsets[j] : w.out_offsets[j + 1]] += x[:, lo:hi].mean(1, keepdim=True)
        acts[name] = (x, y)
    return acts, targets


def test_hebbian_keeps_equal_fan_in_and_the_block_gather_path(tmp_path, monkeypatch):
    stage = "{kind: sparse, width: 32, ensembles: 8, m: 1, pattern: random}"
    s = build_setup(sparse_config("hebbian", f"model.stages=[{stage}, {stage}]"))
    layers = s.plasticity.layers
    assert {layer.path for layer in layers.values()} == {"block-gather"}
    before = {name: layer.wiring for name, layer in layers.items()}
    acts, targets = planted_probe(layers)
    monkeypatch.setattr(s.plasticity, "_probe", lambda step: acts)
    events = s.plasticity.after_step(5, tmp_path)
    for event, (name, layer) in zip(events, layers.items(), strict=True):
        fan_in = lambda w: sorted(j for _, j in w.block_pairs)  # noqa: E731
        assert fan_in(layer.wiring) == fan_in(before[name]) == sorted(list(range(8)) * 2)
        assert layer.path == event["path"] == "block-gather"
        rows = {j for _, j in event["pruned_pairs"]}
        assert rows and all((targets[name][j], j) in layer.wiring.block_pairs for j in rows)


def test_prune_rule_is_only_for_set_and_rigl():
    with pytest.raises(ConfigError, match="prune_rule = 'magnitude': applies to kind set or rigl"):
        sparse_config("hebbian", "train.plasticity.prune_rule=magnitude")


def test_set_rewires_modular_stages_with_inter_links_and_keeps_their_ensembles(tmp_path):
    stage = "{kind: sparse, width: 32, ensembles: 4, m: 0, p_inter: 0.2}"
    cfg = sparse_config("set", f"model.stages=[{stage}, {stage}]")
    s = build_setup(cfg)
    layers = sparse_layers(s.model)
    initial = {name: layer.wiring for name, layer in layers.items()}
    run_steps(s, 5, tmp_path)
    for name, layer in layers.items():
        before, after = initial[name], layer.wiring
        assert after != before and after.to_mask().sum() == before.to_mask().sum()
        assert (after.in_sizes, after.out_sizes) == (before.in_sizes, before.out_sizes)
        assert layer.path == "masked-dense"
