import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

from neuroplex import wiring
from neuroplex.analysis.functional import ensemble_correlation, unit_correlation
from neuroplex.analysis.run import analyze_run
from neuroplex.analysis.structure import (
    block_sums,
    path_mass,
    shared_input,
    stage_structure,
    structure_function,
    structure_report,
)
from neuroplex.config import load_config
from neuroplex.layers.stages import SparseStage
from neuroplex.train import train

G, S = 8, 6  # ensembles, units per ensemble


def linear_stage(seed: int, layers: int = 1) -> SparseStage:
    """A sparse stage of ``layers`` modular layers, no norm, identity activation. Each output
    ensemble reads its own input ensemble and 3 - layers random others, so that two layers
    still leave pairs of ensembles with little shared input."""
    torch.manual_seed(seed)
    m = 3 - layers
    wirings = [wiring.modular(G * S, G * S, G, m, "random", seed=seed + t) for t in range(layers)]
    return SparseStage(wirings, norm_layer=None, act_layer=nn.Identity)


def functional_graph(stage: SparseStage, seed: int) -> np.ndarray:
    """Ensemble correlation of the stage's output when each input ensemble carries its own
    independent signal."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((2000, G))
    x = np.repeat(latent, S, axis=1) + 0.3 * rng.standard_normal((2000, G * S))
    with torch.no_grad():
        acts = stage(torch.tensor(x, dtype=torch.float32)).double().numpy()
    return ensemble_correlation(unit_correlation(acts), stage.ensemble_labels)


def test_path_mass_sums_every_path_product_of_absolute_weights():
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((3, 2)), rng.standard_normal((2, 3))
    brute = np.zeros((2, 2))
    for out, mid, inp in itertools.product(range(2), range(3), range(2)):
        brute[out, inp] += abs(w2[out, mid]) * abs(w1[mid, inp])
    assert np.allclose(path_mass([w1, w2]), brute)


def test_block_sums_and_shared_input():
    matrix = np.arange(12.0).reshape(3, 4)
    assert block_sums(matrix, (1, 2), (3, 1)).tolist() == [[3, 3], [42, 18]]
    sim = shared_input(np.array([[1.0, 0, 0], [1, 1, 0], [0, 0, 2], [0, 0, 0]]))
    assert sim[0, 0] == pytest.approx(1) and sim[0, 1] == pytest.approx(2**-0.5)
    assert sim[0, 2] == 0 and sim[3, 3] == 0  # no shared input; a unit with none


def test_rank_correlation_follows_planted_graph_and_not_a_shuffled_one():
    rng = np.random.default_rng(0)
    structural = shared_input(rng.random((G, G)) ** 4)
    functional = structural + 0.01 * rng.standard_normal((G, G))
    assert structure_function(structural, functional)["rho"] > 0.9
    rhos = [
        structure_function(structural, functional[np.ix_(p, p)])["rho"]
        for p in (rng.permutation(G) for _ in range(50))
    ]
    assert abs(np.mean(rhos)) < 0.15
    assert structure_function(np.ones((G, G)), functional)["rho"] is None  # nothing to rank
    assert structure_function(np.eye(2), np.eye(2)) == {"rho": None, "p": None, "pairs": 1}


@pytest.mark.parametrize("layers", [1, 2])
def test_function_of_a_sparse_stage_follows_its_wiring_and_not_another(layers):
    stage = linear_stage(seed=0, layers=layers)
    functional = functional_graph(stage, seed=0)
    report = structure_report(stage, functional)
    assert report["from_weights"]["rho"] > 0.6 and report["from_wiring"]["rho"] > 0.6
    assert report["from_weights"]["pairs"] == G * (G - 1) // 2
    other = structure_report(linear_stage(seed=100, layers=layers), functional)
    assert abs(other["from_weights"]["rho"]) < 0.4 and abs(other["from_wiring"]["rho"]) < 0.4


def test_stage_structure_reports_link_fraction_and_mass_per_layer():
    stage = linear_stage(seed=3, layers=2)
    graphs = stage_structure(stage)
    for layer, w in zip(graphs["layers"], (b.linear.wiring for b in stage), strict=True):
        expected = np.zeros((G, G))
        for i, j in w.block_pairs:
            expected[j, i] = 1.0
        assert np.array_equal(layer["links"], expected)
        assert np.all((layer["mass"] > 0) == (expected > 0))
    assert np.allclose(np.diag(graphs["wiring"]), 1.0)
    summary = structure_report(stage, np.eye(G))["layer_links"]
    for row, w in zip(summary, (b.linear.wiring for b in stage), strict=True):
        own = sum(1 for i, j in w.block_pairs if i == j)
        assert row["pairs"] == G * G and row["linked_pairs"] == len(w.block_pairs) == G * 2
        assert row["links"] == len(w.block_pairs) * S * S
        assert row["cross_links"] == (len(w.block_pairs) - own) * S * S == G * S * S


def test_analyze_a_sparse_modular_run_saves_structure_vs_function(tmp_path):
    cfg = load_config(
        None,
        [
            "data.name=digits",
            "model.stages=[{kind: sparse, width: 32, ensembles: 4, m: 1, pattern: random},"
            " {kind: dense, width: 16}]",
            "train.epochs=1",
            "train.batch_size=64",
        ],
    )
    train(cfg, tmp_path / "run")
    result = analyze_run(tmp_path / "run", probe=200)
    sparse, dense = result["stages"]
    assert "structure" not in dense
    assert sparse["structure"]["from_weights"]["pairs"] == 6
    rho = sparse["structure"]["from_weights"]["rho"]
    assert rho is None or -1 <= rho <= 1
    saved = json.loads((tmp_path / "run" / "analysis.json").read_text())["stages"][0]
    assert saved["structure"] == sparse["structure"]
    arrays = np.load(tmp_path / "run" / "analysis.npz")
    assert arrays["stage0.structure"].shape == (4, 4)
    assert arrays["stage0.pairs_structure"].shape == arrays["stage0.pairs_function"].shape == (6,)
    assert arrays["stage0.layer0.links"].shape == (4, 4)  # 64 digit pixels in 4 ensembles
