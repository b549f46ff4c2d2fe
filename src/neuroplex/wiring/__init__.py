"""Wiring: which units of one layer connect, as plain data (numpy, networkx, json; no torch).

Units are grouped into *ensembles* on the input side (``in_sizes``) and the output side
(``out_sizes``). A block-structured wiring lists *edges* ``(inputs, output)``: every unit of
every input ensemble in the set ``inputs`` connects to every unit of output ensemble
``output``; a set with more than one member is a hyperedge. Two edges into the same output
may share input ensembles: the layer executes the union of the (input, output) ensemble
pairs, so overlapping hyperedges share one weight block.

Unstructured unit-level sparsity (Erdős–Rényi, as in SET) is a wiring with a ``unit_mask``
(bool ``[n_out, n_in]``) and no edges; its ensembles only group units for analysis.

Builders: :func:`dense`, :func:`modular` (G2G patterns), :func:`random`, :func:`hypergraph`,
:func:`hypergraph_from_file`. ``Wiring.save`` / ``Wiring.load`` write and read the same JSON
format that ``hypergraph_from_file`` reads.
"""

from neuroplex.wiring.builders import (
    PATTERNS,
    dense,
    hypergraph,
    hypergraph_from_file,
    modular,
    random,
)
from neuroplex.wiring.core import Edge, Wiring, WiringError

__all__ = [
    "PATTERNS",
    "Edge",
    "Wiring",
    "WiringError",
    "dense",
    "hypergraph",
    "hypergraph_from_file",
    "modular",
    "random",
]
