"""Tests of neuroplex.data.idx: IDX files written here with struct, gzipped or not, and bad ones."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from neuroplex.data.idx import read_idx
from neuroplex.errors import DataError


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    """The IDX encoding of ``array``, written from the specification (big-endian)."""
    big = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(big).tobytes()


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    ("code", "dtype"), [(0x08, np.uint8), (0x09, np.int8), (0x0B, np.int16), (0x0C, np.int32),
                        (0x0D, np.float32), (0x0E, np.float64)]
)  # fmt: skip
def test_round_trip_every_type_plain_and_gzipped(tmp_path, gz, code, dtype):
    rng = np.random.default_rng(code)
    array = (rng.random((5, 3, 4)) * 100).astype(dtype)
    raw = idx_bytes(array, code)
    path = tmp_path / "images-idx3-ubyte"
    path.write_bytes(gzip.compress(raw) if gz else raw)
    out = read_idx(path)
    assert out.shape == (5, 3, 4) and out.dtype == np.dtype(dtype)
    assert np.array_equal(out, array)


def test_big_endian_values_are_decoded(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(struct.pack(">BBBBIhh", 0, 0, 0x0B, 1, 2, 258, -2))
    assert read_idx(path).tolist() == [258, -2]


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (b"", ["magic bytes none", "expected 00 00 <type> <ndim>"]),
        (b"\x1f\x8b\x08\x00junk", ["cannot read"]),
        (b"PK\x03\x04" + b"\x00" * 20, ["magic bytes 50 4b 03 04", "not an IDX file"]),
        (struct.pack(">BBBBI", 0, 0, 0x07, 1, 2) + b"ab", ["type code 0x07", "expected one of"]),
        (struct.pack(">BBBB", 0, 0, 0x08, 3) + b"\x00\x00", ["3 dimensions", "16 header bytes"]),
        (struct.pack(">BBBB", 0, 0, 0x08, 0), ["0 dimensions", "at least 1"]),
        (
            struct.pack(">BBBBIII", 0, 0, 0x08, 3, 10, 28, 28) + bytes(100),
            ["dims (10, 28, 28) of uint8", "7840 data bytes", "the file has 100"],
        ),
    ],
)
def test_corrupt_files_are_one_line_data_errors(tmp_path, content, fragments):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_idx(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_missing_file_and_directory_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_idx(tmp_path / "nothing")
    with pytest.raises(DataError, match="is a directory"):
        read_idx(tmp_path)
