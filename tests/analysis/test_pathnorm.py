import itertools

import pytest
import torch
from torch import nn

from neuroplex.analysis.pathnorm import path_norm
from neuroplex.layers import DenseStage
from neuroplex.network import Network


def tiny_relu_net() -> Network:
    torch.manual_seed(0)
    stages = [
        DenseStage(3, 4, norm_layer=None, act_layer=nn.ReLU),
        DenseStage(4, 3, norm_layer=None, act_layer=nn.ReLU),
    ]
    return Network(stages, nn.Linear(3, 2))


def brute_force(model: Network, p: float) -> float:
    """Sum over every path (from an input unit or a bias) to an output of prod |w|^p."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    total = 0.0
    for start in range(len(layers) + 1):  # start = 0: input units; start = l: bias of layer l-1
        if start == 0:
            sources = [(i, 1.0) for i in range(layers[0].in_features)]
            rest = layers
        else:
            bias = layers[start - 1].bias.detach()
            sources = [(j, abs(float(bias[j])) ** p) for j in range(len(bias))]
            rest = layers[start:]
        for unit, weight in sources:
            dims = [m.out_features for m in rest]
            for path in itertools.product(*[range(d) for d in dims]):
                prod, prev = weight, unit
                for m, nxt in zip(rest, path, strict=True):
                    prod *= abs(float(m.weight.detach()[nxt, prev])) ** p
                    prev = nxt
                total += prod
    return total ** (1.0 / p)


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_path_norm_equals_brute_force_path_enumeration(p):
    model = tiny_relu_net()
    assert path_norm(model, p) == pytest.approx(brute_force(model, p), rel=1e-10)


def test_path_norm_refuses_layers_it_does_not_model():
    class Odd(nn.Module):
        d_out = 3

        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.scale

    with pytest.raises(ValueError, match="chain"):
        path_norm(Network([Odd()], nn.Linear(3, 2)))
