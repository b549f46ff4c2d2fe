"""Networks on feature maps: stage kinds conv / residual / pool / flatten built from config,
their config errors, and a conv network through training, resume, evaluation and analysis."""

import json

import pytest
import torch
from torch import nn

from neuroplex.analysis.run import analyze_run
from neuroplex.config import load_config
from neuroplex.data.registry import Dataset, Split
from neuroplex.errors import ConfigError
from neuroplex.files import read_jsonl
from neuroplex.layers.conv import ChannelLayerNorm
from neuroplex.network import build_network, describe_network
from neuroplex.train import loop, setup
from neuroplex.train.runs import evaluate_run

CNN = (
    "model.stages=[{kind: conv, channels: 8, stride: 2},"
    " {kind: conv, channels: 12, layers: 2, pool: max, norm: layernorm},"
    " {kind: residual, channels: 16, blocks: 1, stride: 2, norm: groupnorm, groups: 4},"
    " {kind: pool}, {kind: dense, width: 10}]"
)


def model_of(stages: str, in_shape, n_classes: int = 3):
    return build_network(load_config(None, [f"model.stages={stages}"]).model, in_shape, n_classes)


def test_cnn_from_config_on_images_and_signals():
    torch.manual_seed(0)
    net = build_network(load_config(None, [CNN]).model, (1, 28, 28), 10)
    # 28 -stride 2-> 14 -pool-> 7 -pool-> 3 -stride 2-> 2; pool -> 16 channels; dense 10
    shapes = [row["out"] for row in describe_network(net, (1, 28, 28))]
    assert shapes == [[8, 14, 14], [12, 3, 3], [16, 2, 2], [16], [10], [10]]
    assert isinstance(net.stages[0][0].norm, nn.BatchNorm2d)
    assert isinstance(net.stages[1][0].norm, ChannelLayerNorm)
    norm = net.stages[2][0].norm1
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 4
    assert net(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    signal = build_network(load_config(None, [CNN]).model, (2, 40), 10)
    # 40 -stride 2-> 20 -pool-> 10 -pool-> 5 -stride 2-> 3
    assert [row["out"] for row in describe_network(signal, (2, 40))][:3] == [
        [8, 20],
        [12, 5],
        [16, 3],
    ]
    assert isinstance(signal.stages[0][0].conv, nn.Conv1d)
    assert isinstance(signal.stages[0][0].norm, nn.BatchNorm1d)


def test_flatten_then_dense_and_vectors_still_take_an_int():
    stages = "[{kind: conv, channels: 4, pool: avg}, {kind: flatten}, {kind: dense}]"
    net = model_of(stages, (1, 8, 8))
    assert [row["out"] for row in describe_network(net, (1, 8, 8))][:2] == [[4, 4, 4], [64]]
    assert net.stages[2][0].linear.in_features == 64
    vector = model_of("[{kind: dense, width: 7}]", 5)
    assert vector(torch.randn(2, 5)).shape == (2, 3)


@pytest.mark.parametrize("kind", ["dense", "sparse"])  # moe also takes feature maps
def test_vector_stage_after_a_feature_map_says_to_flatten_or_pool(kind):
    with pytest.raises(ConfigError) as e:
        model_of(f"[{{kind: conv, channels: 4}}, {{kind: {kind}}}]", (1, 8, 8))
    assert str(e.value) == (
        f"config error: model.stages.1 (kind {kind}) needs a vector input but gets a feature "
        "map of shape (4, 8, 8); put a flatten or pool stage before it"
    )


def test_feature_map_before_the_head_says_to_flatten_or_pool():
    with pytest.raises(ConfigError, match=r"model.stages.1 outputs a feature map of shape "):
        model_of("[{kind: conv, channels: 4}, {kind: residual, channels: 4}]", (1, 8, 8))


@pytest.mark.parametrize("kind", ["conv", "residual", "pool"])
def test_feature_map_stage_on_vectors_is_a_config_error(kind):
    with pytest.raises(ConfigError, match=r"model.stages.1 \(input width 256\): needs a "):
        model_of(f"[{{kind: dense}}, {{kind: {kind}}}]", 10)


def test_conv_config_errors():
    with pytest.raises(ConfigError, match=r"model.stages.0.groups = 8: must divide channels"):
        load_config(None, ["model.stages=[{kind: conv, channels: 12, norm: groupnorm}]"])
    with pytest.raises(ConfigError, match=r"model.stages.0.pool = 'min'"):
        load_config(None, ["model.stages=[{kind: conv, pool: min}]"])
    with pytest.raises(ConfigError, match="shrink the feature map"):
        model_of("[{kind: conv, layers: 4, pool: max}, {kind: flatten}]", (1, 8, 8))


# ---------------------------------------------------------------------------------------------
# a conv network through the whole run (digits as 1x8x8 images)


@pytest.fixture
def digit_images(monkeypatch):
    """Runs load scikit-learn digits as ``[n, 1, 8, 8]`` images."""
    load = setup.load_dataset

    def as_images(cfg, source=None) -> Dataset:
        data = load(cfg, source)

        def image(split: Split | None) -> Split | None:
            return None if split is None else Split(split.x.reshape(-1, 1, 8, 8), split.y)

        return Dataset(
            data.name,
            image(data.train),
            image(data.val),
            image(data.test),
            data.n_features,
            data.n_classes,
            data.class_names,
        )

    monkeypatch.setattr(setup, "load_dataset", as_images)


CNN_RUN = [
    "name=cnn",
    "data.name=digits",
    "model.stages=[{kind: conv, channels: 8}, {kind: sparse_conv, channels: 8, ensembles: 4, "
    "m: 1}, {kind: residual, channels: 12, blocks: 1, stride: 2}, {kind: pool}]",
    "train.epochs=4",
    "train.batch_size=64",
    "train.lr=0.01",
]


def metrics(run_dir) -> list[dict]:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    return [{k: v for k, v in r.items() if k not in {"samples_per_s", "wall_time"}} for r in rows]


@pytest.mark.parametrize("method", ["backprop", "local"])
def test_channels_last_trains_like_the_default_layout_and_resumes_exactly(
    digit_images, tmp_path, method
):
    base = [*CNN_RUN, "train.epochs=2", f"train.method={method}"]
    loop.train(load_config(None, base), tmp_path / "default")
    cfg = load_config(None, [*base, "train.channels_last=true"])
    assert loop.train(cfg, tmp_path / "cl")["channels_last"] is True
    # other conv algorithms round float32 differently (~1e-7 per op), which may flip a few
    # uncertain predictions (0.5% = 6 of 1,293 training digits); one changed step (another
    # batch, a missed update) moves the losses by more than 1e-2
    for a, b in zip(metrics(tmp_path / "default"), metrics(tmp_path / "cl"), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], abs=5e-3 if "acc" in key else 1e-3), key
    loop.train(cfg, tmp_path / "split", stop_after_epoch=1)
    loop.train(cfg, tmp_path / "split", resume=True)
    assert metrics(tmp_path / "split") == metrics(tmp_path / "cl")
    parts = setup.build_setup(cfg).method.modules()  # the network and any aux nets
    weights = [m.weight for part in parts for m in part.modules() if isinstance(m, nn.Conv2d)]
    assert len(weights) >= 3 + (method == "local")
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert not all(w.is_contiguous() for w in weights)  # not only 1-channel filters


def test_conv_network_trains_resumes_evaluates_and_analyses(digit_images, tmp_path):
    cfg = load_config(None, CNN_RUN)
    full = loop.train(cfg, tmp_path / "full")
    assert full["test_acc"] > 0.8  # 4 epochs of a small CNN on 8x8 digits; chance is 0.1
    assert full["activation_bytes_peak"] > 0
    loop.train(cfg, tmp_path / "split", stop_after_epoch=2)
    done = loop.train(cfg, tmp_path / "split", resume=True)
    assert metrics(tmp_path / "split") == metrics(tmp_path / "full")
    assert done["test_acc"] == full["test_acc"]
    again = evaluate_run(tmp_path / "full", which="last")
    assert again["samples"] == full["dataset"]["test"] and 0 <= again["acc"] <= 1
    result = analyze_run(tmp_path / "full", probe=100)
    assert [st["units"] for st in result["stages"]] == [8, 8, 12, 12]  # channels are the units
    assert 0 <= result["stages"][1]["nmi"] <= 1  # sparse_conv: communities vs its ensembles
    assert result["path_norm"] is None  # the path-norm models Linear chains only
    saved = json.loads((tmp_path / "full" / "analysis.json").read_text())
    assert len(saved["cka_between_stages"]) == 4
