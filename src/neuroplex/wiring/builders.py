"""Wiring builders: :func:`dense`, :func:`modular` (G2G patterns), :func:`random`
(unit-level Erdős–Rényi), :func:`hypergraph` and :func:`hypergraph_from_file`."""

from __future__ import annotations

import json
import os
from numbers import Integral, Real
from typing import Any

import numpy as np

from neuroplex.wiring.core import (
    Wiring,
    WiringError,
    check_widths,
    parse_dict,
    parse_incidence,
    read_text,
)

PATTERNS = ("ring", "random", "shuffle")


def dense(n_in: int, n_out: int) -> Wiring:
    """Every input unit connects to every output unit (one ensemble per side)."""
    _positive(n_in, "n_in"), _positive(n_out, "n_out")
    return Wiring((n_in,), (n_out,), (((0,), 0),))


def modular(
    n_in: int,
    n_out: int,
    ensembles: int,
    m: int,
    pattern: str = "ring",
    seed: int = 0,
    p_inter: float = 0.0,
) -> Wiring:
    """G2G ensemble-to-ensemble wiring: ``ensembles`` ensembles on each side.

    Output ensemble ``j`` is linked to its own input ensemble ``j`` plus ``m`` others, one
    edge per link, so every output ensemble has exactly ``m + 1`` input ensembles:

    - ``"ring"``: the next ``m`` ensembles, ``j+1 .. j+m`` (mod ``ensembles``);
    - ``"random"``: ``m`` others drawn without replacement (seeded);
    - ``"shuffle"``: the ring on a seeded random cyclic order of the ensembles: with a
      permutation ``p``, ``j`` is linked to ``p⁻¹[(p[j] + d) mod ensembles]`` for
      ``d = 1..m``, so every input ensemble also feeds exactly ``m + 1`` output ensembles.

    When a width is not divisible by ``ensembles`` the first ``width % ensembles``
    ensembles of that side get one unit more than the rest.

    ``p_inter > 0`` adds G2GNet's sparse links between modules (its authors' code, with
    ``p_intra = 1`` and index grouping): each unit connection from an input ensemble that is not
    linked to output ensemble ``j`` exists independently with probability ``p_inter``. The
    result is a unit-mask wiring on the same ensembles, of density
    ``(m + 1) / ensembles + (ensembles - m - 1) / ensembles * p_inter`` in expectation.
    """
    _positive(n_in, "n_in"), _positive(n_out, "n_out"), _positive(ensembles, "ensembles")
    for name, width in (("n_in", n_in), ("n_out", n_out)):
        if ensembles > width:
            raise WiringError(
                f"ensembles = {ensembles} exceeds {name} = {width}; "
                "use at most one ensemble per unit."
            )
    if not isinstance(m, Integral) or m < 0:
        raise WiringError(f"m = {m!r} must be a non-negative integer (links beyond its own).")
    if m >= ensembles:
        raise WiringError(
            f"m = {m} must be smaller than ensembles = {ensembles} "
            "(each output ensemble links to its own input ensemble plus m others)."
        )
    if pattern not in PATTERNS:
        raise WiringError(f"pattern {pattern!r} is unknown; use 'ring', 'random' or 'shuffle'.")
    g, rng = int(ensembles), np.random.default_rng(seed)
    if pattern == "ring":
        others = [[(j + d) % g for d in range(1, m + 1)] for j in range(g)]
    elif pattern == "random":
        others = [rng.choice([i for i in range(g) if i != j], m, replace=False) for j in range(g)]
    else:
        perm = rng.permutation(g)
        inverse = np.argsort(perm)
        others = [inverse[(perm[j] + np.arange(1, m + 1)) % g] for j in range(g)]
    edges = tuple(((int(i),), j) for j in range(g) for i in sorted({j, *map(int, others[j])}))
    blocks = Wiring(_split(n_in, g), _split(n_out, g), edges)
    return _with_inter_links(blocks, p_inter, rng) if p_inter else blocks


def _with_inter_links(blocks: Wiring, p_inter: float, rng: np.random.Generator) -> Wiring:
    """``blocks`` plus each missing unit connection with probability ``p_inter``, as a
    unit mask ``[n_out, n_in]`` on the same ensembles."""
    if not isinstance(p_inter, Real) or not 0 <= p_inter <= 1:
        raise WiringError(f"p_inter = {p_inter!r} must be a probability in [0, 1].")
    draw = rng.random((blocks.n_out, blocks.n_in)) < p_inter
    return Wiring(blocks.in_sizes, blocks.out_sizes, unit_mask=blocks.to_mask() | draw)


def random(n_in: int, n_out: int, epsilon: float, seed: int = 0) -> Wiring:
    """Erdős–Rényi unit-level mask with SET's density ``ε (n_in + n_out) / (n_in n_out)``.

    Each connection exists independently with that probability (capped at 1).
    """
    _positive(n_in, "n_in"), _positive(n_out, "n_out")
    if not isinstance(epsilon, Real) or not epsilon > 0:
        raise WiringError(
            f"epsilon = {epsilon!r} must be positive "
            "(SET density is epsilon * (n_in + n_out) / (n_in * n_out))."
        )
    p = min(1.0, float(epsilon) * (n_in + n_out) / (n_in * n_out))
    mask = np.random.default_rng(seed).random((n_out, n_in)) < p
    return Wiring((n_in,), (n_out,), unit_mask=mask)


def hypergraph(
    in_sizes: list[int] | tuple[int, ...],
    out_sizes: list[int] | tuple[int, ...],
    incidence: list,
    *,
    n_in: int | None = None,
    n_out: int | None = None,
) -> Wiring:
    """Wiring from an incidence list ``[(input ensembles, output ensemble), ...]``.

    ``n_in`` / ``n_out``, when given, must equal the sums of the sizes.
    """
    return check_widths(Wiring(in_sizes, out_sizes, parse_incidence(incidence)), n_in, n_out)


def hypergraph_from_file(path: str | os.PathLike) -> Wiring:
    """Read a JSON file with keys ``in_sizes``, ``out_sizes``, ``incidence``
    (optionally ``n_in``, ``n_out``)."""
    source = f"hypergraph file {path}"
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise WiringError(f"{source} is not valid JSON ({e.msg} at line {e.lineno}).") from e
    if isinstance(data, dict) and "incidence" not in data:
        raise WiringError(f"{source} has no 'incidence' key; add the list of hyperedges.")
    return parse_dict(data, source)


def _positive(value: Any, name: str) -> None:
    if not isinstance(value, Integral) or isinstance(value, bool) or value <= 0:
        raise WiringError(f"{name} = {value!r} must be a positive integer.")


def _split(width: int, parts: int) -> tuple[int, ...]:
    """``parts`` sizes summing to ``width``; the first ``width % parts`` get one extra."""
    base, extra = divmod(int(width), int(parts))
    return tuple(base + (k < extra) for k in range(parts))
