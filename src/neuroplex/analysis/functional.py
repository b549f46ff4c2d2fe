"""Functional connectivity of a trained network: how its units co-activate on a probe set.

Unit-level correlation per stage, ensemble-level correlation, communities (Louvain on |corr|),
their agreement with designed ensembles (NMI, ARI), block contrast (mean |corr| inside vs
between communities and designed ensembles), and dead units.
Shape legend: ``n`` probe samples, ``d`` units, ``g`` ensembles.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import networkx as nx
import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch import nn

from neuroplex.network import Network


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; the model's previous mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def units(features: torch.Tensor) -> torch.Tensor:
    """A stage's output as units: ``[n, d]`` unchanged, a feature map ``[n, c, *positions]``
    averaged over its positions to ``[n, c]`` (a channel is a feature map's unit)."""
    return features.flatten(2).mean(-1) if features.dim() > 2 else features


def stage_activations(model: Network, x: torch.Tensor) -> list[np.ndarray]:
    """Each stage's units on ``x [n, *in_shape]`` as float64 arrays ``[n, d_s]`` (feature maps
    pooled over positions by :func:`units`; eval mode, no gradients; the model's mode is
    restored)."""
    with evaluating(model):
        features = model.forward_stages(x).features
    return [units(f).double().cpu().numpy() for f in features]


def unit_correlation(acts: np.ndarray) -> np.ndarray:
    """Pearson correlation between units, ``[n, d] -> [d, d]``; constant units correlate 0."""
    centered = acts - acts.mean(axis=0)
    norms = np.linalg.norm(centered, axis=0)
    alive = norms > 1e-12
    scaled = np.zeros_like(centered)
    scaled[:, alive] = centered[:, alive] / norms[alive]
    corr = scaled.T @ scaled
    np.fill_diagonal(corr, 1.0)
    return np.clip(corr, -1.0, 1.0)


def ensemble_correlation(corr: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean |corr| between the units of each pair of ensembles, ``[d, d] -> [g, g]`` (the
    diagonal averages distinct unit pairs only)."""
    groups = [np.flatnonzero(labels == g) for g in np.unique(labels)]
    out = np.zeros((len(groups), len(groups)))
    strength = np.abs(corr)
    for i, a in enumerate(groups):
        for j, b in enumerate(groups):
            block = strength[np.ix_(a, b)]
            if i == j:
                n = len(a)
                out[i, j] = (block.sum() - n) / max(n * (n - 1), 1)
            else:
                out[i, j] = block.mean()
    return out


def block_contrast(ensemble_corr: np.ndarray) -> dict[str, float | None]:
    """Mean |corr| inside groups (the diagonal of ``ensemble_corr [g, g]``) and between them
    (off the diagonal; None with a single group): how bright the diagonal blocks of a
    correlation heat map ordered by these groups are against the rest."""
    g = len(ensemble_corr)
    inside = float(np.trace(ensemble_corr) / g)
    outside = (
        float((ensemble_corr.sum() - np.trace(ensemble_corr)) / (g * (g - 1))) if g > 1 else None
    )
    return {"inside": inside, "outside": outside}


def communities(corr: np.ndarray, seed: int = 0) -> tuple[np.ndarray, float]:
    """Louvain communities of the graph weighted by |corr| (no self-loops).

    Returns a label per unit ``[d]`` and the modularity Q of that partition.
    """
    weights = np.abs(corr).copy()
    np.fill_diagonal(weights, 0.0)
    graph = nx.from_numpy_array(weights)
    parts = nx.community.louvain_communities(graph, weight="weight", seed=seed)
    labels = np.zeros(len(weights), dtype=int)
    for k, part in enumerate(sorted(parts, key=min)):
        labels[list(part)] = k
    q = nx.community.modularity(graph, parts, weight="weight")
    return labels, float(q)


def agreement(found: np.ndarray, designed: np.ndarray) -> dict[str, float]:
    """How well found communities match designed ensembles: NMI and ARI (1 = identical)."""
    return {
        "nmi": float(normalized_mutual_info_score(designed, found)),
        "ari": float(adjusted_rand_score(designed, found)),
    }


def dead_units(acts: np.ndarray, tol: float = 1e-6) -> dict[str, float]:
    """Fraction of units that never vary on the probe set (dead) and of units that are
    active (> tol) on every probe sample or on none (saturated on one side)."""
    spread = acts.max(axis=0) - acts.min(axis=0)
    active = acts > tol
    one_sided = active.all(axis=0) | (~active).all(axis=0)
    return {"dead": float((spread < tol).mean()), "one_sided": float(one_sided.mean())}


def stage_report(acts: np.ndarray, designed: np.ndarray | None, seed: int = 0) -> dict[str, Any]:
    """Everything above for one stage; ``designed`` labels each unit with its ensemble."""
    corr = unit_correlation(acts)
    labels, q = communities(corr, seed=seed)
    report: dict[str, Any] = {
        "units": acts.shape[1],
        "communities": int(labels.max() + 1),
        "modularity": q,
        **dead_units(acts),
        "labels": labels,
        "corr": corr,
        "community_contrast": block_contrast(ensemble_correlation(corr, labels)),
    }
    if designed is not None:
        report.update(agreement(labels, designed))
        report["ensemble_corr"] = ensemble_correlation(corr, designed)
        report["design_contrast"] = block_contrast(report["ensemble_corr"])
    return report
