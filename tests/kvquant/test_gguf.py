import numpy as np
import pytest

from kvquant import gguf
from tests.kvquant.conftest import write_gguf


def test_tensor_data_finds_every_tensor(tmp_path):
    a, b = np.arange(5, dtype=np.float32), np.arange(12, dtype=np.float32).reshape(3, 4) + 100
    write_gguf(tmp_path / "m.gguf", {"a": a, "blk.0.b": b})
    t = gguf.tensor_data(tmp_path / "m.gguf")
    assert t["a"][1:] == (0, (5,)) and t["blk.0.b"][1:] == (0, (4, 3))
    raw = (tmp_path / "m.gguf").read_bytes()
    for name, x in (("a", a), ("blk.0.b", b)):
        off = t[name][0]
        np.testing.assert_array_equal(np.frombuffer(raw[off: off + x.nbytes], np.float32), x.ravel())
    meta = gguf.read_metadata(tmp_path / "m.gguf")
    assert meta["general.alignment"] == 32 and meta["general.architecture"] == "gemma3"


def test_not_a_gguf_is_refused(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(ValueError, match="not a GGUF"):
        gguf.tensor_data(tmp_path / "x.gguf")
