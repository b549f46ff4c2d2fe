"""Early exit: the auxiliary heads of a local run double as exit classifiers (JEI-DNN, seed 000).

Two policies decide, per input, after which stage to stop:
- ``confidence``: exit at the first stage whose classifier's top probability reaches a threshold
  (swept);
- ``gate``: a small learned exit gate per stage, trained after the main run on held-out data
  (the validation split) to predict from the stage's features and its classifier's confidence
  whether exiting there is correct; with compute-cost weight ``λ`` it exits when
  P(correct) ≥ 1 − λ, minimising P(wrong) + λ · (stages executed) one stage at a time.

Each policy gives accuracy against mean stages executed. Shape legend: ``n`` samples, ``s``
stages, ``d`` stage width, ``c`` classes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuroplex.network import Network, run_stage

THRESHOLDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99, 0.995, 0.999, 1.01)
COSTS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


class ExitOutputs(NamedTuple):
    features: list[Tensor]  # s x [n, d_s]
    probs: Tensor  # [s, n, c]: each stage's classifier (aux heads, then the real head)


@torch.no_grad()
def exit_outputs(model: Network, heads: list[nn.Module], x: Tensor) -> ExitOutputs:
    """Every stage's features and its exit classifier's probabilities (eval mode)."""
    model.eval()
    for head in heads:
        head.eval()
    features, probs = [], []
    h = x
    for stage, head in zip(model.stages, heads, strict=True):
        h = run_stage(stage, h).x
        features.append(h)
        probs.append(F.softmax(head(h), dim=-1))
    return ExitOutputs(features, torch.stack(probs))


def first_exit(exit_mask: Tensor) -> Tensor:
    """``exit_mask [s, n]`` bool -> index of the first True stage per sample ``[n]`` (the last
    stage always exits)."""
    mask = exit_mask.clone()
    mask[-1] = True
    return mask.int().argmax(dim=0)


def policy_point(stage: Tensor, probs: Tensor, y: Tensor) -> dict[str, float]:
    """Accuracy and mean stages executed when sample i exits after ``stage[i]``."""
    chosen = probs[stage, torch.arange(len(y))]  # [n, c]
    return {
        "acc": float((chosen.argmax(dim=-1) == y).float().mean()),
        "mean_stages": float((stage + 1).float().mean()),
    }


def confidence_policy(probs: Tensor, y: Tensor, thresholds=THRESHOLDS) -> list[dict[str, float]]:
    confidence = probs.max(dim=-1).values  # [s, n]
    return [
        {"threshold": t, **policy_point(first_exit(confidence >= t), probs, y)} for t in thresholds
    ]


class ExitGate(nn.Module):
    """P(exiting here is correct) from a stage's features, its top probability and entropy.

    Shapes: ``[n, d]``, ``[n, c] -> [n]``.
    """

    def __init__(self, d: int, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d + 2, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, features: Tensor, probs: Tensor) -> Tensor:
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1, keepdim=True)
        top = probs.max(dim=-1, keepdim=True).values
        return self.net(torch.cat([features, top, entropy], dim=-1)).squeeze(-1)


def train_exit_gates(
    out: ExitOutputs, y: Tensor, *, steps: int = 300, seed: int = 0
) -> list[ExitGate]:
    """One gate per stage, trained full-batch with BCE to predict that stage's correctness."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    gates = []
    for feats, probs in zip(out.features, out.probs, strict=True):
        gate = ExitGate(feats.shape[1])
        target = (probs.argmax(dim=-1) == y).float()
        opt = torch.optim.Adam(gate.parameters(), lr=1e-2)
        for _ in range(steps):
            loss = F.binary_cross_entropy_with_logits(gate(feats, probs), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        gates.append(gate.eval())
    torch.random.set_rng_state(gen_state)
    return gates


@torch.no_grad()
def gate_policy(
    gates: list[ExitGate], out: ExitOutputs, y: Tensor, costs=COSTS
) -> list[dict[str, float]]:
    p_correct = torch.stack(
        [torch.sigmoid(g(f, p)) for g, f, p in zip(gates, out.features, out.probs, strict=True)]
    )  # [s, n]
    return [
        {"cost": lam, **policy_point(first_exit(p_correct >= 1 - lam), out.probs, y)}
        for lam in costs
    ]


def exit_report(
    model: Network, heads: list[nn.Module], fit_x: Tensor, fit_y: Tensor, x: Tensor, y: Tensor
) -> dict[str, Any]:
    """Both policies on (x, y), gates trained on (fit_x, fit_y)."""
    gates = train_exit_gates(exit_outputs(model, heads, fit_x), fit_y)
    out = exit_outputs(model, heads, x)
    full = policy_point(torch.full_like(y, len(heads) - 1), out.probs, y)
    return {
        "stages": len(heads),
        "full": full,
        "per_stage_acc": [float((p.argmax(-1) == y).float().mean()) for p in out.probs],
        "confidence": confidence_policy(out.probs, y),
        "gate": gate_policy(gates, out, y),
    }


def best_saving(points: list[dict[str, float]], full: dict[str, float], max_drop: float = 0.01):
    """The point with the fewest stages whose accuracy is within ``max_drop`` of the full net."""
    ok = [p for p in points if p["acc"] >= full["acc"] - max_drop]
    return min(ok, key=lambda p: p["mean_stages"]) if ok else None
