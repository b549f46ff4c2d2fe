import numpy as np
import pytest

from neuroplex.analysis.plasticity import plasticity_report, unique_events
from neuroplex.analysis.run import analyze_run
from neuroplex.config import load_config
from neuroplex.files import read_jsonl
from neuroplex.plasticity.rewiring import sparse_layers
from neuroplex.train import train
from neuroplex.train.runs import load_run

RUN = [
    "data.name=digits",
    "model.stages=[{kind: sparse, width: 32, ensembles: 4, m: 0, layers: 2}]",
    "train.epochs=2",
    "train.batch_size=64",
    "train.plasticity={kind: set, every: 5, fraction: 0.3}",
]


def links_between_ensembles(mask: np.ndarray, in_sizes, out_sizes) -> int:
    """Links of a ``[n_out, n_in]`` mask whose input and output ensembles differ."""
    ins = np.repeat(np.arange(len(in_sizes)), in_sizes)
    outs = np.repeat(np.arange(len(out_sizes)), out_sizes)
    return int(
        sum(mask[j, i] for j in range(len(outs)) for i in range(len(ins)) if outs[j] != ins[i])
    )


@pytest.fixture(scope="module")
def rewired(tmp_path_factory):
    run = tmp_path_factory.mktemp("plasticity") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEUROPLEX_CACHE", str(run.parent / "cache"))
        train(load_config(None, RUN), run)
    return run


def test_events_log_links_between_ensembles_and_the_report_follows_them(rewired):
    events = read_jsonl(rewired / "plasticity.jsonl")
    report = analyze_run(rewired, probe=100, which="last")["plasticity"]
    s, _ = load_run(rewired, "last")
    assert report["kind"] == "set" and report["events"] == len(events)
    assert report["steps"] == sorted({e["step"] for e in events})
    for row, (name, layer) in zip(report["layers"], sparse_layers(s.model).items(), strict=True):
        mine = [e for e in events if e["layer"] == name]
        w = layer.wiring
        assert row["layer"] == name and row["steps"] == [e["step"] for e in mine]
        assert row["swapped"] == sum(e["pruned"] for e in mine) > 0
        assert mine[0]["cross_links_before"] == 0  # m: 0, block diagonal at the start
        cross = links_between_ensembles(w.to_mask(), w.in_sizes, w.out_sizes)
        assert mine[-1]["cross_links_after"] == cross == row["checkpoint"]["cross_links"] > 0
        links = int(w.to_mask().sum())
        assert row["checkpoint"]["links"] == links
        assert row["cross_fraction_end"] == pytest.approx(cross / links)
        assert row["cross_fraction_start"] == 0 and row["density_end"] == w.density


def test_a_resumed_runs_repeated_events_count_once_the_later_kept():
    events = [
        {"step": 5, "layer": "a", "pruned": 1},
        {"step": 10, "layer": "a", "pruned": 2},
        {"step": 10, "layer": "a", "pruned": 3},  # logged again after a resume
        {"step": 5, "layer": "b", "pruned": 4},
    ]
    kept = unique_events(events)
    assert [(e["step"], e["layer"], e["pruned"]) for e in kept] == [
        (5, "a", 1),
        (5, "b", 4),
        (10, "a", 3),
    ]


def test_no_plasticity_gives_none_and_a_configured_run_without_log_gives_no_events(
    rewired, tmp_path
):
    s, _ = load_run(rewired, "last")
    assert plasticity_report(tmp_path, s.model, None) is None
    report = plasticity_report(tmp_path, s.model, "set")
    assert report["events"] == 0 and report["steps"] == []
    assert all("steps" not in row for row in report["layers"])
