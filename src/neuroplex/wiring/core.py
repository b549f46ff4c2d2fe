"""The Wiring dataclass: validation, JSON, networkx export (numpy, networkx, json; no torch).

See the package docstring (neuroplex.wiring) for the model; builders live in
neuroplex.wiring.builders.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from neuroplex.errors import NeuroplexError
from neuroplex.files import atomic_write_text

Edge = tuple[tuple[int, ...], int]
_JSON_KEYS = frozenset(
    ("format", "version", "n_in", "n_out", "in_sizes", "out_sizes", "incidence", "unit_mask")
)


class WiringError(NeuroplexError, ValueError):
    """An invalid wiring: the message names the problem and says what to change."""


@dataclass(frozen=True, eq=False, repr=False)
class Wiring:
    """Connectivity of one layer (see the neuroplex.wiring package docstring).

    Args:
        in_sizes: unit count of each input ensemble.
        out_sizes: unit count of each output ensemble.
        edges: ``((input ensembles...), output ensemble)`` pairs; empty when ``unit_mask``
            is given.
        unit_mask: bool ``[n_out, n_in]`` unit-level connectivity, or ``None``.
    """

    in_sizes: tuple[int, ...]
    out_sizes: tuple[int, ...]
    edges: tuple[Edge, ...] = ()
    unit_mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "in_sizes", _sizes(self.in_sizes, "in_sizes"))
        set_(self, "out_sizes", _sizes(self.out_sizes, "out_sizes"))
        set_(self, "edges", _edges(self.edges, len(self.in_sizes), len(self.out_sizes)))
        if self.unit_mask is not None:
            if self.edges:
                raise WiringError("give either edges or unit_mask, not both.")
            set_(self, "unit_mask", _mask(self.unit_mask, self.n_out, self.n_in))
        else:
            fed = {j for _, j in self.edges}
            for j in range(len(self.out_sizes)):
                if j not in fed:
                    raise WiringError(
                        f"output ensemble {j} has no input; add an edge into it "
                        "or remove the ensemble from out_sizes."
                    )

    # ---- sizes and structure -------------------------------------------------------------
    @property
    def n_in(self) -> int:
        return sum(self.in_sizes)

    @property
    def n_out(self) -> int:
        return sum(self.out_sizes)

    @property
    def is_block(self) -> bool:
        """True when connectivity is ensemble-structured (edges, no unit mask)."""
        return self.unit_mask is None

    @property
    def block_pairs(self) -> tuple[tuple[int, int], ...]:
        """Sorted unique ``(input ensemble, output ensemble)`` pairs of a block wiring."""
        return tuple(sorted({(i, j) for ins, j in self.edges for i in ins}))

    @property
    def in_offsets(self) -> np.ndarray:
        """First unit of each input ensemble, ``[len(in_sizes) + 1]`` (last = n_in)."""
        return np.concatenate([[0], np.cumsum(self.in_sizes)]).astype(np.int64)

    @property
    def out_offsets(self) -> np.ndarray:
        """First unit of each output ensemble, ``[len(out_sizes) + 1]`` (last = n_out)."""
        return np.concatenate([[0], np.cumsum(self.out_sizes)]).astype(np.int64)

    @property
    def density(self) -> float:
        """Fraction of the ``n_out * n_in`` unit-level connections that exist."""
        if self.unit_mask is not None:
            return float(self.unit_mask.mean())
        links = sum(self.in_sizes[i] * self.out_sizes[j] for i, j in self.block_pairs)
        return links / (self.n_in * self.n_out)

    def to_mask(self) -> np.ndarray:
        """Unit-level connectivity, bool ``[n_out, n_in]`` (a fresh array)."""
        if self.unit_mask is not None:
            return self.unit_mask.copy()
        mask = np.zeros((self.n_out, self.n_in), dtype=bool)
        ino, outo = self.in_offsets, self.out_offsets
        for i, j in self.block_pairs:
            mask[outo[j] : outo[j + 1], ino[i] : ino[i + 1]] = True
        return mask

    @property
    def cross_links(self) -> int | None:
        """Unit connections from input ensemble ``i`` to output ensemble ``j != i``: links
        between modules. None unless both sides have the same number (> 1) of ensembles."""
        g = len(self.in_sizes)
        if g != len(self.out_sizes) or g < 2:
            return None
        mask = self.to_mask()
        ino, outo = self.in_offsets, self.out_offsets
        own = sum(int(mask[outo[e] : outo[e + 1], ino[e] : ino[e + 1]].sum()) for e in range(g))
        return int(mask.sum()) - own

    # ---- export --------------------------------------------------------------------------
    def to_networkx(self) -> nx.DiGraph:
        """Bipartite encoding of the hypergraph as a ``networkx.DiGraph``.

        Nodes ``("in", i)`` and ``("out", j)`` are ensembles (attributes ``side``, ``size``);
        each hyperedge ``t`` is a node ``("edge", t)`` (attributes ``side="edge"``,
        ``inputs``, ``output``, ``connections`` = unit-level links it spans) with arcs
        ``("in", i) -> ("edge", t)`` for each of its input ensembles and
        ``("edge", t) -> ("out", j)``. A unit-mask wiring gets one edge node per ensemble
        pair holding at least one link, ``connections`` counting its links.
        """
        graph = nx.DiGraph(n_in=self.n_in, n_out=self.n_out, density=self.density)
        for i, size in enumerate(self.in_sizes):
            graph.add_node(("in", i), side="in", size=size)
        for j, size in enumerate(self.out_sizes):
            graph.add_node(("out", j), side="out", size=size)
        for t, (ins, j, links) in enumerate(self._hyperedges()):
            graph.add_node(("edge", t), side="edge", inputs=ins, output=j, connections=links)
            graph.add_edges_from((("in", i), ("edge", t)) for i in ins)
            graph.add_edge(("edge", t), ("out", j))
        return graph

    def _hyperedges(self) -> list[tuple[tuple[int, ...], int, int]]:
        """``(inputs, output, unit links)`` per edge node of :meth:`to_networkx`."""
        if self.unit_mask is None:
            return [
                (ins, j, sum(self.in_sizes[i] for i in ins) * self.out_sizes[j])
                for ins, j in self.edges
            ]
        ino, outo = self.in_offsets, self.out_offsets
        mask = self.unit_mask.astype(np.int64)
        counts = np.add.reduceat(np.add.reduceat(mask, outo[:-1], 0), ino[:-1], 1)  # [g_out, g_in]
        rows, cols = np.nonzero(counts)
        return [((int(i),), int(j), int(counts[j, i])) for j, i in zip(rows, cols, strict=True)]

    def to_json(self) -> str:
        """JSON text that :meth:`from_json` turns back into an equal wiring."""
        data: dict[str, Any] = {
            "format": "neuroplex-wiring",
            "version": 1,
            "in_sizes": list(self.in_sizes),
            "out_sizes": list(self.out_sizes),
        }
        if self.unit_mask is None:
            data["incidence"] = [[list(ins), j] for ins, j in self.edges]
        else:
            bits = base64.b64encode(np.packbits(self.unit_mask, axis=None)).decode("ascii")
            data["unit_mask"] = {"shape": list(self.unit_mask.shape), "packbits": bits}
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str, *, source: str = "wiring JSON") -> Wiring:
        """Parse :meth:`to_json` output (or a hypergraph file's text)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise WiringError(f"{source} is not valid JSON ({e.msg} at line {e.lineno}).") from e
        return parse_dict(data, source)

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_json` to ``path`` atomically."""
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Wiring:
        """Read a wiring written by :meth:`save`."""
        return cls.from_json(read_text(path), source=f"wiring file {path}")

    # ---- value semantics -----------------------------------------------------------------
    def _key(self) -> tuple:
        mask = None if self.unit_mask is None else self.unit_mask.tobytes()  # shape is fixed
        return (self.in_sizes, self.out_sizes, self.edges, mask)

    def __eq__(self, other: object) -> bool:
        return self._key() == other._key() if isinstance(other, Wiring) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        kind = f"edges={len(self.edges)}" if self.is_block else "unit_mask"
        return (
            f"Wiring(n_in={self.n_in}, n_out={self.n_out}, ensembles=({len(self.in_sizes)}, "
            f"{len(self.out_sizes)}), {kind}, density={self.density:.4g})"
        )


# ---- parsing and validation --------------------------------------------------------------
def read_text(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise WiringError(f"cannot read wiring file {path}: {e.strerror or e}.") from e


def parse_dict(data: Any, source: str) -> Wiring:
    if not isinstance(data, dict):
        raise WiringError(f"{source} must hold a JSON object with in_sizes, out_sizes, ...")
    unknown = sorted(set(data) - _JSON_KEYS)
    if unknown:
        raise WiringError(
            f"{source} has unknown key {unknown[0]!r}; expected in_sizes, out_sizes and "
            "incidence (or unit_mask), optionally n_in and n_out."
        )
    for key in ("in_sizes", "out_sizes"):
        if key not in data:
            raise WiringError(f"{source} has no {key!r} key; add the list of ensemble sizes.")
    if "incidence" not in data and "unit_mask" not in data:
        raise WiringError(f"{source} has neither 'incidence' nor 'unit_mask'; add one of them.")
    try:
        if "unit_mask" in data:
            mask = _unpack(data["unit_mask"])
            wiring = Wiring(data["in_sizes"], data["out_sizes"], (), mask)
        else:
            wiring = Wiring(data["in_sizes"], data["out_sizes"], parse_incidence(data["incidence"]))
        return check_widths(wiring, data.get("n_in"), data.get("n_out"))
    except WiringError as e:
        raise WiringError(f"{source}: {e}") from e


def check_widths(wiring: Wiring, n_in: int | None, n_out: int | None) -> Wiring:
    for name, width, side in (("n_in", n_in, "in_sizes"), ("n_out", n_out, "out_sizes")):
        total = getattr(wiring, name)
        if width is not None and width != total:
            raise WiringError(
                f"{side} sum to {total} but {name} = {width}; "
                "make the ensemble sizes add up to the layer width."
            )
    return wiring


def _unpack(blob: Any) -> np.ndarray:
    try:
        rows, cols = (int(v) for v in blob["shape"])
        bits = np.frombuffer(base64.b64decode(blob["packbits"], validate=True), np.uint8)
        if rows < 0 or cols < 0 or bits.size != -(-rows * cols // 8):
            raise ValueError("bit count does not match the shape")
        return np.unpackbits(bits, count=rows * cols).reshape(rows, cols).astype(bool)
    except (KeyError, TypeError, ValueError) as e:
        raise WiringError(
            "unit_mask must be {'shape': [n_out, n_in], 'packbits': base64 text} "
            "as written by Wiring.to_json."
        ) from e


def parse_incidence(incidence: Any) -> tuple[Edge, ...]:
    if not isinstance(incidence, list | tuple):
        raise WiringError("incidence must be a list of [input ensembles, output ensemble] pairs.")
    edges = []
    for t, item in enumerate(incidence):
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise WiringError(
                f"incidence item {t} is {item!r}; write it as [[input ensembles...], output]."
            )
        ins, j = item
        edges.append(((ins,) if isinstance(ins, Integral) else tuple(ins), j))
    return tuple(edges)


def _sizes(sizes: Any, name: str) -> tuple[int, ...]:
    if not isinstance(sizes, list | tuple) or not sizes:
        raise WiringError(f"{name} must be a non-empty list of ensemble sizes, got {sizes!r}.")
    for k, size in enumerate(sizes):
        if not isinstance(size, Integral) or isinstance(size, bool) or size <= 0:
            raise WiringError(
                f"{name}[{k}] = {size!r}; every ensemble size must be a positive integer."
            )
    return tuple(int(s) for s in sizes)


def _edges(edges: Any, n_in_ens: int, n_out_ens: int) -> tuple[Edge, ...]:
    seen: dict[Edge, int] = {}
    for t, edge in enumerate(edges):
        if not isinstance(edge, list | tuple) or len(edge) != 2:
            raise WiringError(f"edge {t} is {edge!r}; write it as ((input ensembles...), output).")
        ins, j = edge
        ins = (ins,) if isinstance(ins, Integral) else tuple(ins)
        if not ins:
            raise WiringError(f"edge {t} has no input ensembles; give each edge at least one.")
        for i in (*ins, j):
            if not isinstance(i, Integral) or isinstance(i, bool):
                raise WiringError(f"edge {t} names ensemble {i!r}; use integer indices.")
        for i in ins:
            if not 0 <= i < n_in_ens:
                raise WiringError(
                    f"edge {t} names input ensemble {i}, but input ensembles are "
                    f"0..{n_in_ens - 1}; fix the index or add the ensemble to in_sizes."
                )
        if not 0 <= j < n_out_ens:
            raise WiringError(
                f"edge {t} names output ensemble {j}, but output ensembles are "
                f"0..{n_out_ens - 1}; fix the index or add the ensemble to out_sizes."
            )
        key = (tuple(sorted(int(i) for i in ins)), int(j))
        repeated = sorted({i for i in key[0] if key[0].count(i) > 1})
        if repeated:
            raise WiringError(
                f"edge {t} lists input ensemble {repeated[0]} twice; list each member once."
            )
        if key in seen:
            raise WiringError(
                f"edge {t} duplicates edge {seen[key]} ({key[0]} -> {key[1]}); list each edge once."
            )
        seen[key] = t
    return tuple(seen)


def _mask(mask: Any, n_out: int, n_in: int) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != (n_out, n_in):
        raise WiringError(
            f"unit_mask has shape {mask.shape}, expected (n_out, n_in) = ({n_out}, {n_in}); "
            "match it to the ensemble sizes."
        )
    if mask.dtype != bool and not np.isin(mask, (0, 1)).all():
        raise WiringError("unit_mask must hold only True/False (or 0/1) values.")
    mask = mask.astype(bool)  # a copy: the wiring owns its mask
    mask.flags.writeable = False
    return mask
