"""Unit tests of neuroplex.train.checkpoint: pickle-free, atomic, verified checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import stat
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuroplex.errors import CheckpointError
from neuroplex.train.checkpoint import (
    FORMAT_VERSION,
    INDEX,
    STATE,
    TENSORS,
    Checkpoint,
    checkpoint_root,
    load_checkpoint,
    load_module_state,
    load_optimizer_state,
    optimizer_state,
    read_index,
    save_checkpoint,
)

# ---------------------------------------------------------------------------------------------
# helpers


def tiny_module(seed: int = 0) -> nn.Module:
    """Linear + BatchNorm (float and int64 buffers) + Linear."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def adamw(module: nn.Module, **kwargs) -> torch.optim.AdamW:
    return torch.optim.AdamW(module.parameters(), **({"lr": 0.01} | kwargs))


def one_step(module: nn.Module, opt: torch.optim.Optimizer, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=gen)
    y = torch.randint(0, 3, (16,), generator=gen)
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(module(x), y).backward()
    opt.step()


def trained(seed: int = 0) -> tuple[nn.Module, torch.optim.AdamW]:
    module = tiny_module(seed)
    opt = adamw(module)
    one_step(module, opt)
    return module, opt


def make_checkpoint(module: nn.Module, opt: torch.optim.Optimizer, epoch: int = 1) -> Checkpoint:
    tensors = {f"model.{k}": v for k, v in module.state_dict().items()}
    opt_tensors, opt_meta = optimizer_state(opt, "optim.")
    tensors.update(opt_tensors)
    state = {"optimizer": opt_meta, "loop": {"epoch": epoch, "best": None, "elapsed": 0.25}}
    return Checkpoint(tensors, state)


def save_trained(run_dir: Path, name: str = "epoch-0001") -> tuple[nn.Module, torch.optim.AdamW]:
    module, opt = trained()
    save_checkpoint(run_dir, name, make_checkpoint(module, opt), best=True)
    return module, opt


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def assert_same_optimizer_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert set(a["state"]) == set(b["state"])
    for idx in a["state"]:
        assert set(a["state"][idx]) == set(b["state"][idx]), idx
        for key, value in a["state"][idx].items():
            other = b["state"][idx][key]
            if torch.is_tensor(value):
                assert torch.is_tensor(other) and torch.equal(value, other), (idx, key)
            else:
                assert value == other, (idx, key)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    assert message.startswith("checkpoint error: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# ---------------------------------------------------------------------------------------------
# round trip


def test_round_trip_tensors_and_state(tmp_path):
    module, opt = trained()
    ckpt = make_checkpoint(module, opt)
    path = save_checkpoint(tmp_path, "epoch-0001", ckpt, best=True)
    assert path == checkpoint_root(tmp_path) / "epoch-0001"

    loaded = load_checkpoint(tmp_path, "last")

    assert_same_tensors(loaded.tensors, {k: v.detach() for k, v in ckpt.tensors.items()})
    expected_state = json.loads(json.dumps(ckpt.state))  # tuples become lists, int keys strings
    assert {
        k: v for k, v in loaded.state.items() if k not in ("format", "sha256", "state_sha256")
    } == (expected_state)
    assert loaded.state["format"] == FORMAT_VERSION
    assert loaded.state["sha256"] == sha256(path / TENSORS)
    assert load_checkpoint(tmp_path, "best").state == loaded.state


def test_load_module_state_reproduces_state_dict(tmp_path):
    module, _ = save_trained(tmp_path)
    fresh = tiny_module(seed=123)
    assert not torch.equal(fresh[0].weight, module[0].weight)  # the load must do something

    load_module_state(fresh, load_checkpoint(tmp_path).tensors, "model.")

    assert_same_tensors(fresh.state_dict(), module.state_dict())


def test_optimizer_state_round_trip_and_next_step_is_bit_identical(tmp_path):
    module, opt = save_trained(tmp_path)
    ckpt = load_checkpoint(tmp_path)

    fresh = tiny_module(seed=123)
    load_module_state(fresh, ckpt.tensors, "model.")
    fresh_opt = adamw(fresh, lr=0.5, weight_decay=0.0, betas=(0.5, 0.5))  # all overwritten
    load_optimizer_state(fresh_opt, ckpt.tensors, ckpt.state["optimizer"], "optim.")

    restored = fresh_opt.state_dict()
    assert all(type(idx) is int for idx in restored["state"])
    assert restored["state"][0]["step"] == 1
    assert isinstance(restored["param_groups"][0]["betas"], tuple)
    assert_same_optimizer_state(restored, opt.state_dict())

    one_step(module, opt, seed=7)
    one_step(fresh, fresh_opt, seed=7)
    assert_same_tensors(fresh.state_dict(), module.state_dict())
    assert_same_optimizer_state(fresh_opt.state_dict(), opt.state_dict())
    assert fresh_opt.state_dict()["state"][0]["step"] == 2


def test_optimizer_state_for_another_model_is_a_checkpoint_error(tmp_path):
    save_trained(tmp_path)
    ckpt = load_checkpoint(tmp_path)
    other = nn.Linear(4, 3)  # two parameters instead of six
    with pytest.raises(CheckpointError) as excinfo:
        load_optimizer_state(adamw(other), ckpt.tensors, ckpt.state["optimizer"], "optim.")
    one_line_error(excinfo, "optimizer state does not match")


# ---------------------------------------------------------------------------------------------
# no pickle


def _forbidden(*args, **kwargs):
    raise AssertionError("pickle / torch.save / torch.load must not be used by checkpoints")


def test_checkpoint_dir_holds_only_safetensors_and_json(tmp_path):
    module, opt = save_trained(tmp_path)
    root = checkpoint_root(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0001", INDEX]
    ckpt_dir = root / "epoch-0001"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == sorted([TENSORS, STATE])

    assert isinstance(json.loads((ckpt_dir / STATE).read_text(encoding="utf-8")), dict)
    assert json.loads((root / INDEX).read_text(encoding="utf-8")) == {
        "last": "epoch-0001",
        "best": "epoch-0001",
    }
    # safetensors layout: u64 little-endian header length, then a JSON header naming the tensors
    raw = (ckpt_dir / TENSORS).read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert set(header) - {"__metadata__"} == set(make_checkpoint(module, opt).tensors)
    for path in root.rglob("*"):
        if path.is_file():  # neither a pickle stream (0x80) nor torch.save's zip archive (PK)
            assert not path.read_bytes().startswith((b"\x80", b"PK")), path


def test_save_and_load_work_with_pickle_and_torch_save_disabled(tmp_path, monkeypatch):
    module, opt = trained()
    ckpt = make_checkpoint(module, opt)
    with monkeypatch.context() as m:
        m.setattr(pickle, "dumps", _forbidden)
        m.setattr(pickle, "dump", _forbidden)
        m.setattr(torch, "save", _forbidden)
        with pytest.raises(AssertionError):  # the patches are live
            pickle.dumps(1)
        save_checkpoint(tmp_path, "epoch-0001", ckpt, best=True)
    with monkeypatch.context() as m:
        m.setattr(pickle, "loads", _forbidden)
        m.setattr(pickle, "load", _forbidden)
        m.setattr(torch, "load", _forbidden)
        with pytest.raises(AssertionError):
            torch.load("anything")
        loaded = load_checkpoint(tmp_path)
        fresh = tiny_module(seed=5)
        load_module_state(fresh, loaded.tensors, "model.")
        fresh_opt = adamw(fresh)
        load_optimizer_state(fresh_opt, loaded.tensors, loaded.state["optimizer"], "optim.")
    assert_same_tensors(fresh.state_dict(), module.state_dict())
    assert_same_optimizer_state(fresh_opt.state_dict(), opt.state_dict())


# ---------------------------------------------------------------------------------------------
# index semantics


def _save_marked(run_dir: Path, epoch: int, *, best: bool) -> None:
    tensors = {"w": torch.full((2,), float(epoch))}
    save_checkpoint(run_dir, f"epoch-{epoch:04d}", Checkpoint(tensors, {"epoch": epoch}), best=best)


def _dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in checkpoint_root(run_dir).iterdir() if p.is_dir())


def test_index_last_and_best_and_cleanup_of_unreferenced_dirs(tmp_path):
    _save_marked(tmp_path, 1, best=True)
    assert read_index(tmp_path) == {"last": "epoch-0001", "best": "epoch-0001"}

    _save_marked(tmp_path, 2, best=False)
    assert read_index(tmp_path) == {"last": "epoch-0002", "best": "epoch-0001"}
    assert _dirs(tmp_path) == ["epoch-0001", "epoch-0002"]
    assert load_checkpoint(tmp_path, "best").state["epoch"] == 1
    assert load_checkpoint(tmp_path, "last").state["epoch"] == 2

    _save_marked(tmp_path, 3, best=True)
    assert read_index(tmp_path) == {"last": "epoch-0003", "best": "epoch-0003"}
    assert _dirs(tmp_path) == ["epoch-0003"]

    _save_marked(tmp_path, 4, best=False)
    _save_marked(tmp_path, 5, best=False)
    assert read_index(tmp_path) == {"last": "epoch-0005", "best": "epoch-0003"}
    assert _dirs(tmp_path) == ["epoch-0003", "epoch-0005"]  # epoch-0004 no longer referenced
    assert torch.equal(load_checkpoint(tmp_path, "best").tensors["w"], torch.full((2,), 3.0))
    assert torch.equal(load_checkpoint(tmp_path, "last").tensors["w"], torch.full((2,), 5.0))


def test_first_checkpoint_is_best_even_if_not_marked(tmp_path):
    _save_marked(tmp_path, 1, best=False)
    assert read_index(tmp_path) == {"last": "epoch-0001", "best": "epoch-0001"}


def test_leftovers_of_a_killed_save_are_cleaned(tmp_path):
    _save_marked(tmp_path, 1, best=True)
    root = checkpoint_root(tmp_path)
    leftover_tmp = root / ".tmp-epoch-0002-abc123"
    leftover_tmp.mkdir()
    (leftover_tmp / TENSORS).write_bytes(b"torn")
    stale = root / "epoch-0002"  # renamed into place, but the index was never updated
    stale.mkdir()
    (stale / "junk").write_text("x")

    _save_marked(tmp_path, 2, best=False)

    assert sorted(p.name for p in root.iterdir()) == ["epoch-0001", "epoch-0002", INDEX]
    assert sorted(p.name for p in stale.iterdir()) == sorted([TENSORS, STATE])
    assert load_checkpoint(tmp_path, "last").state["epoch"] == 2


# ---------------------------------------------------------------------------------------------
# errors


def _rewrite_state(ckpt_dir: Path, **changes) -> None:
    """Edit state.json and recompute its own checksum, as a deliberate edit would."""
    state = json.loads((ckpt_dir / STATE).read_text(encoding="utf-8"))
    state.update(changes)
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    state["state_sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    (ckpt_dir / STATE).write_text(json.dumps(state), encoding="utf-8")


def _edit_state_keeping_checksum(ckpt_dir: Path) -> None:
    state = json.loads((ckpt_dir / STATE).read_text(encoding="utf-8"))
    state["epoch"] = 7
    (ckpt_dir / STATE).write_text(json.dumps(state), encoding="utf-8")


def _edit_json_file(path: Path, edit) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def _replace_dir_by_file(ckpt_dir: Path) -> None:
    shutil.rmtree(ckpt_dir)
    ckpt_dir.write_text("x", encoding="utf-8")


def _flip_byte(ckpt_dir: Path) -> None:
    path = ckpt_dir / TENSORS
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data, past the header
    path.write_bytes(bytes(data))


def _truncate(ckpt_dir: Path) -> None:
    path = ckpt_dir / TENSORS
    path.write_bytes(path.read_bytes()[:-16])


def _truncate_with_matching_checksum(ckpt_dir: Path) -> None:
    _truncate(ckpt_dir)
    _rewrite_state(ckpt_dir, sha256=sha256(ckpt_dir / TENSORS))


def _cut_header(ckpt_dir: Path) -> None:
    (ckpt_dir / TENSORS).write_bytes(b"\x01\x00")
    _rewrite_state(ckpt_dir, sha256=sha256(ckpt_dir / TENSORS))


def _write(name: str, text: str, *, in_root: bool = False):
    def corrupt(ckpt_dir: Path) -> None:
        target = ckpt_dir.parent if in_root else ckpt_dir
        (target / name).write_text(text, encoding="utf-8")

    return corrupt


def _unlink(name: str):
    return lambda ckpt_dir: (ckpt_dir / name).unlink()


CORRUPTIONS = [
    pytest.param(_unlink(TENSORS), ["epoch-0001", f"missing {TENSORS}"], id="missing-tensors"),
    pytest.param(_unlink(STATE), ["epoch-0001", f"missing {STATE}"], id="missing-state"),
    pytest.param(_flip_byte, [TENSORS, "checksum"], id="flipped-byte"),
    pytest.param(_truncate, [TENSORS, "checksum"], id="truncated"),
    pytest.param(_truncate_with_matching_checksum, [TENSORS, "unreadable"], id="truncated-sha"),
    pytest.param(_cut_header, [TENSORS, "unreadable"], id="no-header"),
    pytest.param(_write(STATE, "{not json"), [STATE, "not valid JSON"], id="state-not-json"),
    pytest.param(
        lambda d: _rewrite_state(d, format=FORMAT_VERSION + 98),
        ["epoch-0001", f"format {FORMAT_VERSION + 98}", f"reads {FORMAT_VERSION}"],
        id="wrong-format",
    ),
    pytest.param(lambda d: _rewrite_state(d, format=None), ["format None"], id="missing-format"),
    pytest.param(
        _write(INDEX, '{"last": "epoch-0001', in_root=True),
        [INDEX, "corrupted", "not valid JSON"],
        id="index-not-json",
    ),
    pytest.param(
        _write(INDEX, '["epoch-0001"]', in_root=True), [INDEX, "corrupted"], id="index-list"
    ),
    pytest.param(
        _write(INDEX, '{"best": "epoch-0001"}', in_root=True),
        [INDEX, "corrupted", "'last'"],
        id="index-without-last",
    ),
    pytest.param(
        _write(INDEX, '{"last": "epoch-0042", "best": "epoch-0042"}', in_root=True),
        ["epoch-0042", f"missing {STATE}"],
        id="index-names-missing-dir",
    ),
    pytest.param(_write(INDEX, '{"last": 5}', in_root=True), [INDEX, "'last' = 5"], id="index-int"),
    pytest.param(
        _write(INDEX, '{"last": "/etc", "best": "/etc"}', in_root=True),
        [INDEX, "'/etc'", "checkpoints/"],
        id="index-outside-checkpoints",
    ),
    pytest.param(
        _write(INDEX, '{"last": "../epoch-0001"}', in_root=True),
        [INDEX, "'../epoch-0001'"],
        id="index-parent",
    ),
    pytest.param(_edit_state_keeping_checksum, [STATE, "checksum"], id="state-edited"),
    pytest.param(
        lambda d: _edit_json_file(d / STATE, lambda state: state.pop("state_sha256")),
        [STATE, "no checksum of its own"],
        id="state-without-checksum",
    ),
    pytest.param(_replace_dir_by_file, ["epoch-0001", "a file where"], id="dir-is-a-file"),
    pytest.param(
        _write(STATE, "[1, 2]"),
        [STATE, "corrupted"],
        id="state-json-not-an-object",
    ),
]


@pytest.mark.parametrize(("corrupt", "fragments"), CORRUPTIONS)
def test_corrupted_checkpoint_is_a_one_line_checkpoint_error(tmp_path, corrupt, fragments):
    save_trained(tmp_path)
    corrupt(checkpoint_root(tmp_path) / "epoch-0001")
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(tmp_path, "last")
    one_line_error(excinfo, *fragments)


def test_missing_run_dir_is_a_checkpoint_error(tmp_path):
    missing = tmp_path / "no-such-run"
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(missing)
    one_line_error(excinfo, str(missing), "no checkpoint found", INDEX)


def test_run_dir_without_index_is_a_checkpoint_error(tmp_path):
    (tmp_path / "checkpoints" / "epoch-0001").mkdir(parents=True)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(tmp_path)
    one_line_error(excinfo, str(checkpoint_root(tmp_path) / INDEX), "no checkpoint found")


def test_unknown_pointer_is_a_checkpoint_error(tmp_path):
    save_trained(tmp_path)
    (checkpoint_root(tmp_path) / INDEX).write_text('{"last": "epoch-0001"}', encoding="utf-8")
    assert load_checkpoint(tmp_path, "last").tensors  # 'last' alone is readable
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(tmp_path, "best")
    one_line_error(excinfo, "no 'best' checkpoint", "last")


def _drop_key(tensors):
    return {k: v for k, v in tensors.items() if k != "model.3.bias"}


def _extra_key(tensors):
    return {**tensors, "model.4.weight": torch.zeros(2, 2)}


def _wrong_shape(tensors):
    # the last key in state_dict order, so a key-by-key loader would already have loaded the rest
    return {**tensors, "model.3.bias": torch.zeros(5)}


def _wrong_dtype(tensors):
    return {**tensors, "model.3.bias": tensors["model.3.bias"].double()}


@pytest.mark.parametrize(
    ("mangle", "fragments"),
    [
        pytest.param(_drop_key, ["missing", "3.bias"], id="missing-key"),
        pytest.param(_extra_key, ["unexpected", "4.weight"], id="extra-key"),
        pytest.param(_wrong_shape, ["model.3.bias", "(5,)", "(3,)"], id="wrong-shape"),
        pytest.param(_wrong_dtype, ["model.3.bias", "float64", "float32"], id="wrong-dtype"),
    ],
)
def test_load_module_state_mismatch_leaves_module_untouched(tmp_path, mangle, fragments):
    save_trained(tmp_path)
    tensors = mangle(load_checkpoint(tmp_path).tensors)
    target = tiny_module(seed=99)
    before = snapshot(target)
    assert not torch.equal(before["0.weight"], tensors["model.0.weight"])

    with pytest.raises(CheckpointError) as excinfo:
        load_module_state(target, tensors, "model.")

    one_line_error(excinfo, "does not match the model", *fragments)
    assert_same_tensors(target.state_dict(), before)


def test_load_module_state_ignores_other_prefixes(tmp_path):
    module, _ = save_trained(tmp_path)
    tensors = load_checkpoint(tmp_path).tensors
    assert any(k.startswith("optim.") for k in tensors)  # present, and must be ignored
    fresh = tiny_module(seed=3)
    load_module_state(fresh, tensors, "model.")
    assert_same_tensors(fresh.state_dict(), module.state_dict())


# ---------------------------------------------------------------------------------------------
# permissions


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize(
    "relpath",
    [
        INDEX,
        f"epoch-0001/{STATE}",
        f"epoch-0001/{TENSORS}",
    ],
)
def test_checkpoint_files_are_readable_by_group_and_others(tmp_path, umask_022, relpath):
    save_trained(tmp_path)
    mode = stat.S_IMODE((checkpoint_root(tmp_path) / relpath).stat().st_mode)
    assert mode == 0o644, oct(mode)


def test_checkpoint_dirs_follow_the_umask(tmp_path, umask_022):
    save_trained(tmp_path)
    for path in (checkpoint_root(tmp_path), checkpoint_root(tmp_path) / "epoch-0001"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path
