"""IDX files, the format of MNIST, Fashion-MNIST, KMNIST and EMNIST (gzipped or not).

An IDX file is a 4-byte magic number ``00 00 <type> <ndim>``, ``ndim`` big-endian uint32
sizes, then the values, big-endian, row-major. Every problem raises
:class:`~neuroplex.errors.DataError` naming the file, the value read and what was expected.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from neuroplex.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
# type code -> big-endian numpy dtype (the IDX specification's six types)
IDX_TYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: Path) -> np.ndarray:
    """The array of the IDX file ``path`` (native byte order), e.g. uint8 ``[N, H, W]``."""
    raw = _file_bytes(path)
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise DataError(
            f"{path}: not an IDX file: magic bytes {raw[:4].hex(' ') or 'none'}, "
            "expected 00 00 <type> <ndim>"
        )
    code, ndim = raw[2], raw[3]
    if code not in IDX_TYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_TYPES)
        raise DataError(f"{path}: IDX type code 0x{code:02X} is unknown, expected one of {known}")
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(
            f"{path}: IDX header declares {ndim} dimensions; the file has {len(raw)} bytes, "
            f"expected at least 1 dimension and {header} header bytes"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_TYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX header says dims {dims} of {dtype.name}, {expected} data bytes; "
            f"the file has {len(raw) - header}"
        )
    values = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return values.astype(dtype.newbyteorder("="), copy=False)


def _file_bytes(path: Path) -> bytes:
    """The (decompressed) content of ``path``."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == GZIP_MAGIC:
            return gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected an IDX file") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({str(e) or type(e).__name__})") from None
    return raw
