"""Plasticity of a finished run: what rewiring did over training, from ``plasticity.jsonl``.

Per rewired layer: the steps of its events, connections pruned and grown per event, density
and the links between different ensembles (``cross_links``, links that cross modules) after
each event, with the start values of the first event; and the layer's links at the analysed
checkpoint. Events a resumed run logged twice (it repeats the steps after its last
checkpoint) count once, the later record kept. Fields of an event that this reader does not
know are ignored; a log written before ``cross_links`` existed gives None there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from neuroplex.files import read_jsonl
from neuroplex.plasticity.rewiring import sparse_layers
from neuroplex.plasticity.schedule import LOG


def unique_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (step, layer), the last one logged, in step order (layers in log order)."""
    kept = {(e["step"], e["layer"]): e for e in events}
    return sorted(kept.values(), key=lambda e: e["step"])


def layer_series(events: list[dict[str, Any]], units: int) -> dict[str, Any]:
    """Time series of one layer's events (``units`` = n_in * n_out connections possible)."""
    first, last = events[0], events[-1]

    def fraction(cross: int | None, density: float) -> float | None:
        return None if cross is None or density == 0 else cross / (density * units)

    return {
        "steps": [e["step"] for e in events],
        "pruned": [e["pruned"] for e in events],
        "grown": [e["grown"] for e in events],
        "density": [e["density_after"] for e in events],
        "cross_fraction": [
            fraction(e.get("cross_links_after"), e["density_after"]) for e in events
        ],
        "swapped": sum(e["pruned"] for e in events),
        "density_start": first["density_before"],
        "density_end": last["density_after"],
        "cross_fraction_start": fraction(first.get("cross_links_before"), first["density_before"]),
        "cross_fraction_end": fraction(last.get("cross_links_after"), last["density_after"]),
    }


def plasticity_report(run_dir: Path, model: nn.Module, kind: str | None) -> dict[str, Any] | None:
    """The rewiring of a run whose config sets ``train.plasticity.kind`` to ``kind`` (None when
    off): None for a run without plasticity and without a log. Else ``events`` (one per layer
    and step; 0 when the log is missing or empty), ``steps`` (the steps with events), and per
    layer its :func:`layer_series` and, under ``checkpoint``, its links and links between
    ensembles in ``model`` (the analysed checkpoint)."""
    path = Path(run_dir) / LOG
    events = unique_events(read_jsonl(path)) if path.exists() else []
    if kind is None and not events:
        return None
    layers = sparse_layers(model)
    kind = kind or events[0].get("kind")
    steps = sorted({e["step"] for e in events})
    report: dict[str, Any] = {"kind": kind, "events": len(events), "steps": steps, "layers": []}
    for name, layer in layers.items():
        mine = [e for e in events if e["layer"] == name]
        wiring = layer.wiring
        now = {"links": int(wiring.to_mask().sum()), "cross_links": wiring.cross_links}
        entry = {"layer": name, "checkpoint": now}
        if mine:
            entry |= layer_series(mine, wiring.n_in * wiring.n_out)
        report["layers"].append(entry)
    return report
