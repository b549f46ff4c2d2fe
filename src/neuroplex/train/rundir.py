"""The run directory: resolved config, checkpoints (with loop state and RNG), summary.

Rank 0 alone writes; every rank reads (resume).
"""

from __future__ import annotations

import base64
import hashlib
import json
import platform
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

import neuroplex
from neuroplex.config import Config, load_config, to_yaml
from neuroplex.errors import CheckpointError, ConfigError
from neuroplex.files import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    json_line,
    read_jsonl,
)
from neuroplex.layers.macs import count_macs
from neuroplex.plasticity.rewiring import restore_wirings, wiring_state
from neuroplex.plasticity.schedule import LOG as PLASTICITY_LOG
from neuroplex.train.checkpoint import (
    INDEX,
    Checkpoint,
    checkpoint_root,
    load_checkpoint,
    load_module_state,
    read_index,
    save_checkpoint,
)
from neuroplex.train.memory import peak_rss_bytes
from neuroplex.train.setup import Setup

PREPROCESSING = "preprocessing.json"  # how raw inputs become model inputs (load_model)


@dataclass
class LoopState:
    """Scalars saved with every checkpoint; with the tensors they make resume exact."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimizer steps
    best_val_acc: float | None = None
    best_epoch: int | None = None
    elapsed: float = 0.0  # seconds of training, summed over resumed sessions
    activation_peak: int = 0  # bytes saved for backward, peak over all steps


def config_digest(cfg: Config) -> str:
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]


def start_run_dir(run_dir: Path, s: Setup, start_epoch: int = 0) -> LoopState:
    """Create the run directory with its ``config.yaml``; refuse one that holds a run. The
    loop state starts at ``start_epoch``'s first step."""
    if not 0 <= start_epoch < s.total_epochs:
        raise ConfigError(
            f"start epoch {start_epoch}: must be in [0, {s.total_epochs}), the run's epochs"
        )
    taken = (run_dir / "checkpoints").exists() or (run_dir / "metrics.jsonl").exists()
    if s.world.any(taken):
        raise ConfigError(
            f"run dir {run_dir} already holds a run; continue it with --resume {run_dir} "
            "or choose another --run-dir"
        )
    if s.world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", to_yaml(s.cfg))
        atomic_write_json(run_dir / PREPROCESSING, s.data.preprocessing())
    return LoopState(epoch=start_epoch, step=start_epoch * s.steps_per_epoch)


def save(run_dir: Path, s: Setup, state: LoopState, *, best: bool) -> None:
    method_tensors, method_meta = s.method.state()
    tensors = {f"model.{k}": v for k, v in s.model.state_dict().items()}
    tensors.update({f"method.{k}": v for k, v in method_tensors.items()})
    meta = {
        "loop": asdict(state),
        "method": method_meta,
        "wirings": wiring_state(s.model),  # plasticity may have rewired the sparse layers
        "rng": {"ranks": s.world.gather(json.dumps(rng_state(s.device)))},
        "config_digest": config_digest(s.cfg),
        "data_sha256": s.data.fingerprint,  # data given from Python (None for files)
        "versions": versions(),
    }
    if s.world.is_main:
        save_checkpoint(run_dir, f"epoch-{state.epoch:04d}", Checkpoint(tensors, meta), best=best)


def restore(run_dir: Path, s: Setup) -> LoopState:
    """Load the last checkpoint into ``s`` and drop metrics logged after it. A run killed before
    its first checkpoint starts again from step 0 (``s`` is freshly built, as a new run's)."""
    if s.world.is_main:
        remove_leftovers(run_dir)
    if not (checkpoint_root(run_dir) / INDEX).is_file():
        return restart(run_dir, s)
    ckpt = load_checkpoint(run_dir, "last")
    if ckpt.state.get("config_digest") != config_digest(s.cfg):
        raise ConfigError(
            f"{run_dir}: the checkpoint was written with a different config than "
            f"{run_dir / 'config.yaml'}; resume with the run's own config"
        )
    if ckpt.state.get("data_sha256") != s.data.fingerprint:
        raise ConfigError(
            f"{run_dir}: the run was trained on other data than the data given now (sha256 "
            f"{str(ckpt.state.get('data_sha256'))[:12]} vs {str(s.data.fingerprint)[:12]}); "
            "resume with the same data"
        )
    try:
        state = load_state(s, ckpt)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise CheckpointError(
            f"{checkpoint_root(run_dir)}: the last checkpoint does not fit this run "
            f"({type(e).__name__}: {e}); was it edited?"
        ) from e
    if s.world.is_main:
        truncate_logs(run_dir, state)
    return state


def load_state(s: Setup, ckpt: Checkpoint) -> LoopState:
    """Model, method, RNG and loop state from ``ckpt`` into ``s``; the loop state."""
    state = loop_state(ckpt.state["loop"])
    restore_wirings(s.model, ckpt.state.get("wirings", {}))  # before the shapes are checked
    load_module_state(s.model, ckpt.tensors, "model.")
    load_method_state(s, ckpt)
    ranks = ckpt.state["rng"]["ranks"]  # exact resume needs the same number of ranks
    set_rng_state(json.loads(ranks[s.world.rank % len(ranks)]), s.device)
    return state


def loop_state(raw: dict[str, Any]) -> LoopState:
    """``LoopState`` from its JSON form; ValueError on a missing, extra or ill-typed field."""
    names = {f.name for f in fields(LoopState)}
    if not isinstance(raw, dict) or set(raw) != names:
        raise ValueError(f"loop state must have the keys {sorted(names)}")
    for key in ("epoch", "step", "activation_peak"):
        if not isinstance(raw[key], int) or isinstance(raw[key], bool) or raw[key] < 0:
            raise ValueError(f"loop.{key} = {raw[key]!r}: expected an integer >= 0")
    return LoopState(**raw)


def restart(run_dir: Path, s: Setup) -> LoopState:
    """Resume a run that has no checkpoint: from the start, its logs emptied. (A checkpoint
    directory that no index names yet is replaced when that epoch is saved again.)"""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise CheckpointError(f"{run_dir}: not a run directory (no config.yaml)")
    if to_yaml(load_config(saved)) != to_yaml(s.cfg):
        raise ConfigError(f"{run_dir}: resume with the run's own config ({saved})")
    state = LoopState()
    if s.world.is_main:
        truncate_logs(run_dir, state)
    return state


def truncate_logs(run_dir: Path, state: LoopState) -> None:
    truncate_jsonl(run_dir / "metrics.jsonl", "epoch", state.epoch)
    truncate_jsonl(run_dir / PLASTICITY_LOG, "step", state.step)


def remove_leftovers(run_dir: Path) -> None:
    """Temporary files and checkpoint directories of a killed session (never referenced)."""
    for tmp in checkpoint_root(run_dir).glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for folder in (run_dir, checkpoint_root(run_dir), run_dir / "rewind"):
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def truncate_jsonl(path: Path, key: str, last: int) -> None:
    """Drop the lines of ``path`` whose ``key`` is past ``last`` (logged after the checkpoint)."""
    if path.exists():
        kept = [r for r in read_jsonl(path, key) if r[key] <= last]
        atomic_write_text(path, "".join(json_line(r) for r in kept))


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


def cuda_peak_bytes(device: torch.device) -> int | None:
    """``torch.cuda.max_memory_allocated`` of this process on ``device`` (None off CUDA): the
    allocator's peak, beside the exact saved-tensor count (``activation_bytes_peak``)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def write_summary(
    run_dir: Path, s: Setup, state: LoopState, *, status: str, error: str | None = None
) -> dict[str, Any]:
    """Final figures of the run; test accuracy of the final model and of the best checkpoint."""
    path = run_dir / "metrics.jsonl"
    metrics = read_jsonl(path, "epoch") if path.exists() else []
    final = metrics[-1] if metrics else {}
    best = next((r for r in metrics if r["epoch"] == state.best_epoch), {})
    data = s.data
    summary = {
        "status": status,
        "error": error,
        "test_acc": final.get("test_acc"),
        "test_loss": final.get("test_loss"),
        "val_acc": final.get("val_acc"),  # of the final epoch, the model test_acc is of
        "best_val_acc": state.best_val_acc,
        "best_epoch": state.best_epoch,
        "test_acc_at_best_val": best.get("test_acc"),
        "epochs": state.epoch,
        "steps": state.step,
        "params": s.model.num_parameters(),
        "active_params": s.model.num_active_parameters(),
        "macs": count_macs(s.model, torch.zeros((1, *data.input_shape), device=s.device)),
        "min_expert_load": min_expert_load(final),
        "activation_bytes_peak": state.activation_peak,
        "cuda_max_memory_allocated": cuda_peak_bytes(s.device),
        "peak_rss_bytes": peak_rss_bytes(),
        "train_time_s": state.elapsed,
        "seed": s.cfg.seed,
        "method": s.cfg.train.method,
        "precision": s.cfg.train.precision,
        "compile": s.cfg.train.compile,
        "channels_last": s.cfg.train.channels_last,
        "dataset": {
            "name": data.name,
            "train": len(data.train),
            "val": len(data.val) if data.val is not None else 0,
            "test": len(data.test),
            "features": data.n_features,
            "input_shape": list(data.input_shape),
            "scaling": data.scaling(),
            "classes": data.n_classes,
        },
        "versions": versions(),
    }
    summary["ranks"] = s.world.size
    if s.world.is_main:
        atomic_write_json(run_dir / "summary.json", summary)
    return summary


def min_expert_load(record: dict[str, Any]) -> float | None:
    """Smallest per-expert share of assignments (``stageN.load.i``) in a metrics record; a dead
    expert shows as ~0. ``None`` without MoE stages."""
    loads = [v for k, v in record.items() if re.fullmatch(r"stage\d+\.load\.\d+", k)]
    return min(loads, default=None)


def kept_checkpoint(run_dir: Path) -> str:
    """What a run that stops now leaves to resume from, as a clause of a sentence."""
    root = checkpoint_root(run_dir)
    if not (root / INDEX).is_file():
        return f"no checkpoint was written yet (none in {root})"
    try:
        last = read_index(run_dir)["last"]
    except CheckpointError:
        return f"{root / INDEX} is unreadable"
    return f"the last good checkpoint, {last}, is kept in {root}"


def resume_hint(run_dir: Path) -> str:
    """One clause: what is kept and the command that continues the run."""
    return f"{kept_checkpoint(run_dir)}; continue with `neuroplex train --resume {run_dir}`"


def rewind_path(run_dir: Path, epoch: int) -> Path:
    return run_dir / "rewind" / f"epoch-{epoch:04d}.safetensors"


def save_rewind_point(run_dir: Path, s: Setup, epoch: int) -> None:
    """Keep the model weights after ``epoch`` epochs if ``train.save_epochs`` lists it."""
    if epoch in s.cfg.train.save_epochs and s.world.is_main:
        tensors = {k: v.detach().contiguous().cpu() for k, v in s.model.state_dict().items()}
        atomic_write(rewind_path(run_dir, epoch), lambda p: save_file(tensors, str(p)))


def load_method_state(s: Setup, ckpt: Checkpoint) -> None:
    """Load the method's part of a checkpoint (optimizers, auxiliary networks)."""
    prefix = "method."
    tensors = {k[len(prefix) :]: v for k, v in ckpt.tensors.items() if k.startswith(prefix)}
    s.method.load_state(tensors, ckpt.state["method"])
