"""Functional communities of a run's feature-map stages under four readings of functional
connectivity, against the designed channel ensembles (docs/benchmarks.md, modular CNN):

- ``pooled``: channels averaged over positions (what ``neuroplex analyze`` does);
- ``pooled+gsr``: the same with the global signal (the mean over channels) regressed out;
- ``positions``: every (image, position) an observation;
- ``positions-within``: the same, each image's spatial mean removed first.

    python scripts/fc_variants.py RUN_DIR [--probe 1000] [--louvain-seeds 3]

Prints, per stage with designed ensembles, the NMI (mean over Louvain seeds), the number of
communities and the mean |r| inside and outside the designed ensembles.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from neuroplex.analysis.functional import agreement, communities, evaluating, unit_correlation
from neuroplex.analysis.run import probe_batch


def variants(f: torch.Tensor) -> dict[str, np.ndarray]:
    """The four activation tables ``[observations, c]`` of a feature map ``f [n, c, *s]``."""
    maps = f.double().flatten(2)  # [n, c, p]
    c = maps.shape[1]
    pooled = maps.mean(-1).numpy()  # [n, c]
    g = pooled.mean(1, keepdims=True) - pooled.mean()  # [n, 1] the global signal, centred
    beta = ((pooled - pooled.mean(0)) * g).sum(0) / (g**2).sum()  # [c]
    within = maps - maps.mean(-1, keepdim=True)
    return {
        "pooled": pooled,
        "pooled+gsr": pooled - g * beta,
        "positions": maps.permute(0, 2, 1).reshape(-1, c).numpy(),
        "positions-within": within.permute(0, 2, 1).reshape(-1, c).numpy(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--probe", type=int, default=1000)
    parser.add_argument("--louvain-seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    s, x, _ = probe_batch(args.run_dir, args.probe, "last")
    with evaluating(s.model):
        features = s.model.forward_stages(x).features
    for i, (stage, f) in enumerate(zip(s.model.stages, features, strict=True)):
        designed = getattr(stage, "ensemble_labels", None)
        if designed is None or f.dim() < 3:
            continue
        designed = np.asarray(designed)
        same = designed[:, None] == designed[None, :]
        off = ~np.eye(len(designed), dtype=bool)
        for name, acts in variants(f).items():
            corr = unit_correlation(acts)
            found = [communities(corr, seed=k)[0] for k in range(args.louvain_seeds)]
            nmi = np.mean([agreement(labels, designed)["nmi"] for labels in found])
            strength = np.abs(corr)
            inside, outside = strength[same & off].mean(), strength[~same].mean()
            print(
                f"stage {i} {name:17s} NMI {nmi:.2f}, {found[0].max() + 1} communities, "
                f"|r| inside {inside:.2f}, outside {outside:.2f}"
            )


if __name__ == "__main__":
    main()
