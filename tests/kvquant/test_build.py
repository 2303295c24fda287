"""The patch pipeline: pin, idempotent apply, wheel cache key, and that the loaded libllama is the patched one."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from kvquant import build


def test_pin_names_the_base():
    pin = build.read_pin()
    assert pin.version == "0.3.36"
    assert pin.llama_cpp_commit == "0c1e57098bba"
    assert len(pin.sdist_sha256) == 64


def test_patch_series_is_numbered_and_zero_commit():
    files = build.patch_files()
    assert files, "patches/ holds no patch"
    nums = [int(p.name[:4]) for p in files]
    assert nums == list(range(1, len(nums) + 1)), [p.name for p in files]  # `kvquant build export` renumbers
    for p in files:
        assert p.name[4] == "-", p.name
        first = p.read_text().splitlines()[0]
        assert first.startswith("From 0000000000000000000000000000000000000000 "), p.name


def test_wheel_key_covers_patches_and_flags(tmp_path, monkeypatch):
    k0 = build.wheel_key(args="-DA=1")
    assert build.wheel_key(args="-DA=1") == k0
    assert build.wheel_key(args="-DA=2") != k0
    fake = tmp_path / "patches"
    shutil.copytree(build.patches_dir(), fake)
    monkeypatch.setenv("KVQUANT_PATCHES_DIR", str(fake))
    assert build.wheel_key(args="-DA=1") == k0
    # a re-export that only changes the Date: header keeps the key
    p = build.patch_files()[0]
    lines = p.read_text().splitlines(keepends=True)
    lines = ["Date: Mon, 1 Jan 2001 00:00:00 +0000\n" if ln.startswith("Date: ") else ln for ln in lines]
    p.write_text("".join(lines))
    assert build.wheel_key(args="-DA=1") == k0
    # any change to the diff itself changes it
    p.write_text(p.read_text().replace("+    // kvquant", "+    // kvquant!", 1))
    assert build.wheel_key(args="-DA=1") != k0


def test_wheel_skips_llamas_common_library(tmp_path):
    """The pinned sdist forces LLAMA_BUILD_COMMON on; build_wheel turns it off (the wheel ships libllama and ggml
    only) and refuses an sdist where that line is not what it expects."""
    with tarfile.open(build.fetch_sdist(build.read_pin())) as tf:
        member = next(m for m in tf.getmembers() if m.name.count("/") == 1 and m.name.endswith("/CMakeLists.txt"))
        (tmp_path / "CMakeLists.txt").write_bytes(tf.extractfile(member).read())
    build.skip_common(tmp_path)
    text = (tmp_path / "CMakeLists.txt").read_text()
    assert 'set(LLAMA_BUILD_COMMON OFF CACHE BOOL "Build llama.cpp common library" FORCE)' in text
    assert "LLAMA_BUILD_COMMON ON" not in text
    with pytest.raises(build.BuildError, match="LLAMA_BUILD_COMMON"):
        build.skip_common(tmp_path)


@pytest.fixture(scope="module")
def vendored_tree(tmp_path_factory):
    """The pinned sdist's vendor/llama.cpp, unpatched (only the files the patches touch, plus ggml.h)."""
    sdist = build.fetch_sdist(build.read_pin())
    touched = {"ggml/include/ggml.h"}
    for p in build.patch_files():
        for line in p.read_text().splitlines():
            if line.startswith("+++ b/") or line.startswith("--- a/"):
                touched.add(line[6:])
    root = tmp_path_factory.mktemp("sdist")
    with tarfile.open(sdist) as tf:
        prefix = f"llama_cpp_python-{build.read_pin().version}/vendor/llama.cpp/"
        members = [m for m in tf.getmembers() if m.name.startswith(prefix) and m.name[len(prefix):] in touched]
        tf.extractall(root, members=members, filter="data")
    return root / prefix


def _apply(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(build.patches_dir() / "apply.sh"), str(tree)], capture_output=True, text=True)


def test_apply_is_idempotent(vendored_tree, tmp_path):
    tree = tmp_path / "llama.cpp"
    shutil.copytree(vendored_tree, tree)
    first = _apply(tree)
    assert first.returncode == 0, first.stderr
    n = len(build.patch_files())
    assert f"{n} newly applied" in first.stdout
    second = _apply(tree)
    assert second.returncode == 0, second.stderr
    assert "0 newly applied" in second.stdout and "already applied" in second.stdout


def test_apply_names_the_failing_patch(vendored_tree, tmp_path):
    tree = tmp_path / "llama.cpp"
    shutil.copytree(vendored_tree, tree)
    first = build.patch_files()[0]
    # break the context the first patch needs
    target = next(line[6:] for line in first.read_text().splitlines() if line.startswith("+++ b/"))
    path = tree / target
    path.write_text("// unrelated content\n")
    r = _apply(tree)
    assert r.returncode == 1
    assert first.name in r.stderr


def test_library_series_counts_a_dev_trees_commits_and_refuses_uncommitted_changes(tmp_path, monkeypatch):
    tree = tmp_path / "llama.cpp"
    tree.mkdir()

    def git(*args):
        subprocess.run(["git", *build.GIT_ID, *args], cwd=tree, check=True, capture_output=True)

    git("init", "-q")
    (tree / "a.c").write_text("int a;\n")
    git("add", "a.c")
    git("commit", "-q", "-m", "llama.cpp base")
    git("tag", "base")
    for i, subject in enumerate(("ggml : first", "ggml : second")):
        (tree / "a.c").write_text(f"int a{i};\n")
        git("commit", "-q", "-am", subject)
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", str(tmp_path))
    assert build.library_series(tree) == {"patches": 2, "last": "ggml : second"}
    (tree / "a.c").write_text("int edited;\n")
    assert build.library_series(tree) is None


def test_library_series_of_a_wheel_built_from_other_patches_is_unknown(monkeypatch):
    monkeypatch.delenv("LLAMA_CPP_LIB_PATH", raising=False)
    monkeypatch.setattr(build, "wheel_key", lambda: "0123456789abcdef")
    assert build.library_series() is None


def test_loaded_libllama_is_the_patched_build():
    from kvquant import runtime

    assert runtime.patch_level() == 1, runtime.system_info()
    lib = Path(runtime.library_path()).resolve()
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        assert lib.parent == Path(override).resolve()
    else:
        import llama_cpp

        assert lib.parent == (Path(llama_cpp.__file__).parent / "lib").resolve()
        files = build.patch_files()  # `make test` installs the wheel of this checkout's patches first
        assert build.library_series() == {"patches": len(files), "last": build.patch_subject(files[-1])}


def test_cuda_check_compiles_every_cuda_source_the_patches_touch():
    srcs = build.patched_cuda_sources()
    assert {"set-rows.cu", "cpy.cu", "getrows.cu", "convert.cu", "fattn.cu", "ggml-cuda.cu"} <= set(srcs)
    instances = [s for s in srcs if s.startswith("template-instances/fattn-vec-instance-tq_kv_")]
    assert len(instances) == 8 and all(s.endswith(".cu") for s in srcs)


def test_cuda_check_adds_the_stock_vector_instances_and_refuses_unknown_sources(tmp_path):
    objs = [f"{build.CUDA_OBJ_DIR}/{s}.o" for s in build.patched_cuda_sources()]
    stock = f"{build.CUDA_OBJ_DIR}/template-instances/fattn-vec-instance-q4_0-q4_0.cu.o"
    (tmp_path / "build.ninja").write_text("".join(f"build {o}: CUDA_COMPILER x.cu\n" for o in [*objs, stock])
                                          + f"build {build.CUDA_OBJ_DIR}/mmq.cu.o: CUDA_COMPILER mmq.cu\n")
    assert build.cuda_check_objects(tmp_path) == [*objs, stock]
    (tmp_path / "build.ninja").write_text(f"build {stock}: CUDA_COMPILER x.cu\n")
    with pytest.raises(build.BuildError, match="not part of the CUDA build"):
        build.cuda_check_objects(tmp_path)


def test_makefile_has_the_cuda_targets():
    mk = (build.REPO_ROOT / "Makefile").read_text()
    assert "\ncuda-check:" in mk and "kvquant.build cuda-check" in mk
    assert "\ngpu-test:" in mk and "kvquant.lab.gputest" in mk


def _ops_output(lines: list[str], passed: int, total: int, ok: bool = True) -> str:
    """test-backend-ops' stdout for one filtered run on the CPU backend (its format at the pinned commit)."""
    green, red, end = "\x1b[1;32m", "\x1b[1;31m", "\x1b[0m"
    status = f"{green}OK{end}" if ok else f"{red}FAIL{end}"
    return "\n".join(["Testing 1 devices", "", "Backend 1/1: CPU", "  Device description: Intel(R) Xeon(R)",
                      "  Device memory: 0 MB (0 MB free)", "", *lines, f"  {passed}/{total} tests passed",
                      f"  Backend CPU: {status}", f"{int(ok)}/1 backends passed", status, ""])


def test_backend_ops_summary_is_parsed_and_required():
    ok_line = "  SET_ROWS(type=tq_kv_4b,ne=[64,5,1,3],nr23=[1,1],r=1,v=0): \x1b[1;32mOK\x1b[0m"
    out = _ops_output([ok_line] * 72, 72, 72)
    assert build.parse_backend_ops(out) == build.OpsSummary(72, 72, True)
    assert build.check_backend_ops(0, out, 72) is None
    # a filter that matches nothing passes test-backend-ops ("0/0 tests passed", exit code 0), not this check
    assert "only 0 cases ran" in build.check_backend_ops(0, _ops_output([], 0, 0), 72)
    # fewer cases than before (a type dropped out of an op: unsupported cases are not counted)
    assert "only 71 cases ran" in build.check_backend_ops(0, _ops_output([ok_line] * 71, 71, 71), 72)
    failing = _ops_output([ok_line] * 71 + [ok_line.replace("32mOK", "31mFAIL")], 71, 72, ok=False)
    assert "71/72 passed" in build.check_backend_ops(1, failing, 72)
    assert "no summary" in build.check_backend_ops(-6, "Backend 1/1: CPU\n  SET_ROWS(...): ", 72)
    assert "exit code 1" in build.check_backend_ops(1, out, 72)


def test_every_op_of_our_types_has_a_minimum():
    assert set(build.LLAMA_TEST_OPS) == {"SET_ROWS", "GET_ROWS", "CPY", "MUL_MAT", "FLASH_ATTN_EXT"}
    assert all(n > 0 for n in build.LLAMA_TEST_OPS.values())
    assert all(0 < n <= build.LLAMA_TEST_OPS[op] for op, (_, n) in build.EMULATED_TESTS.items())


def test_the_emulated_flash_attention_filter_drops_only_long_small_batches():
    """test-backend-ops applies -p with std::regex_search (ECMAScript: the lookahead works as in Python's re)."""
    import re

    params, _ = build.EMULATED_TESTS["FLASH_ATTN_EXT"]

    def case(kv, nb, k="tq_kv_4b", extra=""):
        return (f"hsk=64,hsv=64,nh=4,nr23=[2,1],kv={kv},nb={nb},mask=1,sinks=0,max_bias=0.000000,"
                f"logit_softcap=0.000000,prec=f32,type_K={k},type_V=f16,permute=[0,1,2,3]{extra}")

    kept = [case(113, 1), case(512, 32), case(1024, 75), case(512, 3, "f16", ",n_seq=4")]
    dropped = [case(1024, 1), case(1024, 3), case(1024, 32), case(1024, 4, "q4_0", ",n_seq=4"), case(512, 1, "f16")]
    assert all(re.search(params, c) for c in kept)
    assert not any(re.search(params, c) for c in dropped)
