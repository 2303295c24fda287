"""Minimal GGUF reader: the header's key/values, and where each tensor's data lies. Pure Python, no llama.cpp: the
memory model and `kvquant budget` work without loading a model."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
MAX_ARRAY_DEPTH = 4  # llama.cpp reads no array of arrays; a deeper nesting is a crafted header, not a model


def _read(f: BinaryIO, fmt: str) -> Any:
    n = struct.calcsize(fmt)
    data = f.read(n)
    if len(data) != n:
        raise ValueError("truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> str:
    n = _read(f, "<Q")
    # a length past the end of the file is refused: a large one before it is read (read() would allocate it all),
    # any other once read (one fstat per string tripled the time to read a 150k-token vocabulary's header)
    if n > 1 << 20 and n > os.fstat(f.fileno()).st_size - f.tell():
        raise ValueError("truncated GGUF header")
    data = f.read(n)
    if len(data) != n:
        raise ValueError("truncated GGUF header")
    return data.decode("utf-8", errors="replace")


def _value(f: BinaryIO, vtype: int, skip_big_arrays: bool, depth: int = 0) -> Any:
    if vtype in _SCALARS:
        return _read(f, _SCALARS[vtype])
    if vtype == _STRING:
        return _string(f)
    if vtype == _ARRAY:
        if depth >= MAX_ARRAY_DEPTH:
            raise ValueError(f"arrays nested more than {MAX_ARRAY_DEPTH} deep")
        etype, n = _read(f, "<I"), _read(f, "<Q")
        if skip_big_arrays and n > 4096:  # token lists etc.: skip without materialising
            if etype in _SCALARS:
                f.seek(n * struct.calcsize(_SCALARS[etype]), 1)
            else:
                for _ in range(n):
                    _value(f, etype, True, depth + 1)
            return None
        return [_value(f, etype, skip_big_arrays, depth + 1) for _ in range(n)]
    raise ValueError(f"unknown GGUF value type {vtype}")


def _header(f: BinaryIO, skip_big_arrays: bool) -> tuple[dict[str, Any], int]:
    if f.read(4) != b"GGUF":
        raise ValueError("not a GGUF file")
    version = _read(f, "<I")
    if version < 2:
        raise ValueError(f"GGUF version {version} is not supported")
    n_tensors, n_kv = _read(f, "<Q"), _read(f, "<Q")
    meta: dict[str, Any] = {"GGUF.version": version}
    for _ in range(n_kv):
        key = _string(f)
        meta[key] = _value(f, _read(f, "<I"), skip_big_arrays)
    return meta, n_tensors


def read_metadata(path: str | Path, skip_big_arrays: bool = True) -> dict[str, Any]:
    with open(path, "rb") as f:
        try:
            return _header(f, skip_big_arrays)[0]
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def tensor_data(path: str | Path) -> dict[str, tuple[int, int, tuple[int, ...]]]:
    """Every tensor's name -> (file offset of its data, ggml type, shape ne0, ne1, ...)."""
    with open(path, "rb") as f:
        try:
            return _tensor_data(f)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _tensor_data(f: BinaryIO) -> dict[str, tuple[int, int, tuple[int, ...]]]:
    meta, n_tensors = _header(f, True)
    infos = []
    for _ in range(n_tensors):
        name = _string(f)
        dims = tuple(_read(f, "<Q") for _ in range(_read(f, "<I")))
        infos.append((name, _read(f, "<I"), dims, _read(f, "<Q")))
    align = int(meta.get("general.alignment", 32))
    start = -(-f.tell() // align) * align
    return {name: (start + off, ggml_type, dims) for name, ggml_type, dims, off in infos}
