"""How each sparse layer executes: its path, why (``SparseLinear.path_reason``,
``SparseConv.path_reason``), and the plasticity events that rewired it (a block wiring rewired
at unit level runs masked-dense)."""

from __future__ import annotations

from typing import Any

from torch import nn

from neuroplex.layers.sparse import SparseLinear
from neuroplex.layers.sparse_conv import SparseConv


def execution_paths(model: nn.Module, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per SparseLinear and SparseConv of ``model`` (by module name): ``path``, ``reason``,
    ``connections`` (weights that exist), ``stored`` (entries of the weight tensor) and
    ``rewired`` (kind, number of events, first and last step; None when never rewired), from
    ``events``, the plasticity.jsonl records up to the loaded checkpoint; and ``text``, all of
    it in one line (:func:`describe_execution`) for the CLI and the report."""
    rows = []
    for name, layer in model.named_modules():
        if not isinstance(layer, SparseLinear | SparseConv):
            continue
        mine = [e for e in events if e["layer"] == name]
        rewired = None
        if mine:
            steps = [e["step"] for e in mine]
            rewired = {"kind": mine[0]["kind"], "events": len(mine)}
            rewired |= {"first_step": min(steps), "last_step": max(steps)}
        row = {
            "layer": name,
            "path": layer.path,
            "reason": layer.path_reason,
            "connections": layer.num_connections(),
            "stored": layer.weight.numel(),
            "rewired": rewired,
        }
        rows.append(row | {"text": describe_execution(row)})
    return rows


def describe_execution(row: dict[str, Any]) -> str:
    """One line for a row of :func:`execution_paths`, e.g. ``stages.0.0.linear: masked-dense:
    unit-level mask (not block-structured), after 14 set rewiring events (steps 200-2800)``."""
    text = f"{row['layer']}: {row['reason']}"
    r = row["rewired"]
    if r is None:
        return text
    if r["events"] == 1:
        return text + f", after 1 {r['kind']} rewiring event (step {r['first_step']})"
    steps = f"steps {r['first_step']}-{r['last_step']}"
    return text + f", after {r['events']} {r['kind']} rewiring events ({steps})"
