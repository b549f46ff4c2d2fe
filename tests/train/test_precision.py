"""``train.precision`` (autocast) and ``train.compile`` in the loop."""

import json

import pytest
import torch

from neuroplex.config import load_config
from neuroplex.errors import ConfigError
from neuroplex.files import read_jsonl
from neuroplex.train import loop
from neuroplex.train.precision import Precision

TIMING = {"samples_per_s", "wall_time"}
# no dropout: compiled code draws its random numbers differently from eager (inductor's RNG)
SMALL = [
    "name=tiny",
    "data.name=digits",
    "model.stages=[{kind: dense, width: 32}, {kind: sparse, width: 32, ensembles: 4, m: 1}]",
    "train.epochs=2",
    "train.batch_size=64",
    "train.lr=0.01",
]


def metrics(run_dir) -> list[dict]:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.mark.parametrize("method", ["backprop", "local"])
def test_bf16_mixed_trains_and_the_summary_says_so(tmp_path, method):
    cfg = load_config(None, [*SMALL, "train.precision=bf16-mixed", f"train.method={method}"])
    summary = loop.train(cfg, tmp_path / "run")
    rows = metrics(tmp_path / "run")
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert summary["test_acc"] > 0.6  # digits: chance is 0.1
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["precision"] == "bf16-mixed" and saved["compile"] is False
    assert saved["cuda_max_memory_allocated"] is None  # CPU run
    # the run really ran in bf16: its numbers differ from the float32 run's
    loop.train(load_config(None, [*SMALL, f"train.method={method}"]), tmp_path / "fp32")
    assert metrics(tmp_path / "fp32")[0]["train_loss"] != rows[0]["train_loss"]


def test_autocast_covers_forward_and_loss_and_leaves_parameters_float32():
    model = torch.nn.Linear(4, 3)
    precision = Precision("bf16-mixed", torch.device("cpu"))
    with precision.autocast():
        y = model(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16
    precision.backward(y.float().sum())
    assert model.weight.grad.dtype == torch.float32
    with Precision("32", torch.device("cpu")).autocast():
        assert model(torch.randn(2, 4)).dtype == torch.float32


def test_compile_on_and_off_give_matching_metrics_and_compiled_resume_is_exact(tmp_path):
    eager = load_config(None, SMALL)
    compiled = load_config(None, [*SMALL, "train.compile=true"])
    loop.train(eager, tmp_path / "eager")
    summary = loop.train(compiled, tmp_path / "compiled")
    assert summary["compile"] is True
    # inductor fuses and reorders float32 arithmetic (differences ~1e-7 per op); over 2 epochs
    # of 28 steps each the losses drift by far less than 1e-3, while one changed step (another
    # batch order, a missed update) moves them by more than 1e-2
    for a, b in zip(metrics(tmp_path / "eager"), metrics(tmp_path / "compiled"), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], abs=1e-3), key
    loop.train(compiled, tmp_path / "split", stop_after_epoch=1)
    loop.train(compiled, tmp_path / "split", resume=True)
    assert metrics(tmp_path / "split") == metrics(tmp_path / "compiled")


def test_16_mixed_is_refused_on_the_cpu_in_one_line(tmp_path):
    cfg = load_config(None, [*SMALL, "train.precision=16-mixed", "device=cpu"])
    with pytest.raises(ConfigError, match=r"train.precision = '16-mixed' on device 'cpu': "):
        loop.train(cfg, tmp_path / "run")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed runs on CUDA; no GPU here")
def test_16_mixed_trains_on_cuda_with_a_grad_scaler(tmp_path):
    cfg = load_config(None, [*SMALL, "train.precision=16-mixed", "device=cuda"])
    summary = loop.train(cfg, tmp_path / "run")
    assert summary["precision"] == "16-mixed" and summary["test_acc"] > 0.6
    assert summary["cuda_max_memory_allocated"] > 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.precision=16", "train.precision = 16: must be '32', 'bf16-mixed' or '16-mixed'"),
        ("train.precision=fp16", "train.precision = 'fp16': must be '32', 'bf16-mixed' or"),
        ("train.compile=2", "train.compile = 2: must be a valid boolean"),
    ],
)
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_yaml_32_is_the_string_32():
    assert load_config(None, ["train.precision=32"]).train.precision == "32"
