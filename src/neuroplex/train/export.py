"""Trained models out of neuroplex: :func:`load_model` (from a run directory or an export) and
:func:`export_model` (``neuroplex export RUN_DIR --out DIR``).

:func:`load_model` returns a :class:`RawInputModel`: the network and the preprocessing it was
trained with (standardisation, saved with the run in ``preprocessing.json``), so it takes raw
inputs, as numpy or torch, and needs neither the dataset nor the training state (optimizers,
auxiliary networks). An export directory holds::

    model.safetensors  the network's weights (its state_dict)
    model.json         format, architecture (config.model, input shape, classes), the wirings of
                       sparse layers (rewired ones included), preprocessing, source (run
                       directory, checkpoint, epoch), sha256 of the weights, and whether
                       model.pt2 was written (and why not)
    model.pt2          the raw-input model as a torch.export program, when the model allows it:
                       raw samples [b, *image_shape] (images) or [b, *input_shape] (vectors),
                       batch size free; load it with torch.export.load(path).module()

Shape legend: ``b`` batch, ``c`` classes.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import neuroplex
from neuroplex.config import ModelConfig, format_validation_error, load_config
from neuroplex.data.preprocess import Preprocess, check_preprocessing
from neuroplex.errors import CheckpointError, NeuroplexError
from neuroplex.files import atomic_write, atomic_write_json, read_json
from neuroplex.network import Network, build_network
from neuroplex.plasticity.rewiring import restore_wirings, wiring_state
from neuroplex.train.checkpoint import (
    Checkpoint,
    checkpoint_root,
    load_checkpoint,
    load_module_state,
    read_checkpoint,
)
from neuroplex.train.rundir import PREPROCESSING

FORMAT = "neuroplex-model/1"
WEIGHTS, META, PROGRAM = "model.safetensors", "model.json", "model.pt2"


class RawInputModel(nn.Module):
    """A trained network on raw inputs: ``forward(x [b, ...]) -> logits [b, c]``, where ``x``
    holds raw samples as the data had them (vectors ``[b, d]``, images ``[b, c, h, w]``, any
    numeric dtype, numpy or torch; unstandardised). ``classes`` names the logits' columns."""

    def __init__(self, network: Network, preprocess: Preprocess, classes: list[str]) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.network = network
        self.classes = list(classes)

    def forward(self, x: Tensor) -> Tensor:
        """Raw ``x`` ``[b, ...]`` -> logits ``[b, c]``."""
        if not isinstance(x, Tensor):
            x = torch.as_tensor(np.asarray(x))
        return self.network(self.preprocess(x))


def load_model(path: str | Path, checkpoint: str | int = "best") -> RawInputModel:
    """The trained model in ``path`` — a run directory (its ``checkpoint``: ``"best"`` = highest
    validation accuracy, ``"last"``, or an epoch number whose checkpoint the run kept) or an
    export directory of :func:`export_model` — in eval mode, on the CPU."""
    path = Path(path)
    if (path / META).is_file():
        if checkpoint != "best":
            raise NeuroplexError(
                f"checkpoint = {checkpoint!r}: {path} is an export (one model); checkpoint= "
                "chooses among a run directory's checkpoints"
            )
        return _load_export(path)
    if not (path / "config.yaml").is_file():
        what = "not found" if not path.exists() else "neither a run directory nor an export"
        raise NeuroplexError(f"{path}: {what} (expected config.yaml or {META})")
    model, _ = _load_run(path, checkpoint)
    return model


def _load_run(run_dir: Path, checkpoint: str | int) -> tuple[RawInputModel, Checkpoint]:
    cfg = load_config(run_dir / "config.yaml")
    prep = run_preprocessing(run_dir, cfg)
    ckpt = run_checkpoint(run_dir, checkpoint)
    network = build_network(cfg.model, tuple(prep["input_shape"]), len(prep["classes"]))
    restore_wirings(network, ckpt.state.get("wirings", {}))
    load_module_state(network, ckpt.tensors, "model.")
    return _finish(network, prep), ckpt


def _finish(network: Network, prep: dict[str, Any]) -> RawInputModel:
    return RawInputModel(network, Preprocess(prep), prep["classes"]).eval()


def run_preprocessing(run_dir: Path, cfg: Any) -> dict[str, Any]:
    """The run's ``preprocessing.json``; for a run written before it existed, recomputed from
    the run's dataset (which must still be readable)."""
    path = run_dir / PREPROCESSING
    if path.is_file():
        prep = read_json(path)
        check_preprocessing(prep, str(path))
        return prep
    from neuroplex.data.registry import load_dataset

    return load_dataset(cfg.data).preprocessing()


def run_checkpoint(run_dir: Path, checkpoint: str | int) -> Checkpoint:
    """The checkpoint ``"best"``, ``"last"`` or of an epoch (an int, or digits) of a run."""
    if checkpoint in ("best", "last"):
        return load_checkpoint(run_dir, str(checkpoint))
    if isinstance(checkpoint, str) and checkpoint.isdigit():
        checkpoint = int(checkpoint)
    if not isinstance(checkpoint, int) or isinstance(checkpoint, bool) or checkpoint < 0:
        raise NeuroplexError(
            f"checkpoint = {checkpoint!r}: expected 'best', 'last' or an epoch number >= 0"
        )
    folder = checkpoint_root(run_dir) / f"epoch-{checkpoint:04d}"
    if folder.is_dir():
        return read_checkpoint(folder)
    kept = sorted(int(p.name[6:]) for p in checkpoint_root(run_dir).glob("epoch-[0-9]*"))
    raise CheckpointError(
        f"checkpoint = {checkpoint}: {run_dir} keeps no checkpoint of epoch {checkpoint} (kept: "
        f"{', '.join(map(str, kept)) or 'none'}; a run keeps its best and last epochs)"
    )


# ---------------------------------------------------------------------------------------------
# export


def export_model(run_dir: str | Path, out: str | Path, checkpoint: str | int = "best") -> dict:
    """Write ``model.safetensors``, ``model.json`` and (when the model allows it) ``model.pt2``
    of a run's ``checkpoint`` into ``out``; return model.json's content."""
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.yaml").is_file():
        raise NeuroplexError(f"{run_dir}: not a run directory (no config.yaml)")
    if out.exists() and not out.is_dir():
        raise NeuroplexError(f"--out {out}: a file, not a directory")
    model, ckpt = _load_run(run_dir, checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.network.state_dict().items()}
    atomic_write(out / WEIGHTS, lambda p: save_file(weights, str(p)))
    cfg = load_config(run_dir / "config.yaml")
    meta = {
        "format": FORMAT,
        "versions": {"neuroplex": neuroplex.__version__, "torch": torch.__version__},
        "model": cfg.model.model_dump(mode="json"),
        "input_shape": list(model.preprocess.input_shape),
        "classes": model.classes,
        "wirings": wiring_state(model.network),
        "preprocessing": run_preprocessing(run_dir, cfg),
        "source": {
            "run_dir": str(run_dir),
            "checkpoint": checkpoint,
            "epoch": ckpt.state["loop"]["epoch"],
        },
        "weights_sha256": _sha256(out / WEIGHTS),
        "torch_export": write_program(model, out / PROGRAM),
    }
    atomic_write_json(out / META, meta)
    return meta


def write_program(model: RawInputModel, path: Path) -> dict[str, Any]:
    """``model`` as a torch.export program taking raw samples ``[b, *image_shape]`` (images) or
    ``[b, *input_shape]`` (vectors) with a free batch size, checked against the eager model on a
    batch of another size; ``{"file": ..., "written": bool, "reason": ...}``."""
    shape = model.preprocess.image_shape
    gen = torch.Generator().manual_seed(0)
    example, check = torch.randn(4, *shape, generator=gen), torch.randn(7, *shape, generator=gen)
    path.unlink(missing_ok=True)
    buffer = io.BytesIO()
    try:
        with quiet_torch_logs():
            batch = torch.export.Dim("batch", min=1)
            program = torch.export.export(
                model, (example,), dynamic_shapes=({0: batch},), strict=False
            )
            with torch.no_grad():
                same = torch.allclose(program.module()(check), model(check), rtol=1e-4, atol=1e-5)
            if not same:
                raise RuntimeError("the exported program's outputs differ from the model's")
            torch.export.save(program, buffer)
    except Exception as e:  # noqa: BLE001 (torch.export fails in many ways; each is reported)
        text = " ".join(str(e).split()) or type(e).__name__
        return {"file": None, "written": False, "reason": f"{type(e).__name__}: {text[:200]}"}
    atomic_write(path, lambda p: p.write_bytes(buffer.getvalue()))
    return {"file": PROGRAM, "written": True, "reason": None}


@contextmanager
def quiet_torch_logs() -> Iterator[None]:
    """Within the block, torch's loggers print nothing (a failed export logs its whole graph;
    the reason is reported in one line instead)."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    loggers = [lg for lg in loggers if lg.name.split(".")[0] == "torch"]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _load_export(folder: Path) -> RawInputModel:
    meta = read_json(folder / META)
    where = str(folder / META)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{where}: format {_get(meta, 'format')!r}, expected {FORMAT!r}")
    try:
        model_cfg = ModelConfig.model_validate(meta["model"])
    except ValidationError as e:
        raise CheckpointError(
            f"{where}: model.{format_validation_error(e, meta['model'], ModelConfig)}"
        ) from None
    except KeyError:
        raise CheckpointError(f"{where}: has no 'model' section") from None
    prep = meta.get("preprocessing")
    check_preprocessing(prep, f"{where} preprocessing")
    network = build_network(model_cfg, tuple(prep["input_shape"]), len(prep["classes"]))
    restore_wirings(network, meta.get("wirings") or {})
    weights = folder / WEIGHTS
    if not weights.is_file() or _sha256(weights) != meta.get("weights_sha256"):
        raise CheckpointError(f"{weights}: missing or corrupted (sha256 does not match {META})")
    try:
        load_module_state(network, load_file(str(weights)), "")
    except SafetensorError as e:
        raise CheckpointError(f"{weights}: unreadable ({e})") from None
    return _finish(network, prep)


def _get(meta: Any, key: str) -> Any:
    return meta.get(key) if isinstance(meta, dict) else None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def describe_export(meta: dict[str, Any]) -> str:
    """One line on the torch.export program of an export's ``meta``."""
    program = meta["torch_export"]
    if program["written"]:
        return f"{PROGRAM}: torch.export program (load with torch.export.load(path).module())"
    return f"{PROGRAM}: not written, the model does not export ({program['reason']})"


__all__ = ["RawInputModel", "describe_export", "export_model", "load_model"]
