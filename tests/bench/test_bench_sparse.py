import json

import pytest
import torch
from typer.testing import CliRunner

from neuroplex.bench.sparse import IMPLS, run, setup, wiring_for
from neuroplex.cli import app

OPTS = {"seed": 0, "csr_max_batch": 8, "repeats": 1, "warmup": 0}


@pytest.mark.parametrize("pattern", ["ring", "shuffle", "random"])
def test_every_implementation_computes_the_same_output_and_input_gradient(pattern):
    wiring, found, x = setup(64, 8, pattern, 8, 0.5, OPTS)  # 8 ensembles, m = 3
    assert [c.name for c in found] == list(IMPLS)
    ran = [c for c in found if c.skip is None]
    assert len(ran) == len(IMPLS) - (pattern == "random")  # random has no cyclic window
    grad = torch.randn(8, 64)
    outputs = {}
    for c in ran:
        xg = x.clone().requires_grad_(True)
        y = c.call(xg)
        y.backward(grad)
        outputs[c.name] = (y.detach(), xg.grad)
    y_ref, gx_ref = outputs["dense"]
    for name, (y, gx) in outputs.items():
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5, msg=name)
    # the dense reference really carries the wiring's zeros: equal work, not a dense layer
    dense = next(c for c in found if c.name == "dense")
    assert (dense.call.weight.detach() != 0).float().mean().item() == pytest.approx(wiring.density)


def test_wiring_density_is_nearest_the_target_and_reported():
    wiring = wiring_for(4096, 128, 0.05, "ring")  # 32 ensembles: 1.6 -> 2 of 32
    assert wiring.density == pytest.approx(2 / 32)
    assert wiring_for(4096, 16, 0.1, "random").density == pytest.approx(26 / 256)


def test_tiny_run_writes_json_and_table_with_every_implementation(tmp_path):
    out = tmp_path / "sparse.json"
    result = run(
        width=64,
        batches=[4, 16],
        patterns=["ring", "random"],
        blocks=[8],
        densities=[0.5],
        repeats=1,
        warmup=0,
        threads=1,
        csr_max_batch=8,
        out=out,
        echo=lambda _: None,
    )
    assert json.loads(out.read_text()) == result
    rows = result["rows"]
    assert len(rows) == 4 * len(IMPLS) and {r["impl"] for r in rows} == set(IMPLS)
    for r in rows:
        ran = r["fwd"] is not None
        assert ran == (r["skip"] is None)
        assert ran == (r["fwd_bwd_vs_dense"] is not None)
    skipped = {(r["batch"], r["pattern"], r["impl"]) for r in rows if r["skip"]}
    assert skipped == {(4, "random", "block-window"), (16, "random", "block-window")} | {
        (16, p, "csr") for p in ("ring", "random")
    }
    assert all(r["density"] == 0.5 for r in rows)
    md = out.with_suffix(".md").read_text()
    assert "**Forward + backward**" in md and "**Forward (no_grad)**" in md
    assert "**Forward + backward, first layer (no input gradient)**" in md
    assert result["clock"] == "process CPU time" and "timed in process CPU time" in md
    assert all((r["fwd_bwd_first"] is None) == (r["skip"] is not None) for r in rows)
    assert "| 4 | ring | 8 | 0.500 | " in md
    assert md.count("| 16 | random | 8 | 0.500 |") == 3  # one row per metric table


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--density", "0"], "--density = 0.0: must be in (0, 1]"),
        (["--pattern", "grid"], "--pattern = 'grid': must be one of ring, random, shuffle"),
        (["--block", "64", "--width", "32"], "--block = 64: must be between 1 and --width (32)"),
        (["--batch", "0"], "--batch [0]: every value must be at least 1"),
    ],
)
def test_cli_rejects_a_bad_option_in_one_line(tmp_path, args, message):
    out = ["--out", str(tmp_path / "s.json")]
    result = CliRunner().invoke(app, ["bench", "sparse", *args, *out])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "s.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_one_line_error():
    result = CliRunner().invoke(
        app, ["bench", "sparse", "--device", "cuda", "--width", "8", "--block", "8"]
    )
    assert result.exit_code != 0
    assert "--device = 'cuda': no CUDA device is available" in result.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none here")
def test_cuda_run_computes_on_the_gpu(tmp_path):
    wiring, found, x = setup(64, 8, "random", 8, 0.5, OPTS | {"device": "cuda"})
    assert x.is_cuda and all(p.is_cuda for c in found for p in c.params)
    result = run(
        width=64,
        batches=[8],
        patterns=["ring"],
        blocks=[8],
        densities=[0.5],
        repeats=1,
        warmup=0,
        device="cuda",
        out=tmp_path / "s.json",
        echo=print,
    )
    assert result["clock"] == "CUDA-synchronized wall time"
