"""``neuroplex analyze`` and ``neuroplex compare``: analysis of finished runs.

Writes ``analysis.json`` (scalars and tables) and ``analysis.npz`` (matrices) into the run dir.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuroplex.analysis.execution import execution_paths
from neuroplex.analysis.functional import stage_activations, stage_report
from neuroplex.analysis.pathnorm import path_norm
from neuroplex.analysis.plasticity import plasticity_report, unique_events
from neuroplex.analysis.routing import routing_analysis
from neuroplex.analysis.similarity import check_estimator, cka_matrix, shuffled_matrix
from neuroplex.analysis.structure import structure_report, wired_layers
from neuroplex.errors import NeuroplexError
from neuroplex.files import atomic_write, atomic_write_json, read_jsonl
from neuroplex.train.checkpoint import load_checkpoint
from neuroplex.train.rundir import PLASTICITY_LOG
from neuroplex.train.runs import load_run

FORMAT = 2  # of analysis.json; older files lack what the report needs (CKA baseline, captions)


def probe_batch(run_dir: Path, probe: int, which: str):
    """The run's model and the first ``probe`` test samples (inputs and labels)."""
    if probe < 2:
        raise NeuroplexError(f"--probe {probe}: need at least 2 samples")
    s, _ = load_run(run_dir, which)
    test = s.data.test
    return s, test.inputs(slice(0, probe)), test.y[:probe]


def rewiring_events(run_dir: Path, which: str) -> list[dict[str, Any]]:
    """The run's plasticity events up to the ``which`` checkpoint (those its weights saw), one
    per (step, layer) even where a resume logged a step twice."""
    path = run_dir / PLASTICITY_LOG
    if not path.exists():
        return []
    step = load_checkpoint(run_dir, which).state["loop"]["step"]
    return [e for e in unique_events(read_jsonl(path)) if e["step"] <= step]


def analyze_run(
    run_dir: str | Path, *, probe: int = 1000, which: str = "best", cka: str = "debiased"
) -> dict[str, Any]:
    """Functional connectivity, communities, dead units per stage; CKA between stages (``cka``
    estimator, with its shuffled-rows baseline); path-norms; structure vs function of sparse
    stages; MoE routing; each sparse layer's execution path and why; what plasticity did.
    Saves analysis.json and analysis.npz in the run dir."""
    run_dir = Path(run_dir)
    check_estimator(cka, probe)
    s, x, y = probe_batch(run_dir, probe, which)
    acts = stage_activations(s.model, x)
    arrays: dict[str, np.ndarray] = {}
    stages = []
    for i, (stage, a) in enumerate(zip(s.model.stages, acts, strict=True)):
        report = _stage(i, stage, a, s.cfg.seed, arrays)
        stages.append({"stage": i, "kind": s.cfg.model.stages[i].kind, **report})
    similarity = _cka(acts, acts, cka, s.cfg.seed)
    arrays["cka"], arrays["cka_shuffled"] = similarity["cka"], similarity["cka_shuffled"]
    routing = _routing(s, x, y, arrays)
    kind = s.cfg.train.plasticity.kind if s.cfg.train.plasticity is not None else None
    result = {
        "format": FORMAT,
        "run_dir": str(run_dir),
        "checkpoint": which,
        "probe": len(x),
        "stages": stages,
        "cka_estimator": cka,
        "cka_between_stages": similarity["cka"].tolist(),
        "cka_shuffled_between_stages": similarity["cka_shuffled"].tolist(),
        "cka_adjacent": [float(similarity["cka"][i, i + 1]) for i in range(len(acts) - 1)],
        "cka_shuffled_max_abs": float(np.abs(similarity["cka_shuffled"]).max()),
        "path_norm": _path_norms(s.model),
        "routing": routing,
        "sparse_layers": execution_paths(s.model, rewiring_events(run_dir, which)),
        "plasticity": plasticity_report(run_dir, s.model, kind),
    }
    atomic_write_json(run_dir / "analysis.json", result)
    atomic_write(run_dir / "analysis.npz", lambda p: _savez(p, arrays))
    return result


def is_current(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds an analysis.json of the current format."""
    path = Path(run_dir) / "analysis.json"
    return path.exists() and json.loads(path.read_text()).get("format") == FORMAT


def compare_runs(
    run_a: str | Path,
    run_b: str | Path,
    *,
    probe: int = 1000,
    which: str = "best",
    cka: str = "debiased",
) -> dict[str, Any]:
    """Linear CKA (``cka`` estimator) between every stage of run A and every stage of run B on
    the same inputs, and its shuffled-rows baseline."""
    check_estimator(cka, probe)
    sa, x, _ = probe_batch(Path(run_a), probe, which)
    sb, xb, _ = probe_batch(Path(run_b), probe, which)
    if sa.cfg.data != sb.cfg.data or not torch.equal(x, xb):
        raise NeuroplexError(f"{run_a} and {run_b} were trained on different data; CKA needs both")
    similarity = _cka(
        stage_activations(sa.model, x), stage_activations(sb.model, x), cka, sa.cfg.seed
    )
    return {
        "run_a": str(run_a),
        "run_b": str(run_b),
        "checkpoint": which,
        "probe": len(x),
        "estimator": cka,
        **{key: matrix.tolist() for key, matrix in similarity.items()},
    }


def _cka(a: list[np.ndarray], b: list[np.ndarray], estimator: str, seed: int):
    """CKA ``[len(a), len(b)]`` between two lists of stage outputs and its shuffled baseline."""
    return {
        "cka": cka_matrix(a, b, estimator),
        "cka_shuffled": shuffled_matrix(a, b, estimator, seed),
    }


def _stage(i: int, stage, acts: np.ndarray, seed: int, arrays: dict[str, np.ndarray]):
    """Functional report of one stage (and structure vs function for a sparse stage): scalars
    returned for the JSON, matrices added to ``arrays``."""
    designed = getattr(stage, "ensemble_labels", None)
    report = stage_report(acts, None if designed is None else np.asarray(designed), seed=seed)
    if designed is not None:
        arrays[f"stage{i}.designed"] = np.asarray(designed)
    if wired_layers(stage):
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
