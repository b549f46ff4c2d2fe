import numpy as np
import torch

from neuroplex.analysis.functional import (
    agreement,
    communities,
    dead_units,
    ensemble_correlation,
    stage_activations,
    stage_report,
    unit_correlation,
)
from neuroplex.config import load_config
from neuroplex.network import build_network


def planted_blocks(n: int = 400, groups: int = 4, size: int = 8, noise: float = 0.3, seed: int = 0):
    """Activations where each block of units follows its own latent signal."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, groups))
    acts = np.repeat(latent, size, axis=1) + noise * rng.standard_normal((n, groups * size))
    return acts, np.repeat(np.arange(groups), size)


def test_functional_connectivity_recovers_planted_blocks():
    acts, designed = planted_blocks()
    report = stage_report(acts, designed)
    assert report["communities"] == 4
    assert report["nmi"] > 0.99 and report["ari"] > 0.99
    assert report["modularity"] > 0.5
    ens = report["ensemble_corr"]
    assert np.all(np.diag(ens) > 0.8) and np.all(ens[~np.eye(4, dtype=bool)] < 0.2)


def test_unstructured_activations_give_no_agreement_with_a_fake_design():
    rng = np.random.default_rng(1)
    acts = rng.standard_normal((400, 32))
    designed = np.repeat(np.arange(4), 8)
    labels, _ = communities(unit_correlation(acts))
    assert agreement(labels, designed)["nmi"] < 0.5


def test_unit_correlation_is_pearson_and_constant_units_are_zero():
    rng = np.random.default_rng(2)
    acts = rng.standard_normal((50, 3))
    acts[:, 2] = 5.0
    corr = unit_correlation(acts)
    assert np.isclose(corr[0, 1], np.corrcoef(acts[:, 0], acts[:, 1])[0, 1])
    assert corr[0, 2] == 0.0 and corr[2, 2] == 1.0


def test_ensemble_correlation_diagonal_excludes_self_pairs():
    corr = np.array([[1.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.0]])
    ens = ensemble_correlation(corr, np.array([0, 0, 1]))
    assert ens[0, 0] == 0.5 and ens[1, 1] == 0.0
    assert np.isclose(ens[0, 1], 0.1)


def test_dead_units():
    acts = np.array([[0.0, 1.0, -1.0], [0.0, 2.0, 3.0]])
    out = dead_units(acts)
    assert np.isclose(out["dead"], 1 / 3)
    assert np.isclose(out["one_sided"], 2 / 3)  # unit 0 never active, unit 1 always active


def test_stage_activations_do_not_change_the_model():
    cfg = load_config(None, ["model.stages=[{kind: dense, width: 8, dropout: 0.5}]"])
    model = build_network(cfg.model, 5, 3)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    acts = stage_activations(model, torch.randn(20, 5))
    again = stage_activations(model, torch.randn(20, 5).zero_() + 1)
    assert model.training and acts[0].shape == (20, 8) and again[0].dtype == np.float64
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_block_contrast_is_mean_abs_corr_inside_vs_between_designed_ensembles():
    acts, designed = planted_blocks(groups=3, size=4)
    report = stage_report(acts, designed)
    corr = np.abs(np.corrcoef(acts.T))
    inside, between = [], []
    for g in range(3):
        units = np.flatnonzero(designed == g)
        inside.append(np.mean([corr[i, j] for i in units for j in units if i != j]))
        for h in range(3):
            if h != g:
                between.append(corr[np.ix_(units, np.flatnonzero(designed == h))].mean())
    contrast = report["design_contrast"]
    assert np.isclose(contrast["inside"], np.mean(inside))
    assert np.isclose(contrast["outside"], np.mean(between))
    assert contrast["inside"] > 0.8 > 0.2 > contrast["outside"]
    assert report["community_contrast"]["inside"] > 0.8  # communities = the planted blocks
    assert "design_contrast" not in stage_report(acts, None)


def test_feature_maps_are_pooled_to_channels_and_planted_channel_communities_found():
    from neuroplex.analysis.functional import units

    # Input: 4 groups of 4 channels; a group's channels share one latent image (+ noise).
    # A sparse_conv stage with m = 0 (grouped) keeps the groups apart, so its channel
    # communities are its designed ensembles.
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(300, 4, 1, 6, 6, generator=gen)
    x = (latent + 0.3 * torch.randn(300, 4, 4, 6, 6, generator=gen)).reshape(300, 16, 6, 6)
    stages = "[{kind: sparse_conv, channels: 16, ensembles: 4, m: 0, norm: none}, {kind: pool}]"
    torch.manual_seed(0)
    net = build_network(load_config(None, [f"model.stages={stages}"]).model, (16, 6, 6), 3)
    with torch.no_grad():
        for block in net.stages[0]:
            block.conv.weight.abs_()  # positive filters: a channel follows its group's latent
            block.conv.bias.zero_()
    acts = stage_activations(net, x)
    with torch.no_grad():
        features = net.forward_stages(x).features[0]  # [300, 16, 6, 6]
    assert np.allclose(acts[0], features.mean(dim=(2, 3)).double().numpy(), atol=1e-6)
    assert units(torch.ones(2, 5)).shape == (2, 5)  # vectors are units already
    report = stage_report(acts[0], net.stages[0].ensemble_labels)
    assert report["units"] == 16 and report["nmi"] == 1.0
