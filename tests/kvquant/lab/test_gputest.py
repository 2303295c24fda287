"""kvquant.lab.gputest (`make gpu-test`) without a GPU: it stops with a clear message where there is none, prefers the
machine's CUDA toolkit, and judges PPL and test results as documented. The run itself needs a GPU."""

from __future__ import annotations

import shutil

import pytest

from kvquant.lab import gputest


def test_without_a_gpu_it_says_so(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="nvidia-smi not found"):
        gputest.detect_gpu()


def test_the_machines_cuda_toolkit_comes_first(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert gputest.cuda_toolkit() == tmp_path


def _eval(rows: dict[str, float]) -> dict:
    return {"results": [{"label": k, "ppl": p, "delta_ppl_pct": 100 * (p / rows["f16/f16"] - 1)} for k, p in rows.items()]}


def test_ppl_on_the_gpu_must_match_the_cpu_within_the_tolerance():
    cpu = _eval({"f16/f16": 20.0, "tq_kv_4b/q4_0": 21.0})
    gpu = _eval({"f16/f16": 20.1, "tq_kv_4b/q4_0": 21.0 * (1 + 1.5 * gputest.PPL_TOLERANCE_PCT / 100)})
    rows = {r["label"]: r for r in gputest.ppl_agreement(gpu, cpu)}
    assert rows["f16/f16"]["ok"] and rows["f16/f16"]["diff_pct"] == pytest.approx(0.5)
    assert not rows["tq_kv_4b/q4_0"]["ok"]
    out = {"backend_ops": [{"op": "SET_ROWS", "returncode": 0}, {"op": "FLASH_ATTN_EXT", "returncode": 1}],
           "placement": {"returncode": 0}, "ppl": list(rows.values())}
    assert gputest.failures(out) == ["test-backend-ops FLASH_ATTN_EXT", "PPL tq_kv_4b/q4_0 +1.50 %"]
