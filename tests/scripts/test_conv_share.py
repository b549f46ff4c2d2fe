"""scripts/conv_share.py: each stage's convolutions are found by their weight shapes."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch import nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import conv_share  # noqa: E402


def event(key: str, shapes: list[list[int]], us: float) -> SimpleNamespace:
    return SimpleNamespace(key=key, input_shapes=shapes, self_cpu_time_total=us)


def test_each_stage_gets_the_time_of_the_convolutions_holding_its_weights():
    model = SimpleNamespace(
        stages=nn.ModuleList(
            [nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)), nn.Conv2d(4, 8, 3), nn.Flatten()]
        )
    )
    events = [
        event("aten::mkldnn_convolution", [[2, 1, 8, 8], [4, 1, 3, 3], []], 10.0),
        event("aten::convolution_backward", [[2, 4, 6, 6], [2, 1, 8, 8], [4, 1, 3, 3]], 20.0),
        event("aten::mkldnn_convolution", [[2, 4, 6, 6], [8, 4, 3, 3], []], 30.0),
        event("aten::native_batch_norm", [[2, 4, 6, 6], [4]], 15.0),  # not a convolution
        event("aten::addmm", [[8, 4, 3, 3]], 25.0),  # a weight's shape, but not a convolution
    ]
    shares = conv_share.stage_shares(model, events)
    assert shares == {0: pytest.approx(30 / 100), 1: pytest.approx(30 / 100)}
