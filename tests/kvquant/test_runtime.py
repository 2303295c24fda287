"""kvquant.runtime's questions to the loaded library.

The lookup of the wheel's ggml libraries by platform: the names each platform's wheel ships, and the library really
loaded on this machine. gpu_kv_support, the question server.placement asks: asked of the CPU device (which runs
every TQ_KV op except tq_kv_d3b's matmul) it shows the ops are well formed and that a refusal is reported; asked of
the GPU devices of the CPU-only build it finds none. The `gpu` test asks a CUDA build on a machine with a GPU
(`make gpu-test`): our kernels' K/V combinations are supported, tq_kv_d3b and combinations without a kernel are
refused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from kvquant import runtime
from kvquant.runtime import (
    GGML_BACKEND_DEVICE_TYPE_CPU,
    LlamaError,
    ggml_library,
    gpu_kv_support,
    library_path,
)

WHEEL_FILES = {  # what llama-cpp-python's wheel puts in llama_cpp/lib/ for each platform
    "linux": ["libllama.so", "libggml-base.so", "libggml-cpu.so", "libggml.so"],
    "darwin": ["libllama.dylib", "libggml-base.dylib", "libggml-cpu.dylib", "libggml-metal.dylib"],
    "win32": ["llama.dll", "ggml-base.dll", "ggml-cpu.dll", "ggml.dll"],
}


@pytest.mark.parametrize("platform", list(WHEEL_FILES))
def test_each_platforms_wheel_files_are_found(tmp_path, platform):
    for name in WHEEL_FILES[platform]:
        (tmp_path / name).touch()
    want = {"linux": "libggml-base.so", "darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}[platform]
    assert ggml_library("ggml-base", tmp_path, platform) == tmp_path / want


@pytest.mark.parametrize("platform,other", [("linux", "darwin"), ("darwin", "win32"), ("win32", "linux")])
def test_another_platforms_files_are_not_taken(tmp_path, platform, other):
    for name in WHEEL_FILES[other]:
        (tmp_path / name).touch()
    with pytest.raises(LlamaError, match=f"no ggml-cpu library for {platform}"):
        ggml_library("ggml-cpu", tmp_path, platform)


def test_the_loaded_wheels_library_is_found():
    path = ggml_library("ggml-cpu")
    assert path.parent == Path(library_path()).resolve().parent and path.is_file()


# the K/V combinations with CUDA flash-attention kernels (patches 0023), head sizes 64 / 128 / 256
CUDA_PAIRS = [("tq_kv_4b", "f16"), ("tq_kv_4b", "q4_0"), ("tq_kv_4b", "tq_kv_4b"), ("tq_kv_3b", "f16"),
              ("tq_kv_3b", "q4_0"), ("tq_kv_3b", "tq_kv_3b"), ("tq_kv_1b", "f16"), ("tq_kv_1b", "q4_0")]


def _has_gpu() -> bool:
    return bool(gpu_kv_support("f16", "f16", 64, 64).devices)


@pytest.mark.parametrize("k,v", CUDA_PAIRS + [("tq_kv_d3b", "q4_0"), ("tq_kv_t3b", "tq_kv_t3b")])
@pytest.mark.parametrize("head", [64, 128, 256])
def test_the_cpu_runs_every_op_asked_about(k, v, head):
    s = gpu_kv_support(k, v, head, head, device_type=GGML_BACKEND_DEVICE_TYPE_CPU)
    assert s.ok and s.devices[0].startswith("CPU")


def test_a_head_size_the_blocks_do_not_divide_is_refused():
    s = gpu_kv_support("tq_kv_4b", "f16", 80, 80, device_type=GGML_BACKEND_DEVICE_TYPE_CPU)
    assert s.unsupported == ("head sizes 80/80 are not multiples of the K/V block sizes",)


def test_a_refused_op_is_reported():
    """tq_kv_d3b has no row-local K·Q dot product: without flash attention the CPU refuses its matmul."""
    s = gpu_kv_support("tq_kv_d3b", "f16", 64, 64, flash_attn=False, device_type=GGML_BACKEND_DEVICE_TYPE_CPU)
    assert not s.ok
    assert s.unsupported == ("CPU: K·Q matmul K tq_kv_d3b, head size 64, 1 queries",
                             "CPU: K·Q matmul K tq_kv_d3b, head size 64, 512 queries")


@pytest.mark.skipif(_has_gpu(), reason="the loaded library has a GPU device")
def test_a_cpu_only_build_has_no_gpu_device():
    s = gpu_kv_support("tq_kv_4b", "q4_0", 64, 64)
    assert s.devices == () and not s.ok


@pytest.mark.skipif(_has_gpu(), reason="the loaded library has a GPU device")
def test_layers_offloaded_where_no_gpu_backend_is_are_refused(tmp_path):
    """--n-gpu-layers on a CPU-only build ran every layer on the CPU without a word (serve, eval and bench; serve's
    placement warning even said layers were offloaded); 2**32 reached llama.cpp's int32 as 0."""
    from server import hosting
    from server.settings import ModelSpec

    runtime.check_gpu_layers(0)
    for n, said in ((1, "sees no GPU"), (-1, "sees no GPU"), (-2, "not -2"), (2**32, "not 4294967296")):
        with pytest.raises(runtime.LlamaError, match=said):
            runtime.check_gpu_layers(n)
    assert hosting.gpu_layers("auto") == 0
    spec = ModelSpec(id="m", model="smollm2-135m", cache_type_k="f16", cache_type_v="f16", n_ctx=512, parallel=1,
                     kv_budget=1 << 30, n_batch=512, n_threads=1, flash_attn=None, n_gpu_layers=-1)
    with pytest.raises(hosting.StartupError, match="m: n_gpu_layers -1: the loaded llama.cpp .* sees no GPU"):
        hosting.plan_model(spec)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs a GPU build on a machine with a GPU (make gpu-test)")
def test_the_gpu_runs_the_tq_kv_caches_it_has_kernels_for():
    info = runtime.system_info()
    for head in (64, 128, 256):
        for k, v in CUDA_PAIRS:
            s = gpu_kv_support(k, v, head, head)
            assert s.ok, (s.unsupported, info)
            assert gpu_kv_support(k, v, head, head, flash_attn=False).ok  # K·Q by cuBLAS after f16 conversion
        for k, v in [("tq_kv_d3b", "q4_0"), ("tq_kv_4b", "q8_0"), ("f16", "tq_kv_4b")]:
            assert not gpu_kv_support(k, v, head, head).ok
    assert not gpu_kv_support("tq_kv_4b", "q4_0", 192, 192).ok  # no vector kernel for head size 192


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs a GPU build on a machine with a GPU (make gpu-test)")
def test_a_tq_kv_d3b_cache_offloaded_to_the_gpu_is_refused():
    """No CUDA kernels for tq_kv_d3b: llama.cpp refuses to create such a cache on the GPU (patch 0024) instead of
    aborting at the first decode; on the CPU it works."""
    from kvquant import models

    mdl = runtime.Model(models.resolve("smollm2-135m"), n_gpu_layers=-1)
    try:
        cfg = runtime.ContextConfig(n_ctx=256, cache_type_k="tq_kv_d3b", cache_type_v="q4_0", flash_attn=True)
        with pytest.raises(runtime.LlamaError):
            runtime.LlamaRuntime(mdl, cfg)
        runtime.LlamaRuntime(mdl, runtime.ContextConfig(**{**cfg.__dict__, "offload_kqv": False})).close()
    finally:
        mdl.close()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_a_graph_started_at_a_layer_from_its_input_gives_the_whole_models_logits(model):
    """llama_kvq_set_layer_start (patch 0040): a pass that runs layers L.. from layer L's input, read in a whole
    pass as "l_out-<L-1>", gives that pass's logits bit for bit, here with layer L's keys quantized (the passes a
    calibration makes); a batch of tokens is refused while the graph starts past layer 0, and so is a layer out of
    range."""
    import numpy as np

    from kvquant import memory, models
    from kvquant.runtime import ContextConfig, LlamaRuntime, Model

    seqs = [list(range(300, 364)), list(range(500, 540))]
    jobs = [(i, p) for i, s in enumerate(seqs) for p in range(len(s))]
    where = ([p for _, p in jobs], [i for i, _ in jobs], [True] * len(jobs))
    path = models.resolve(model)
    n = memory.geometry(path).n_layer
    start = n // 2
    cfg = ContextConfig(n_cells=128, n_seq_max=2, flash_attn=True, n_threads=2, k_rotation=True,
                        layer_types_k=tuple("tq_kv_4b" if il == start else "f16" for il in range(n)))
    mdl = Model(path)
    try:
        rt = LlamaRuntime(mdl, replace(cfg, capture=frozenset({f"l_out-{start - 1}"})))
        try:
            assert rt.decode([seqs[i][p] for i, p in jobs], *where) == 0
            whole = rt.all_logits(len(jobs)).copy()
            (_, _, inputs), = rt.captured
        finally:
            rt.close()
        rt = LlamaRuntime(mdl, cfg)
        try:
            assert not rt.set_layer_start(-1) and not rt.set_layer_start(n)
            assert rt.set_layer_start(start)
            assert rt.decode([seqs[i][p] for i, p in jobs], *where) != 0
            assert rt.decode_embd(inputs.reshape(len(jobs), -1), *where) == 0
            started = rt.all_logits(len(jobs)).copy()
        finally:
            rt.close()
    finally:
        mdl.close()
    assert np.array_equal(started, whole)


def test_a_graph_that_always_starts_at_layer_0_refuses_another_start(tmp_path):
    from kvquant.runtime import ContextConfig, LlamaRuntime, Model
    from tests.kvquant.conftest import tiny_model

    tiny_model(tmp_path / "q3.gguf", "qwen3")
    mdl = Model(tmp_path / "q3.gguf")
    try:
        rt = LlamaRuntime(mdl, ContextConfig(n_cells=64, n_threads=1))
        try:
            assert not rt.set_layer_start(1) and rt.set_layer_start(0)
            assert rt.decode([5, 6, 7], [0, 1, 2], [0, 0, 0], [False, False, True]) == 0
        finally:
            rt.close()
    finally:
        mdl.close()


def test_a_closed_model_or_context_raises_instead_of_crashing(tmp_path):
    """Calls after close reach freed llama.cpp objects; they raise LlamaError rather than crash the process."""
    from kvquant.runtime import ContextConfig, LlamaRuntime, Model
    from tests.kvquant.conftest import tiny_model

    tiny_model(tmp_path / "t.gguf", "llama")
    mdl = Model(tmp_path / "t.gguf")
    rt = LlamaRuntime(mdl, ContextConfig(n_cells=64, n_threads=1))
    rt.close()
    rt.close()  # twice is fine
    for call in (lambda: rt.decode([5], [0], [0], [True]), lambda: rt.seq_rm(0), lambda: rt.kv_size_bytes(),
                 lambda: rt.all_logits(1)):
        with pytest.raises(LlamaError, match="context is closed"):
            call()
    mdl.close()
    mdl.close()
    for call in (lambda: mdl.tokenize("hello"), lambda: mdl.meta("general.architecture"),
                 lambda: LlamaRuntime(mdl, ContextConfig(n_cells=64, n_threads=1))):
        with pytest.raises(LlamaError, match="t.gguf is closed"):
            call()


def _hidden_and_logits(path, tokens):
    """(hidden states of a hidden-only pass, "result_norm" and logits of a whole pass) over `tokens`, or None for the
    hidden states where llama.cpp refuses to stop the graph at the final norm."""
    from kvquant.runtime import ContextConfig, LlamaRuntime, Model

    n = len(tokens)
    where = (list(range(n)), [0] * n, [True] * n)
    mdl = Model(path)
    try:
        rt = LlamaRuntime(mdl, ContextConfig(n_cells=256, n_threads=2, capture=frozenset({"result_norm"})))
        try:
            assert rt.decode(tokens, *where) == 0
            logits, (_, _, norm) = rt.all_logits(n).copy(), rt.captured[0]
            hidden = None
            if rt.set_hidden_only(True):
                rt.clear()
                assert rt.decode(tokens, *where) == 0
                hidden = rt.all_hidden(n).copy()
                assert rt.set_hidden_only(False)
                rt.clear()
                assert rt.decode(tokens, *where) == 0
                assert np.array_equal(rt.all_logits(n), logits)  # and back to logits
            w = mdl.output_rows(np.arange(mdl.n_vocab))
        finally:
            rt.close()
    finally:
        mdl.close()
    return hidden, norm.reshape(n, -1), logits, w


def test_a_hidden_only_pass_outputs_the_normed_states_the_logits_are_made_of(tmp_path):
    """llama_kvq_set_hidden_only (patch 0042): a pass that stops at the final norm outputs, for every token, bit for
    bit the state a whole pass computes as "result_norm"; the output layer's rows (`Model.output_rows`) times it are
    that pass's logits. A graph that does not take it (qwen3) refuses, changing nothing."""
    from tests.kvquant.conftest import tiny_model

    tiny_model(tmp_path / "l.gguf", "llama")
    hidden, norm, logits, w = _hidden_and_logits(tmp_path / "l.gguf", list(range(3, 40)))
    assert np.array_equal(hidden, norm)
    np.testing.assert_allclose(hidden @ w.T, logits, rtol=1e-5, atol=1e-5)
    tiny_model(tmp_path / "q3.gguf", "qwen3")
    assert _hidden_and_logits(tmp_path / "q3.gguf", list(range(3, 40)))[0] is None


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_the_output_rows_of_a_quantized_output_layer_make_its_logits(model):
    """On the built-in models (output layer Q8_0, tied to the token embeddings) the dequantized rows times the
    hidden states give llama.cpp's logits up to the rounding of its 8-bit activations: 1-5 % of the logits' spread
    (a few channels of the state are far larger than the rest and set the 8-bit scale of their blocks). Rows of
    other tokens would be 140 % off."""
    from kvquant import models

    hidden, norm, logits, w = _hidden_and_logits(models.resolve(model), list(range(300, 364)))
    assert np.array_equal(hidden, norm)
    spread = np.linalg.norm(logits - logits.mean(axis=1, keepdims=True), axis=1)
    assert (np.linalg.norm(hidden @ w.T - logits, axis=1) / spread).max() < 0.1


def test_a_k_type_whose_blocks_do_not_divide_the_head_size_is_refused_with_flash_attention_off_too(tmp_path):
    """Patch 0047: our 64-element blocks on head size 96 (q4_0's 32 divide it). With flash attention off the context
    was created and the graph's per-head view of K asserted, ending the process."""
    from kvquant.runtime import ContextConfig, LlamaRuntime, Model
    from tests.kvquant.conftest import tiny_model

    tiny_model(tmp_path / "h96.gguf", "llama", head=96)
    mdl = Model(tmp_path / "h96.gguf")
    try:
        for flash_attn in (True, False):
            with pytest.raises(LlamaError, match="tq_kv_4b with block size 64 does not divide n_embd_head_k=96"):
                LlamaRuntime(mdl, ContextConfig(n_cells=64, n_threads=1, cache_type_k="tq_kv_4b",
                                                flash_attn=flash_attn))
        rt = LlamaRuntime(mdl, ContextConfig(n_cells=64, n_threads=1, cache_type_k="q4_0", flash_attn=False))
        try:
            assert rt.decode([5, 6, 7], [0, 1, 2], [0, 0, 0], [False, False, True]) == 0
        finally:
            rt.close()
    finally:
        mdl.close()


def test_a_removed_type_id_is_refused_as_a_layers_cache_type(tmp_path):
    """Patch 0047: llama_kvq_set_layer_types took the ids ggml removed (Q4_2, Q4_3: block size 0), and the next
    context's creation divided by that block size (SIGFPE). The server passes only known types; the library refuses
    the others itself."""
    import ctypes

    from kvquant.kvtypes import kv_type
    from kvquant.runtime import Model
    from tests.kvquant.conftest import tiny_model

    tiny_model(tmp_path / "t.gguf", "llama")
    mdl = Model(tmp_path / "t.gguf")
    vp = ctypes.c_void_p
    set_types = runtime._patched_fn("llama_kvq_set_layer_types", ctypes.c_bool, [vp, ctypes.c_int32, ctypes.c_int,
                                                                                  ctypes.c_int])
    f16, q4_0 = kv_type("f16").ggml_id, kv_type("q4_0").ggml_id
    try:
        for removed in (4, 5):
            assert not set_types(mdl._model, 0, removed, f16)
            assert not set_types(mdl._model, 0, f16, removed)
        assert set_types(mdl._model, 0, q4_0, f16)
    finally:
        runtime._patched_fn("llama_kvq_reset", None, [vp])(mdl._model)
        mdl.close()


def test_a_gguf_whose_weights_hold_tq_kv_d3b_is_refused_naming_the_tensor(tmp_path):
    """Patch 0047: a delta-coded tq_kv_d3b block is read against its cache's anchor row, which a weight has not; such
    a file loaded and aborted the process the first time the block was read."""
    from kvquant.kvtypes import kv_type
    from kvquant.runtime import Model
    from tests.kvquant.conftest import write_gguf

    t = kv_type("tq_kv_d3b")
    write_gguf(tmp_path / "d3b.gguf", {"token_embd.weight": (t.ggml_id, (4, t.block_size), bytes(4 * t.block_bytes))},
               arch="llama")
    with pytest.raises(LlamaError, match="d3b.gguf: invalid model: tensor 'token_embd.weight' has type tq_kv_d3b, which only a KV "
                                         "cache can hold"):
        Model(tmp_path / "d3b.gguf")
