"""``neuroplex customize``: cheap customisation of a trained network on a user's own data.

"A Mixture of Expert Approach for Low-Cost Customization of DNNs" (seed 000): the trained
network is frozen as the *global expert*; a small *local expert* and a *gating network* that
mixes the two are trained on the user's data. The prediction is
``p(y|x) = g(x) · p_global(y|x) + (1 − g(x)) · p_local(y|x)``. The gate also sees a replay of the
original training data (as many samples as the user's), so it learns to keep original inputs
with the global expert; the local expert trains on the user's data only.

On images (a CNN as the global expert) the local expert and the gate read the input flattened
to its ``d = c·h·w`` pixels (and the local expert the CNN's last stage, a flatten or pool stage,
as on vectors): they stay the paper's small linear / one-hidden-layer models, so their cost
stays a small fraction of the global expert's (a conv local expert would be a second network
to design and tune). The global expert's cost counts its convolutions
(:func:`~neuroplex.layers.macs.count_macs`).

Shape legend: ``b`` batch, ``d`` features (pixels of an image), ``f`` last-stage features,
``c`` classes, ``*s`` one sample's shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from neuroplex.config import DataConfig
from neuroplex.data.registry import MNIST1D_VARIANTS, Dataset, Split, load_dataset
from neuroplex.errors import NeuroplexError
from neuroplex.files import atomic_write, atomic_write_json
from neuroplex.layers.macs import count_macs
from neuroplex.network import Network
from neuroplex.train.evaluate import evaluate
from neuroplex.train.runs import load_run


class LocalExpert(nn.Module):
    """A linear classifier on the (flattened) input and the global expert's last-stage features
    (reusing what the global expert computes anyway): ``[b, *s] (d values), [b, f] -> [b, c]``."""

    def __init__(self, d: int, f: int, c: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d + f, c)

    def forward(self, x: Tensor, features: Tensor) -> Tensor:
        return self.linear(torch.cat([x.flatten(1), features], dim=-1))


class Customized(nn.Module):
    """Frozen global expert + local expert, mixed by a gate. ``[b, *s] -> [b, c]`` log-probs
    (``d`` values per sample)."""

    def __init__(self, global_expert: Network, d: int, c: int, gate_hidden: int):
        super().__init__()
        self.global_expert = global_expert.requires_grad_(False).eval()
        self.local_expert = LocalExpert(d, global_expert.stages[-1].d_out, c)
        self.gate = nn.Sequential(
            nn.Flatten(), nn.Linear(d, gate_hidden), nn.ReLU(), nn.Linear(gate_hidden, 1)
        )

    def train(self, mode: bool = True) -> Customized:
        super().train(mode)
        self.global_expert.eval()  # frozen: dropout and norm statistics stay as trained
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.mix(x).log_probs

    def mix(self, x: Tensor) -> MixOutput:
        out = self.global_expert.forward_stages(x)
        local_logits = self.local_expert(x, out.features[-1])
        g = torch.sigmoid(self.gate(x))  # [b, 1]: weight of the global expert
        log_global = F.log_softmax(out.logits, dim=-1)
        log_local = F.log_softmax(local_logits, dim=-1)
        log_probs = torch.logaddexp(torch.log(g) + log_global, torch.log1p(-g) + log_local)
        return MixOutput(log_probs, local_logits, g.squeeze(-1))


class MixOutput(NamedTuple):
    log_probs: Tensor  # [b, c]
    local_logits: Tensor  # [b, c]
    gate: Tensor  # [b]: weight of the global expert


def linear_cost(module: nn.Module) -> dict[str, int]:
    """Parameters and multiply-accumulates per sample of the Linear layers in ``module``."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return {
        "params": sum(p.numel() for p in module.parameters()),
        "macs": sum(m.in_features * m.out_features for m in linears),
    }


def data_config(spec: str, like: DataConfig | None = None) -> DataConfig:
    """A built-in dataset name, or a path: a .npz/.csv file of vectors, or, when the run
    (``like``) trained on images, an image .npz or folder. Built-ins take the run's shape."""
    image = like is not None and like.images and like.shape == "image"
    shape = "image" if image else "flat"
    if spec in MNIST1D_VARIANTS or spec in ("digits", "fashion_mnist"):
        return DataConfig(name=spec, shape=shape)
    return DataConfig(name="images" if image else "file", path=Path(spec), shape=shape)


def train_customized(
    model: Customized, user: Split, replay: Split, *, epochs: int, lr: float, seed: int
) -> None:
    """Adam on local expert + gate; each batch mixes user samples and replayed original ones."""
    params = [*model.local_expert.parameters(), *model.gate.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    x = torch.cat([user.inputs(), replay.inputs()])
    y = torch.cat([user.y, replay.y])
    is_user = torch.cat([torch.ones(len(user)), torch.zeros(len(replay))]).bool()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 100):
            idx = order[start : start + 100]
            out = model.mix(x[idx])
            loss = F.nll_loss(out.log_probs, y[idx])
            mask = is_user[idx]  # the local expert also learns the user's data on its own
            if mask.any():
                loss = loss + F.cross_entropy(out.local_logits[mask], y[idx][mask])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


def customize(
    run_dir: str | Path,
    data: str,
    out: str | Path,
    *,
    epochs: int = 30,
    gate_hidden: int = 8,
    lr: float = 3e-3,
    seed: int = 0,
) -> dict[str, Any]:
    """Customise the run's best checkpoint to ``data``; write weights and summary to ``out``."""
    run_dir, out = Path(run_dir), Path(out)
    s, _ = load_run(run_dir, "best")
    user = load_dataset(data_config(data, s.cfg.data))
    _check_compatible(s.data, user, data)
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    torch.manual_seed(seed)
    model = Customized(s.model, s.data.n_features, s.data.n_classes, gate_hidden)
    replay = _replay(s.data.train, len(user.train), seed)
    baseline = {
        "new_test_acc": evaluate(s.model, user.test)["acc"],
        "original_test_acc": evaluate(s.model, s.data.test)["acc"],
    }
    train_customized(model, user.train, replay, epochs=epochs, lr=lr, seed=seed)
    unchanged = all(torch.equal(before[k], v) for k, v in s.model.state_dict().items())
    global_cost = {
        "params": linear_cost(s.model)["params"],
        "macs": count_macs(s.model, s.data.test.inputs(slice(0, 1)))["total"],
    }
    added = linear_cost(nn.ModuleList([model.local_expert, model.gate]))
    summary = {
        "run_dir": str(run_dir),
        "data": data,
        "before": baseline,
        "after": {
            "new_test_acc": _nll_accuracy(model, user.test),
            "original_test_acc": _nll_accuracy(model, s.data.test),
            "local_expert_alone_new_test_acc": _local_accuracy(model, user.test),
        },
        "global_expert": global_cost,
        "gate_plus_local_expert": added,
        "cost_fraction": {k: added[k] / global_cost[k] for k in ("params", "macs")},
        "global_expert_unchanged": unchanged,
        "settings": {"epochs": epochs, "gate_hidden": gate_hidden, "lr": lr, "seed": seed},
    }
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"local_expert.{k}": v for k, v in model.local_expert.state_dict().items()}
    tensors.update({f"gate.{k}": v for k, v in model.gate.state_dict().items()})
    atomic_write(out / "customization.safetensors", lambda p: save_file(tensors, str(p)))
    atomic_write_json(out / "summary.json", summary)
    return summary


def _check_compatible(original: Dataset, user: Dataset, spec: str) -> None:
    if (user.input_shape, user.n_classes) != (original.input_shape, original.n_classes):
        raise NeuroplexError(
            f"--data {spec}: samples of shape {user.input_shape} in {user.n_classes} classes, "
            f"but the network expects {original.input_shape} in {original.n_classes} classes"
        )


def _replay(train: Split, n: int, seed: int) -> Split:
    gen = torch.Generator().manual_seed(seed + 1)
    idx = torch.randperm(len(train), generator=gen)[: min(n, len(train))]
    return Split(train.inputs(idx), train.y[idx])


@torch.no_grad()
def _nll_accuracy(model: Customized, split: Split) -> float:
    return float((model(split.inputs()).argmax(-1) == split.y).float().mean())


@torch.no_grad()
def _local_accuracy(model: Customized, split: Split) -> float:
    return float((model.mix(split.inputs()).local_logits.argmax(-1) == split.y).float().mean())
