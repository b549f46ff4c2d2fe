"""MoE routing of a trained network on a probe set: where tokens go and whether it tracks class.

Per MoE stage (vector inputs; on feature maps each routed position, labelled by its sample's
class, or each routed sample): load per expert (fraction of the top-k assignments), the
[experts x classes] routing matrix of top-1 choices, the mutual information between top-1
expert and class label (bits, and normalised by the class entropy), and two routing entropies
(mean per-token entropy of the full gate distribution; entropy of the mean load), in bits.
Shape legend: ``n`` probe samples, ``k`` chosen experts per sample, ``e`` experts,
``c`` classes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from neuroplex.analysis.functional import evaluating
from neuroplex.layers.moe import Routed
from neuroplex.layers.routers import RouterOutput
from neuroplex.network import Network


def moe_of(stage: nn.Module) -> Routed | None:
    """The routed layer a stage routes with (the stage itself or its ``moe``), or None."""
    if isinstance(stage, Routed):
        return stage
    inner = getattr(stage, "moe", None)
    return inner if isinstance(inner, Routed) else None


def router_choices(model: Network, x: torch.Tensor) -> dict[int, RouterOutput]:
    """Each MoE stage's routing of ``x [n, *in_shape]``, keyed by stage index, in eval mode.

    Every MoE sees its real input (the previous stage's output); no state changes. A stage
    that routes positions of a feature map gives ``n * positions`` tokens, sample-major.
    """
    moes = {i: s for i, s in enumerate(model.stages) if moe_of(s) is not None}
    if not moes:
        return {}
    with evaluating(model):
        features = model.forward_stages(x).features
        inputs = [x, *features[:-1]]
        return {i: getattr(s, "route", moe_of(s).route)(inputs[i]) for i, s in moes.items()}


def entropy_bits(p: np.ndarray) -> np.ndarray:
    """Entropy in bits along the last axis of probabilities ``[..., m] -> [...]`` (0 log 0 = 0)."""
    p = np.asarray(p, dtype=np.float64)
    logs = np.log2(p, out=np.zeros_like(p), where=p > 0)
    return -(p * logs).sum(axis=-1)


def expert_load(indices: np.ndarray, n_experts: int) -> np.ndarray:
    """Fraction of the ``[n, k]`` assignments that go to each expert, ``[e]`` (sums to 1)."""
    counts = np.bincount(np.asarray(indices).ravel(), minlength=n_experts)
    return counts / max(counts.sum(), 1)


def routing_matrix(top1: np.ndarray, y: np.ndarray, n_experts: int, n_classes: int) -> np.ndarray:
    """Counts of samples per (top-1 expert, class): ``[n], [n] -> [e, c]``."""
    flat = np.asarray(top1) * n_classes + np.asarray(y)
    return np.bincount(flat, minlength=n_experts * n_classes).reshape(n_experts, n_classes)


def mutual_information_bits(joint: np.ndarray) -> float:
    """Mutual information in bits of the two variables of a count table ``[e, c]``."""
    p = joint / joint.sum()
    independent = p.sum(axis=1, keepdims=True) * p.sum(axis=0, keepdims=True)  # [e, c]
    ratio = np.divide(p, independent, out=np.ones_like(p), where=p > 0)
    return float(max((p * np.log2(ratio)).sum(), 0.0))


def routing_report(route: RouterOutput, y: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Load, routing matrix, expert-class MI and entropies of one MoE's routing of a probe set.

    ``route.indices [n, k]`` (best first) and ``route.probs [n, e]``; ``y [n]`` class labels.
    ``k`` is the experts chosen per input at this checkpoint (a dense-to-sparse router's
    current ``k_eff``, which exceeds its final ``k`` before the end of its schedule). The MI
    is the plug-in estimate, biased up by about ``(e-1)(c-1) / (2 n ln 2)`` bits.
    Arrays (``load [e]``, ``routing [e, c]`` counts, ``routing_frac [e, c]`` = P(expert |
    class)) are returned under those keys next to the scalars, among them the extremes of the
    load, the largest cell of ``routing_frac`` and the classes whose top expert takes more
    than half of them.
    """
    indices = route.indices.cpu().numpy()
    probs = route.probs.double().cpu().numpy()
    n_experts = probs.shape[1]
    load = expert_load(indices, n_experts)
    joint = routing_matrix(indices[:, 0], y, n_experts, n_classes)
    per_class = joint.sum(axis=0, keepdims=True)  # [1, c]
    class_entropy = float(entropy_bits(per_class[0] / per_class.sum()))
    mi = mutual_information_bits(joint)
    frac = np.divide(joint, per_class, out=np.zeros(joint.shape), where=per_class > 0)
    return {
        "experts": n_experts,
        "classes": n_classes,
        "k": int(indices.shape[1]),
        "mi_bits": mi,
        "class_entropy_bits": class_entropy,
        "mi_over_class_entropy": mi / class_entropy if class_entropy > 0 else 0.0,
        "token_entropy_bits": float(entropy_bits(probs).mean()),
        "load_entropy_bits": float(entropy_bits(load)),
        "max_entropy_bits": float(np.log2(n_experts)),
        "load": load,
        "routing": joint,
        "routing_frac": frac,
        "load_max": float(load.max()),
        "load_min": float(load.min()),
        "top_share_max": float(frac.max()),
        "classes_with_majority_expert": int((frac.max(axis=0) > 0.5).sum()),
    }


def routing_analysis(
    model: Network, x: torch.Tensor, y: torch.Tensor, n_classes: int
) -> dict[int, dict[str, Any]]:
    """:func:`routing_report` for every MoE stage of ``model`` on ``x [n, *in_shape]``,
    ``y [n]``; a token routed per position carries its sample's label."""
    labels = y.cpu().numpy()
    reports = {}
    for i, route in router_choices(model, x).items():
        per_sample = route.indices.shape[0] // max(len(labels), 1)  # positions per sample
        reports[i] = routing_report(route, np.repeat(labels, per_sample), n_classes)
    return reports
