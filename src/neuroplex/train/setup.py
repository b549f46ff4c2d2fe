"""Everything a run needs, built from its config in a fixed order (same seed, same run)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from neuroplex.config import Config
from neuroplex.data.registry import Dataset, load_dataset
from neuroplex.data.stream import StreamDataset
from neuroplex.distributed.parallel import World
from neuroplex.errors import ConfigError
from neuroplex.methods.backprop import Backprop
from neuroplex.methods.local import Local
from neuroplex.network import Network, build_network
from neuroplex.plasticity.schedule import NullPlasticity, Plasticity, build_plasticity
from neuroplex.train.callbacks import Callbacks
from neuroplex.train.method import Method
from neuroplex.train.precision import compile_stages

METHODS: dict[str, type[Method]] = {"backprop": Backprop, "local": Local}


@dataclass
class Setup:
    """Everything a run needs, built from its config."""

    cfg: Config
    device: torch.device
    data: Dataset | StreamDataset
    model: Network
    method: Method
    world: World = field(default_factory=World)
    plasticity: Plasticity | NullPlasticity = field(default_factory=NullPlasticity)
    callbacks: Callbacks = field(default_factory=Callbacks)  # rank 0's loggers and user hooks

    @cached_property
    def scheduled(self) -> list[nn.Module]:
        """Modules that follow training progress (``set_progress``, e.g. dense-to-sparse
        routers), found once: rewiring changes layers in place, never the module tree."""
        return [m for m in self.model.modules() if hasattr(m, "set_progress")]

    @property
    def steps_per_epoch(self) -> int:
        return self.data.steps_per_epoch(self.cfg.train.batch_size)

    @property
    def total_steps(self) -> int:
        return self.cfg.train.steps or self.cfg.train.epochs * self.steps_per_epoch

    @property
    def total_epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)


def build_setup(
    cfg: Config,
    world: World | None = None,
    prepare: Callable[[Network], None] | None = None,
    data: Any = None,
) -> Setup:
    """Seed, then data, model and method, in a fixed order (so the same seed gives the same run).
    ``prepare``, if given, changes the model before the method (and its optimizers) is built;
    ``data`` is the data given from Python (``data.name: python``, neuroplex.data.python)."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device, world or World())
    data = load_dataset(cfg.data, data)
    check_stream(cfg, data, world or World())
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data, device)
    if prepare is not None:
        prepare(model)
    if cfg.train.compile:
        compile_stages(model)
    method = METHODS[cfg.train.method](model, cfg)
    if cfg.train.channels_last:  # 4-D weights only; the Parameters (and optimizers) stay
        for part in method.modules():
            part.to(memory_format=torch.channels_last)
    s = Setup(cfg, device, data, model, method, world or World())
    check_batchnorm_batches(s)
    s.plasticity = build_plasticity(
        cfg, model, method.optimizers, data.train, s.total_steps, s.world
    )
    return s


def check_stream(cfg: Config, data: Dataset | StreamDataset, world: World) -> None:
    """What streamed data (DataLoaders) cannot do: several ranks, Hebbian probes."""
    if not isinstance(data, StreamDataset):
        return
    if world.size > 1:
        raise ConfigError(
            f"data: DataLoaders stream in one process; this run has {world.size} ranks (pass "
            "arrays or a Dataset: each rank then trains on its share of every batch)"
        )
    plasticity = cfg.train.plasticity
    if plasticity is not None and plasticity.kind == "hebbian":
        raise ConfigError(
            "train.plasticity.kind = 'hebbian': its probe batch needs in-memory training data; "
            "pass arrays or a Dataset, or use set / rigl"
        )


def build_model(cfg: Config, data: Dataset | StreamDataset, device: torch.device) -> Network:
    """The network of ``cfg.model``; ConfigError if it cannot be allocated."""
    try:
        return build_network(cfg.model, data.input_shape, data.n_classes).to(device)
    except (RuntimeError, MemoryError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"model.stages: the network cannot be allocated ({first[:160]}); make the stages "
            "smaller"
        ) from e


def check_batchnorm_batches(s: Setup) -> None:
    """Batchnorm cannot normalise a training batch of one sample: refuse a batch size that
    makes one (every batch, or the last of each epoch)."""
    bs, n = s.cfg.train.batch_size, len(s.data.train)
    norms = (m for part in s.method.modules() for m in part.modules())
    batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in norms)
    if batchnorm and isinstance(s.data, StreamDataset) and s.data.smallest_batch == 1:
        raise ConfigError(
            "data['train']: the DataLoader yields a batch of 1 sample, which batchnorm cannot "
            "normalise; use drop_last=True, another batch size, or norm: layernorm"
        )
    if batchnorm and not isinstance(s.data, StreamDataset) and (bs == 1 or n % bs == 1):
        which = "every batch" if bs == 1 else "the last batch of each epoch"
        raise ConfigError(
            f"train.batch_size = {bs}: with {n} training samples {which} has 1 sample, which "
            "batchnorm cannot normalise; choose another batch size or norm: layernorm"
        )


def resolve_device(name: str, world: World) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda': no CUDA device is available; use 'cpu' or 'auto'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(f"cuda:{world.local_rank}") if name == "cuda" else torch.device(name)
