"""Early exit: the auxiliary heads of a local run double as exit classifiers (JEI-DNN, seed 000).

Three policies decide, per input, after which stage to stop:
- ``confidence``: exit at the first stage whose classifier's top probability reaches a threshold
  (swept);
- ``jei`` (JEI-DNN, Regol et al. 2024; reference code networkslab/dynn): one gate per early exit
  and the early exit classifiers (copies of the aux heads), trained on the frozen network for a
  trade-off ``λ`` set before training. A sample's target exit is the one minimising
  ``CE_l + λ·cost_l`` (``cost_l`` = stages run / all stages); gate ``l`` learns, by BCE weighted
  against class imbalance, whether that exit is at or before ``l``; the classifiers learn by CE
  weighted by the gates' exit probabilities. The two phases alternate every ``phase_steps``
  steps, gates first. Unlike the reference, the gates train on the validation split and the
  classifiers on the train split by default (``ExitsConfig``: a local run's heads already fit
  the train split, and overfit the small validation split);
- ``correctness``: a small gate per stage trained to predict whether that stage's classifier is
  right; with cost weight ``λ`` it exits when P(correct) ≥ 1 − λ (swept after training).

Shape legend: ``n`` samples, ``s`` stages (= exits, the last is the network's head), ``d`` stage
width (channels of a feature map), ``c`` classes. Exits work on feature-map stages alike: the
exit classifiers are the aux nets, which read the stage output as it is.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuroplex.config import ExitsConfig
from neuroplex.network import Network, run_stage

THRESHOLDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99, 0.995, 0.999, 1.01)
COSTS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
POS_WEIGHT_CAP = 5.0  # the reference clips each gate's 0/1 ratio "for stability"
MOMENTUM = 0.9  # the reference's SGD momentum; its cosine ends at 2e-4 for lr 1e-2
MIN_LR_RATIO = 0.02


class ExitOutputs(NamedTuple):
    features: list[Tensor]  # s x [n, *out_shape_s]
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


# ---- JEI-DNN: targets, losses, exit probabilities, inference rule ----


def exit_costs(stages: int) -> Tensor:
    """``[s]``: the cost of exiting after stage l, as a fraction of the whole network."""
    return torch.arange(1, stages + 1, dtype=torch.float32) / stages


def jei_targets(ce: Tensor, costs: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Optimal exit and cumulative gate targets.

    ``ce [s, n]`` (every exit's cross-entropy, the last head included), ``costs [s]`` ->
    ``optimal [n]`` = argmin_l CE_l + λ·cost_l (first on ties) and ``targets [s-1, n]``: 1 for
    gate l when the optimal exit is at or before l.
    """
    optimal = (ce + lam * costs[:, None]).argmin(dim=0)
    gate = torch.arange(ce.shape[0] - 1)[:, None]
    return optimal, (optimal[None, :] <= gate).float()


def positive_weights(optimal: Tensor, stages: int, balance: str = "exact") -> Tensor:
    """``[s-1]``: the weight of each gate's 1 targets, samples not counted over samples counted
    (count at least 0.1), capped at 5. ``exact`` (the reference) counts the samples whose optimal
    exit is l; ``cumulative`` counts gate l's actual 1 targets, optimal exit at or before l."""
    counts = torch.bincount(optimal, minlength=stages)[:-1].float()
    if balance == "cumulative":
        counts = counts.cumsum(dim=0)
    counts = counts.clamp_min(0.1)
    return ((len(optimal) - counts) / counts).clamp_max(POS_WEIGHT_CAP)


def gate_loss(logits: Tensor, targets: Tensor, pos_weight: Tensor) -> Tensor:
    """BCE of ``logits [s-1, n]`` against ``targets [s-1, n]``, 1 targets weighted by
    ``pos_weight [s-1]``, mean over all entries."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    weight = torch.where(targets > 0, pos_weight[:, None], torch.ones_like(bce))
    return (bce * weight).mean()


def exit_probabilities(g: Tensor) -> Tensor:
    """Gate outputs ``g [s-1, n]`` in [0, 1] -> P(exit at l) ``[s-1, n]`` = max(0, min(g_l,
    1 − Σ_{j<l} g_j)): the reference reads g_l as the exit probability itself, capped so the
    early exits never hold more than 1 in total."""
    before = g.cumsum(dim=0) - g
    return torch.minimum(g, 1 - before).clamp_min(0)


def classifier_loss(ce: Tensor, p_exit: Tensor, mode: str) -> Tensor:
    """Loss of the early exit classifiers from their cross-entropies ``ce [s-1, n]``.

    ``exit_prob``: the expected CE under the exit distribution, Σ_l P_l·CE_l per sample, mean
    over samples (``p_exit [s-1, n]`` from gates that receive no gradient here). The reference
    also rescales each sample's sum to Σ_l CE_l by a factor that it lets the gradient through,
    which cancels the weights exactly: its loss is the plain mean, ``uniform``. (With a
    stop-gradient the factor is ill-conditioned: a sample sure to exit where its CE is ~0 gets
    a factor of 1e12 and the classifiers diverge.)
    """
    if mode == "uniform":
        return ce.mean()
    return (p_exit * ce).sum(dim=0).mean()


def jei_exit_stage(g: Tensor) -> Tensor:
    """Reference inference rule: ``g [s-1, n]`` -> exit stage ``[n]``. The conditional exit
    probability at l is a_l = P_l / ∏_{j<l}(1 − a_j) (clipped to [0, 1]); exit at the first l
    with a_l ≥ 0.5, else after the last stage."""
    survive = torch.ones_like(g[0])
    exits = []
    for p in exit_probabilities(g):
        a = (p / survive).clamp(0, 1)
        exits.append(a >= 0.5)
        survive = survive * (1 - a)
    exits.append(torch.ones_like(exits[0]))
    return first_exit(torch.stack(exits))


def uncertainty_features(probs: Tensor) -> Tensor:
    """``[n, c] -> [n, 4]``: top probability, entropy, top-2 margin, entropy of the squared
    (renormalised) probabilities — the reference gate's inputs."""
    top2 = probs.topk(2, dim=-1).values
    squared = probs**2
    squared = squared / squared.sum(dim=-1, keepdim=True)
    return torch.stack(
        [top2[:, 0], entropy(probs), top2[:, 0] - top2[:, 1], entropy(squared)], dim=-1
    )


def entropy(probs: Tensor) -> Tensor:
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)


class JeiGate(nn.Module):
    """Exit logit from an exit classifier's probabilities: a linear map of their uncertainty
    features, computed on detached input (no gradient reaches the classifier).

    Shapes: ``[n, c] -> [n]``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, probs: Tensor) -> Tensor:
        return self.linear(uncertainty_features(probs.detach())).squeeze(-1)


class JeiExits(NamedTuple):
    heads: list[nn.Module]  # s-1 early exit classifiers (trained copies of the aux heads)
    gates: list[JeiGate]  # s-1


def nll(probs: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy ``[n]`` from probabilities ``[n, c]``."""
    return F.nll_loss(probs.clamp_min(1e-12).log(), y, reduction="none")


def early_probs(heads: list[nn.Module], features: list[Tensor]) -> list[Tensor]:
    """The early exit classifiers' probabilities, s-1 x ``[n, c]``."""
    return [F.softmax(head(f), dim=-1) for head, f in zip(heads, features, strict=True)]


@torch.no_grad()
def optimal_exits(heads: list[nn.Module], out: ExitOutputs, y: Tensor, lam: float) -> Tensor:
    for head in heads:
        head.eval()
    probs = [*early_probs(heads, out.features[:-1]), out.probs[-1]]
    ce = torch.stack([nll(p, y) for p in probs])
    return jei_targets(ce, exit_costs(len(probs)), lam)[0]


def gate_step(jei: JeiExits, feats: list[Tensor], last_ce: Tensor, y, lam, pos_weight) -> Tensor:
    """Gate phase on one batch: classifiers fixed, gates towards the cumulative targets."""
    with torch.no_grad():
        for head in jei.heads:
            head.eval()
        probs = early_probs(jei.heads, feats)
        ce = torch.stack([*(nll(p, y) for p in probs), last_ce])  # [s, b]
        _, targets = jei_targets(ce, exit_costs(len(ce)), lam)
    logits = torch.stack([gate(p) for gate, p in zip(jei.gates, probs, strict=True)])
    return gate_loss(logits, targets, pos_weight)


def classifier_step(jei: JeiExits, feats: list[Tensor], y: Tensor, mode: str) -> Tensor:
    """Classifier phase on one batch: gates fixed, classifiers by exit-weighted CE."""
    for head in jei.heads:
        head.train()
    logits = [head(f) for head, f in zip(jei.heads, feats, strict=True)]
    ce = torch.stack([F.cross_entropy(z, y, reduction="none") for z in logits])  # [s-1, b]
    with torch.no_grad():
        probs = [F.softmax(z, dim=-1) for z in logits]
        g = torch.stack([torch.sigmoid(gate(p)) for gate, p in zip(jei.gates, probs, strict=True)])
    return classifier_loss(ce, exit_probabilities(g), mode)


def batches(n: int, size: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Index batches ``[size]`` (the last of an epoch may be smaller), reshuffled each epoch."""
    while True:
        yield from torch.randperm(n, generator=gen).split(size)


def train_jei(
    heads: list[nn.Module],
    fit: dict[str, tuple[ExitOutputs, Tensor]],
    lam: float,
    cfg: ExitsConfig,
    seed: int = 0,
) -> JeiExits:
    """Gates and early exit classifiers for trade-off ``lam``: the gates trained on
    ``fit["gates"]``, the classifiers on ``fit["classifiers"]``, the gates' 1-target weights
    re-estimated on ``fit["val"]`` at the start of every gate phase."""
    (out, y), (c_out, c_y), (val_out, val_y) = fit["gates"], fit["classifiers"], fit["val"]
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    jei = JeiExits([copy.deepcopy(h) for h in heads[:-1]], [JeiGate() for _ in heads[:-1]])
    params = [p for m in [*jei.heads, *jei.gates] for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=MOMENTUM, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps, MIN_LR_RATIO * cfg.lr)
    last_ce = nll(out.probs[-1], y)
    order = batches(len(y), cfg.batch_size, torch.Generator().manual_seed(seed))
    c_order = batches(len(c_y), cfg.batch_size, torch.Generator().manual_seed(seed + 1))
    for step in range(cfg.steps):
        gate_phase = cfg.classifier_loss == "frozen" or (step // cfg.phase_steps) % 2 == 0
        if gate_phase and step % cfg.phase_steps == 0:
            optimal = optimal_exits(jei.heads, val_out, val_y, lam)
            pos_weight = positive_weights(optimal, len(heads), cfg.gate_balance)
        if gate_phase:
            idx = next(order)
            feats = [f[idx] for f in out.features[:-1]]
            loss = gate_step(jei, feats, last_ce[idx], y[idx], lam, pos_weight)
        else:
            idx = next(c_order)
            feats = [f[idx] for f in c_out.features[:-1]]
            loss = classifier_step(jei, feats, c_y[idx], cfg.classifier_loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    torch.random.set_rng_state(gen_state)
    for module in [*jei.heads, *jei.gates]:
        module.eval()
    return jei


@torch.no_grad()
def jei_point(jei: JeiExits, out: ExitOutputs, y: Tensor) -> dict[str, float]:
    probs = early_probs(jei.heads, out.features[:-1])
    g = torch.stack([torch.sigmoid(gate(p)) for gate, p in zip(jei.gates, probs, strict=True)])
    return policy_point(jei_exit_stage(g), torch.stack([*probs, out.probs[-1]]), y)


# ---- correctness predictor ----


class CorrectnessGate(nn.Module):
    """P(exiting here is correct) from a stage's features (a feature map averaged over its
    positions), its top probability and entropy.

    Shapes: ``[n, d]`` or ``[n, d, *positions]``, ``[n, c] -> [n]``.
    """

    def __init__(self, d: int, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d + 2, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, features: Tensor, probs: Tensor) -> Tensor:
        ent = entropy(probs)[:, None]
        top = probs.max(dim=-1, keepdim=True).values
        units = features.flatten(2).mean(-1) if features.dim() > 2 else features  # [n, d]
        return self.net(torch.cat([units, top, ent], dim=-1)).squeeze(-1)


def train_correctness_gates(
    out: ExitOutputs, y: Tensor, *, steps: int = 300, seed: int = 0
) -> list[CorrectnessGate]:
    """One gate per stage, trained full-batch with BCE to predict that stage's correctness."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    gates = []
    for feats, probs in zip(out.features, out.probs, strict=True):
        gate = CorrectnessGate(feats.shape[1])
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
def correctness_policy(
    gates: list[CorrectnessGate], out: ExitOutputs, y: Tensor, costs=COSTS
) -> list[dict[str, float]]:
    p_correct = torch.stack(
        [torch.sigmoid(g(f, p)) for g, f, p in zip(gates, out.features, out.probs, strict=True)]
    )  # [s, n]
    return [
        {"cost": lam, **policy_point(first_exit(p_correct >= 1 - lam), out.probs, y)}
        for lam in costs
    ]


# ---- the report ----

SETTING = {"confidence": "threshold", "jei": "lambda", "correctness": "cost"}


def curves(
    out: ExitOutputs, y: Tensor, jei: dict[float, JeiExits], gates: list[CorrectnessGate]
) -> dict[str, Any]:
    """Every policy's operating points (accuracy, mean stages) on one split."""
    s = out.probs.shape[0]
    return {
        "full": policy_point(torch.full_like(y, s - 1), out.probs, y),
        "per_stage_acc": [float((p.argmax(-1) == y).float().mean()) for p in out.probs],
        "confidence": confidence_policy(out.probs, y),
        "jei": [{"lambda": lam, **jei_point(j, out, y)} for lam, j in jei.items()],
        "correctness": correctness_policy(gates, out, y),
    }


def accuracy_at_stages(points: list[dict[str, float]], stages: float) -> float:
    """A policy's accuracy at ``stages`` mean stages, linear between its operating points (a
    random mix of two settings costs and scores in between)."""
    ordered = sorted(points, key=lambda p: p["mean_stages"])
    return float(
        np.interp(stages, [p["mean_stages"] for p in ordered], [p["acc"] for p in ordered])
    )


def select(val: dict[str, Any], test: dict[str, Any]) -> dict[str, Any]:
    """Per policy, the setting chosen on val (fewest stages within 1 point of all stages) and
    its val and test points; None where no setting qualifies."""
    chosen: dict[str, Any] = {}
    for policy, key in SETTING.items():
        best = best_saving(val[policy], val["full"])
        if best is None:
            chosen[policy] = None
            continue
        at_test = next(p for p in test[policy] if p[key] == best[key])
        chosen[policy] = {key: best[key], "val": best, "test": at_test}
    return chosen


def exit_report(
    model: Network,
    heads: list[nn.Module],
    data: dict[str, tuple[Tensor, Tensor]],
    cfg: ExitsConfig,
    seed: int = 0,
) -> dict[str, Any]:
    """All policies on ``data["eval"]``, settings chosen on ``data["val"]``; the gates (JEI and
    correctness) trained on ``data["gates"]``, the JEI exit classifiers on
    ``data["classifiers"]``. Each split is ``(x [n, *in_shape], y [n])``."""
    out = {k: (exit_outputs(model, heads, x), y) for k, (x, y) in data.items()}
    gates = train_correctness_gates(*out["gates"], seed=seed)
    jei = {lam: train_jei(heads, out, lam, cfg, seed) for lam in cfg.lambdas}
    val, test = curves(*out["val"], jei, gates), curves(*out["eval"], jei, gates)
    for p in test["jei"]:
        p["confidence_acc"] = accuracy_at_stages(test["confidence"], p["mean_stages"])
    return {
        "stages": len(heads),
        **test,
        "val": val,
        "selected_on_val": select(val, test),
        "jei_beats_confidence": [
            p["lambda"] for p in test["jei"] if p["acc"] > p["confidence_acc"]
        ],
    }


def best_saving(points: list[dict[str, float]], full: dict[str, float], max_drop: float = 0.01):
    """The point with the fewest stages whose accuracy is within ``max_drop`` of the full net."""
    ok = [p for p in points if p["acc"] >= full["acc"] - max_drop]
    return min(ok, key=lambda p: p["mean_stages"]) if ok else None
