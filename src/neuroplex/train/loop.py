"""The one training loop. The method (``backprop``, ``local``) is an object with ``step``.

Run directory written (by rank 0) through neuroplex.train.rundir::

    config.yaml      the resolved config
    metrics.jsonl    one JSON line per epoch (losses, accuracies, lr, samples/s, wall time)
    plasticity.jsonl one JSON line per rewiring event (neuroplex.plasticity.schedule), if enabled
    checkpoints/     see neuroplex.train.checkpoint
    rewind/          epoch-EEEE.safetensors: model weights after the epochs in train.save_epochs
    summary.json     final figures, written when the run ends (or stops, diverges, is interrupted,
                     or a pipeline worker is lost)
    pipeline.json    train.parallel > 1: the stage groups and their measured shares
    .lock            held by the one process writing the run (neuroplex.train.runlock)

Shape legend: ``b`` batch, ``d`` features.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from neuroplex.config import Config, validate_config
from neuroplex.data.stream import StreamDataset, epoch_order
from neuroplex.distributed.parallel import World, close_world, init_world
from neuroplex.errors import ConfigError, TrainingDiverged
from neuroplex.files import append_jsonl
from neuroplex.network import Network
from neuroplex.train.callbacks import Callback, Callbacks, StepLog, check_callbacks
from neuroplex.train.evaluate import evaluate_splits
from neuroplex.train.loggers import build_loggers, check_loggers
from neuroplex.train.memory import ActivationMeter
from neuroplex.train.optim import lr_at
from neuroplex.train.progress import NullProgress
from neuroplex.train.rundir import (
    LoopState,
    kept_checkpoint,
    restore,
    resume_hint,
    save,
    save_rewind_point,
    start_run_dir,
    write_summary,
)
from neuroplex.train.runlock import run_dir_lock
from neuroplex.train.setup import Setup, build_setup


def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    data: Any = None,
    resume: bool = False,
    stop_after_epoch: int | None = None,
    progress: NullProgress | None = None,
    prepare: Callable[[Network], None] | None = None,
    start_epoch: int = 0,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir`` (or continue it with ``resume``); return the summary.

    ``data`` trains on data given from Python instead of ``cfg.data.name`` (which becomes
    ``python``; the split and standardisation settings of ``cfg.data`` apply): ``(x, y)`` numpy
    arrays or torch tensors, a torch ``Dataset`` of ``(x, y)`` pairs, or a mapping
    ``{"train": ..., "val": ..., "test": ...}`` of those or of DataLoaders (streamed); see
    neuroplex.data.python. A resumed run needs the same data again (checked by its sha256,
    except for DataLoaders).

    ``stop_after_epoch`` ends the session after that many epochs with a checkpoint, so a long run
    can be done in pieces; resuming it gives the same metrics as an uninterrupted run.
    ``prepare`` changes the freshly built model before the method sees it (e.g. a pruned
    lottery ticket, neuroplex.plasticity.prune). ``start_epoch`` starts a new run at that epoch's
    first step, as if the epochs before it had run: the learning-rate schedule, the data order
    and the step count continue from there (a ticket rewound late, neuroplex.plasticity.prune).
    ``callbacks`` are called every step, epoch and at the end, after the loggers of ``cfg.log``
    (neuroplex.train.callbacks).
    """
    run_dir = Path(run_dir)
    callbacks = check_callbacks(callbacks)
    check_loggers(cfg.log)
    if data is not None:
        cfg = python_data_config(cfg)
    if cfg.train.parallel > 1:
        from neuroplex.distributed.launch import train_pipeline  # it builds on this module

        if data is not None:
            raise ConfigError(
                f"train.parallel = {cfg.train.parallel}: data given from Python trains in one "
                "process; set train.parallel = 1"
            )
        if prepare is not None or start_epoch:
            raise ConfigError(
                f"train.parallel = {cfg.train.parallel}: a prepared (e.g. pruned) model trains "
                "in one process; set train.parallel = 1"
            )
        if callbacks:
            raise ConfigError(
                f"callbacks: not with train.parallel = {cfg.train.parallel} (the stages train "
                "in spawned processes); the loggers of log: still run"
            )
        return train_pipeline(cfg, run_dir, resume, stop_after_epoch, progress)  # it locks
    world = init_world()
    try:
        with run_dir_lock(run_dir, enabled=world.is_main):
            s = build_setup(cfg, world, prepare, data)
            if not world.is_main:
                progress = None  # one progress display, on rank 0
            state = restore(run_dir, s) if resume else start_run_dir(run_dir, s, start_epoch)
            shown = progress or NullProgress()
            return run_epochs(s, state, run_dir, stop_after_epoch, shown, callbacks=callbacks)
    finally:
        close_world(world)


def python_data_config(cfg: Config) -> Config:
    """``cfg`` with ``data.name: python`` (and no data path), for data given from Python."""
    raw = cfg.model_dump(mode="json")
    raw["data"].update(name="python", path=None, root=None)
    return validate_config(raw)


EpochFn = Callable[[Setup, LoopState, ActivationMeter, int, Path, NullProgress], dict[str, Any]]


def run_epochs(
    s: Setup,
    state: LoopState,
    run_dir: Path,
    stop_after_epoch: int | None,
    progress: NullProgress,
    epoch_fn: EpochFn | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Epochs of ``epoch_fn`` (default :func:`run_epoch`; the pipeline plugs in its own), with
    metrics, checkpoints and the summary; rank 0 tells the loggers of ``s.cfg.log`` and
    ``callbacks``."""
    if s.world.is_main:
        s.callbacks = Callbacks([*build_loggers(s.cfg, run_dir, state.step), *callbacks])
    summary = None
    try:
        summary = _epochs(s, state, run_dir, stop_after_epoch, progress, epoch_fn or run_epoch)
        return summary
    except TrainingDiverged as e:
        summary = write_summary(run_dir, s, state, status="diverged", error=str(e))
        raise
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(e):
            raise
        error = out_of_memory_error(e, s, state, run_dir)
        summary = write_summary(run_dir, s, state, status="out_of_memory", error=str(error))
        raise error from e
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM as the CLI raises it
        why = f"interrupted ({getattr(e, 'signal_name', 'SIGINT')}); {resume_hint(run_dir)}"
        summary = write_summary(run_dir, s, state, status="interrupted", error=why)
        raise
    finally:
        s.callbacks.on_end(summary)


def _epochs(
    s: Setup,
    state: LoopState,
    run_dir: Path,
    stop_after_epoch: int | None,
    progress: NullProgress,
    epoch_fn: EpochFn,
) -> dict[str, Any]:
    """The epochs of this session, each logged and checkpointed; the summary."""
    meter = ActivationMeter(modules=s.method.modules())
    meter.peak = state.activation_peak
    last_epoch = (
        s.total_epochs if stop_after_epoch is None else min(stop_after_epoch, s.total_epochs)
    )
    progress.start(s.total_steps, state.step)
    try:
        for epoch in range(state.epoch, last_epoch):
            save_rewind_point(run_dir, s, epoch)  # if train.save_epochs lists it
            record = epoch_fn(s, state, meter, epoch, run_dir, progress)
            if s.world.is_main:
                append_jsonl(run_dir / "metrics.jsonl", record)
            progress.epoch_end(record)
            if state.epoch % s.cfg.train.checkpoint_every == 0 or state.epoch == last_epoch:
                save(run_dir, s, state, best=record["is_best"])
            s.callbacks.on_epoch(record)
    finally:
        progress.close()
    status = "completed" if state.epoch >= s.total_epochs else "stopped"
    return write_summary(run_dir, s, state, status=status)


OOM_MESSAGES = ("out of memory", "not enough memory", "cannot allocate memory")


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure (CUDA, CPU allocator, MemoryError)."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    return any(text in str(e).lower() for text in OOM_MESSAGES)


def out_of_memory_error(e: BaseException, s: Setup, state: LoopState, run_dir: Path) -> ConfigError:
    """One line naming the field most likely to fix an allocation failure during training."""
    first = " ".join(str(e).split())[:160] or type(e).__name__
    return ConfigError(
        f"train.batch_size = {s.cfg.train.batch_size}: out of memory at step {state.step + 1} "
        f"(epoch {state.epoch + 1}) on {s.device.type} ({first}); lower train.batch_size or "
        f"the stage widths in model.stages; {kept_checkpoint(run_dir)}"
    )


@dataclass
class EpochTotals:
    """What one process adds up over an epoch (sums over its steps)."""

    loss_sum: float = 0.0
    correct: float = 0.0
    seen: int = 0
    lr: float = 0.0  # the last step's
    seconds: float = 0.0
    activation_peak: int = 0
    stat_sums: dict[str, float] = field(default_factory=dict)


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
    totals = EpochTotals()
    t0 = time.perf_counter()
    for batch in train_batches(s, state, epoch):
        loss = train_batch(s, state, meter, batch, totals, run_dir)
        progress.advance(state.step, loss)
    totals.seconds = time.perf_counter() - t0
    totals.activation_peak = meter.peak
    totals = reduce_totals(s.world, totals)
    return finish_epoch(s, state, epoch, totals, evaluate_splits(s.model, s.data))


def train_batches(s: Setup, state: LoopState, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
    """This rank's training batches (``x [b, d]``, ``y [b]``) of ``epoch`` still to train,
    drawn one at a time (``state.step`` advances between them): in-memory data in the order of
    :func:`epoch_order`, streamed data in its loader's order."""
    remaining = max(0, s.total_steps - state.step)
    if isinstance(s.data, StreamDataset):
        yield from islice(s.data.epoch(epoch, s.cfg.seed), remaining)
        return
    for idx in epoch_batches(s, epoch, state.step):
        yield s.data.train_batch(idx, (s.cfg.seed, epoch, state.step), s.world.shard)


def epoch_batches(s: Setup, epoch: int, done_steps: int) -> list[Tensor]:
    """The global batches (indices into the training split) of ``epoch`` still to train, given
    ``done_steps`` optimizer steps done so far (the run ends at ``s.total_steps``)."""
    order = epoch_order(len(s.data.train), s.cfg.seed, epoch, s.device)
    bs = s.cfg.train.batch_size
    starts = range(0, len(order), bs)[: max(0, s.total_steps - done_steps)]
    return [order[start : start + bs] for start in starts]


def train_batch(
    s: Setup,
    state: LoopState,
    meter: ActivationMeter,
    batch: tuple[Tensor, Tensor],
    totals: EpochTotals,
    run_dir: Path,
) -> float:
    """One step of the method on ``batch`` (``x [b, d]``, ``y [b]``) at the scheduled learning
    rate; stop if the loss diverged on any rank; add it to ``totals``; return the loss."""
    x, y = batch
    totals.lr = lr_at(state.step, s.total_steps, s.cfg.train)
    for module in s.scheduled:  # e.g. dense-to-sparse routers anneal with training progress
        module.set_progress(state.step / max(s.total_steps - 1, 1))
    with meter.track():
        result = s.method.step(x, y, totals.lr)
    loss = float(result.loss)
    if s.world.any(not math.isfinite(loss)):
        raise TrainingDiverged(
            f"loss became {loss} at step {state.step + 1} (epoch "
            f"{state.step // s.steps_per_epoch + 1}); {kept_checkpoint(run_dir)}. Lower "
            "train.lr or set train.grad_clip."
        )
    state.step += 1
    events = s.plasticity.after_step(state.step, run_dir)  # rewiring, every plasticity.every
    s.callbacks.on_step(StepLog(state.step, state.epoch, loss, totals.lr, events))
    totals.loss_sum += loss * len(y)
    totals.correct += int(result.correct)
    totals.seen += len(y)
    for key, value in flat_stats(result.stats).items():
        totals.stat_sums[key] = totals.stat_sums.get(key, 0.0) + value
    return loss


def reduce_totals(world: World, totals: EpochTotals) -> EpochTotals:
    """Data parallel: sums over ranks (statistics averaged); the local seconds and peak kept."""
    if world.size == 1:
        return totals
    keys = sorted(totals.stat_sums)
    loss_sum, correct, seen, *values = world.sum(
        [totals.loss_sum, totals.correct, totals.seen, *(totals.stat_sums[k] for k in keys)]
    )
    stats = {k: v / world.size for k, v in zip(keys, values, strict=True)}
    return replace(totals, loss_sum=loss_sum, correct=correct, seen=int(seen), stat_sums=stats)


def finish_epoch(
    s: Setup, state: LoopState, epoch: int, totals: EpochTotals, evaluation: dict[str, float]
) -> dict[str, Any]:
    """Advance ``state`` past ``epoch``; the metrics record from the whole run's ``totals`` and
    the ``evaluation`` of the model on the val/test splits."""
    state.epoch = epoch + 1
    state.elapsed += totals.seconds
    state.activation_peak = max(state.activation_peak, totals.activation_peak)
    seen = max(totals.seen, 1)
    n_batches = max(1, math.ceil(totals.seen / s.cfg.train.batch_size))
    record: dict[str, Any] = {
        "epoch": state.epoch,
        "step": state.step,
        "lr": totals.lr,
        "train_loss": totals.loss_sum / seen,
        "train_acc": totals.correct / seen,
        **{k: v / n_batches for k, v in totals.stat_sums.items()},
        **evaluation,
        "samples_per_s": totals.seen / max(totals.seconds, 1e-9),
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


def update_best(state: LoopState, record: dict[str, Any]) -> bool:
    """Best = highest validation accuracy; without a validation split, the latest epoch."""
    val = record.get("val_acc")
    if val is None or state.best_val_acc is None or val > state.best_val_acc:
        state.best_val_acc, state.best_epoch = val, state.epoch
        return True
    return False
