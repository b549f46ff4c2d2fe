"""Run configuration: pydantic models, YAML loading, ``--set`` overrides, one-line errors.

Every default lives here, so ``neuroplex config show`` prints every option a run uses.
Errors name the dotted field, the value and what was expected::

    config error: train.lr = -1.0: must be greater than 0
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from neuroplex.errors import ConfigError


class StrictModel(BaseModel):
    """Base for all config sections: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class DataConfig(StrictModel):
    name: Literal["mnist1d", "mnist1d_shifted", "digits", "file"] = Field(
        "mnist1d",
        description="dataset; mnist1d is generated offline, digits ships with scikit-learn",
    )
    path: Path | None = Field(None, description="for name=file: a .npz (arrays x, y) or .csv")
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
        0.2, gt=0, lt=1, description="digits/file only: fraction held out as the test split"
    )
    standardize: bool = Field(True, description="scale features with training-split statistics")
    split_seed: int = Field(0, description="seed of the train/val/test split (fixed across runs)")

    @model_validator(mode="after")
    def _file_needs_path(self) -> DataConfig:
        if self.name == "file" and self.path is None:
            raise ValueError("path: missing: name=file needs a .npz or .csv path")
        return self


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

    @model_validator(mode="after")
    def _k_at_most_experts(self) -> MoEStageConfig:
        if self.k > self.experts:
            raise ValueError(f"k = {self.k}: must be <= experts ({self.experts})")
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


# The discriminator is ``kind``; a new stage kind adds its config here and a builder in stages.py.
StageConfig = Annotated[
    Union[DenseStageConfig, MoEStageConfig, SparseStageConfig],  # noqa: UP007
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
    width: int = Field(56, ge=1, description="augmented: width of the copied later layers")
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
    momentum: float = Field(0.995, ge=0, lt=1, description="momentum: EMA decay")


class PlasticityConfig(StrictModel):
    """Rewiring of the sparse layers during training (neuroplex.train.plasticity)."""

    kind: Literal["set", "rigl", "hebbian", "block_set", "block_rigl"] = Field(
        "set",
        description="set: prune smallest |w|, regrow at random; rigl: regrow largest |dense "
        "gradient|; hebbian: swap ensemble pairs by activation correlation; block_set / "
        "block_rigl: set / rigl on whole ensemble blocks",
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
        "each (1 = sequential)",
    )
    aux: AuxConfig = Field(default_factory=AuxConfig)
    plasticity: PlasticityConfig | None = Field(
        None, description="rewiring of the sparse layers during training; null = off"
    )

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


class Config(StrictModel):
    name: str = Field("run", min_length=1, description="run name (prefix of the run dir)")
    seed: int = Field(0, description="the one seed: init, shuffling, dropout")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda if present")
    threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads; null = torch default (1 per process when "
        "train.parallel > 1)",
    )
    output_dir: Path = Field(Path("runs"), description="parent of run directories")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _plasticity_needs_sparse_stages(self) -> Config:
        plasticity = self.train.plasticity
        if plasticity is None:
            return self
        sparse = [s for s in self.model.stages if isinstance(s, SparseStageConfig)]
        if not sparse:
            raise ValueError(
                "train.plasticity: the model has no sparse stage to rewire; add a stage with "
                "kind: sparse or set train.plasticity: null"
            )
        unit = [i for i, s in enumerate(self.model.stages) if getattr(s, "wiring", "") == "random"]
        if plasticity.kind in BLOCK_KINDS and unit:
            raise ValueError(
                f"train.plasticity.kind = {plasticity.kind!r}: needs ensemble (block) wirings, "
                f"but model.stages.{unit[0]} has wiring: random; use kind set or rigl"
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


# ---------------------------------------------------------------------------------------------
# loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, overlaid with the YAML file (if any), then ``KEY=VALUE`` overrides; validated.
    Raises ConfigError with a one-line message."""
    raw = merge(Config().model_dump(mode="json"), read_yaml(path) if path is not None else {})
    for item in overrides or []:
        apply_override(raw, item)
    return validate_config(raw)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` laid over ``base``: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
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
        value = yaml.safe_load(text) if text.strip() else None
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
}


def to_yaml(config: Config) -> str:
    """The fully resolved config as YAML (every option, defaults included)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
