"""The one training loop. The method (``backprop``; later ``local``) is an object with ``step``.

Run directory written here::

    config.yaml      the resolved config
    metrics.jsonl    one JSON line per epoch (losses, accuracies, lr, samples/s, wall time)
    checkpoints/     see neuroplex.train.checkpoint
    summary.json     final figures, written when the run ends (or stops, or diverges)

Shape legend: ``b`` batch, ``d`` features.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import neuroplex
from neuroplex.config import Config, to_yaml
from neuroplex.data import Dataset, load_dataset
from neuroplex.errors import ConfigError, TrainingDiverged
from neuroplex.files import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl
from neuroplex.network import Network, build_network
from neuroplex.train.backprop import Backprop
from neuroplex.train.checkpoint import (
    Checkpoint,
    load_checkpoint,
    load_module_state,
    save_checkpoint,
)
from neuroplex.train.evaluate import evaluate_splits
from neuroplex.train.local import Local
from neuroplex.train.memory import ActivationMeter, peak_rss_bytes
from neuroplex.train.method import Method
from neuroplex.train.optim import lr_at
from neuroplex.train.progress import NullProgress

METHODS: dict[str, type[Method]] = {"backprop": Backprop, "local": Local}


@dataclass
class LoopState:
    """Scalars saved with every checkpoint; with the tensors they make resume exact."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimizer steps
    best_val_acc: float | None = None
    best_epoch: int | None = None
    elapsed: float = 0.0  # seconds of training, summed over resumed sessions
    activation_peak: int = 0  # bytes saved for backward, peak over all steps


@dataclass
class Setup:
    """Everything a run needs, built from its config."""

    cfg: Config
    device: torch.device
    data: Dataset
    model: Network
    method: Method

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.data.train) / self.cfg.train.batch_size)

    @property
    def total_steps(self) -> int:
        return self.cfg.train.steps or self.cfg.train.epochs * self.steps_per_epoch

    @property
    def total_epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)


def build_setup(cfg: Config) -> Setup:
    """Seed, then data, model and method, in a fixed order (so the same seed gives the same run)."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.data)
    torch.manual_seed(cfg.seed)
    model = build_network(cfg.model, data.n_features, data.n_classes).to(device)
    method = METHODS[cfg.train.method](model, cfg)
    return Setup(cfg, device, data, model, method)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda': no CUDA device is available; use 'cpu' or 'auto'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    stop_after_epoch: int | None = None,
    progress: NullProgress | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir`` (or continue it with ``resume``); return the summary.

    ``stop_after_epoch`` ends the session after that many epochs with a checkpoint, so a long run
    can be done in pieces; resuming it gives the same metrics as an uninterrupted run.
    """
    run_dir = Path(run_dir)
    progress = progress or NullProgress()
    s = build_setup(cfg)
    if resume:
        state = restore(run_dir, s)
    else:
        start_run_dir(run_dir, cfg)
        state = LoopState()
    meter = ActivationMeter(s.model.parameters())
    meter.peak = state.activation_peak
    last_epoch = (
        s.total_epochs if stop_after_epoch is None else min(stop_after_epoch, s.total_epochs)
    )
    progress.start(s.total_steps, state.step)
    try:
        for epoch in range(state.epoch, last_epoch):
            record = run_epoch(s, state, meter, epoch, run_dir, progress)
            append_jsonl(run_dir / "metrics.jsonl", record)
            progress.epoch_end(record)
            is_last = state.epoch == last_epoch
            if state.epoch % cfg.train.checkpoint_every == 0 or is_last:
                save(run_dir, s, state, best=record.get("is_best", True))
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
    t0 = time.perf_counter()
    for start in range(0, len(order), bs):
        if state.step >= s.total_steps:
            break
        idx = order[start : start + bs]
        x, y = train_split.x[idx], train_split.y[idx]
        lr = lr_at(state.step, s.total_steps, s.cfg.train)
        with meter.track():
            result = s.method.step(x, y, lr)
        loss = float(result.loss)
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"loss became {loss} at step {state.step + 1} (epoch {epoch + 1}); the last good "
                f"checkpoint is kept in {run_dir / 'checkpoints'}. Lower train.lr or set "
                f"train.grad_clip."
            )
        state.step += 1
        loss_sum += loss * len(idx)
        correct += int(result.correct)
        seen += len(idx)
        for key, value in result.stats.items():
            stat_sums[key] = stat_sums.get(key, 0.0) + float(value.float().mean())
        progress.advance(state.step, loss)
    seconds = time.perf_counter() - t0
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


# ---------------------------------------------------------------------------------------------
# run directory, checkpoints, summary


def config_digest(cfg: Config) -> str:
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]


def start_run_dir(run_dir: Path, cfg: Config) -> None:
    if (run_dir / "checkpoints").exists() or (run_dir / "metrics.jsonl").exists():
        raise ConfigError(
            f"run dir {run_dir} already holds a run; continue it with --resume {run_dir} "
            "or choose another --run-dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))


def save(run_dir: Path, s: Setup, state: LoopState, *, best: bool) -> None:
    method_tensors, method_meta = s.method.state()
    tensors = {f"model.{k}": v for k, v in s.model.state_dict().items()}
    tensors.update({f"method.{k}": v for k, v in method_tensors.items()})
    meta = {
        "loop": asdict(state),
        "method": method_meta,
        "rng": rng_state(s.device),
        "config_digest": config_digest(s.cfg),
        "versions": versions(),
    }
    save_checkpoint(run_dir, f"epoch-{state.epoch:04d}", Checkpoint(tensors, meta), best=best)


def restore(run_dir: Path, s: Setup) -> LoopState:
    """Load the last checkpoint into ``s`` and drop metrics logged after it."""
    ckpt = load_checkpoint(run_dir, "last")
    if ckpt.state.get("config_digest") != config_digest(s.cfg):
        raise ConfigError(
            f"{run_dir}: the checkpoint was written with a different config than "
            f"{run_dir / 'config.yaml'}; resume with the run's own config"
        )
    load_module_state(s.model, ckpt.tensors, "model.")
    method_tensors = {k[7:]: v for k, v in ckpt.tensors.items() if k.startswith("method.")}
    s.method.load_state(method_tensors, ckpt.state["method"])
    set_rng_state(ckpt.state["rng"], s.device)
    state = LoopState(**ckpt.state["loop"])
    metrics = run_dir / "metrics.jsonl"
    kept = [r for r in read_jsonl(metrics) if r["epoch"] <= state.epoch] if metrics.exists() else []
    atomic_write_text(metrics, "".join(_json_line(r) for r in kept))
    return state


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True) + "\n"


def rng_state(device: torch.device) -> dict[str, str]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if device.type == "cuda":
        cuda = torch.cuda.get_rng_state(device)
        state["cuda"] = base64.b64encode(cuda.numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict[str, str], device: torch.device) -> None:
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(_bytes_tensor(state["cuda"]), device)


def _bytes_tensor(text: str) -> Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


def versions() -> dict[str, str]:
    return {
        "neuroplex": neuroplex.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def write_summary(
    run_dir: Path, s: Setup, state: LoopState, *, status: str, error: str | None = None
) -> dict[str, Any]:
    """Final figures of the run; test accuracy of the final model and of the best checkpoint."""
    metrics = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    final = metrics[-1] if metrics else {}
    best = next((r for r in metrics if r["epoch"] == state.best_epoch), {})
    data = s.data
    summary = {
        "status": status,
        "error": error,
        "test_acc": final.get("test_acc"),
        "test_loss": final.get("test_loss"),
        "best_val_acc": state.best_val_acc,
        "best_epoch": state.best_epoch,
        "test_acc_at_best_val": best.get("test_acc"),
        "epochs": state.epoch,
        "steps": state.step,
        "params": s.model.num_parameters(),
        "activation_bytes_peak": state.activation_peak,
        "peak_rss_bytes": peak_rss_bytes(),
        "train_time_s": state.elapsed,
        "seed": s.cfg.seed,
        "method": s.cfg.train.method,
        "dataset": {
            "name": data.name,
            "train": len(data.train),
            "val": len(data.val) if data.val is not None else 0,
            "test": len(data.test),
            "features": data.n_features,
            "classes": data.n_classes,
        },
        "versions": versions(),
    }
    atomic_write_json(run_dir / "summary.json", summary)
    return summary
