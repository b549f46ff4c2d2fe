import json

from torch import nn

from neuroplex import wiring as W
from neuroplex.analysis.execution import execution_paths
from neuroplex.analysis.run import analyze_run
from neuroplex.config import load_config
from neuroplex.layers.sparse import SparseLinear
from neuroplex.train import train


def test_each_sparse_layer_says_its_path_why_and_what_rewired_it():
    model = nn.Sequential(
        SparseLinear(W.modular(40, 256, 8, 0, "ring")), SparseLinear(W.modular(256, 16, 8, 1))
    )
    model[1].set_wiring(W.random(256, 16, 2.0, seed=0))  # as a unit-level rewiring leaves it
    events = [{"step": s, "layer": "1", "kind": "set"} for s in (200, 400, 600)]
    block, unit = execution_paths(model, events)
    assert block["layer"] == "0" and block["path"] == "block-window" and block["rewired"] is None
    assert block["text"] == "0: block-window: 8 blocks of 5x32, up to 1 per output ensemble"
    assert block["connections"] == block["stored"] == 8 * 5 * 32
    assert unit["path"] == "masked-dense" and unit["stored"] == 256 * 16
    assert unit["connections"] == int(model[1].mask.sum()) < unit["stored"]
    assert unit["rewired"] == {"kind": "set", "events": 3, "first_step": 200, "last_step": 600}
    assert unit["text"] == (
        "1: masked-dense: unit-level mask (not block-structured), "
        "after 3 set rewiring events (steps 200-600)"
    )
    (once,) = execution_paths(model[1:], [{"step": 200, "layer": "1", "kind": "rigl"}])
    assert once["text"].endswith(
        "unit-level mask (not block-structured), after 1 rigl rewiring event (step 200)"
    )


def test_analyze_reports_paths_with_the_events_of_the_loaded_checkpoint(tmp_path):
    cfg = load_config(
        None,
        [
            "data.name=digits",
            "model.stages=[{kind: sparse, width: 32, ensembles: 4, m: 1}]",
            "train.epochs=2",
            "train.batch_size=64",
            "train.plasticity={kind: set, every: 5, fraction: 0.3}",
        ],
    )
    train(cfg, tmp_path / "run")
    events = [json.loads(line) for line in (tmp_path / "run" / "plasticity.jsonl").open()]
    result = analyze_run(tmp_path / "run", probe=50, which="last")
    (row,) = result["sparse_layers"]
    assert row["layer"] == "stages.0.0.linear" and row["path"] == "masked-dense"
    assert row["rewired"]["events"] == len(events) > 0
    assert row["rewired"]["last_step"] == max(e["step"] for e in events)
    saved = json.loads((tmp_path / "run" / "analysis.json").read_text())
    assert saved["sparse_layers"] == result["sparse_layers"]
