"""Run configuration: pydantic models, YAML loading, ``--set`` overrides, one-line errors.

Every default lives here, so ``neuroplex config show`` prints every option a run uses.
Errors name the dotted field, the value and what was expected::

    config error: train.lr = -1.0: must be greater than 0
"""

from __future__ import annotations

import difflib
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from neuroplex.errors import ConfigError


class StrictModel(BaseModel):
    """Base for all config sections: unknown keys are errors, floats are finite, and an integer
    field takes integers only (not ``true`` nor ``2.0``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _integers_are_integers(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for key, value in data.items():
            field = cls.model_fields.get(key) if isinstance(key, str) else None
            if field is not None and _not_integers(field.annotation, value):
                raise ValueError(f"{key} = {value!r}: must be an integer")
        return data


SEED = {"ge": 0, "lt": 2**32}  # numpy and scikit-learn take seeds in [0, 2**32)


def _is_int(annotation: Any) -> bool:
    """``int`` or ``int | None`` (possibly Annotated)."""
    if get_origin(annotation) is Annotated:
        return _is_int(get_args(annotation)[0])
    if annotation is int:
        return True
    args = set(get_args(annotation))
    return get_origin(annotation) in (Union, UnionType) and args == {int, type(None)}


def _not_integers(annotation: Any, value: Any) -> bool:
    """Whether ``value`` is a bool or float given to an int (or list of int) field."""
    if _is_int(annotation):
        return isinstance(value, (bool, float))
    if get_origin(annotation) is list and _is_int(get_args(annotation)[0]):
        return isinstance(value, list) and any(isinstance(v, (bool, float)) for v in value)
    return False


class IdxFilesConfig(StrictModel):
    """The four MNIST-format (IDX) files; relative paths are under ``data.root``, and each is
    also looked for with ``.gz`` appended."""

    train_images: str = Field("train-images-idx3-ubyte", description="training images [N, H, W]")
    train_labels: str = Field("train-labels-idx1-ubyte", description="training labels [N]")
    test_images: str = Field("t10k-images-idx3-ubyte", description="test images [M, H, W]")
    test_labels: str = Field("t10k-labels-idx1-ubyte", description="test labels [M]")
    transpose: bool = Field(
        False,
        description="swap each image's rows and columns as read: EMNIST's IDX files store "
        "every image transposed (column by column), so they need true",
    )


class AugmentConfig(StrictModel):
    """Training-batch augmentation of images, drawn per sample from (seed, epoch, step)."""

    crop: int = Field(0, ge=0, description="random crop after zero padding by this many pixels")
    flip: bool = Field(False, description="horizontal flip (last axis) with probability 1/2")


class DataConfig(StrictModel):
    name: Literal[
        "mnist1d", "mnist1d_shifted", "digits", "fashion_mnist", "idx", "images", "file", "python"
    ] = Field(
        "mnist1d",
        description="dataset; mnist1d is generated offline, digits ships with scikit-learn, "
        "fashion_mnist/idx read IDX files from data.root, images a .npz or folder at data.path, "
        "python the arrays, Dataset or DataLoaders given to train(cfg, run_dir, data=...)",
    )
    path: Path | None = Field(
        None,
        description="name=file: a .npz (arrays x, y) or .csv; name=images: a .npz (x [N, H, W] "
        "or [N, C, H, W], y) or a folder with one subfolder of PNG/JPEG files per class",
    )
    root: Path | None = Field(
        None,
        description="fashion_mnist/idx: folder of the IDX files; fashion_mnist defaults to "
        "$NEUROPLEX_DATA/fashion-mnist, then /usr/share/datasets/fashion-mnist",
    )
    idx_files: IdxFilesConfig = Field(default_factory=IdxFilesConfig)
    shape: Literal["flat", "image"] = Field(
        "flat",
        description="flat: vectors [n, d] for dense/sparse/moe stages; image: [n, C, H, W] "
        "([n, 1, 8, 8] digits, [n, 1, 40] mnist1d) for convolutional stages",
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    label_column: str | int = Field(
        "label", description="for .csv files: the label column, by header name or 0-based index"
    )
    num_samples: int = Field(
        5000, ge=100, description="mnist1d*: total samples (5000 = standard 4000/1000 split)"
    )
    val_fraction: float = Field(
        0.1, ge=0, lt=1, description="fraction of the training split held out for validation"
    )
    test_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="digits/images/file/python only: fraction held out as the test split "
        "(python: when no test split is given)",
    )
    standardize: bool = Field(
        True,
        description="scale with training-split statistics: per feature (vectors), per channel "
        "(images and data.shape=image)",
    )
    split_seed: int = Field(
        0, **SEED, description="seed of the train/val/test split (fixed across runs)"
    )

    @model_validator(mode="after")
    def _file_needs_path(self) -> DataConfig:
        if self.name in ("file", "images") and self.path is None:
            what = "a .npz or .csv" if self.name == "file" else "an image .npz or folder"
            raise ValueError(f"path: missing: name={self.name} needs {what} path")
        if self.name == "idx" and self.root is None:
            raise ValueError("root: missing: name=idx needs the folder of the IDX files")
        if self.name == "file" and self.shape == "image":
            raise ValueError(
                "shape = 'image': name=file holds vectors [samples, features]; "
                "use name: images for an image .npz or folder"
            )
        if not self.images and (self.augment.crop or self.augment.flip):
            raise ValueError(
                f"augment = {self.augment.model_dump()}: crop and flip need images; "
                f"set shape: image for {self.name}, or use an image dataset"
            )
        return self

    @property
    def images(self) -> bool:
        """Whether samples are images (scaled per channel, augmentable), flattened or not."""
        return self.name in ("fashion_mnist", "idx", "images") or self.shape == "image"


class DenseStageConfig(StrictModel):
    """``layers`` blocks of Linear -> norm -> activation -> dropout, all of one width."""

    kind: Literal["dense"] = Field("dense", description="stage kind")
    width: int = Field(256, ge=1, description="units per layer")
    layers: int = Field(1, ge=1, description="Linear layers in the stage")
    norm: Literal["layernorm", "batchnorm", "none"] = Field(
        "layernorm", description="normalisation after each Linear"
    )
    activation: Literal["gelu", "relu", "tanh", "silu"] = "gelu"
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout after each activation")


class ExpertWiringConfig(StrictModel):
    """Sparse experts: both expert layers wired modularly (the same wiring for every expert)."""

    ensembles: int = Field(4, ge=1, description="ensembles on each side of each expert layer")
    m: int = Field(1, ge=0, description="input ensembles per output ensemble beyond its own")
    pattern: Literal["ring", "random", "shuffle"] = Field("ring", description="which ones")

    @model_validator(mode="after")
    def _m_below_ensembles(self) -> ExpertWiringConfig:
        if self.m >= self.ensembles:
            raise ValueError(f"m = {self.m}: must be < ensembles ({self.ensembles})")
        return self


class MoEStageConfig(StrictModel):
    """A gated mixture of expert MLPs: each input goes to its top-k experts, then norm, dropout."""

    kind: Literal["moe"] = Field("moe", description="stage kind")
    width: int = Field(256, ge=1, description="output units")
    experts: int = Field(8, ge=1, description="number of experts")
    k: int = Field(2, ge=1, description="experts per input")
    expert_hidden: int = Field(128, ge=1, description="hidden width of each expert MLP")
    router: Literal["noisy_topk", "softmax_topk", "dts_temperature", "dts_activation"] = Field(
        "noisy_topk", description="gating network"
    )
    capacity_factor: float | None = Field(
        None,
        gt=0,
        description="training capacity per expert (x k x inputs / experts); null = no drop",
    )
    eval_capacity_factor: float | None = Field(None, gt=0, description="the same in evaluation")
    drop: Literal["residual", "zero"] = Field(
        "zero", description="output of an input whose every expert was full"
    )
    balance: Literal["cv2", "switch"] = Field("cv2", description="load-balancing loss")
    balance_weight: float = Field(1e-2, ge=0, description="weight of the balance loss")
    z_loss_weight: float = Field(1e-3, ge=0, description="weight of the router z-loss")
    norm: Literal["layernorm", "batchnorm", "none"] = Field("layernorm", description="after mixing")
    activation: Literal["gelu", "relu", "tanh", "silu"] = Field("gelu", description="in experts")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout after the norm")
    expert_dropout: float = Field(
        0.0, ge=0, lt=1, description="dropout on the experts' hidden units"
    )
    residual: bool = Field(
        False, description="norm(x + moe(x)), a residual block; needs width = the input width"
    )
    expert_wiring: ExpertWiringConfig | None = Field(
        None, description="sparse experts (modular wiring of both expert layers); null = dense"
    )
    shared_hidden: int = Field(
        0,
        ge=0,
        description="hidden width of a shared dense expert every input also goes through "
        "(added to the routed output); 0 = none",
    )
    routing: Literal["position", "sample"] = Field(
        "position",
        description="on a feature map: route each position to pointwise MLP experts over the "
        "channels (patch-level MoE), or each whole sample to convolutional experts",
    )
    kernel: int = Field(3, ge=1, description="routing sample: kernel of each conv expert (odd)")

    @model_validator(mode="after")
    def _k_at_most_experts(self) -> MoEStageConfig:
        if self.k > self.experts:
            raise ValueError(f"k = {self.k}: must be <= experts ({self.experts})")
        if self.routing == "sample" and (self.shared_hidden or self.expert_wiring is not None):
            raise ValueError("routing = sample: conv experts take no shared_hidden/expert_wiring")
        return self


class SparseStageConfig(StrictModel):
    """``layers`` sparse layers (SparseLinear over a Wiring) -> norm -> activation -> dropout."""

    kind: Literal["sparse"] = Field("sparse", description="stage kind")
    width: int = Field(256, ge=1, description="units per layer")
    layers: int = Field(1, ge=1, description="sparse layers in the stage")
    wiring: Literal["modular", "random", "dense", "hypergraph"] = Field(
        "modular", description="connectivity builder"
    )
    ensembles: int = Field(8, ge=1, description="modular: ensembles on each side")
    m: int = Field(1, ge=0, description="modular: other input ensembles per output ensemble")
    pattern: Literal["ring", "random", "shuffle"] = Field("ring", description="modular pattern")
    p_inter: float = Field(
        0.0,
        ge=0,
        le=1,
        description="modular: probability of each unit connection between ensembles that are "
        "not linked (G2GNet's sparse inter-module links); > 0 makes a unit-mask wiring",
    )
    epsilon: float = Field(20.0, gt=0, description="random: SET density parameter")
    hypergraph: Path | None = Field(None, description="hypergraph: JSON incidence file")
    norm: Literal["layernorm", "batchnorm", "none"] = Field("layernorm")
    activation: Literal["gelu", "relu", "tanh", "silu"] = "gelu"
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _wiring_arguments(self) -> SparseStageConfig:
        if self.wiring == "modular" and self.m >= self.ensembles:
            raise ValueError(f"m = {self.m}: must be < ensembles ({self.ensembles})")
        if self.wiring == "hypergraph" and self.hypergraph is None:
            raise ValueError("hypergraph: missing; wiring=hypergraph needs a JSON incidence file")
        return self


ConvNorm = Literal["batchnorm", "groupnorm", "layernorm", "none"]


class ConvStageConfig(StrictModel):
    """``layers`` blocks of Conv -> norm -> activation -> pool on a feature map ``(c, L)`` (1-D
    convolutions) or ``(c, h, w)`` (2-D), all with ``channels`` outputs."""

    kind: Literal["conv"] = Field("conv", description="stage kind")
    channels: int = Field(32, ge=1, description="output channels of every conv")
    layers: int = Field(1, ge=1, description="conv layers in the stage")
    kernel: int = Field(3, ge=1, description="kernel size (padding kernel // 2)")
    stride: int = Field(1, ge=1, description="stride of the first conv (later ones: 1)")
    norm: ConvNorm = Field(
        "batchnorm", description="after each conv; layernorm = over the channels per position"
    )
    groups: int = Field(8, ge=1, description="groupnorm: channel groups (must divide channels)")
    activation: Literal["gelu", "relu", "tanh", "silu"] = Field("relu", description="activation")
    pool: Literal["none", "max", "avg"] = Field("none", description="pooling after each block")
    pool_size: int = Field(2, ge=2, description="pooling window and stride")

    @model_validator(mode="after")
    def _groups_divide_channels(self) -> ConvStageConfig:
        return _check_groups(self)


class ResidualStageConfig(StrictModel):
    """``blocks`` ResNet basic blocks (two convs, identity or 1x1-projection shortcut)."""

    kind: Literal["residual"] = Field("residual", description="stage kind")
    channels: int = Field(64, ge=1, description="output channels of every block")
    blocks: int = Field(2, ge=1, description="basic blocks in the stage")
    kernel: int = Field(3, ge=1, description="kernel size (padding kernel // 2)")
    stride: int = Field(
        1, ge=1, description="stride of the first block (a projection shortcut when != 1)"
    )
    norm: ConvNorm = Field("batchnorm", description="after each conv and the projection")
    groups: int = Field(8, ge=1, description="groupnorm: channel groups (must divide channels)")
    activation: Literal["gelu", "relu", "tanh", "silu"] = Field("relu", description="activation")

    @model_validator(mode="after")
    def _groups_divide_channels(self) -> ResidualStageConfig:
        return _check_groups(self)


class SparseConvStageConfig(ConvStageConfig):
    """A conv stage whose channel connectivity is a Wiring between channel ensembles (G2G):
    ``m: 0`` runs as a grouped convolution, ``m > 0`` as gathered channel groups."""

    kind: Literal["sparse_conv"] = Field("sparse_conv", description="stage kind")
    wiring: Literal["modular", "random", "dense", "hypergraph"] = Field(
        "modular", description="channel connectivity builder"
    )
    ensembles: int = Field(4, ge=1, description="modular: channel ensembles on each side")
    m: int = Field(0, ge=0, description="modular: other input ensembles per output ensemble")
    pattern: Literal["ring", "random", "shuffle"] = Field("ring", description="modular pattern")
    epsilon: float = Field(20.0, gt=0, description="random: SET density parameter")
    hypergraph: Path | None = Field(None, description="hypergraph: JSON incidence file")

    @model_validator(mode="after")
    def _wiring_arguments(self) -> SparseConvStageConfig:
        return SparseStageConfig._wiring_arguments(self)


def _check_groups(cfg: Any) -> Any:
    if cfg.norm == "groupnorm" and cfg.channels % cfg.groups:
        raise ValueError(f"groups = {cfg.groups}: must divide channels ({cfg.channels})")
    return cfg


class PoolStageConfig(StrictModel):
    """Global pooling of a feature map to one value per channel: ``(c, *s) -> (c,)``."""

    kind: Literal["pool"] = Field("pool", description="stage kind")
    mode: Literal["avg", "max"] = Field("avg", description="average or maximum over positions")


class FlattenStageConfig(StrictModel):
    """A feature map as one vector: ``(c, *s) -> (c * prod(s),)``."""

    kind: Literal["flatten"] = Field("flatten", description="stage kind")


# The discriminator is ``kind``; a new stage kind adds its config here and a builder in stages.py.
StageConfig = Annotated[
    Union[  # noqa: UP007
        DenseStageConfig,
        MoEStageConfig,
        SparseStageConfig,
        ConvStageConfig,
        ResidualStageConfig,
        PoolStageConfig,
        FlattenStageConfig,
        SparseConvStageConfig,
    ],
    Field(discriminator="kind"),
]


def _four_dense_stages() -> list[DenseStageConfig]:
    return [DenseStageConfig() for _ in range(4)]


class ModelConfig(StrictModel):
    stages: list[StageConfig] = Field(
        default_factory=_four_dense_stages, min_length=1, description="ordered stages"
    )


class AuxConfig(StrictModel):
    """Auxiliary networks of `train.method: local`: one per stage, the last stage uses the head."""

    kind: Literal["linear", "mlp", "augmented", "momentum"] = Field(
        "augmented",
        description="linear: linear classifier; mlp: 2-layer MLP; augmented: AugLocal, copies "
        "of later layers; momentum: MAN, trainable + EMA copy of the next stage's first layer",
    )
    hidden: int = Field(128, ge=1, description="mlp, momentum: hidden width of the classifier")
    width: int = Field(
        56, ge=1, description="augmented: width of the copied later vector (dense) layers"
    )
    widen: float = Field(
        1.0,
        gt=0,
        description="augmented: channels of a copied conv / residual layer = widen x its own "
        "channels (AugLocal's aux_net_widen; 1 in its scripts)",
    )
    max_depth: int = Field(
        3, ge=1, description="augmented: layers in stage 0's aux net, decaying linearly"
    )
    depth_coeff: float = Field(
        0.5,
        ge=0,
        le=1,
        description="augmented: depth decay c; the second-to-last stage gets "
        "max_depth - c*(max_depth - 1) layers (AugLocal's scripts: 0.5)",
    )
    picks: Literal["end", "spread"] = Field(
        "end",
        description="augmented: end: uniform steps ending at the last layer (AugLocal's code); "
        "spread: evenly spaced from the first later layer to the last",
    )
    reduce: Literal["network", "avg"] = Field(
        "network",
        description="augmented on feature maps: how the aux net's last map becomes a vector; "
        "network: as the network does it (its next pool or flatten stage; AugLocal's aux nets "
        "end in its ResNets' own avgpool + fc head); avg: global average pool",
    )
    momentum: float = Field(0.995, ge=0, lt=1, description="momentum: EMA decay")


class PlasticityConfig(StrictModel):
    """Rewiring of the sparse layers during training (neuroplex.plasticity.schedule)."""

    kind: Literal["set", "rigl", "hebbian", "block_set", "block_rigl"] = Field(
        "set",
        description="set: drop the weights of each sign closest to zero, regrow at random; "
        "rigl: drop smallest |w|, regrow at the largest |dense gradient|; hebbian: swap "
        "ensemble pairs by activation correlation; block_set / block_rigl: set / rigl on whole "
        "ensemble blocks",
    )
    every: int = Field(100, ge=1, description="steps between rewiring events")
    fraction: float = Field(
        0.3,
        gt=0,
        le=1,
        description="initial fraction of active connections (ensemble pairs for hebbian and "
        "block kinds) swapped per event; cosine-annealed to 0 at end_step",
    )
    end_step: int | None = Field(
        None, ge=1, description="last rewiring before this step; null = end of training"
    )
    probe_size: int = Field(256, ge=2, description="hebbian: training samples in the probe")
    hebbian_output: Literal["activation", "linear"] = Field(
        "activation",
        description="hebbian: what each layer's input is correlated with; activation: the "
        "output of its block's activation (post-synaptic activity, G2GNet); linear: the layer's "
        "own output before the norm",
    )
    prune_rule: Literal["sign_split", "magnitude"] | None = Field(
        None,
        description="set / rigl: which active connections are dropped; sign_split: zeta of the "
        "positive and zeta of the negative weights, the ones closest to zero (SET's reference); "
        "magnitude: zeta of all, smallest |w| (RigL); null = each paper's own rule",
    )

    @model_validator(mode="after")
    def _prune_rule_for_unit_kinds(self) -> PlasticityConfig:
        if self.prune_rule is not None and self.kind not in ("set", "rigl"):
            raise ValueError(
                f"prune_rule = {self.prune_rule!r}: applies to kind set or rigl only, not "
                f"{self.kind!r}; set prune_rule: null"
            )
        return self


class ExitsConfig(StrictModel):
    """Early exit, JEI-DNN (`eval --exits`): exit gates and exit classifiers trained on the
    frozen network after the main run, one set per trade-off ``λ``."""

    lambdas: list[Annotated[float, Field(ge=0)]] = Field(
        [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0],
        min_length=1,
        description="JEI-DNN trade-off λ: gate targets minimise CE_l + λ·cost_l (cost_l = stages "
        "run / all stages); gates and exit classifiers are trained once per value",
    )
    gate_split: Literal["val", "train"] = Field(
        "val",
        description="split the gates train on; JEI-DNN uses train, but a local run's heads "
        "already fit it (train CE near 0, every target would be the first exit)",
    )
    classifier_split: Literal["train", "val"] = Field(
        "train",
        description="split the exit classifiers train on (JEI-DNN: train); val is small and "
        "they overfit it",
    )
    classifier_loss: Literal["exit_prob", "uniform", "frozen"] = Field(
        "exit_prob",
        description="exit classifiers' loss: CE weighted by the gates' exit probabilities "
        "(JEI-DNN), plain mean CE (what the reference's non-detached rescaling computes), or "
        "not trained (gates only)",
    )
    gate_balance: Literal["exact", "cumulative"] = Field(
        "exact",
        description="weight of gate l's 1 targets = #0/#1 with #1 counted as samples whose "
        "optimal exit is l (exact, the reference code) or at or before l (cumulative, gate l's "
        "actual 1 targets)",
    )
    steps: int = Field(1000, ge=1, description="optimizer steps per λ, both phases together")
    phase_steps: int = Field(
        100, ge=1, description="steps before switching between the gate and classifier phases"
    )
    batch_size: int = Field(64, ge=1, description="samples per step")
    lr: float = Field(1e-2, gt=0, description="SGD (momentum 0.9) peak lr, cosine to 2% of it")
    weight_decay: float = Field(5e-4, ge=0, description="SGD weight decay")


class PipelineConfig(StrictModel):
    balance: Literal["time", "params"] = Field(
        "time",
        description="how train.parallel splits the stages into groups: by the measured time of "
        "each stage + aux net and of sending its output (time) or by trainable parameters "
        "(params)",
    )
    timing_batches: int = Field(
        10,
        ge=1,
        le=1000,
        description="batches each stage is timed on before the run "
        "(interleaved rounds, after a warm-up round), and transfers of each stage's output",
    )


class TrainConfig(StrictModel):
    method: Literal["backprop", "local"] = Field(
        "backprop", description="backprop: end to end; local: per-stage auxiliary networks"
    )
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="optimizer")
    lr: float = Field(3e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.01, ge=0, description="applied to weight matrices only")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adamw only")
    batch_size: int = Field(100, ge=1, description="training batch size")
    epochs: int = Field(20, ge=1, description="passes over the training split")
    steps: int | None = Field(None, ge=1, description="if set, train this many steps instead")
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="learning-rate decay after warmup"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warmup from 0 to lr")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr / peak lr (cosine)")
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm; null = off")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy smoothing")
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    save_epochs: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list,
        description="keep the model weights after these epochs (0 = the initial weights) in "
        "rewind/, for neuroplex prune --rewind-epoch",
    )
    parallel: int = Field(
        1,
        ge=1,
        description="local only: processes training the stages as a pipeline, one stage group "
        "each (1 = sequential); under torchrun the ranks are train.parallel groups x "
        "data-parallel replicas",
    )
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    precision: Literal["32", "bf16-mixed", "16-mixed"] = Field(
        "32",
        description="Lightning's names: 32 = float32; bf16-mixed / 16-mixed = forward and loss "
        "under torch.autocast in bfloat16 / float16 (16-mixed: CUDA only, with a GradScaler)",
    )
    compile: bool = Field(
        False, description="torch.compile every stage and the head (nn.Module.compile, in place)"
    )
    channels_last: bool = Field(
        False,
        description="2-D feature maps and conv weights in channels-last memory order (timm's "
        "--channels-last); the same numbers up to float rounding, faster convolutions",
    )
    aux: AuxConfig = Field(default_factory=AuxConfig)
    plasticity: PlasticityConfig | None = Field(
        None, description="rewiring of the sparse layers during training; null = off"
    )
    exits: ExitsConfig = Field(default_factory=ExitsConfig)

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_32_as_number(cls, value: object) -> object:
        return "32" if value == 32 and not isinstance(value, bool) else value  # YAML `32`

    @model_validator(mode="after")
    def _check_betas(self) -> TrainConfig:
        for i, b in enumerate(self.betas):
            if not 0 <= b < 1:
                raise ValueError(f"betas.{i} = {b}: must be in [0, 1)")
        return self

    @model_validator(mode="after")
    def _plasticity_without_ema_copies(self) -> TrainConfig:
        if self.plasticity is not None and self.method == "local" and self.aux.kind == "momentum":
            raise ValueError(
                "plasticity: not supported with method local and aux.kind momentum (the EMA "
                "copy of a layer cannot follow its rewiring); use another aux.kind"
            )
        return self


class LogConfig(StrictModel):
    """Loggers fed every step (loss, lr), every epoch (the metrics.jsonl record) and every
    rewiring event (neuroplex.train.loggers)."""

    tensorboard: bool = Field(
        True, description="TensorBoard event files in RUN_DIR/tensorboard (torch.utils.tensorboard)"
    )
    csv: bool = Field(True, description="RUN_DIR/steps.csv (step, epoch, loss, lr), metrics.csv")
    wandb: bool = Field(False, description="Weights & Biases (pip install 'neuroplex[wandb]')")
    mlflow: bool = Field(False, description="MLflow tracking (pip install 'neuroplex[mlflow]')")
    project: str = Field(
        "neuroplex", min_length=1, description="wandb project / mlflow experiment name"
    )


class Config(StrictModel):
    name: str = Field("run", min_length=1, description="run name (prefix of the run dir)")
    seed: int = Field(0, **SEED, description="the one seed: init, shuffling, dropout")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda if present")
    threads: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="torch CPU threads; null = torch default (1 per process when "
        "train.parallel > 1)",
    )
    output_dir: Path = Field(Path("runs"), description="parent of run directories")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @model_validator(mode="after")
    def _name_stays_in_output_dir(self) -> Config:
        if any(c in self.name for c in "/\\\0") or self.name in (".", ".."):
            raise ValueError(
                f"name = {self.name!r}: must be a plain name (no '/', '\\', not '.' or '..'); "
                "the run dir is OUTPUT_DIR/NAME-TIMESTAMP"
            )
        return self

    @model_validator(mode="after")
    def _plasticity_needs_sparse_stages(self) -> Config:
        plasticity = self.train.plasticity
        if plasticity is None:
            return self
        wired = (SparseStageConfig, SparseConvStageConfig)
        if not any(isinstance(s, wired) for s in self.model.stages):
            raise ValueError(
                "train.plasticity: the model has no sparse stage to rewire; add a stage with "
                "kind: sparse or sparse_conv, or set train.plasticity: null"
            )
        convs = [i for i, s in enumerate(self.model.stages) if isinstance(s, SparseConvStageConfig)]
        if plasticity.kind not in BLOCK_KINDS and convs:
            raise ValueError(
                f"train.plasticity.kind = {plasticity.kind!r}: model.stages.{convs[0]} is a "
                "sparse_conv stage, which rewires channel ensembles only; use kind block_set, "
                "block_rigl or hebbian"
            )
        unit = [i for i, s in enumerate(self.model.stages) if _unit_mask_stage(s)]
        if plasticity.kind in BLOCK_KINDS and unit:
            raise ValueError(
                f"train.plasticity.kind = {plasticity.kind!r}: needs ensemble (block) wirings, "
                f"but model.stages.{unit[0]} has a unit-mask wiring (wiring: random, or "
                "modular with p_inter > 0); use kind set or rigl"
            )
        return self

    @model_validator(mode="after")
    def _pipeline_needs_local_stages(self) -> Config:
        n, stages = self.train.parallel, len(self.model.stages)
        if n == 1:
            return self
        if self.train.method != "local":
            raise ValueError(
                f"train.parallel = {n}: needs train.method = 'local' (backprop sends gradients "
                "back through every stage), or set train.parallel = 1"
            )
        if n > stages:
            raise ValueError(
                f"train.parallel = {n}: must be <= the number of stages ({stages}), "
                "one stage group per process"
            )
        if self.train.aux.kind == "momentum":
            raise ValueError(
                f"train.aux.kind = 'momentum': not supported with train.parallel = {n} (its EMA "
                "follows the next stage, which another process trains); use linear, mlp or "
                "augmented"
            )
        if self.train.plasticity is not None:
            raise ValueError(
                f"train.plasticity: not supported with train.parallel = {n} (rewiring runs in "
                "one process); set train.parallel = 1 or train.plasticity: null"
            )
        return self


BLOCK_KINDS = ("hebbian", "block_set", "block_rigl")  # plasticity kinds that rewire ensembles


def _unit_mask_stage(stage: object) -> bool:
    """Whether a stage's wiring is a unit mask (random, or modular with inter-module links)."""
    wiring = getattr(stage, "wiring", "")
    return wiring == "random" or (wiring == "modular" and getattr(stage, "p_inter", 0) > 0)


# ---------------------------------------------------------------------------------------------
# loading


ConfigSource = Union["Config", dict, str, Path, None]


def load_config(
    source: ConfigSource = None, overrides: list[str] | None = None, **fields: Any
) -> Config:
    """Defaults, overlaid with ``source``, then ``fields``, then ``KEY=VALUE`` ``overrides``;
    validated. Raises ConfigError with a one-line message.

    ``source`` is a YAML file, the name of a shipped config (``"default"``, see
    :func:`shipped_configs`), a dict of the same form as the YAML, a ``Config``, or None (the
    defaults). ``fields`` are top-level keys laid over it like the YAML (mappings merge key by
    key): ``load_config("default", seed=1, train={"lr": 1e-3})``.
    """
    raw = merge(Config().model_dump(mode="json"), _source_dict(source))
    raw = merge(raw, fields)
    for item in overrides or []:
        apply_override(raw, item)
    return validate_config(raw)


def _source_dict(source: ConfigSource) -> dict[str, Any]:
    """The mapping a config source lays over the defaults."""
    if source is None:
        return {}
    if isinstance(source, Config):
        return source.model_dump(mode="json")
    if isinstance(source, dict):
        return source
    if isinstance(source, (str, Path)):
        return read_yaml(resolve_config_path(source))
    raise ConfigError(
        f"config = {source!r}: expected a YAML path, a shipped config name, a dict or a Config, "
        f"got {type(source).__name__}"
    )


def shipped_configs() -> dict[str, Path]:
    """The configs shipped with the package (``neuroplex/configs/*.yaml``, the repository's
    ``configs/`` folder), by name: ``{"default": .../default.yaml, ...}``."""
    root = Path(__file__).resolve().parent / "configs"
    return {path.stem: path for path in sorted(root.glob("*.yaml"))}


def shipped_config_summaries() -> dict[str, str]:
    """Each shipped config's name and the first sentence of its leading comment."""
    summaries = {}
    for name, path in shipped_configs().items():
        lines = path.read_text(encoding="utf-8").splitlines()
        comment = []
        for line in lines:
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("#").strip())
        text = " ".join(comment)
        summaries[name] = text.split(". ")[0].rstrip(".")
    return summaries


def resolve_config_path(path: str | Path) -> Path:
    """``path`` itself when it is a file; else the shipped config of that name (``default`` or
    ``default.yaml``); else ``path`` (reading it then says it is not found)."""
    path = Path(path)
    if path.is_file() or path.parent != Path("."):
        return path
    return shipped_configs().get(path.name.removesuffix(".yaml"), path)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` laid over ``base``: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (else the last one wins)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                duplicate = False
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice", key_node.start_mark
                )
        return super().construct_mapping(node, deep)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        shipped = ", ".join(shipped_configs())
        hint = f", nor a shipped config ({shipped})" if path.parent == Path(".") else ""
        raise ConfigError(f"{path}: file not found{hint}")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x})"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise ConfigError(f"{path}: YAML parse error{where}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(raw).__name__}")
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply ``a.b.0.c=value`` to the nested dict/list ``raw`` in place (value parsed as YAML)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=3e-3")
    try:
        value = parse_yaml(text) if text.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {item!r}: value {text!r} is not a valid YAML scalar") from None
    *parents, last = key.split(".")
    node: Any = raw
    walked: list[str] = []
    for part in parents:
        walked.append(part)
        child = _child(node, part, walked, item)
        if child is None:
            child = {}
            _assign(node, part, child, walked, item)
        node = child
    _assign(node, last, value, [*walked, last], item)


def _child(node: Any, part: str, walked: list[str], item: str) -> Any:
    if isinstance(node, dict):
        return node.get(part)
    if isinstance(node, list):
        return node[_list_index(node, part, walked, item)]
    raise ConfigError(f"--set {item!r}: {'.'.join(walked[:-1])} is a value, not a section")


def _assign(node: Any, part: str, value: Any, walked: list[str], item: str) -> None:
    if isinstance(node, dict):
        node[part] = value
    elif isinstance(node, list):
        node[_list_index(node, part, walked, item)] = value
    else:
        raise ConfigError(f"--set {item!r}: {'.'.join(walked[:-1])} is a value, not a section")


def _list_index(node: list, part: str, walked: list[str], item: str) -> int:
    path = ".".join(walked[:-1])
    if not part.isdigit():
        raise ConfigError(f"--set {item!r}: {path} is a list; {part!r} is not an index")
    index = int(part)
    if index >= len(node):
        raise ConfigError(
            f"--set {item!r}: {path} has {len(node)} entries; index {index} is out of range"
        )
    return index


def validate_config(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, raw)) from None


def format_validation_error(
    error: ValidationError, raw: Any, root: type[BaseModel] = Config
) -> str:
    """First error of ``error`` as ``dotted.path = value: what was expected``."""
    first = error.errors()[0]
    path, model = _clean_loc(first["loc"], raw, root)
    dotted = ".".join(str(p) for p in path) or "(top level)"
    kind, ctx, message = first["type"], first.get("ctx") or {}, first["msg"]
    if kind == "extra_forbidden":
        fields = list(model.model_fields) if model is not None else []  # model holding the key
        hint = difflib.get_close_matches(str(path[-1]), fields, n=1)
        suggestion = (
            f"; did you mean {hint[0]!r}?" if hint else f"; valid keys: {', '.join(fields)}"
        )
        return f"{dotted}: unknown key{suggestion}"
    if kind == "missing":
        return f"{dotted}: missing required value"
    if kind == "union_tag_invalid":
        return f"{dotted}.kind = {ctx.get('tag')!r}: must be one of {ctx.get('expected_tags')}"
    if kind == "union_tag_not_found":
        return f"{dotted}.kind: missing; every stage needs a kind"
    if kind == "value_error":  # a model validator: its message is relative to the model
        text = str(ctx.get("error", message))
        return f"{dotted}.{text}" if path else text
    value = _lookup(raw, path)
    expected = message.replace("Input should be", "must be").replace("Input ", "")
    return f"{dotted} = {value!r}: {expected}"


def _clean_loc(
    loc: tuple, raw: Any, root: type[BaseModel]
) -> tuple[list[str | int], type[BaseModel] | None]:
    """Drop pydantic's union-tag entries from ``loc``; return the path and the model that holds
    its last key."""
    path: list[str | int] = []
    model: type[BaseModel] | None = root
    parent = model
    for part in loc:
        node = _lookup(raw, path)
        if isinstance(part, str) and isinstance(node, dict) and node.get("kind") == part:
            model = STAGE_CONFIGS.get(part)
            continue
        path.append(part)
        if isinstance(part, int):
            continue
        parent = model
        if model is not None and part in model.model_fields:
            model = model_in(model.model_fields[part].annotation)
        else:
            model = None
    return path, parent


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``annotation`` (Config, list[Config], Config | None)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = model_in(arg)
        if found is not None:
            return found
    return None


def _lookup(raw: Any, path: list[str | int]) -> Any:
    node = raw
    for part in path:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


STAGE_CONFIGS: dict[str, type[BaseModel]] = {
    "dense": DenseStageConfig,
    "moe": MoEStageConfig,
    "sparse": SparseStageConfig,
    "conv": ConvStageConfig,
    "residual": ResidualStageConfig,
    "pool": PoolStageConfig,
    "flatten": FlattenStageConfig,
    "sparse_conv": SparseConvStageConfig,
}


def to_yaml(config: Config) -> str:
    """The fully resolved config as YAML (every option, defaults included)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
