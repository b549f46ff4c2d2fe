"""``neuroplex analyze`` and ``neuroplex compare``: analysis of finished runs.

Writes ``analysis.json`` (scalars and tables) and ``analysis.npz`` (matrices) into the run dir.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuroplex.analysis.functional import stage_activations, stage_report
from neuroplex.analysis.pathnorm import path_norm
from neuroplex.analysis.routing import routing_analysis
from neuroplex.analysis.similarity import cka_matrix
from neuroplex.analysis.structure import structure_report
from neuroplex.errors import NeuroplexError
from neuroplex.files import atomic_write, atomic_write_json
from neuroplex.layers.stages import SparseStage
from neuroplex.train.runs import load_run


def probe_batch(run_dir: Path, probe: int, which: str):
    """The run's model and the first ``probe`` test samples (inputs and labels)."""
    if probe < 2:
        raise NeuroplexError(f"--probe {probe}: need at least 2 samples")
    s, _ = load_run(run_dir, which)
    test = s.data.test
    return s, test.inputs(slice(0, probe)), test.y[:probe]


def analyze_run(run_dir: str | Path, *, probe: int = 1000, which: str = "best") -> dict[str, Any]:
    """Functional connectivity, communities, dead units per stage; CKA between stages;
    path-norms; structure vs function of sparse stages; MoE routing. Saves analysis.json and
    analysis.npz in the run dir."""
    run_dir = Path(run_dir)
    s, x, y = probe_batch(run_dir, probe, which)
    acts = stage_activations(s.model, x)
    arrays: dict[str, np.ndarray] = {}
    stages = []
    for i, (stage, a) in enumerate(zip(s.model.stages, acts, strict=True)):
        report = _stage(i, stage, a, s.cfg.seed, arrays)
        stages.append({"stage": i, "kind": s.cfg.model.stages[i].kind, **report})
    cka = cka_matrix(acts, acts)
    arrays["cka"] = cka
    routing = _routing(s, x, y, arrays)
    result = {
        "run_dir": str(run_dir),
        "checkpoint": which,
        "probe": len(x),
        "stages": stages,
        "cka_between_stages": cka.tolist(),
        "path_norm": _path_norms(s.model),
        "routing": routing,
    }
    atomic_write_json(run_dir / "analysis.json", result)
    atomic_write(run_dir / "analysis.npz", lambda p: _savez(p, arrays))
    return result


def compare_runs(
    run_a: str | Path, run_b: str | Path, *, probe: int = 1000, which: str = "best"
) -> dict[str, Any]:
    """Linear CKA between every stage of run A and every stage of run B on the same inputs."""
    sa, x, _ = probe_batch(Path(run_a), probe, which)
    sb, xb, _ = probe_batch(Path(run_b), probe, which)
    if sa.cfg.data != sb.cfg.data or not torch.equal(x, xb):
        raise NeuroplexError(f"{run_a} and {run_b} were trained on different data; CKA needs both")
    cka = cka_matrix(stage_activations(sa.model, x), stage_activations(sb.model, x))
    return {"run_a": str(run_a), "run_b": str(run_b), "probe": len(x), "cka": cka.tolist()}


def _stage(i: int, stage, acts: np.ndarray, seed: int, arrays: dict[str, np.ndarray]):
    """Functional report of one stage (and structure vs function for a sparse stage): scalars
    returned for the JSON, matrices added to ``arrays``."""
    designed = getattr(stage, "ensemble_labels", None)
    report = stage_report(acts, None if designed is None else np.asarray(designed), seed=seed)
    if designed is not None:
        arrays[f"stage{i}.designed"] = np.asarray(designed)
    if isinstance(stage, SparseStage):
        structure = structure_report(stage, report["ensemble_corr"])
        for key in ("structure", "pairs_structure", "pairs_function"):
            arrays[f"stage{i}.{key}"] = structure.pop(key)
        for layer, graphs in enumerate(structure.pop("layers")):
            for key, matrix in graphs.items():
                arrays[f"stage{i}.layer{layer}.{key}"] = matrix
        report["structure"] = structure
    for key in ("corr", "labels", "ensemble_corr"):
        if key in report:
            arrays[f"stage{i}.{key}"] = np.asarray(report.pop(key))
    return report


def _routing(s, x, y, arrays: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Routing of every MoE stage: scalars (and the load) for the JSON, matrices to ``arrays``."""
    out = []
    for i, report in routing_analysis(s.model, x, y, s.data.n_classes).items():
        arrays[f"stage{i}.load"] = report["load"]
        arrays[f"stage{i}.routing"] = report.pop("routing")
        arrays[f"stage{i}.routing_frac"] = report.pop("routing_frac")
        out.append({"stage": i, **report, "load": report["load"].tolist()})
    return out


def _path_norms(model) -> dict[str, float] | None:
    try:
        return {"l1": path_norm(model, 1.0), "l2": path_norm(model, 2.0)}
    except ValueError:
        return None  # stages the path-norm does not model (experts, sparse blocks)


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path.write_bytes(buffer.getvalue())
