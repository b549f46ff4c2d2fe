"""Checkpoints without pickle: tensors in safetensors, scalars and RNG states in JSON, atomic.

Layout inside a run directory::

    checkpoints/
      index.json            {"last": "epoch-0004", "best": "epoch-0003"}
      epoch-0004/tensors.safetensors
      epoch-0004/state.json  (includes the sha256 of tensors.safetensors, and of itself)

A checkpoint directory is written under a temporary name, fsynced and renamed into place; only
then is ``index.json`` replaced (atomically), and only then are unreferenced directories removed.
A process killed at any instant leaves ``index.json`` pointing at complete checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from neuroplex.errors import CheckpointError, NeuroplexError
from neuroplex.files import atomic_write_json, crash_point, current_umask, fsync_dir

FORMAT_VERSION = 1
TENSORS = "tensors.safetensors"
STATE = "state.json"
INDEX = "index.json"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a checkpoint directory inside checkpoints/


@dataclass
class Checkpoint:
    tensors: dict[str, Tensor]
    state: dict[str, Any]


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, name: str, ckpt: Checkpoint, *, best: bool) -> Path:
    """Write ``ckpt`` as ``checkpoints/<name>``, make it ``last`` (and ``best`` if asked)."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        _write_files(tmp, ckpt)
    except (OSError, NeuroplexError):
        shutil.rmtree(tmp, ignore_errors=True)  # e.g. a full disk: leave nothing half-written
        raise
    target = root / name
    if target.is_dir():  # left by a run killed after the rename but before the index update
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    os.replace(tmp, target)
    fsync_dir(root)
    crash_point(target)
    index = read_index(run_dir) if (root / INDEX).exists() else {}
    index["last"] = name
    if best or "best" not in index:
        index["best"] = name
    atomic_write_json(root / INDEX, index)
    crash_point(root)
    _remove_unreferenced(root, set(index.values()))
    return target


def _write_files(tmp: Path, ckpt: Checkpoint) -> None:
    """The tensors and the state (with both checksums) into ``tmp``, fsynced."""
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700 directories
    tensors = {k: v.detach().contiguous().cpu() for k, v in ckpt.tensors.items()}
    try:
        save_file(tensors, str(tmp / TENSORS))
    except SafetensorError as e:  # safetensors reports OS errors (ENOSPC) as its own type
        raise NeuroplexError(f"cannot write {tmp / TENSORS}: {e}") from None
    crash_point(tmp / TENSORS)
    os.chmod(tmp / TENSORS, 0o666 & ~current_umask())  # safetensors writes 0600
    state = {**ckpt.state, "format": FORMAT_VERSION, "sha256": _sha256(tmp / TENSORS)}
    state["state_sha256"] = state_digest(state)
    (tmp / STATE).write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
    crash_point(tmp / STATE)
    for f in (TENSORS, STATE):
        with open(tmp / f, "rb") as fh:
            os.fsync(fh.fileno())


def state_digest(state: dict[str, Any]) -> str:
    """sha256 of ``state`` without its own ``state_sha256`` (canonical JSON, sorted keys)."""
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_index(run_dir: str | os.PathLike) -> dict[str, str]:
    path = checkpoint_root(run_dir) / INDEX
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no checkpoint found (missing {path})")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupted (not valid JSON)") from None
    if not isinstance(index, dict) or "last" not in index:
        raise CheckpointError(f"{path}: corrupted (expected keys 'last' and 'best')")
    for key, name in index.items():
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise CheckpointError(
                f"{path}: corrupted ({key!r} = {name!r}; expected the name of a checkpoint "
                "directory in checkpoints/, e.g. 'epoch-0004')"
            )
    return index


def load_checkpoint(run_dir: str | os.PathLike, which: str = "last") -> Checkpoint:
    """Read and verify ``which`` ('last' or 'best'); raise CheckpointError if anything is off."""
    index = read_index(run_dir)
    if which not in index:
        raise CheckpointError(f"{run_dir}: no '{which}' checkpoint (have: {', '.join(index)})")
    return read_checkpoint(checkpoint_root(run_dir) / index[which])


def read_checkpoint(ckpt_dir: Path) -> Checkpoint:
    """Read and verify the checkpoint directory ``ckpt_dir``; CheckpointError if anything is off."""
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: corrupted (a file where a checkpoint directory was)")
    try:
        state = json.loads((ckpt_dir / STATE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir}: missing {STATE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{ckpt_dir / STATE}: corrupted (not valid JSON)") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{ckpt_dir / STATE}: corrupted (expected a JSON object)")
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{ckpt_dir}: format {state.get('format')!r}, this neuroplex reads {FORMAT_VERSION}"
        )
    if "state_sha256" not in state:
        raise CheckpointError(
            f"{ckpt_dir / STATE}: has no checksum of its own (edited, or written by a neuroplex "
            "before 0.1.0's reliability checks); train the run again"
        )
    if state["state_sha256"] != state_digest(state):
        raise CheckpointError(f"{ckpt_dir / STATE}: corrupted (its checksum does not match)")
    path = ckpt_dir / TENSORS
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: missing {TENSORS}")
    if _sha256(path) != state.get("sha256"):
        raise CheckpointError(f"{path}: corrupted (checksum does not match {STATE})")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    return Checkpoint(tensors, state)


def load_module_state(module: nn.Module, tensors: dict[str, Tensor], prefix: str) -> None:
    """Load ``prefix``-ed tensors into ``module`` after checking every key and shape first,
    so a mismatch never leaves a half-loaded module."""
    expected = module.state_dict()
    found = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise CheckpointError(
            f"checkpoint does not match the model ({what}); was it written with another config?"
        )
    for key, value in expected.items():
        if found[key].shape != value.shape or found[key].dtype != value.dtype:
            raise CheckpointError(
                f"checkpoint does not match the model: {prefix}{key} has shape "
                f"{tuple(found[key].shape)} {found[key].dtype}, the model expects "
                f"{tuple(value.shape)} {value.dtype}; was it written with another config?"
            )
    module.load_state_dict(found)


def optimizer_state(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, Tensor], dict]:
    """Split an optimizer's state_dict into tensors (safetensors) and JSON-able scalars."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        scalars[str(idx)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}{idx}.{key}"] = value
            else:
                scalars[str(idx)][key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(
    opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict, prefix: str
) -> None:
    """Inverse of :func:`optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for idx, scalars in meta["scalars"].items():
        state[int(idx)] = dict(scalars)
    for key, value in tensors.items():
        if key.startswith(prefix):
            idx, name = key[len(prefix) :].split(".", 1)
            state.setdefault(int(idx), {})[name] = value
    groups = [
        {**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]
    ]
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"optimizer state does not match the model: {e}") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove_unreferenced(root: Path, keep: set[str]) -> None:
    for child in root.iterdir():
        if child.is_dir() and child.name not in keep:
            shutil.rmtree(child, ignore_errors=True)
