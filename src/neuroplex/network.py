"""Network = ordered stages + a head, and the builders that make one from config.

A *stage* is the unit of local learning (gradient-isolation boundary), of checkpointing and of
parallelism. Any ``nn.Module`` can be a stage if it maps ``[b, *in_shape] -> [b, *out_shape]``,
exposes ``out_shape`` (a vector stage may expose ``d_out`` instead: ``out_shape = (d_out,)``),
and returns either a tensor or a :class:`StageOutput`; a stage that returns a tensor and holds
MoE layers gets their side losses through :func:`run_stage`. Shapes leave out the batch:
vectors are ``(d,)``, feature maps ``(c, L)`` or ``(c, h, w)``. Builders get the input shape;
vector stages (``dense``, ``sparse``) and the linear head need a vector, so a feature map
reaches them through a ``flatten`` or ``pool`` stage; a ``moe`` stage takes either (on a
feature map it routes positions or samples).

Shape legend: ``b`` batch, ``d`` features, ``c`` classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from neuroplex import wiring
from neuroplex.config import (
    ConvStageConfig,
    DenseStageConfig,
    ModelConfig,
    MoEStageConfig,
    ResidualStageConfig,
    SparseConvStageConfig,
    SparseStageConfig,
)
from neuroplex.errors import ConfigError
from neuroplex.layers import DenseStage, StageOutput
from neuroplex.layers.conv import (
    ChannelLayerNorm,
    ConvStage,
    Flatten,
    GlobalPool,
    ResidualStage,
    spatial_dims,
)
from neuroplex.layers.moe import MoE, moe_stats, take_moe_aux_loss
from neuroplex.layers.moe_conv import ConvMoE
from neuroplex.layers.params import count_parameters, masked_out
from neuroplex.layers.stages import GatedStage, SparseStage, shared_expert
from neuroplex.wiring import Wiring
from neuroplex.wiring.core import check_widths


class NetworkOutput(NamedTuple):
    """Result of :meth:`Network.forward_stages`."""

    logits: Tensor  # [b, c]
    features: list[Tensor]  # one [b, *out_shape_s] per stage
    aux_loss: Tensor  # scalar: sum of the stages' aux losses (0 when none)
    stats: dict[str, Tensor]  # "stage{i}.{name}" -> value


def run_stage(stage: nn.Module, x: Tensor) -> StageOutput:
    """Call ``stage`` and normalise its result to a StageOutput. A stage that returns a tensor
    gets the aux losses and stats its MoE layers left (:func:`take_moe_aux_loss`, which
    clears them from the layers, and :func:`moe_stats`): stats under their own names when it
    holds one MoE, else prefixed by the layer's module name."""
    out = stage(x)
    if isinstance(out, StageOutput):
        return out
    per_layer = moe_stats(stage)
    if not per_layer:
        return StageOutput(out, out.new_zeros(()), {})
    if len(per_layer) == 1:
        stats = next(iter(per_layer.values()))
    else:
        stats = {f"{name}.{k}": v for name, s in per_layer.items() for k, v in s.items()}
    return StageOutput(out, take_moe_aux_loss(stage), stats)  # the trainer owns it now


class Network(nn.Module):
    """Ordered ``stages`` followed by ``head``.

    Args:
        stages: modules, each ``[b, *out_shape_s-1] -> [b, *out_shape_s]``.
        head: classifier ``[b, d_last] -> [b, c]``.
    """

    def __init__(self, stages: Sequence[nn.Module], head: nn.Module) -> None:
        super().__init__()
        if not stages:
            raise ValueError("Network needs at least one stage")
        self.stages = nn.ModuleList(stages)
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        """``[b, *in_shape] -> [b, c]`` logits."""
        for stage in self.stages:
            x = run_stage(stage, x).x
        return self.head(x)

    def forward_stages(self, x: Tensor) -> NetworkOutput:
        """Logits plus every stage's output, the summed aux losses and the stage statistics."""
        features: list[Tensor] = []
        aux_loss = x.new_zeros(())
        stats: dict[str, Tensor] = {}
        for i, stage in enumerate(self.stages):
            x, stage_aux, stage_stats = run_stage(stage, x)
            features.append(x)
            aux_loss = aux_loss + stage_aux
            stats.update({f"stage{i}.{k}": v for k, v in stage_stats.items()})
        return NetworkOutput(self.head(x), features, aux_loss, stats)

    def num_parameters(self) -> int:
        """Parameters that exist as connections (:func:`~neuroplex.layers.params.count_parameters`:
        masked-out weights of sparse layers are not counted)."""
        return count_parameters(self)

    def num_active_parameters(self) -> int:
        """Parameters one input uses: an MoE layer counts its router and ``k`` of its ``e``
        experts, sparse layers and experts only their masked-in weights (what a dense network
        of equal active size is compared with)."""
        total = self.num_parameters()
        for m in self.modules():
            if isinstance(m, MoE):
                experts = sum(p.numel() for p in (m.w1, m.b1, m.w2, m.b2)) - masked_out(m)
                total -= experts - experts * m.k // m.n_experts
            elif isinstance(m, ConvMoE):
                experts = sum(p.numel() for p in m.experts.parameters())
                total -= experts - experts * m.k // m.n_experts
        return total


# ---------------------------------------------------------------------------------------------
# builders: config -> modules. One explicit registry; later stage kinds add one entry each.

Shape = tuple[int, ...]  # one sample's shape: (d,), (c, L) or (c, h, w)
NORMS: dict[str, type[nn.Module] | None] = {
    "layernorm": nn.LayerNorm,
    "batchnorm": nn.BatchNorm1d,
    "none": None,
}
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}


def build_dense_stage(cfg: DenseStageConfig, in_shape: Shape) -> nn.Module:
    (d_in,) = in_shape
    return DenseStage(
        d_in,
        cfg.width,
        cfg.layers,
        norm_layer=NORMS[cfg.norm],
        act_layer=ACTIVATIONS[cfg.activation],
        dropout=cfg.dropout,
    )


def build_moe_stage(cfg: MoEStageConfig, in_shape: Shape) -> nn.Module:
    """A vector MoE stage, or on a feature map ``(c, *s)`` one that routes every position
    (``routing: position``) or every sample to conv experts (``routing: sample``)."""
    d_in, spatial = in_shape[0], tuple(in_shape[1:])
    norm = conv_norm(cfg.norm, len(spatial), 1) if spatial else NORMS[cfg.norm]
    if spatial and cfg.routing == "sample":
        moe = ConvMoE(
            in_shape,
            cfg.width,
            cfg.experts,
            cfg.k,
            kernel=cfg.kernel,
            act_layer=ACTIVATIONS[cfg.activation],
            **routing_kwargs(cfg),
        )
        return GatedStage(moe, norm, dropout=cfg.dropout, residual=cfg.residual, spatial=spatial)
    moe = MoE(
        d_in,
        cfg.width,
        cfg.experts,
        cfg.k,
        cfg.expert_hidden,
        act_layer=ACTIVATIONS[cfg.activation],
        expert_dropout=cfg.expert_dropout,
        expert_wirings=expert_wirings(cfg, d_in),
        **routing_kwargs(cfg),
    )
    shared = None
    if cfg.shared_hidden:
        act = ACTIVATIONS[cfg.activation]
        shared = shared_expert(d_in, cfg.shared_hidden, cfg.width, act, cfg.expert_dropout)
    return GatedStage(
        moe, norm, dropout=cfg.dropout, residual=cfg.residual, shared=shared, spatial=spatial
    )


def routing_kwargs(cfg: MoEStageConfig) -> dict[str, Any]:
    """The router, capacity, drop and loss arguments every routed layer takes."""
    return {
        "router": cfg.router,
        "capacity_factor": cfg.capacity_factor,
        "eval_capacity_factor": cfg.eval_capacity_factor,
        "drop": cfg.drop,
        "balance": cfg.balance,
        "balance_weight": cfg.balance_weight,
        "z_loss_weight": cfg.z_loss_weight,
    }


def build_wiring(
    cfg: SparseStageConfig | SparseConvStageConfig, n_in: int, n_out: int, seed: int
) -> Wiring:
    if cfg.wiring == "modular":
        p_inter = cfg.p_inter if isinstance(cfg, SparseStageConfig) else 0.0
        return wiring.modular(
            n_in, n_out, cfg.ensembles, cfg.m, cfg.pattern, seed=seed, p_inter=p_inter
        )
    if cfg.wiring == "random":
        return wiring.random(n_in, n_out, cfg.epsilon, seed=seed)
    if cfg.wiring == "hypergraph":
        return check_widths(wiring.hypergraph_from_file(cfg.hypergraph), n_in, n_out)
    return wiring.dense(n_in, n_out)


def expert_wirings(cfg: MoEStageConfig, d_in: int) -> tuple[Wiring, Wiring] | None:
    """The two modular wirings shared by a sparse MoE stage's experts (seeds from torch's
    generator, so they follow the run's seed)."""
    w = cfg.expert_wiring
    if w is None:
        return None
    s1, s2 = torch.randint(0, 2**31 - 1, (2,)).tolist()
    return (
        wiring.modular(d_in, cfg.expert_hidden, w.ensembles, w.m, w.pattern, seed=s1),
        wiring.modular(cfg.expert_hidden, cfg.width, w.ensembles, w.m, w.pattern, seed=s2),
    )


def build_sparse_stage(cfg: SparseStageConfig, in_shape: Shape) -> nn.Module:
    dims = [in_shape[0]] + [cfg.width] * cfg.layers
    # wiring seeds come from torch's generator, so they follow the run's seed
    seeds = torch.randint(0, 2**31 - 1, (cfg.layers,)).tolist()
    wirings = [
        build_wiring(cfg, n, cfg.width, seed=seed) for n, seed in zip(dims[:-1], seeds, strict=True)
    ]
    return SparseStage(
        wirings,
        norm_layer=NORMS[cfg.norm],
        act_layer=ACTIVATIONS[cfg.activation],
        dropout=cfg.dropout,
    )


def conv_norm(norm: str, n: int, groups: int) -> Callable[[int], nn.Module] | None:
    """The conv stages' norm by name, as ``channels -> module`` (``n`` spatial dims)."""
    if norm == "batchnorm":
        return nn.BatchNorm1d if n == 1 else nn.BatchNorm2d
    if norm == "groupnorm":
        return partial(nn.GroupNorm, groups)
    return ChannelLayerNorm if norm == "layernorm" else None


def build_conv_stage(
    cfg: ConvStageConfig, in_shape: Shape, wirings: list[Wiring] | None = None
) -> nn.Module:
    return ConvStage(
        in_shape,
        cfg.channels,
        cfg.layers,
        kernel=cfg.kernel,
        stride=cfg.stride,
        pool=cfg.pool,
        pool_size=cfg.pool_size,
        norm=conv_norm(cfg.norm, spatial_dims(in_shape), cfg.groups),
        act_layer=ACTIVATIONS[cfg.activation],
        wirings=wirings,
    )


def build_sparse_conv_stage(cfg: SparseConvStageConfig, in_shape: Shape) -> nn.Module:
    """A conv stage with one channel wiring per layer (seeds from torch's generator, so they
    follow the run's seed)."""
    dims = [in_shape[0]] + [cfg.channels] * cfg.layers
    seeds = torch.randint(0, 2**31 - 1, (cfg.layers,)).tolist()
    pairs = zip(dims[:-1], dims[1:], seeds, strict=True)
    return build_conv_stage(cfg, in_shape, [build_wiring(cfg, a, b, s) for a, b, s in pairs])


def build_residual_stage(cfg: ResidualStageConfig, in_shape: Shape) -> nn.Module:
    return ResidualStage(
        in_shape,
        cfg.channels,
        cfg.blocks,
        kernel=cfg.kernel,
        stride=cfg.stride,
        norm=conv_norm(cfg.norm, spatial_dims(in_shape), cfg.groups),
        act_layer=ACTIVATIONS[cfg.activation],
    )


StageBuilder = Callable[[Any, Shape], nn.Module]
STAGE_BUILDERS: dict[str, StageBuilder] = {
    "dense": build_dense_stage,
    "moe": build_moe_stage,
    "sparse": build_sparse_stage,
    "conv": build_conv_stage,
    "residual": build_residual_stage,
    "pool": lambda cfg, in_shape: GlobalPool(in_shape, cfg.mode),
    "flatten": lambda cfg, in_shape: Flatten(in_shape),
    "sparse_conv": build_sparse_conv_stage,
}
VECTOR_KINDS = ("dense", "sparse")  # stage kinds that read a vector [b, d]


def register_stage(kind: str, builder: StageBuilder) -> None:
    """Add a stage kind; a duplicate name is an error."""
    if kind in STAGE_BUILDERS:
        raise ValueError(f"stage kind {kind!r} is already registered")
    STAGE_BUILDERS[kind] = builder


def stage_out_shape(stage: nn.Module) -> Shape:
    """A stage's output shape without the batch: ``out_shape``, else ``(d_out,)``."""
    shape = getattr(stage, "out_shape", None)
    return tuple(shape) if shape is not None else (stage.d_out,)


def build_network(cfg: ModelConfig, in_shape: int | Sequence[int], n_classes: int) -> Network:
    """Build stages in order (each sees the previous one's output shape; ``in_shape`` is one
    input's shape, an int for vectors), then a linear head on the last stage's vector."""
    shape: Shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
    stages = []
    for i, stage_cfg in enumerate(cfg.stages):
        if stage_cfg.kind in VECTOR_KINDS and len(shape) != 1:
            raise ConfigError(
                f"model.stages.{i} (kind {stage_cfg.kind}) needs a vector input but gets a "
                f"feature map of shape {shape}; put a flatten or pool stage before it"
            )
        try:
            stage = STAGE_BUILDERS[stage_cfg.kind](stage_cfg, shape)
        except ValueError as e:  # a size that only clashes with the previous stage's output
            given = f"input width {shape[0]}" if len(shape) == 1 else f"input shape {shape}"
            raise ConfigError(f"model.stages.{i} ({given}): {e}") from None
        stages.append(stage)
        shape = stage_out_shape(stage)
    if len(shape) != 1:
        raise ConfigError(
            f"model.stages.{len(stages) - 1} outputs a feature map of shape {shape}, but the "
            "head needs a vector; end the stages with a flatten or pool stage"
        )
    return Network(stages, nn.Linear(shape[0], n_classes))


def describe_network(model: Network, in_shape: int | Sequence[int]) -> list[dict[str, Any]]:
    """One row per stage and the head: name, output shape, parameter count (as
    :meth:`Network.num_parameters` counts)."""
    rows = []
    x = torch.zeros(2, *((in_shape,) if isinstance(in_shape, int) else in_shape))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.forward_stages(x)
    model.train(was_training)
    parts = [*model.stages, model.head]
    shapes = [f.shape[1:] for f in out.features] + [out.logits.shape[1:]]
    for i, (part, shape) in enumerate(zip(parts, shapes, strict=True)):
        name = f"stage{i}" if i < len(model.stages) else "head"
        params = count_parameters(part)
        rows.append(
            {"name": name, "module": type(part).__name__, "out": list(shape), "params": params}
        )
    return rows
