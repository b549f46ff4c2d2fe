import json
import subprocess
import sys

import numpy as np
import pytest

from neuroplex import wiring as W
from neuroplex.errors import NeuroplexError
from neuroplex.wiring import Wiring, WiringError


def inputs_of(wiring: Wiring) -> list[set[int]]:
    sets = [set() for _ in wiring.out_sizes]
    for i, j in wiring.block_pairs:
        sets[j].add(i)
    return sets


def test_wiring_module_does_not_import_torch():
    code = "import sys, neuroplex.wiring; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_public_name_imports_from_the_package():
    from neuroplex.wiring import builders, core

    for name in W.__all__:
        home = builders if hasattr(builders, name) and name not in vars(core) else core
        assert getattr(W, name) is getattr(home, name)
    assert set(W.__all__) >= {"Wiring", "WiringError", "PATTERNS", "dense", "modular"}
    assert {"random", "hypergraph", "hypergraph_from_file", "Edge"} <= set(W.__all__)


def test_dense_connects_everything():
    w = W.dense(3, 5)
    assert (w.n_in, w.n_out, w.density, w.is_block) == (3, 5, 1.0, True)
    assert w.to_mask().shape == (5, 3) and w.to_mask().all()


@pytest.mark.parametrize("pattern", ["ring", "random", "shuffle"])
def test_modular_links_own_ensemble_plus_m(pattern):
    g, m = 8, 3
    w = W.modular(64, 32, g, m, pattern, seed=1)
    sets = inputs_of(w)
    assert all(j in s and len(s) == m + 1 for j, s in enumerate(sets))
    assert w.density == pytest.approx((m + 1) / g)
    mask = w.to_mask()
    assert mask.sum() == (m + 1) * 8 * 4 * g  # (m+1) blocks of 8x4 units per output ensemble
    assert mask.sum(1).tolist() == [(m + 1) * 8] * 32  # every output unit: m+1 ensembles of 8
    out_degree = np.bincount([i for i, _ in w.block_pairs], minlength=g)
    if pattern != "random":
        assert (out_degree == m + 1).all()


def test_modular_ring_reads_the_next_m_ensembles():
    sets = inputs_of(W.modular(10, 10, 5, 2, "ring"))
    assert sets == [{j, (j + 1) % 5, (j + 2) % 5} for j in range(5)]


def test_modular_seeds_are_reproducible_and_matter():
    a, b = W.modular(40, 40, 10, 3, "random", seed=0), W.modular(40, 40, 10, 3, "random", seed=0)
    assert a == b and a != W.modular(40, 40, 10, 3, "random", seed=5)
    assert W.modular(40, 40, 10, 3, "shuffle", seed=0) != W.modular(40, 40, 10, 3, "shuffle", 5)


def test_modular_uneven_sizes_differ_by_one():
    w = W.modular(10, 7, 3, 1)
    assert w.in_sizes == (4, 3, 3) and w.out_sizes == (3, 2, 2)
    assert w.to_mask().shape == (7, 10)


def test_modular_inter_links_keep_blocks_and_draw_the_rest_at_p_inter():
    g, m, p = 4, 1, 0.3
    w = W.modular(400, 320, g, m, "ring", seed=3, p_inter=p)
    assert not w.is_block and (w.in_sizes, w.out_sizes) == ((100,) * 4, (80,) * 4)
    mask = w.to_mask()
    linked = np.zeros_like(mask)  # output ensemble j reads j and j+1 in full (ring, m = 1)
    for j in range(g):
        for i in (j, (j + 1) % g):
            linked[80 * j : 80 * (j + 1), 100 * i : 100 * (i + 1)] = True
    assert mask[linked].all()
    drawn = mask[~linked].mean()  # 64,000 Bernoulli(0.3) draws: std 0.0018
    assert abs(drawn - p) < 0.01
    assert w.density == pytest.approx((m + 1) / g + (g - m - 1) / g * drawn)


def test_modular_inter_links_limits_and_seeds():
    blocks = W.modular(24, 16, 4, 0, seed=1)
    assert W.modular(24, 16, 4, 0, seed=1, p_inter=0.0) == blocks
    assert W.modular(24, 16, 4, 0, seed=1, p_inter=1.0).to_mask().all()
    a = W.modular(24, 16, 4, 0, seed=1, p_inter=0.5)
    assert a == W.modular(24, 16, 4, 0, seed=1, p_inter=0.5)
    assert a != W.modular(24, 16, 4, 0, seed=2, p_inter=0.5)
    with pytest.raises(WiringError, match=r"p_inter = 1\.5 must be a probability in \[0, 1\]"):
        W.modular(24, 16, 4, 0, p_inter=1.5)


def test_random_density_follows_set_formula():
    n_in, n_out, eps = 400, 300, 20
    p = eps * (n_in + n_out) / (n_in * n_out)
    w = W.random(n_in, n_out, eps, seed=0)
    sigma = (p * (1 - p) / (n_in * n_out)) ** 0.5
    assert not w.is_block and abs(w.density - p) < 5 * sigma
    assert w.to_mask().sum() == w.unit_mask.sum()
    assert W.random(4, 4, 100).density == 1.0  # capped at 1
    assert W.random(50, 50, 2, seed=3) == W.random(50, 50, 2, seed=3)


def test_hypergraph_mask_is_the_union_of_its_hyperedges():
    w = W.hypergraph([2, 1, 3], [2, 1], [([0, 2], 0), ([2], 0), ([1], 1)], n_in=6, n_out=3)
    expected = np.zeros((3, 6), dtype=bool)
    expected[0:2, 0:2] = expected[0:2, 3:6] = True
    expected[2, 2] = True
    assert np.array_equal(w.to_mask(), expected)
    assert w.density == pytest.approx(expected.mean())
    assert w.edges == (((0, 2), 0), ((2,), 0), ((1,), 1))


def all_kinds() -> list[Wiring]:
    return [
        W.dense(3, 4),
        W.modular(20, 12, 4, 1, "ring"),
        W.modular(20, 12, 4, 2, "random", seed=2),
        W.modular(21, 13, 4, 2, "shuffle", seed=2),
        W.random(9, 7, 2.0, seed=1),
        W.hypergraph([2, 3], [1, 4], [([1, 0], 0), ([1], 1)]),
    ]


@pytest.mark.parametrize("wiring", all_kinds(), ids=repr)
def test_json_round_trip_is_exact(wiring, tmp_path):
    again = Wiring.from_json(wiring.to_json())
    assert again == wiring and hash(again) == hash(wiring)
    assert again.to_json() == wiring.to_json()
    assert np.array_equal(again.to_mask(), wiring.to_mask())
    wiring.save(tmp_path / "w.json")
    assert Wiring.load(tmp_path / "w.json") == wiring


def test_networkx_export_encodes_hyperedges_as_nodes():
    w = W.hypergraph([2, 3, 1], [4, 5], [([0, 1], 0), ([2], 1), ([0], 1)])
    graph = w.to_networkx()
    ins = [("in", i) for i in range(3)]
    outs = [("out", j) for j in range(2)]
    hyper = [("edge", t) for t in range(3)]
    assert set(graph.nodes) == set(ins + outs + hyper)
    assert [graph.nodes[n]["size"] for n in ins + outs] == [2, 3, 1, 4, 5]
    assert set(graph.edges) == {
        (("in", 0), ("edge", 0)),
        (("in", 1), ("edge", 0)),
        (("edge", 0), ("out", 0)),
        (("in", 2), ("edge", 1)),
        (("edge", 1), ("out", 1)),
        (("in", 0), ("edge", 2)),
        (("edge", 2), ("out", 1)),
    }
    assert graph.nodes[("edge", 0)]["inputs"] == (0, 1)
    assert graph.nodes[("edge", 0)]["connections"] == (2 + 3) * 4
    assert graph.graph["density"] == pytest.approx(w.density)


def test_networkx_export_of_a_unit_mask_counts_links_per_ensemble_pair():
    w = Wiring((2, 2), (1,), unit_mask=np.array([[True, False, False, False]]))
    graph = w.to_networkx()
    edge_nodes = [n for n in graph if n[0] == "edge"]
    assert edge_nodes == [("edge", 0)]
    assert graph.nodes[("edge", 0)]["connections"] == 1
    assert graph.has_edge(("in", 0), ("edge", 0)) and graph.has_edge(("edge", 0), ("out", 0))


INVALID = {
    "size": (lambda: Wiring((3, 0), (2,), (((0,), 0),)), "in_sizes[1] = 0"),
    "sum": (lambda: W.hypergraph([2, 2], [3], [([0, 1], 0)], n_in=5), "in_sizes sum to 4"),
    "no input": (lambda: W.hypergraph([2], [1, 1], [([0], 0)]), "output ensemble 1 has no input"),
    "in range": (lambda: W.hypergraph([2, 2], [1], [([0, 3], 0)]), "input ensemble 3"),
    "out range": (lambda: W.hypergraph([2], [1], [([0], 0), ([0], 2)]), "output ensemble 2"),
    "duplicate": (lambda: W.hypergraph([1, 1], [1], [([0, 1], 0), ([1, 0], 0)]), "duplicates"),
    "twice": (lambda: W.hypergraph([1, 1], [1], [([1, 1], 0)]), "lists input ensemble 1 twice"),
    "empty set": (lambda: W.hypergraph([1], [1], [([], 0)]), "no input ensembles"),
    "mask shape": (lambda: Wiring((2,), (3,), unit_mask=np.ones((2, 3), bool)), "unit_mask has"),
    "mask values": (lambda: Wiring((2,), (1,), unit_mask=np.array([[0, 2]])), "True/False"),
    "both": (lambda: Wiring((1,), (1,), (((0,), 0),), np.ones((1, 1), bool)), "not both"),
    "m": (lambda: W.modular(8, 8, 4, 4), "m = 4 must be smaller than ensembles = 4"),
    "m negative": (lambda: W.modular(8, 8, 4, -1), "m = -1"),
    "ensembles": (lambda: W.modular(3, 8, 4, 1), "ensembles = 4 exceeds n_in = 3"),
    "pattern": (lambda: W.modular(8, 8, 4, 1, "spiral"), "pattern 'spiral' is unknown"),
    "epsilon": (lambda: W.random(8, 8, 0.0), "epsilon = 0.0 must be positive"),
    "width": (lambda: W.dense(0, 3), "n_in = 0 must be a positive integer"),
}


@pytest.mark.parametrize("name", INVALID)
def test_validation_errors_are_one_line_and_name_the_problem(name):
    build, phrase = INVALID[name]
    with pytest.raises(WiringError) as info:
        build()
    message = str(info.value)
    assert phrase in message and "\n" not in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, NeuroplexError)


def write(tmp_path, data, name="h.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_hypergraph_from_file(tmp_path):
    data = {"in_sizes": [2, 2], "out_sizes": [3], "incidence": [[[0, 1], 0]]}
    w = W.hypergraph_from_file(write(tmp_path, data))
    assert w == W.hypergraph([2, 2], [3], [([0, 1], 0)])
    data["n_in"] = 4
    assert W.hypergraph_from_file(write(tmp_path, data)) == w


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        ("{not json", "is not valid JSON"),
        ({"in_sizes": [2], "out_sizes": [1]}, "has no 'incidence' key"),
        ({"in_sizes": [2], "out_sizes": [1], "incidence": [[[0], 1]]}, "output ensemble 1"),
        ({"in_sizes": [2], "out_sizes": [1], "incidence": [[0]]}, "incidence item 0"),
        ({"in_sizes": [2], "incidence": [[[0], 0]]}, "has no 'out_sizes' key"),
        ({"in_sizes": [2], "out_sizes": [1], "incidence": [], "size": 3}, "unknown key 'size'"),
        ({"in_sizes": [2], "out_sizes": [1], "incidence": [[[0], 0]], "n_out": 2}, "n_out = 2"),
        ([1, 2], "must hold a JSON object"),
    ],
)
def test_bad_hypergraph_file_names_the_file_and_the_problem(tmp_path, content, phrase):
    path = write(tmp_path, content)
    with pytest.raises(WiringError) as info:
        W.hypergraph_from_file(path)
    assert str(path) in str(info.value) and phrase in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_and_corrupt_unit_mask(tmp_path):
    with pytest.raises(WiringError, match="cannot read wiring file"):
        W.hypergraph_from_file(tmp_path / "absent.json")
    data = json.loads(W.random(5, 4, 1.0).to_json())
    data["unit_mask"]["packbits"] = data["unit_mask"]["packbits"][:-4]
    with pytest.raises(WiringError, match="unit_mask must be"):
        Wiring.from_json(json.dumps(data))


def test_cross_links_count_the_unit_links_between_different_ensembles():
    assert W.modular(16, 8, 4, 0).cross_links == 0  # block diagonal: no link between modules
    assert W.modular(16, 8, 4, 1).cross_links == 4 * 2 * 4  # one 2x4 foreign block per output
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = mask[0, 3] = mask[3, 1] = mask[2, 2] = True  # ensembles {0,1} and {2,3}
    w = Wiring((2, 2), (2, 2), unit_mask=mask)
    assert w.cross_links == 2  # (out 0, in 3) and (out 3, in 1)
    assert W.dense(4, 4).cross_links is None  # one ensemble per side: no modules to cross
    assert Wiring((2, 2), (4,), unit_mask=np.ones((4, 4), bool)).cross_links is None
