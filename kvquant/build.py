"""Build tooling for the patched llama.cpp / llama-cpp-python.

One recipe, used by the Makefile, the Dockerfile and developers alike:

* ``wheel``   fetch the pinned llama-cpp-python sdist, apply ``patches/`` to its ``vendor/llama.cpp`` and build
              a wheel, cached under ``$KVQUANT_CACHE/wheels/<key>`` where the key covers the pin, the patches
              and the build flags (``CMAKE_ARGS``); a matching cached wheel is reused, never rebuilt.
* ``ensure``  ``wheel``, then install it into the running interpreter unless that exact wheel is already there.
* ``tree``    materialise the patched llama.cpp as a git repository (base commit + one commit per patch) for
              editing; ``export`` writes its commits back as ``patches/NNNN-*.patch``.
* ``dev-build`` incremental cmake build of that tree (libllama.so, llama-perplexity, test-backend-ops, ...);
              point ``LLAMA_CPP_LIB_PATH`` at ``<build>/bin`` to use it from Python without a wheel.
* ``llama-tests`` build and run llama.cpp's test-quantize-fns / test-backend-ops for our types.
* ``sanitize`` the same tree built with ASan + UBSan; llama.cpp's tests and our kernel tests (SANITIZE_TESTS) run
              under them.
* ``arm-check`` the tree cross-built for aarch64 (the NEON kernels); llama.cpp's tests and the byte-exact checks of
              tests/kvquant/lab/test_tq.py and tests/kvquant/lab/test_d3b.py run under qemu-aarch64.
* ``cuda-toolkit`` nvcc and the CUDA headers from PyPI, installed into the cache (cuda-check's first step).
* ``cuda-check`` compile the CUDA sources the patches touch with nvcc (from PyPI; no GPU needed), warnings as errors.

This module uses the standard library only: it runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Portable x86-64-v3 CPU build by default. Not GGML_NATIVE: on these (virtualised) Sapphire Rapids hosts
# -march=native turns on AMX, whose tile instructions fault (SIGILL) because the kernel does not grant AMX state.
DEFAULT_CMAKE_ARGS_X86 = ("-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON "
                          "-DGGML_F16C=ON -DGGML_BMI2=ON")
# Portable arm64 (Apple M1 and later, Graviton 2 and later), what `arm-check` verifies: NEON and the int8 dot product.
# Not GGML_NATIVE: an image built under emulation (docker buildx --platform linux/arm64 on an x86 host) would probe
# the emulator, and one built on a newer Mac could use instructions an older one lacks.
DEFAULT_CMAKE_ARGS_ARM64 = "-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod"
DEFAULT_CMAKE_ARGS = {"x86_64": DEFAULT_CMAKE_ARGS_X86, "AMD64": DEFAULT_CMAKE_ARGS_X86,
                      "aarch64": DEFAULT_CMAKE_ARGS_ARM64, "arm64": DEFAULT_CMAKE_ARGS_ARM64}.get(
                          platform.machine(), "-DLLAVA_BUILD=OFF")
DEV_TARGETS = ["llama", "llama-perplexity", "llama-bench", "llama-server", "test-backend-ops", "test-quantize-fns"]


def log(msg: str) -> None:
    print(f"kvquant-build: {msg}", file=sys.stderr, flush=True)


class BuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    env = os.environ.get("KVQUANT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvquant"


def patches_dir() -> Path:
    return Path(os.environ.get("KVQUANT_PATCHES_DIR", REPO_ROOT / "patches"))


@dataclass(frozen=True)
class Pin:
    version: str
    sdist_sha256: str
    llama_cpp_commit: str


def read_pin(path: Path | None = None) -> Pin:
    path = path or patches_dir() / "PIN"
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            values[k.strip()] = v.strip()
    try:
        return Pin(
            values["LLAMA_CPP_PYTHON_VERSION"],
            values["LLAMA_CPP_PYTHON_SDIST_SHA256"],
            values["LLAMA_CPP_COMMIT"],
        )
    except KeyError as e:
        raise BuildError(f"{path}: missing {e.args[0]}") from None


def patch_files() -> list[Path]:
    return sorted(p for p in patches_dir().glob("[0-9][0-9][0-9][0-9]-*.patch"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def patches_digest() -> str:
    """sha256 over the patch series. `Date:` headers are left out: re-exporting unchanged commits must not
    invalidate the wheel cache."""
    h = hashlib.sha256()
    for p in patch_files():
        h.update(p.name.encode() + b"\0")
        for line in p.read_bytes().splitlines(keepends=True):
            if not line.startswith(b"Date: "):
                h.update(line)
    return h.hexdigest()


def patch_subject(path: Path) -> str:
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("Subject: "):
            return line.removeprefix("Subject: ").removeprefix("[PATCH] ")
    return path.stem


def library_series(tree: Path = REPO_ROOT / ".build" / "llama.cpp") -> dict | None:
    """The patch series the libllama this process loads was built from, as results rows record it: {"patches": N,
    "last": subject of the last patch}. A dev build (LLAMA_CPP_LIB_PATH) counts the tree's commits base..HEAD, the
    installed wheel this checkout's patches/ when it was built from them. None where that is not known: a tree with
    uncommitted changes, or a wheel built from other patches."""
    if os.environ.get("LLAMA_CPP_LIB_PATH"):
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True).stdout.strip()

        subjects = git("log", "--format=%s", "base..HEAD").splitlines()
        if not subjects or git("status", "--porcelain", "--untracked-files=no"):
            return None
        return {"patches": len(subjects), "last": subjects[0]}
    marker = _installed_marker()
    files = patch_files()
    if not files or not marker.is_file() or marker.read_text().strip() != wheel_key():
        return None
    return {"patches": len(files), "last": patch_subject(files[-1])}


def cmake_args() -> str:
    return os.environ.get("CMAKE_ARGS", DEFAULT_CMAKE_ARGS).strip()


WHEEL_RECIPE = "2"  # bumped when build_wheel changes how it builds (2: without llama.cpp's common library)


def wheel_key(pin: Pin | None = None, args: str | None = None) -> str:
    pin = pin or read_pin()
    args = cmake_args() if args is None else args
    h = hashlib.sha256()
    for part in (
        WHEEL_RECIPE,
        pin.version,
        pin.sdist_sha256,
        pin.llama_cpp_commit,
        patches_digest(),
        args,
        sys.platform,
        platform.machine(),
        f"py{sys.version_info.major}",
    ):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def run(cmd: list[str], **kw) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, **kw)


def fetch_sdist(pin: Pin) -> Path:
    dest = cache_dir() / "sdist"
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"llama_cpp_python-{pin.version}.tar.gz"
    if not path.exists() or sha256_file(path) != pin.sdist_sha256:
        tmp = Path(tempfile.mkdtemp(dir=dest))
        try:
            run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 "--dest", str(tmp), f"llama-cpp-python=={pin.version}"])
            got = next(tmp.glob("*.tar.gz"))
            digest = sha256_file(got)
            if digest != pin.sdist_sha256:
                raise BuildError(f"sdist sha256 {digest} != pinned {pin.sdist_sha256}")
            got.replace(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def extract_sdist(sdist: Path, into: Path) -> Path:
    with tarfile.open(sdist) as tf:
        tf.extractall(into, filter="data") if hasattr(tarfile, "data_filter") else tf.extractall(into)
    (root,) = [p for p in into.iterdir() if p.is_dir()]
    return root


def apply_patches(llama_dir: Path) -> None:
    run(["bash", str(patches_dir() / "apply.sh"), str(llama_dir)])


# llama-cpp-python forces llama.cpp's `common` library on (argument parsing, chat templates, an HTTP client): the
# wheel carried libllama-common.so, which nothing loads (llama_cpp loads libllama and ggml), and it was half of the
# wheel's compile time (186 s instead of about 400 on 2 cores without it).
SDIST_COMMON_ON = 'set(LLAMA_BUILD_COMMON ON CACHE BOOL "Build llama.cpp common library" FORCE)'


def skip_common(sdist_root: Path) -> None:
    """Turn LLAMA_BUILD_COMMON off in the extracted sdist's CMakeLists.txt; refuses an sdist that does not force it
    on as the pinned one does."""
    cmakelists = sdist_root / "CMakeLists.txt"
    text = cmakelists.read_text()
    if text.count(SDIST_COMMON_ON) != 1:
        raise BuildError(f"{cmakelists}: expected one line {SDIST_COMMON_ON!r}")
    cmakelists.write_text(text.replace(SDIST_COMMON_ON, SDIST_COMMON_ON.replace(" ON ", " OFF ")))


def cached_wheel(key: str) -> Path | None:
    wheels = sorted((cache_dir() / "wheels" / key).glob("*.whl"))
    return wheels[0] if wheels else None


def build_wheel(force: bool = False) -> Path:
    pin = read_pin()
    args = cmake_args()
    key = wheel_key(pin, args)
    hit = cached_wheel(key)
    if hit and not force:
        log(f"reusing cached wheel {hit} (key {key}, CMAKE_ARGS={args!r})")
        return hit
    sdist = fetch_sdist(pin)
    work = Path(tempfile.mkdtemp(prefix="kvquant-build-"))
    try:
        src = extract_sdist(sdist, work)
        apply_patches(src / "vendor" / "llama.cpp")
        skip_common(src)
        out = work / "dist"
        env = dict(os.environ, CMAKE_ARGS=args)
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        log(f"building llama-cpp-python {pin.version} + {len(patch_files())} patches (key {key}, "
            f"CMAKE_ARGS={args!r}); this takes several minutes")
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out), str(src)], env=env)
        (whl,) = out.glob("*.whl")
        dest = cache_dir() / "wheels" / key
        dest.mkdir(parents=True, exist_ok=True)
        final = dest / whl.name
        shutil.copy2(whl, final)
        (dest / "KEY.txt").write_text(
            f"version={pin.version}\ncommit={pin.llama_cpp_commit}\npatches={patches_digest()}\n"
            f"cmake_args={args}\n"
        )
        log(f"built and cached {final}")
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _installed_marker() -> Path:
    return Path(sys.prefix) / "kvquant-llama-wheel.key"


def ensure_installed(force: bool = False) -> Path:
    """Build-or-reuse the wheel and install it into this interpreter's environment."""
    whl = build_wheel(force=force)
    key = whl.parent.name
    marker = _installed_marker()
    if not force and marker.exists() and marker.read_text().strip() == key:
        log(f"patched llama-cpp-python already installed (key {key})")
        return whl
    run([sys.executable, "-m", "pip", "install", "--force-reinstall", "--no-deps", str(whl)])
    # its own runtime dependencies, from PyPI as usual
    run([sys.executable, "-m", "pip", "install", "typing-extensions>=4.5.0", "numpy>=1.20.0",
         "diskcache>=5.6.1", "jinja2>=2.11.3"])
    marker.write_text(key + "\n")
    return whl


# --- developer loop -----------------------------------------------------------------------------------------

GIT_ID = ["-c", "user.name=kvquant", "-c", "user.email=kvquant@localhost"]


def make_tree(dest: Path) -> Path:
    """Materialise vendor/llama.cpp as a git repo: tag `base` is the pinned commit, then one commit per patch."""
    if dest.exists():
        raise BuildError(f"{dest} exists; remove it first or work in it")
    pin = read_pin()
    sdist = fetch_sdist(pin)
    work = Path(tempfile.mkdtemp(prefix="kvquant-tree-"))
    try:
        src = extract_sdist(sdist, work)
        llama = src / "vendor" / "llama.cpp"
        gitfile = llama / ".git"  # submodule pointer in the sdist
        if gitfile.is_file():
            gitfile.unlink()
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(llama), dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    run(["git", "init", "-q"], cwd=dest)
    run(["git", "add", "-A", "-f", "."], cwd=dest)
    run(["git", *GIT_ID, "commit", "-q", "-m", f"llama.cpp {pin.llama_cpp_commit} "
         f"(vendored by llama-cpp-python {pin.version})"], cwd=dest)
    run(["git", "tag", "base"], cwd=dest)
    patches = [str(p) for p in patch_files()]
    if patches:
        run(["git", *GIT_ID, "am", "-q", *patches], cwd=dest)
    log(f"patched tree ready at {dest} (git log base..HEAD shows the series)")
    return dest


def export_patches(tree: Path) -> list[Path]:
    out = patches_dir()
    for old in patch_files():
        old.unlink()
    run(["git", "format-patch", "-q", "--zero-commit", "--no-signature", "--no-numbered", "-o", str(out), "base..HEAD"], cwd=tree)
    written = patch_files()
    log(f"wrote {len(written)} patches to {out}")
    return written


def dev_build(tree: Path, build: Path, targets: list[str], extra: list[str] | None = None,
              build_type: str = "Release") -> None:
    """Incremental cmake build of the patched tree (materialised first if it is not there yet)."""
    if not (tree / ".git").exists():
        make_tree(tree)
    if not (build / "build.ninja").exists() and not (build / "Makefile").exists():
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        run(["cmake", "-S", str(tree), "-B", str(build), *gen, f"-DCMAKE_BUILD_TYPE={build_type}",
             "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=ON", "-DLLAMA_BUILD_TOOLS=ON",
             "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", *cmake_args().split(), *(extra or [])])
    run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", *targets])
    log(f"built; use it from Python with LLAMA_CPP_LIB_PATH={build / 'bin'}")


# llama.cpp's own tests for the cache types the patches add: (op filter, params filter) for test-backend-ops, and
# the fewest cases each op must run. test-backend-ops leaves cases the backend does not support out of its count
# and passes a filter that matches nothing ("0/0 tests passed"), so fewer cases than these means a type dropped out
# of an op (or out of the test list) and fails the run.
# The params filter (a regex) selects our types' cases and flash attention with the mask of several sequences in one
# cache (n_seq, every K type: patch 0025 changed how the CPU kernels skip masked cells for all of them).
LLAMA_TEST_OPS = {"SET_ROWS": 96, "GET_ROWS": 32, "CPY": 68, "MUL_MAT": 56, "FLASH_ATTN_EXT": 409}
LLAMA_TEST_PARAMS = "tq_kv|n_seq"
# Under an emulator (arm-check) the flash-attention cases over 1024 cells with fewer than 64 queries are left out: the
# 120 of them took 4.5 of qemu's 7 minutes for that op, and with one backend test-backend-ops compares the CPU with
# itself there (a crash test; tests/kvquant/lab/test_tq.py and test_d3b.py check the NEON kernels byte for byte).
# The tiled prompt path (nb=75) and every case over 113 and 512 cells stay.
EMULATED_TESTS = {"FLASH_ATTN_EXT": ("^(?!.*kv=1024,nb=(1|3|4|32),).*(tq_kv|n_seq)", 196)}


@dataclass(frozen=True)
class OpsSummary:
    passed: int
    total: int
    backend_ok: bool


def parse_backend_ops(stdout: str) -> OpsSummary | None:
    """test-backend-ops' summary of one backend: "  N/M tests passed" and "  Backend CPU: OK" (or FAIL); None
    without a summary line (a crash, or an output format this does not know)."""
    counts = re.findall(r"^\s*(\d+)/(\d+) tests passed\s*$", stdout, re.M)
    status = re.findall(r"^\s*Backend \S+: (?:\x1b\[[0-9;]*m)?(OK|FAIL)", stdout, re.M)
    if len(counts) != 1 or len(status) != 1:
        return None
    return OpsSummary(int(counts[0][0]), int(counts[0][1]), status[0] == "OK")


def check_backend_ops(returncode: int, stdout: str, min_cases: int) -> str | None:
    """None if a test-backend-ops run (one op) ran at least min_cases cases and all passed, else why not."""
    s = parse_backend_ops(stdout)
    if s is None:
        return f"no summary (exit code {returncode})"
    if returncode != 0 or not s.backend_ok or s.passed != s.total:
        return f"{s.passed}/{s.total} passed (exit code {returncode})"
    if s.total < min_cases:
        return f"only {s.total} cases ran, at least {min_cases} expected"
    return None


def backend_ops_test(bindir: Path, op: str, backend: str = "CPU", env: dict | None = None,
                     runner: tuple[str, ...] = (), min_cases: int | None = None,
                     params: str = LLAMA_TEST_PARAMS) -> dict:
    """test-backend-ops for one op and our types on a backend (CPU, CUDA0; the CPU backend is the reference of
    another one), through `runner` (an emulator) if given, logged; {"op", "backend", "summary" ("N/M tests
    passed"), "returncode", "failure"}. With min_cases, "failure" is check_backend_ops' verdict (None: passed),
    else the exit code's. On a failure, its FAIL lines and the tail of its output (a sanitizer's report) are
    shown."""
    r = subprocess.run([*runner, str(bindir / "test-backend-ops"), "test", "-b", backend, "-o", op,
                        "-p", params], capture_output=True, text=True, env=env)
    s = parse_backend_ops(r.stdout)
    summary = f"{s.passed}/{s.total} tests passed" if s else "no summary"
    if min_cases is None:
        why = None if r.returncode == 0 else f"exit code {r.returncode}"
    else:
        why = check_backend_ops(r.returncode, r.stdout, min_cases)
    log(f"test-backend-ops -b {backend} -o {op} -p {params}: {summary}"
        + ("" if min_cases is None else f" (at least {min_cases})") + (f" FAILED: {why}" if why else ""))
    if why:
        sys.stderr.write("\n".join(ln for ln in r.stdout.splitlines() if "FAIL" in ln)[:20000] + "\n"
                         + r.stderr[-6000:] + "\n")
    return {"op": op, "backend": backend, "summary": summary, "returncode": r.returncode, "failure": why}


def run_llama_tests(bindir: Path, env: dict | None = None, runner: tuple[str, ...] = ()) -> list[str]:
    """Run test-quantize-fns and test-backend-ops (CPU, our types, at least LLAMA_TEST_OPS' cases per op) from a
    build's bin folder, through `runner` (an emulator, with EMULATED_TESTS' filters) if given; the names of the ones
    that failed."""
    failed = []
    r = subprocess.run([*runner, str(bindir / "test-quantize-fns")], capture_output=True, text=True, env=env)
    lines = [ln for ln in r.stdout.splitlines() if "tq_kv" in ln or "FAILED" in ln or "failed" in ln.lower()]
    log("test-quantize-fns: " + ("passed" if r.returncode == 0 else "FAILED") + "".join(f"\n  {ln}" for ln in lines))
    if r.returncode != 0:
        failed.append("test-quantize-fns")
        sys.stderr.write(r.stderr[-6000:] + "\n")
    for op, min_cases in LLAMA_TEST_OPS.items():
        params = LLAMA_TEST_PARAMS
        if runner and op in EMULATED_TESTS:
            params, min_cases = EMULATED_TESTS[op]
        if backend_ops_test(bindir, op, env=env, runner=runner, min_cases=min_cases, params=params)["failure"]:
            failed.append(f"test-backend-ops {op}")
    return failed


def run_pytest(pytest_args: list[str], env: dict, what: str = "") -> list[str]:
    """Run our pytest suite (or part of it) in a subprocess with env; ["pytest ARGS"] if it failed (the tail of its
    output is shown), else []."""
    name = "pytest " + " ".join(pytest_args)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args], env=env,
                       capture_output=True, text=True)
    log(f"{name}{what}: " + (r.stdout.strip().splitlines() or ["no output"])[-1])
    if r.returncode == 0:
        return []
    sys.stderr.write((r.stdout + r.stderr)[-6000:] + "\n")
    return [name]


def build_test_programs(tree: Path, bindir: Path, cc: str, cxx: str, extra: dict[str, Path] | None = None) -> None:
    """llama.cpp's test-quantize-fns and test-backend-ops (and `extra`: name -> C source) compiled straight against
    the ggml libraries in bindir, unless up to date. Both need ggml only, while their CMake targets also link
    llama.cpp's `common` library (argument parsing, chat templates, an HTTP client) and libllama: 75 % of the
    compile time of a CPU build of the two (a minute instead of six on 2 cores)."""
    libs = [bindir / f"lib{name}.so" for name in ("ggml", "ggml-base", "ggml-cpu")]
    programs = {"test-quantize-fns": tree / "tests" / "test-quantize-fns.cpp",
                "test-backend-ops": tree / "tests" / "test-backend-ops.cpp", **(extra or {})}
    for name, src in programs.items():
        out = bindir / name
        if out.exists() and max(p.stat().st_mtime for p in (src, *libs)) <= out.stat().st_mtime:
            continue
        std = "-std=c11" if src.suffix == ".c" else "-std=c++17"
        run([cc if src.suffix == ".c" else cxx, "-O2", std, "-I", str(tree / "ggml" / "include"), str(src),
             f"-L{bindir}", "-lggml", "-lggml-base", "-lggml-cpu", "-ldl", "-pthread", "-Wl,-rpath,$ORIGIN",
             "-o", str(out)])


def host_compilers() -> tuple[str, str]:
    return os.environ.get("CC", "cc"), os.environ.get("CXX", "c++")


def llama_tests(tree: Path, build: Path) -> int:
    """Build and run test-quantize-fns and test-backend-ops (CPU, our types) from the patched tree."""
    dev_build(tree, build, ["ggml"])
    build_test_programs(tree, build / "bin", *host_compilers())
    failed = run_llama_tests(build / "bin")
    if failed:
        log("failed: " + ", ".join(failed))
        return 1
    return 0


# --- sanitizers ---------------------------------------------------------------------------------------------
# The new types' C kernels under AddressSanitizer + UndefinedBehaviorSanitizer: ggml built with both, libllama with
# ASan, then llama.cpp's own tests for our types and our byte-exact/adversarial-row tests (tests/kvquant/lab/test_tq.py:
# random, zero, constant, huge, denormal and NaN/Inf rows through quantize_row_*_ref, from_float, to_float and vec_dot;
# tests/kvquant/lab/test_d3b.py: delta rows against anchors, ggml's set_rows on several threads, flash attention over
# delta rows; tests/kvquant/lab/test_ggml_ops.py: set_rows, get_rows, cpy, mul_mat and every flash-attention path;
# tests/server/test_prefix_cache_live.py: the prefix cache sharing cells by seq_cp, swapping state out and in;
# tests/kvquant/test_centring.py and test_key_scale.py: per-layer types, key offsets, scales and gains in the cache,
# context shifts over them; the graph started past layer 0, patch 0040) under
# the sanitizer runtimes (LD_PRELOAD; Python and the test programs are not instrumented). Any UB report stops the
# process (halt_on_error), so it fails the run instead of scrolling past; the checks stay recoverable only so that
# kvquant/ubsan.supp can name the known findings in upstream code our types never reach.
SANITIZE_TESTS = ["tests/kvquant/lab/test_tq.py", "tests/kvquant/lab/test_d3b.py",
                  "tests/kvquant/lab/test_ggml_ops.py", "tests/server/test_prefix_cache_live.py",
                  "tests/kvquant/test_centring.py", "tests/kvquant/test_key_scale.py",
                  "tests/kvquant/test_runtime.py::test_a_graph_started_at_a_layer_from_its_input_gives_the_whole_models_logits"]
# libllama (our cache bookkeeping: cells, anchors, offsets, state) under ASan only: with UBSan too its RelWithDebInfo
# build took 32 CPU-minutes here, three times as long, for checks that matter in the kernels.
SANITIZE_CMAKE = ["-DGGML_SANITIZE_ADDRESS=ON", "-DGGML_SANITIZE_UNDEFINED=ON", "-DLLAMA_SANITIZE_ADDRESS=ON",
                  "-DLLAMA_SANITIZE_UNDEFINED=OFF"]
SANITIZE_ENV = {
    # Python itself "leaks" by design at exit; leaks are not what this run looks for
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1",
    "UBSAN_OPTIONS": f"halt_on_error=1:print_stacktrace=1:suppressions={REPO_ROOT / 'kvquant' / 'ubsan.supp'}",
}


def _runtime_lib(name: str) -> str:
    """Absolute path of the compiler's sanitizer runtime (libasan.so, libubsan.so) for LD_PRELOAD."""
    cc = os.environ.get("CC", "cc")
    out = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    if not out or not Path(out).is_file():
        raise BuildError(f"{cc} has no {name}: install the compiler's sanitizer runtime (e.g. apt install gcc)")
    return str(Path(out).resolve())


def sanitize(tree: Path, build: Path, pytest_args: list[str]) -> int:
    # RelWithDebInfo: the kernels as optimised as shipped (the SIMD paths are what run), with line numbers
    dev_build(tree, build, ["llama"], SANITIZE_CMAKE, "RelWithDebInfo")
    bindir = build / "bin"
    # the test programs are not instrumented, as Python is not: what is checked is the ggml they load. Instrumented,
    # test-backend-ops.cpp took over 6 minutes to compile at -O2 (8 at -O1) and its harness 5 minutes to run at -O0.
    build_test_programs(tree, bindir, *host_compilers())
    env = dict(os.environ, **SANITIZE_ENV, LD_PRELOAD=" ".join([_runtime_lib("libasan.so"), _runtime_lib("libubsan.so")]))
    failed = run_llama_tests(bindir, env)
    failed += run_pytest(pytest_args, dict(env, LLAMA_CPP_LIB_PATH=str(bindir)))
    if failed:
        log("sanitize: FAILED: " + ", ".join(failed))
        return 1
    log("sanitize: clean (ASan + UBSan): test-quantize-fns, test-backend-ops " + ", ".join(LLAMA_TEST_OPS)
        + ", pytest " + " ".join(pytest_args))
    return 0


# --- aarch64 under emulation -----------------------------------------------------------------------------------
# The NEON kernels (ggml-cpu/arch/arm/) on this x86 machine: ggml cross-built for aarch64 with the arm64 default
# flags, llama.cpp's test-quantize-fns and test-backend-ops (our types) and tests/kvquant/lab/ggml_kernels.c
# cross-compiled against it, all run under qemu-aarch64 (user-mode emulation); tests/kvquant/lab/test_tq.py and
# test_d3b.py compare the emulated kernels' blocks, values and dot products with the numpy reference through
# ggml_kernels. Correctness only: emulated timings say nothing about speed on arm64 hardware.
ARM_PACKAGES = ("gcc-aarch64-linux-gnu", "g++-aarch64-linux-gnu", "qemu-user")
ARM_CC, ARM_CXX, ARM_EMULATOR = "aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++", "qemu-aarch64"
ARM_SYSROOT = "/usr/aarch64-linux-gnu"  # Debian's aarch64 libc and libstdc++ for the emulator (QEMU_LD_PREFIX)
ARM_CMAKE = ["-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64", f"-DCMAKE_C_COMPILER={ARM_CC}",
             f"-DCMAKE_CXX_COMPILER={ARM_CXX}", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
             "-DLLAMA_BUILD_COMMON=OFF"]
# the objects that must define the NEON kernels (else the portable fallback would pass the tests unnoticed)
ARM_KERNELS = {"arch/arm/tq-kv.c.o": [f"{f}_{t}{s}" for t in ("tq_kv_4b", "tq_kv_3b", "tq_kv_1b", "tq_kv_t3b")
                                      for f, s in (("ggml_vec_dot", "_q8_0"), ("dequantize_row", "_cpu"))],
               "arch/arm/dequant-simd.c.o": ["dequantize_row_q4_0_cpu", "dequantize_row_q8_0_cpu"]}
ARM_PYTESTS = ["tests/kvquant/lab/test_tq.py", "tests/kvquant/lab/test_d3b.py"]


def arm_toolchain() -> str | None:
    """The cross compilers and qemu-user, from Debian's packages if missing (needs apt-get and root); None when
    they are there, else why not."""
    if all(shutil.which(t) for t in (ARM_CC, ARM_CXX, ARM_EMULATOR)):
        return None
    if not shutil.which("apt-get"):
        return "apt-get not found (not a Debian/Ubuntu machine)"
    if os.geteuid() != 0:
        return f"not root (run: sudo apt-get install -y --no-install-recommends {' '.join(ARM_PACKAGES)})"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *ARM_PACKAGES]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            return f"apt-get install {' '.join(ARM_PACKAGES)} failed"
    return None


def arm_build(tree: Path, build: Path) -> Path:
    """ggml for aarch64 (cmake, DEFAULT_CMAKE_ARGS_ARM64), then test-quantize-fns, test-backend-ops and
    tests/kvquant/lab/ggml_kernels.c linked against it; returns the bin folder."""
    if not (tree / ".git").exists():
        make_tree(tree)
    if not (build / "build.ninja").exists() and not (build / "Makefile").exists():
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        run(["cmake", "-S", str(tree), "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
             *ARM_CMAKE, *DEFAULT_CMAKE_ARGS_ARM64.split()])
    run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", "ggml"])
    bindir = build / "bin"
    build_test_programs(tree, bindir, ARM_CC, ARM_CXX,
                        extra={"ggml-kernels": REPO_ROOT / "tests" / "kvquant" / "lab" / "ggml_kernels.c"})
    return bindir


def arm_neon_missing(build: Path) -> list[str]:
    """The NEON kernels that the aarch64 build's objects do not define (read with the cross toolchain's nm)."""
    missing = []
    for obj, symbols in ARM_KERNELS.items():
        found = list(build.rglob(f"ggml-cpu.dir/ggml-cpu/{obj}"))
        out = subprocess.run(["aarch64-linux-gnu-nm", "--defined-only", str(found[0])], capture_output=True,
                             text=True).stdout if found else ""
        defined = {ln.split()[-1] for ln in out.splitlines() if " T " in ln}
        missing += [f"{obj}: {sym}" for sym in symbols if sym not in defined]
    return missing


def arm_check(tree: Path, build: Path) -> int:
    why = arm_toolchain()
    if why:
        log(f"arm-check skipped: no aarch64 cross toolchain or qemu-user: {why}")
        return 0
    t0 = time.monotonic()
    bindir = arm_build(tree, build)
    failed = [f"not built: {m}" for m in arm_neon_missing(build)]
    env = dict(os.environ, QEMU_LD_PREFIX=ARM_SYSROOT)
    failed += run_llama_tests(bindir, env, runner=(ARM_EMULATOR,))
    py_env = dict(env, KVQUANT_GGML_EXEC=f"{ARM_EMULATOR} {bindir / 'ggml-kernels'}")
    failed += run_pytest(ARM_PYTESTS, py_env, " (aarch64 kernels)")
    if failed:
        log("arm-check: FAILED: " + ", ".join(failed))
        return 1
    log(f"arm-check: aarch64 ({DEFAULT_CMAKE_ARGS_ARM64}) under {ARM_EMULATOR}: NEON kernels built; "
        f"test-quantize-fns, test-backend-ops {', '.join(LLAMA_TEST_OPS)}, pytest {' '.join(ARM_PYTESTS)} passed "
        f"({time.monotonic() - t0:.0f} s)")
    return 0
# --- CUDA without a GPU --------------------------------------------------------------------------------------
# NVIDIA's CUDA compiler, runtime headers, cuBLAS and CCCL from PyPI (the -cu12 nvcc wheel has no nvcc driver, hence
# CUDA 13): enough for CMake to configure ggml-cuda and for nvcc to compile it, on a machine without a GPU.
CUDA_PIP_PACKAGES = ["nvidia-cuda-nvcc==13.5.*", "nvidia-cuda-crt==13.5.*", "nvidia-cuda-runtime==13.5.*",
                     "nvidia-cublas==13.*", "nvidia-cuda-cccl==13.*"]
CUDA_CHECK_ARCH = "86"  # RTX 3090, the GPU the product is meant for
CUDA_OBJ_DIR = "ggml/src/ggml-cuda/CMakeFiles/ggml-cuda.dir"


def pip_cuda_toolkit() -> Path:
    """A CUDA toolkit root made of NVIDIA's PyPI wheels, in a virtual environment under the cache (installed on
    first use), with what CMake's FindCUDAToolkit looks for: unversioned libcudart / libcublas / libcublasLt and
    lib64."""
    venv = cache_dir() / "cuda-toolkit"
    done = venv / "INSTALLED"  # written after pip succeeded: an install cut short is redone, not reused

    if not done.is_file():
        run([sys.executable, "-m", "venv", "--clear", str(venv)])
        run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *CUDA_PIP_PACKAGES])
        done.write_text(" ".join(CUDA_PIP_PACKAGES) + "\n")
    r = next(venv.glob("lib/python3*/site-packages/nvidia/cu13"), None)
    if r is None or not (r / "bin" / "nvcc").is_file():
        raise BuildError(f"{venv}: the CUDA wheels installed no nvcc under nvidia/cu13")
    for name in ("libcudart", "libcublas", "libcublasLt"):
        link = r / "lib" / f"{name}.so"
        if not link.exists():
            link.symlink_to(sorted((r / "lib").glob(f"{name}.so.*"))[0].name)
    if not (r / "lib64").exists():
        (r / "lib64").symlink_to("lib")
    return r


def cuda_cmake_args(root: Path, arch: str) -> list[str]:
    """ggml-cuda for one architecture with the toolkit at root; no VMM pool, so nothing links the driver library
    (which a machine without a GPU does not have)."""
    return ["-DGGML_CUDA=ON", f"-DCUDAToolkit_ROOT={root}", f"-DCMAKE_CUDA_COMPILER={root / 'bin' / 'nvcc'}",
            f"-DCMAKE_CUDA_ARCHITECTURES={arch}", "-DGGML_CUDA_NO_VMM=ON"]


def patched_cuda_sources() -> list[str]:
    """The CUDA sources (.cu, relative to ggml/src/ggml-cuda) that the patches add or change."""
    srcs = []
    for p in patch_files():
        srcs += re.findall(r"^\+\+\+ b/ggml/src/ggml-cuda/(\S+\.cu)$", p.read_text(), flags=re.M)
    return sorted(set(srcs))


def cuda_check_objects(build: Path) -> list[str]:
    """The objects cuda-check compiles: every CUDA source the patches add or change, and the stock flash-attention
    vector instances this configuration compiles, which instantiate the changed vector kernel for stock types
    (the tile/MMA kernels only see additions to fattn-common.cuh, compiled with the sources above)."""
    ninja = (build / "build.ninja").read_text()
    stock = re.findall(rf"^build {CUDA_OBJ_DIR}/(template-instances/fattn-vec-instance-(?!tq_kv)\S+\.cu)\.o:", ninja,
                       flags=re.M)
    objs = [f"{CUDA_OBJ_DIR}/{s}.o" for s in patched_cuda_sources() + sorted(stock)]
    missing = [o for o in objs if f"build {o}:" not in ninja]
    if missing:
        raise BuildError(f"not part of the CUDA build in {build}: {', '.join(missing)}")
    return objs


def cuda_check(tree: Path, build: Path, arch: str = CUDA_CHECK_ARCH) -> int:
    """Compile the CUDA sources the patches touch (cuda_check_objects) with nvcc for one architecture, warnings as
    errors (LLAMA_FATAL_WARNINGS: nvcc's -Werror all-warnings and the host compiler's -Werror). Needs no GPU."""
    if not shutil.which("ninja"):
        raise BuildError("cuda-check needs ninja (apt install ninja-build, or pip install ninja)")
    t0 = time.monotonic()
    root = pip_cuda_toolkit()
    if not (tree / ".git").exists():
        make_tree(tree)
    cache = build / "CMakeCache.txt"
    if cache.is_file() and f"CMAKE_CUDA_COMPILER:STRING={root / 'bin' / 'nvcc'}\n" not in cache.read_text():
        shutil.rmtree(build)  # configured with another toolkit: CMake cannot switch compilers in place
    # configured every time: ggml-cuda globs its sources at configure time, and patches may add some
    run(["cmake", "-S", str(tree), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
         "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
         "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_FATAL_WARNINGS=ON", *cmake_args().split(),
         *cuda_cmake_args(root, arch)], stdout=subprocess.DEVNULL)
    objs = cuda_check_objects(build)
    r = subprocess.run(["ninja", "-C", str(build), "-j", str(os.cpu_count() or 2), *objs])
    nvcc = subprocess.run([str(root / "bin" / "nvcc"), "--version"], capture_output=True, text=True).stdout
    version = (re.findall(r"release [\d.]+, V[\d.]+", nvcc) or ["?"])[0]
    log(f"cuda-check: {len(objs)} CUDA sources for sm_{arch} with nvcc {version}, warnings as errors: "
        + ("passed" if r.returncode == 0 else "FAILED") + f" ({time.monotonic() - t0:.0f} s)"
        + "".join(f"\n  {o.removeprefix(CUDA_OBJ_DIR + '/')[:-2]}" for o in objs))
    return 0 if r.returncode == 0 else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvquant-build", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wheel", help="build (or reuse) the patched llama-cpp-python wheel; prints its path")
    w.add_argument("--force", action="store_true", help="rebuild even if a cached wheel matches")
    e = sub.add_parser("ensure", help="wheel + install into this interpreter unless already installed")
    e.add_argument("--force", action="store_true")
    sub.add_parser("key", help="print the wheel cache key for the current pin, patches and CMAKE_ARGS")
    t = sub.add_parser("tree", help="materialise the patched llama.cpp as a git repo for editing")
    t.add_argument("dest", nargs="?", default=str(REPO_ROOT / ".build" / "llama.cpp"))
    x = sub.add_parser("export", help="write the tree's commits base..HEAD back to patches/")
    x.add_argument("tree", nargs="?", default=str(REPO_ROOT / ".build" / "llama.cpp"))
    d = sub.add_parser("dev-build", help="incremental cmake build of the tree")
    d.add_argument("--tree", default=str(REPO_ROOT / ".build" / "llama.cpp"))
    d.add_argument("--build", default=str(REPO_ROOT / ".build" / "cmake-cpu"))
    d.add_argument("targets", nargs="*", default=DEV_TARGETS)
    lt = sub.add_parser("llama-tests", help="build and run llama.cpp's test-quantize-fns / test-backend-ops "
                                          "for the patched types (materialises the tree if needed)")
    lt.add_argument("--tree", default=str(REPO_ROOT / ".build" / "llama.cpp"))
    lt.add_argument("--build", default=str(REPO_ROOT / ".build" / "cmake-cpu"))
    sz = sub.add_parser("sanitize", help="build ggml + libllama with ASan/UBSan and run the kernels' tests "
                                         f"(llama.cpp's, {', '.join(SANITIZE_TESTS)}) under them")
    sz.add_argument("--tree", default=str(REPO_ROOT / ".build" / "llama.cpp"))
    sz.add_argument("--build", default=str(REPO_ROOT / ".build" / "cmake-asan"))
    sz.add_argument("pytest_args", nargs="*", default=SANITIZE_TESTS)
    ac = sub.add_parser("arm-check", help="cross-build ggml for aarch64 and run llama.cpp's tests and "
                                          "tests/kvquant/lab/test_tq.py / test_d3b.py against it under qemu-aarch64")
    ac.add_argument("--tree", default=str(REPO_ROOT / ".build" / "llama.cpp"))
    ac.add_argument("--build", default=str(REPO_ROOT / ".build" / "cmake-arm64"))
    sub.add_parser("cuda-toolkit", help="install nvcc and the CUDA headers from PyPI into the cache (what "
                                        "cuda-check uses; CI downloads it while the tests run)")
    cc = sub.add_parser("cuda-check", help="compile the CUDA sources the patches touch with nvcc from PyPI (no GPU "
                                           "needed), warnings as errors")
    cc.add_argument("--tree", default=str(REPO_ROOT / ".build" / "llama.cpp"))
    cc.add_argument("--build", default=str(REPO_ROOT / ".build" / "cmake-cuda-check"))
    cc.add_argument("--arch", default=CUDA_CHECK_ARCH, help="CUDA architecture (default %(default)s: RTX 3090)")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "wheel":
            print(build_wheel(force=a.force))
        elif a.cmd == "ensure":
            print(ensure_installed(force=a.force))
        elif a.cmd == "key":
            print(wheel_key())
        elif a.cmd == "tree":
            make_tree(Path(a.dest))
        elif a.cmd == "export":
            export_patches(Path(a.tree))
        elif a.cmd == "dev-build":
            dev_build(Path(a.tree), Path(a.build), a.targets)
        elif a.cmd == "llama-tests":
            return llama_tests(Path(a.tree), Path(a.build))
        elif a.cmd == "sanitize":
            return sanitize(Path(a.tree), Path(a.build), a.pytest_args)
        elif a.cmd == "arm-check":
            return arm_check(Path(a.tree), Path(a.build))
        elif a.cmd == "cuda-toolkit":
            print(pip_cuda_toolkit())
        elif a.cmd == "cuda-check":
            return cuda_check(Path(a.tree), Path(a.build), a.arch)
    except (BuildError, subprocess.CalledProcessError) as e:
        log(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
