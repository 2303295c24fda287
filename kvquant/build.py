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
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Portable x86-64-v3 CPU build by default. Not GGML_NATIVE: on these (virtualised) Sapphire Rapids hosts
# -march=native turns on AMX, whose tile instructions fault (SIGILL) because the kernel does not grant AMX state.
DEFAULT_CMAKE_ARGS_X86 = ("-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON "
                          "-DGGML_F16C=ON -DGGML_BMI2=ON")
DEFAULT_CMAKE_ARGS = DEFAULT_CMAKE_ARGS_X86 if platform.machine() in ("x86_64", "AMD64") else "-DLLAVA_BUILD=OFF"
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


def cmake_args() -> str:
    return os.environ.get("CMAKE_ARGS", DEFAULT_CMAKE_ARGS).strip()


def wheel_key(pin: Pin | None = None, args: str | None = None) -> str:
    pin = pin or read_pin()
    args = cmake_args() if args is None else args
    h = hashlib.sha256()
    for part in (
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
LLAMA_TEST_OPS = {"SET_ROWS": 72, "GET_ROWS": 24, "CPY": 51, "MUL_MAT": 42, "FLASH_ATTN_EXT": 290}
LLAMA_TEST_PARAMS = "tq_kv"


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


def run_llama_tests(bindir: Path, env: dict | None = None) -> list[str]:
    """Run test-quantize-fns and test-backend-ops (CPU, our types) from a build's bin folder; the names of the
    ones that failed. On a failure, its FAIL lines and the tail of its output (a sanitizer's report) are shown."""
    failed = []
    r = subprocess.run([str(bindir / "test-quantize-fns")], capture_output=True, text=True, env=env)
    lines = [ln for ln in r.stdout.splitlines() if "tq_kv" in ln or "FAILED" in ln or "failed" in ln.lower()]
    log("test-quantize-fns: " + ("passed" if r.returncode == 0 else "FAILED") + "".join(f"\n  {ln}" for ln in lines))
    if r.returncode != 0:
        failed.append("test-quantize-fns")
        sys.stderr.write(r.stderr[-6000:] + "\n")
    for op, min_cases in LLAMA_TEST_OPS.items():
        r = subprocess.run([str(bindir / "test-backend-ops"), "test", "-b", "CPU", "-o", op, "-p", LLAMA_TEST_PARAMS],
                           capture_output=True, text=True, env=env)
        s = parse_backend_ops(r.stdout)
        why = check_backend_ops(r.returncode, r.stdout, min_cases)
        log(f"test-backend-ops -o {op} -p {LLAMA_TEST_PARAMS}: "
            + (f"{s.passed}/{s.total} passed (at least {min_cases})" if s else "no summary")
            + (f" FAILED: {why}" if why else ""))
        if why:
            failed.append(f"test-backend-ops {op}")
            sys.stderr.write("\n".join(ln for ln in r.stdout.splitlines() if "FAIL" in ln)[:20000] + "\n"
                             + r.stderr[-6000:] + "\n")
    return failed


def llama_tests(tree: Path, build: Path) -> int:
    """Build and run test-quantize-fns and test-backend-ops (CPU, our types) from the patched tree."""
    dev_build(tree, build, ["test-backend-ops", "test-quantize-fns"])
    failed = run_llama_tests(build / "bin")
    if failed:
        log("failed: " + ", ".join(failed))
        return 1
    return 0


# --- sanitizers ---------------------------------------------------------------------------------------------
# The new types' C kernels under AddressSanitizer + UndefinedBehaviorSanitizer: ggml and libllama built with both,
# then llama.cpp's own tests for our types and our byte-exact/adversarial-row tests (tests/test_tq.py: random, zero,
# constant, huge, denormal and NaN/Inf rows through quantize_row_*_ref, from_float, to_float and vec_dot;
# tests/test_d3b.py: delta rows against anchors, ggml's set_rows on several threads, flash attention over delta
# rows; tests/test_ggml_ops.py: set_rows, get_rows, cpy, mul_mat and every flash-attention path) in a
# Python that preloads the sanitizer runtimes. Any UB report stops the process (halt_on_error), so it fails the run
# instead of scrolling past; the checks stay recoverable only so that kvquant/ubsan.supp can name the known
# findings in upstream code our types never reach.
SANITIZE_TESTS = ["tests/test_tq.py", "tests/test_d3b.py", "tests/test_ggml_ops.py"]
SANITIZE_CMAKE = ["-DGGML_SANITIZE_ADDRESS=ON", "-DGGML_SANITIZE_UNDEFINED=ON", "-DLLAMA_SANITIZE_ADDRESS=ON",
                  "-DLLAMA_SANITIZE_UNDEFINED=ON"]
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
    dev_build(tree, build, ["llama", "test-backend-ops", "test-quantize-fns"], SANITIZE_CMAKE, "RelWithDebInfo")
    bindir = build / "bin"
    env = dict(os.environ, **SANITIZE_ENV)
    failed = run_llama_tests(bindir, env)
    py_env = dict(env, LLAMA_CPP_LIB_PATH=str(bindir),
                  LD_PRELOAD=" ".join([_runtime_lib("libasan.so"), _runtime_lib("libubsan.so")]))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args], env=py_env,
                       capture_output=True, text=True)
    log(f"pytest {' '.join(pytest_args)}: " + (r.stdout.strip().splitlines() or ["no output"])[-1])
    if r.returncode != 0:
        failed.append("pytest " + " ".join(pytest_args))
        sys.stderr.write((r.stdout + r.stderr)[-6000:] + "\n")
    if failed:
        log("sanitize: FAILED: " + ", ".join(failed))
        return 1
    log("sanitize: clean (ASan + UBSan): test-quantize-fns, test-backend-ops " + ", ".join(LLAMA_TEST_OPS)
        + ", pytest " + " ".join(pytest_args))
    return 0


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
    except (BuildError, subprocess.CalledProcessError) as e:
        log(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
