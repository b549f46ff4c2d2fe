"""Structural connectivity of sparse stages, and how well function follows it.

The structural ensemble graph of a sparse stage links two output ensembles by how much input
they share: the cosine similarity of their rows in the ensemble-level path mass ``P [g, g_in]``,
where ``P`` sums ``|W_L| ... |W_1|`` (every path's product of absolute weights through the
stage's layers) over the units of each (output ensemble, input ensemble) pair. With every
weight set to 1 on the wiring's links this is the same graph from the wiring alone. Shared
drive is what makes two ensembles co-activate, so if function follows structure, ensemble pairs
ranked by structural similarity rank the same by functional correlation (Spearman rho).
A sparse_conv stage is read the same way over channels: a channel pair's weight is the sum of
|w| over its kernel taps (the drive one input channel gives one output channel), so the path
mass runs over channels as it runs over units.
Shape legend: ``n`` units (``n_in`` in, ``n_out`` out; channels of a conv), ``g`` output
ensembles, ``g_in`` input ensembles.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import spearmanr

from neuroplex.layers.conv import ConvStage
from neuroplex.layers.sparse import SparseLinear
from neuroplex.layers.sparse_conv import SparseConv
from neuroplex.layers.stages import SparseStage
from neuroplex.wiring import Wiring


def block_sums(matrix: np.ndarray, out_sizes, in_sizes) -> np.ndarray:
    """Sum of ``matrix [n_out, n_in]`` over each (output ensemble, input ensemble) block,
    ``-> [len(out_sizes), len(in_sizes)]``."""
    rows = np.concatenate([[0], np.cumsum(out_sizes)[:-1]])
    cols = np.concatenate([[0], np.cumsum(in_sizes)[:-1]])
    return np.add.reduceat(np.add.reduceat(matrix, rows, axis=0), cols, axis=1)


def path_mass(layers: list[np.ndarray]) -> np.ndarray:
    """``|W_L| @ ... @ |W_1|`` of weights ``[n_l, n_{l-1}]`` in forward order, ``-> [n_L, n_0]``."""
    mass = np.abs(layers[0])
    for w in layers[1:]:
        mass = np.abs(w) @ mass
    return mass


def shared_input(mass: np.ndarray) -> np.ndarray:
    """Cosine similarity between the rows of an ensemble path mass ``[g, g_in] -> [g, g]``."""
    norms = np.linalg.norm(mass, axis=1, keepdims=True)
    unit = np.divide(mass, norms, out=np.zeros_like(mass), where=norms > 0)
    return unit @ unit.T


def upper_pairs(matrix: np.ndarray) -> np.ndarray:
    """The entries above the diagonal of ``[g, g]``, one per ensemble pair, ``-> [g(g-1)/2]``."""
    return matrix[np.triu_indices(len(matrix), k=1)]


def structure_function(structural: np.ndarray, functional: np.ndarray) -> dict[str, Any]:
    """Spearman rank correlation over ensemble pairs of two ``[g, g]`` graphs.

    ``rho`` and ``p`` are None when there are fewer than 3 pairs or either side is constant
    (every pair equally linked: no ranking to follow).
    """
    s, f = upper_pairs(structural), upper_pairs(functional)
    rho = p = None
    if len(s) >= 3 and np.ptp(s) > 1e-12 and np.ptp(f) > 1e-12:
        result = spearmanr(s, f)
        rho, p = float(result.statistic), float(result.pvalue)
    return {"rho": rho, "p": p, "pairs": len(s)}


def wired_layers(stage) -> list[SparseLinear | SparseConv]:
    """The wired layer of each block of a sparse or sparse_conv stage, in forward order; empty
    for any other stage."""
    if isinstance(stage, SparseStage):
        return [block.linear for block in stage]
    if isinstance(stage, ConvStage) and hasattr(stage, "ensemble_labels"):
        return [block.conv for block in stage]
    return []


def stage_wirings(stage: SparseStage | ConvStage) -> list[Wiring]:
    """The wiring of each of the stage's layers, in forward order."""
    return [layer.wiring for layer in wired_layers(stage)]


def stage_weights(stage: SparseStage | ConvStage) -> list[np.ndarray]:
    """Each layer's effective (masked) weight, float64 ``[n_out, n_in]`` (a conv's summed
    |w| over its taps)."""
    weights = []
    for layer in wired_layers(stage):
        w = layer.dense_weight().detach().double().cpu()
        weights.append((w.abs().flatten(2).sum(2) if w.dim() > 2 else w).numpy())
    return weights


def stage_structure(stage: SparseStage | ConvStage) -> dict[str, Any]:
    """Structural graphs of a sparse stage, from its trained weights and from its wiring alone.

    Returns ``weights`` and ``wiring`` (each ``[g, g]``, :func:`shared_input`), and per layer
    ``links [g_out, g_in]`` (fraction of each block's possible links that exist) and
    ``mass [g_out, g_in]`` (mean |w| over each block's possible links): what a drawing needs.
    """
    wirings = stage_wirings(stage)
    weights = stage_weights(stage)
    masks = [w.to_mask().astype(np.float64) for w in wirings]
    first, last = wirings[0], wirings[-1]

    def ensembles(layers: list[np.ndarray]) -> np.ndarray:
        return block_sums(path_mass(layers), last.out_sizes, first.in_sizes)

    layers = []
    for w, weight, mask in zip(wirings, weights, masks, strict=True):
        possible = np.outer(w.out_sizes, w.in_sizes)
        layers.append(
            {
                "links": block_sums(mask, w.out_sizes, w.in_sizes) / possible,
                "mass": block_sums(np.abs(weight), w.out_sizes, w.in_sizes) / possible,
            }
        )
    return {
        "weights": shared_input(ensembles(weights)),
        "wiring": shared_input(ensembles(masks)),
        "layers": layers,
    }


def layer_links(wiring: Wiring, links: np.ndarray) -> dict[str, Any]:
    """What a layer's wiring drawing shows, as numbers: ensemble pairs possible and linked
    (``links [g_out, g_in]`` > 0), unit links, density and links between different ensembles
    (:attr:`Wiring.cross_links`, None when the sides' ensembles differ in number)."""
    return {
        "pairs": int(links.size),
        "linked_pairs": int((links > 0).sum()),
        "links": int(wiring.to_mask().sum()),
        "density": wiring.density,
        "cross_links": wiring.cross_links,
    }


def structure_report(stage: SparseStage | ConvStage, ensemble_corr: np.ndarray) -> dict[str, Any]:
    """Structure vs function for one sparse or sparse_conv stage, ``ensemble_corr [g, g]`` its
    functional ensemble graph. Scalars under ``from_weights`` / ``from_wiring``; arrays under
    ``structure`` ``[g, g]``, ``pairs_structure`` and ``pairs_function`` ``[g(g-1)/2]``, and
    ``layers`` (see :func:`stage_structure`); per layer :func:`layer_links` under
    ``layer_links``."""
    graphs = stage_structure(stage)
    return {
        "from_weights": structure_function(graphs["weights"], ensemble_corr),
        "from_wiring": structure_function(graphs["wiring"], ensemble_corr),
        "structure": graphs["weights"],
        "pairs_structure": upper_pairs(graphs["weights"]),
        "pairs_function": upper_pairs(ensemble_corr),
        "layers": graphs["layers"],
        "layer_links": [
            layer_links(w, layer["links"])
            for w, layer in zip(stage_wirings(stage), graphs["layers"], strict=True)
        ],
    }
