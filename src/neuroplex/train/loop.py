"""The one training loop. The method (``backprop``, ``local``) is an object with ``step``.

Run directory written (by rank 0) through neuroplex.train.rundir::

    config.yaml      the resolved config
    metrics.jsonl    one JSON line per epoch (losses, accuracies, lr, samples/s, wall time)
    plasticity.jsonl one JSON line per rewiring event (neuroplex.train.plasticity), if enabled
    checkpoints/     see neuroplex.train.checkpoint
    rewind/          epoch-EEEE.safetensors: model weights after the epochs in train.save_epochs
    summary.json     final figures, written when the run ends (or stops, or diverges)

Shape legend: ``b`` batch, ``d`` features.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from neuroplex.config import Config
from neuroplex.errors import TrainingDiverged
from neuroplex.files import append_jsonl
from neuroplex.network import Network
from neuroplex.train.evaluate import evaluate_splits
from neuroplex.train.memory import ActivationMeter
from neuroplex.train.optim import lr_at
from neuroplex.train.parallel import close_world, init_world
from neuroplex.train.progress import NullProgress
from neuroplex.train.rundir import (
    LoopState,
    restore,
    save,
    save_rewind_point,
    start_run_dir,
    write_summary,
)
from neuroplex.train.setup import Setup, build_setup


def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    stop_after_epoch: int | None = None,
    progress: NullProgress | None = None,
    prepare: Callable[[Network], None] | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir`` (or continue it with ``resume``); return the summary.

    ``stop_after_epoch`` ends the session after that many epochs with a checkpoint, so a long run
    can be done in pieces; resuming it gives the same metrics as an uninterrupted run.
    ``prepare`` changes the freshly built model before the method sees it (e.g. a pruned
    lottery ticket, neuroplex.train.prune).
    """
    run_dir = Path(run_dir)
    world = init_world()
    try:
        s = build_setup(cfg, world, prepare)
        if not world.is_main:
            progress = None  # one progress display, on rank 0
        state = restore(run_dir, s) if resume else start_run_dir(run_dir, s)
        return run_epochs(s, state, run_dir, stop_after_epoch, progress or NullProgress())
    finally:
        close_world(world)


def run_epochs(
    s: Setup, state: LoopState, run_dir: Path, stop_after_epoch: int | None, progress: NullProgress
) -> dict[str, Any]:
    meter = ActivationMeter(p for m in s.method.modules() for p in m.parameters())
    meter.peak = state.activation_peak
    last_epoch = (
        s.total_epochs if stop_after_epoch is None else min(stop_after_epoch, s.total_epochs)
    )
    progress.start(s.total_steps, state.step)
    try:
        for epoch in range(state.epoch, last_epoch):
            save_rewind_point(run_dir, s, epoch)  # if train.save_epochs lists it
            record = run_epoch(s, state, meter, epoch, run_dir, progress)
            if s.world.is_main:
                append_jsonl(run_dir / "metrics.jsonl", record)
            progress.epoch_end(record)
            if state.epoch % s.cfg.train.checkpoint_every == 0 or state.epoch == last_epoch:
                save(run_dir, s, state, best=record["is_best"])
    except TrainingDiverged as e:
        write_summary(run_dir, s, state, status="diverged", error=str(e))
        raise
    finally:
        progress.close()
    status = "completed" if state.epoch >= s.total_epochs else "stopped"
    return write_summary(run_dir, s, state, status=status)


def run_epoch(
    s: Setup,
    state: LoopState,
    meter: ActivationMeter,
    epoch: int,
    run_dir: Path,
    progress: NullProgress,
) -> dict[str, Any]:
    """Train one epoch, evaluate, update ``state``; return the metrics record."""
    s.model.train()
    train_split = s.data.train
    order = epoch_order(len(train_split), s.cfg.seed, epoch, s.device)
    bs = s.cfg.train.batch_size
    loss_sum, correct, seen, lr = 0.0, 0, 0, 0.0
    stat_sums: dict[str, float] = {}
    scheduled = [m for m in s.model.modules() if hasattr(m, "set_progress")]
    t0 = time.perf_counter()
    for start in range(0, len(order), bs):
        if state.step >= s.total_steps:
            break
        idx = s.world.shard(order[start : start + bs])
        x, y = train_split.x[idx], train_split.y[idx]
        lr = lr_at(state.step, s.total_steps, s.cfg.train)
        for module in scheduled:  # e.g. dense-to-sparse routers anneal with training progress
            module.set_progress(state.step / max(s.total_steps - 1, 1))
        with meter.track():
            result = s.method.step(x, y, lr)
        loss = float(result.loss)
        if s.world.any(not math.isfinite(loss)):
            raise TrainingDiverged(
                f"loss became {loss} at step {state.step + 1} (epoch {epoch + 1}); the last good "
                f"checkpoint is kept in {run_dir / 'checkpoints'}. Lower train.lr or set "
                f"train.grad_clip."
            )
        state.step += 1
        s.plasticity.after_step(state.step, run_dir)  # rewiring, every train.plasticity.every
        loss_sum += loss * len(idx)
        correct += int(result.correct)
        seen += len(idx)
        for key, value in flat_stats(result.stats).items():
            stat_sums[key] = stat_sums.get(key, 0.0) + value
        progress.advance(state.step, loss)
    seconds = time.perf_counter() - t0
    keys = sorted(stat_sums)
    loss_sum, correct, seen, *stat_values = s.world.sum(
        [loss_sum, correct, seen, *(stat_sums[k] for k in keys)]
    )
    stat_sums = {k: v / s.world.size for k, v in zip(keys, stat_values, strict=True)}
    state.epoch = epoch + 1
    state.elapsed += seconds
    state.activation_peak = max(state.activation_peak, meter.peak)
    n_batches = max(1, math.ceil(seen / bs))
    record: dict[str, Any] = {
        "epoch": state.epoch,
        "step": state.step,
        "lr": lr,
        "train_loss": loss_sum / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        **{k: v / n_batches for k, v in stat_sums.items()},
        **evaluate_splits(s.model, s.data),
        "samples_per_s": seen / max(seconds, 1e-9),
        "wall_time": state.elapsed,
    }
    record["is_best"] = update_best(state, record)
    return record


def flat_stats(stats: dict[str, Tensor]) -> dict[str, float]:
    """Scalars as they are; vectors (e.g. per-expert load ``[e]``) as ``key.0``, ``key.1``..."""
    out: dict[str, float] = {}
    for key, value in stats.items():
        values = value.detach().float().flatten().tolist()
        if len(values) == 1:
            out[key] = values[0]
        else:
            out.update({f"{key}.{i}": v for i, v in enumerate(values)})
    return out


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> Tensor:
    """Shuffled indices for ``epoch``, a function of (seed, epoch): resume needs no state."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).to(device)


def update_best(state: LoopState, record: dict[str, Any]) -> bool:
    """Best = highest validation accuracy; without a validation split, the latest epoch."""
    val = record.get("val_acc")
    if val is None or state.best_val_acc is None or val > state.best_val_acc:
        state.best_val_acc, state.best_epoch = val, state.epoch
        return True
    return False
