"""Auxiliary networks of local learning (``train.aux.kind``), for vector and feature-map stages.

- ``linear``: a linear classifier (DGL-style); on a feature map after a global average pool;
- ``mlp``: a 2-layer MLP classifier (InfoPro-like); on a feature map after a global average pool;
- ``augmented``: AugLocal — layers modelled on a uniformly sampled subset of the layers after the
  stage (own parameters; dense layers narrowed to ``aux.width``, conv / residual layers to
  ``aux.widen`` × their channels, each with the layer's own kernel, stride, norm, activation and
  pooling), depth decaying linearly with the stage index (``aux.depth_coeff``; layers picked by
  ``aux.picks``); a feature map then becomes a vector as the network makes it (its own pool or
  flatten stage; ``aux.reduce``), then (at depth ≤ 1, as in AugLocal's code) a batch norm and a
  linear classifier;
- ``momentum``: MAN — ``head(LB(h) + EMA(h))``: a trainable copy and an EMA copy of the next
  stage's first block (dense, conv or residual), then the ``mlp`` classifier.

Shape legend: ``b`` batch, ``d`` features, ``c`` channels, ``*s`` spatial dimensions, ``k``
classes. ``Shape`` is one sample's shape: ``(d,)``, ``(c, L)`` or ``(c, h, w)``.
"""

from __future__ import annotations

import copy
import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from neuroplex.config import (
    AuxConfig,
    ConvStageConfig,
    DenseStageConfig,
    FlattenStageConfig,
    PoolStageConfig,
    ResidualStageConfig,
)
from neuroplex.layers import DenseBlock, DenseStage
from neuroplex.layers.conv import (
    BasicBlock,
    ConvBlock,
    ConvStage,
    Flatten,
    GlobalPool,
    ResidualStage,
)
from neuroplex.network import (
    ACTIVATIONS,
    NORMS,
    Network,
    Shape,
    conv_norm,
    run_stage,
    stage_out_shape,
)

REDUCTIONS = (PoolStageConfig, FlattenStageConfig)  # stages without parameters


def probe_shape(module: nn.Module, in_shape: Shape) -> Shape:
    """``module``'s output shape for one ``in_shape`` sample (an eval-mode forward of zeros: no
    random draw, no statistics updated)."""
    was_training = module.training
    device = next((t.device for t in (*module.parameters(), *module.buffers())), None)
    module.eval()
    with torch.no_grad():
        out = run_stage(module, torch.zeros(2, *in_shape, device=device)).x
    module.train(was_training)
    return tuple(out.shape[1:])


def pooled(in_shape: Shape, classifier: nn.Module) -> nn.Module:
    """``classifier`` on a vector as it is; on a feature map after a global average pool."""
    return classifier if len(in_shape) == 1 else nn.Sequential(GlobalPool(in_shape), classifier)


def mlp_head(d_in: int, hidden: int, n_classes: int) -> nn.Module:
    """The InfoPro-like classifier ``[b, d_in] -> [b, k]``: linear, GELU, linear."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, n_classes))


def redrawn_copy(layer: nn.Module) -> nn.Module:
    """A copy of ``layer`` with its weights drawn afresh (masks and shapes kept).

    MAN's reference code deep-copies the next layer and then runs its model-wide weight init over
    every module, so its copies start from their own draws, not from the layer's weights.
    """
    new = copy.deepcopy(layer)
    for module in new.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return new


def first_layer(stage: nn.Module) -> nn.Module:
    """A dense, conv or residual stage's first block; any other stage counts as one layer."""
    return stage[0] if isinstance(stage, DenseStage | ConvStage | ResidualStage) else stage


class MomentumAux(nn.Module):
    """MAN aux net: ``head(lb(h) + ema(h))``.

    ``lb`` (the "learnable bias") is a trainable copy of the next stage's first layer, trained
    with this stage; ``ema`` is a copy of the same layer whose weights follow the live layer's
    by an exponential moving average (no gradient); ``head`` is the ``mlp`` classifier (after a
    global average pool when the copies output a feature map).

    Shapes: ``[b, *in_shape] -> [b, k]`` (the copies map ``in_shape`` to the next layer's output).
    """

    def __init__(self, next_layer: nn.Module, in_shape: Shape, n_classes: int, aux: AuxConfig):
        super().__init__()
        self.momentum = aux.momentum
        self.lb = redrawn_copy(next_layer)
        self.ema = redrawn_copy(next_layer).requires_grad_(False)
        shape = probe_shape(self.lb, in_shape)
        self.head = pooled(shape, mlp_head(shape[0], aux.hidden, n_classes))

    def forward(self, h: Tensor) -> Tensor:
        return self.head(run_stage(self.lb, h).x + run_stage(self.ema, h).x)

    @torch.no_grad()
    def update(self, next_layer: nn.Module) -> None:
        """EMA step on the parameters: ``ema = m * ema + (1 - m) * live`` (buffers stay the
        copy's own, as in the reference)."""
        for ema, live in zip(self.ema.parameters(), next_layer.parameters(), strict=True):
            ema.mul_(self.momentum).add_(live, alpha=1.0 - self.momentum)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"


# ---- AugLocal ----


def augmented_depth(stage: int, n_stages: int, max_depth: int, coeff: float) -> int:
    """AugLocal's pyramidal depth of stage ``stage``'s aux net (the last stage uses the head).

    With ``t = stage * coeff / (n_stages - 2)``: ``max(1, round(max_depth * (1 - t) + t))``,
    Python's round (half to even) as in the reference: ``max_depth`` at stage 0, decaying
    linearly to ``max_depth - coeff * (max_depth - 1)`` at the second-to-last stage.
    """
    if n_stages <= 2:
        return max_depth
    t = stage * coeff / (n_stages - 2)
    return max(1, round(max_depth * (1 - t) + t))


def augmented_picks(layer: int, n_layers: int, depth: int, rule: str) -> list[int]:
    """Network-wide indices of the later layers an aux net is modelled on, for a stage whose last
    layer is ``layer`` of ``n_layers``; every later layer when ``depth`` covers them all.

    ``end`` (AugLocal's code): ``round(layer + (n_layers - 1 - layer) / depth * i)`` for
    ``i = 1..depth``, uniform steps that end at the last layer. ``spread``: ``depth`` layers
    evenly spaced from the first later layer to the last.
    """
    remaining = n_layers - 1 - layer
    if depth >= remaining:
        return list(range(layer + 1, n_layers))
    if rule == "end":
        return [round(layer + remaining / depth * i) for i in range(1, depth + 1)]
    spaced = np.unique(np.round(np.linspace(0, remaining - 1, depth)).astype(int))
    return [layer + 1 + int(j) for j in spaced]


class Layer(NamedTuple):
    """One layer of the network as AugLocal models it: its stage's config and whether it is the
    stage's first layer (which carries the stage's stride)."""

    cfg: Any
    first: bool

    @property
    def stride(self) -> int:
        return getattr(self.cfg, "stride", 1) if self.first else 1

    @property
    def downsampling(self) -> int:
        """By how much the layer shrinks each spatial size: stride × pooling window."""
        pool = getattr(self.cfg, "pool", "none") != "none"
        return self.stride * (self.cfg.pool_size if pool else 1)


def stage_layer_count(cfg: Any) -> int:
    """Layers of a stage: dense / conv layers, residual blocks; none for pool and flatten (no
    parameters); one for any other stage (sparse, moe)."""
    if isinstance(cfg, DenseStageConfig | ConvStageConfig):  # sparse_conv is a ConvStageConfig
        return cfg.layers
    if isinstance(cfg, ResidualStageConfig):
        return cfg.blocks
    return 0 if isinstance(cfg, REDUCTIONS) else 1


def network_layers(stage_cfgs: list[Any]) -> list[Layer]:
    """Every layer of the network, in order."""
    return [Layer(cfg, i == 0) for cfg in stage_cfgs for i in range(stage_layer_count(cfg))]


def widened(channels: int, widen: float) -> int:
    return max(1, round(channels * widen))


def aux_layer(layer: Layer, in_shape: Shape, aux: AuxConfig, carry: int = 1) -> nn.Module:
    """A fresh layer modelled on ``layer``, reading ``in_shape``: a conv layer (or residual
    block) with ``aux.widen`` × its channels and its kernel, norm, activation and pooling, its
    stride times ``carry`` (the downsampling of the layers skipped before it); a dense layer of
    width ``aux.width`` with its norm and activation; any other vector layer as a LayerNorm /
    GELU dense layer. Group norm keeps as many groups as divide the narrowed channels."""
    cfg, stride = layer.cfg, layer.stride * carry
    if isinstance(cfg, ConvStageConfig | ResidualStageConfig):
        n, c_out = len(in_shape) - 1, widened(cfg.channels, aux.widen)
        norm = conv_norm(cfg.norm, n, math.gcd(cfg.groups, c_out))
        act = ACTIVATIONS[cfg.activation]
        if isinstance(cfg, ResidualStageConfig):
            return BasicBlock(in_shape[0], c_out, n, kernel=cfg.kernel, stride=stride, norm=norm,
                              act_layer=act)  # fmt: skip
        return ConvBlock(in_shape[0], c_out, n, kernel=cfg.kernel, stride=stride, norm=norm,
                         act_layer=act, pool=cfg.pool, pool_size=cfg.pool_size)  # fmt: skip
    norm, act = ("layernorm", "gelu")
    if isinstance(cfg, DenseStageConfig):
        norm, act = cfg.norm, cfg.activation
    return DenseBlock(in_shape[0], aux.width, norm_layer=NORMS[norm], act_layer=ACTIVATIONS[act])


def reduction(stage_cfgs: list[Any], after: int, in_shape: Shape) -> nn.Module:
    """The network's own way from a feature map to a vector (its first pool or flatten stage
    after stage ``after``), built for ``in_shape``; a global average pool if it has none."""
    later = [c for c in stage_cfgs[after + 1 :] if isinstance(c, REDUCTIONS)]
    if later and isinstance(later[0], FlattenStageConfig):
        return Flatten(in_shape)
    return GlobalPool(in_shape, later[0].mode if later else "avg")


def build_augmented(
    aux: AuxConfig, stage: int, in_shape: Shape, n_classes: int, stage_cfgs: list[Any]
) -> nn.Module:
    """AugLocal aux net of ``stage`` (``[b, *in_shape] -> [b, k]``): layers modelled on the
    picked later layers, a vector layer reached through the network's own pool or flatten; a
    feature map at the end made a vector as the network does it (``aux.reduce: network``:
    AugLocal's aux nets end in its ResNets' own head, average pool + linear) or by a global
    average pool (``avg``), then batch-normed at depth ≤ 1 (as AugLocal's ``unifSamp`` head);
    a linear classifier. The downsampling of the layers skipped between two
    picks goes into the next copied conv's stride, so the aux net reaches the network's
    resolution at each picked layer (AugLocal's code strides where the skipped layers double the
    channels, its ResNets' downsampling points)."""
    layers = network_layers(stage_cfgs)
    last = len(network_layers(stage_cfgs[: stage + 1])) - 1
    depth = augmented_depth(stage, len(stage_cfgs), aux.max_depth, aux.depth_coeff)
    parts: list[nn.Module] = []
    shape, previous = in_shape, last
    for i in augmented_picks(last, len(layers), depth, aux.picks):
        if len(shape) > 1 and not isinstance(layers[i].cfg, ConvStageConfig | ResidualStageConfig):
            parts.append(reduction(stage_cfgs, stage, shape))
            shape = probe_shape(parts[-1], shape)
        carry = math.prod(layers[j].downsampling for j in range(previous + 1, i))
        parts.append(aux_layer(layers[i], shape, aux, carry))
        shape, previous = probe_shape(parts[-1], shape), i
    if len(shape) > 1:
        parts.append(
            GlobalPool(shape) if aux.reduce == "avg" else reduction(stage_cfgs, stage, shape)
        )
        shape = probe_shape(parts[-1], shape)
        parts += [nn.BatchNorm1d(shape[0])] if depth <= 1 else []
    return nn.Sequential(*parts, nn.Linear(shape[0], n_classes))


def build_aux(
    aux: AuxConfig, stage: int, in_shape: Shape, n_classes: int, model: Network, stage_cfgs
) -> nn.Module:
    """The auxiliary classifier of ``stage``, reading its output ``[b, *in_shape] -> [b, k]``."""
    if aux.kind == "linear":
        return pooled(in_shape, nn.Linear(in_shape[0], n_classes))
    if aux.kind == "mlp":
        return pooled(in_shape, mlp_head(in_shape[0], aux.hidden, n_classes))
    if aux.kind == "momentum":
        return MomentumAux(first_layer(model.stages[stage + 1]), in_shape, n_classes, aux)
    return build_augmented(aux, stage, in_shape, n_classes, stage_cfgs)


def aux_nets(model: Network, aux: AuxConfig, stage_cfgs: list[Any]) -> list[nn.Module]:
    """One aux net per stage but the last (which the network's head trains)."""
    n_classes = model.head.out_features
    return [
        build_aux(aux, s, stage_out_shape(stage), n_classes, model, stage_cfgs)
        for s, stage in enumerate(model.stages[:-1])
    ]
