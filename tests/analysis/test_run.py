import json

import numpy as np
import pytest

from neuroplex.analysis.run import analyze_run, compare_runs
from neuroplex.errors import NeuroplexError
from neuroplex.train import train


@pytest.fixture
def run_dir(tiny_config, tmp_path):
    train(tiny_config, tmp_path / "run")
    return tmp_path / "run"


def test_analyze_writes_json_and_npz_and_leaves_the_checkpoint_alone(run_dir):
    before = (run_dir / "checkpoints" / "index.json").read_text()
    result = analyze_run(run_dir, probe=200)
    assert [st["units"] for st in result["stages"]] == [32, 16]
    assert all(st["communities"] >= 1 and -0.5 <= st["modularity"] <= 1 for st in result["stages"])
    cka = np.array(result["cka_between_stages"])
    assert np.allclose(np.diag(cka), 1.0) and np.allclose(cka, cka.T)
    assert result["cka_estimator"] == "debiased" and result["cka_adjacent"] == [cka[0, 1]]
    shuffled = np.array(result["cka_shuffled_between_stages"])
    assert shuffled.shape == (2, 2) and np.abs(shuffled).max() < 0.2 < cka[0, 1]
    assert result["cka_shuffled_max_abs"] == np.abs(shuffled).max()
    assert result["plasticity"] is None  # no train.plasticity, no plasticity.jsonl
    assert result["path_norm"]["l1"] > 0 and result["path_norm"]["l2"] > 0
    assert json.loads((run_dir / "analysis.json").read_text())["probe"] == 200
    arrays = np.load(run_dir / "analysis.npz")
    assert arrays["stage0.corr"].shape == (32, 32) and arrays["stage1.labels"].shape == (16,)
    assert (run_dir / "checkpoints" / "index.json").read_text() == before


@pytest.mark.parametrize("estimator", ["debiased", "biased"])
def test_compare_a_run_with_itself_gives_cka_one_on_the_diagonal(run_dir, estimator):
    result = compare_runs(run_dir, run_dir, probe=100, cka=estimator)
    assert np.allclose(np.diag(np.array(result["cka"])), 1.0)
    assert result["estimator"] == estimator and np.array(result["cka_shuffled"]).shape == (2, 2)
    assert np.all(np.diag(np.array(result["cka_shuffled"])) < 0.99)


def test_compare_refuses_runs_on_different_data(run_dir, tiny_config, tmp_path):
    other = tiny_config.model_copy(
        update={"data": tiny_config.data.model_copy(update={"split_seed": 5})}
    )
    train(other, tmp_path / "other", stop_after_epoch=1)
    with pytest.raises(NeuroplexError, match="different data"):
        compare_runs(run_dir, tmp_path / "other", which="last")


def test_probe_must_hold_two_samples(run_dir):
    with pytest.raises(NeuroplexError, match="--probe 1"):
        analyze_run(run_dir, probe=1)
