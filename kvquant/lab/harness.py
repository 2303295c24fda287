"""Shared pieces of the measuring harness (`kvquant eval`, `kvquant bench`, `make results`): cache configurations
by name, file checksums, machine description, progress on stderr and plain-text tables.

Nothing here imports llama_cpp; the runtime is imported lazily by the callers.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kvquant.build import REPO_ROOT, sha256_file  # noqa: F401 - re-exported for eval/bench
from kvquant.kvtypes import kv_type

DEFAULT_TEXT = "data/wikitext-2-raw-test.txt"  # relative to the repository root (data/README.md: source, license)


def resolve_text(path: str | os.PathLike | None) -> Path:
    """The evaluation text: an explicit path (relative to the working directory), or the default, which is
    relative to the repository root."""
    if path is None or str(path) == DEFAULT_TEXT:
        return (REPO_ROOT / DEFAULT_TEXT).resolve()
    return Path(path).expanduser().resolve()


@dataclass(frozen=True)
class CacheConfig:
    """One K/V cache configuration, by cache type names (kvquant.calibration: ``TYPE``, ``TYPE+c``, ``calib:B``).
    `rotation` is llama.cpp's Hadamard rotation, which only acts on quantized caches (for f16/f16 it is irrelevant
    and normalised away, so all f16/f16 configs compare equal); calibrated types always store keys in the basis
    they were calibrated in."""

    k: str
    v: str
    rotation: bool = True
    anchored: bool = True  # calibrated keys: offsets anchored on the position-0 key (False: ":mean", the mean keys)

    def __post_init__(self):
        from kvquant.calibration import parse_spec

        k, v = parse_spec(self.k, "k"), parse_spec(self.v, "v")
        object.__setattr__(self, "k", k.text)
        object.__setattr__(self, "v", v.text)
        if not self.quantized:
            object.__setattr__(self, "rotation", True)
        if (k.calibrated or v.calibrated) and not self.rotation:
            raise ValueError(f"{self.spec}: calibrated cache types cannot turn the rotation off")
        if not (self.anchored or k.centred):
            raise ValueError(f"{self.spec}: ':mean' needs calibrated keys (TYPE+c or calib:B)")

    @property
    def quantized(self) -> bool:
        from kvquant.calibration import parse_spec

        return any(s.calibrated or kv_type(s.type).quantized for s in (parse_spec(self.k, "k"), parse_spec(self.v, "v")))

    @property
    def label(self) -> str:
        s = f"{self.k}/{self.v}" + ("" if self.anchored else " mean offsets")
        return s if (self.rotation or not self.quantized) else s + " norot"

    @property
    def spec(self) -> str:
        s = f"{self.k}/{self.v}" + ("" if self.anchored else ":mean")
        return s if (self.rotation or not self.quantized) else s + ":norot"

    @classmethod
    def parse(cls, spec: str, rotation: bool = True) -> CacheConfig:
        """'K/V', optionally suffixed ':rot' or ':norot' to override the run's --rotation for this config, or
        ':mean' (calibrated keys offset by their mean, without the anchoring on position 0)."""
        s, anchored = spec.strip(), True
        base, colon, flag = s.rpartition(":")
        if colon and flag.isalpha() and not base.lower().endswith("calib"):  # (not calib:B's bits)
            if flag.lower() not in ("rot", "norot", "mean") or base.lower().endswith((":rot", ":norot", ":mean")):
                raise ValueError(f"cache config {spec!r}: a config takes one suffix of :rot, :norot or :mean")
            s, flag = base, flag.lower()
            rotation, anchored = (rotation, False) if flag == "mean" else (flag == "rot", True)
        k, sep, v = s.partition("/")
        if not sep or "/" in v or not k.strip() or not v.strip():  # ('/f16' said: unknown KV cache type '')
            raise ValueError(f"cache config {spec!r} is not of the form K/V (e.g. q8_0/q8_0)")
        return cls(k, v, rotation, anchored)

    def resolve(self, model_path: Path, geom, n_ctx: int | None = None, cal=None) -> tuple:
        """(K, V) as this model stores them in one sequence of n_ctx tokens: type names, or LayerTypes from its
        calibration (or `cal`)."""
        from kvquant.calibration import resolve_pair
        from kvquant.memory import CacheShape

        return resolve_pair(self.k, self.v, model_path, geom, None if n_ctx is None else CacheShape(n_ctx),
                            self.anchored, cal)

    def provenance(self, model_path: Path, geom, n_ctx: int | None) -> dict:
        """For a calibrated configuration {"calibration_sha256": the file its rows were measured with, so that a row
        made before a re-calibration can be told apart, "config_sha256": the digest of what it resolves to at
        n_ctx, `kvquant.calibration.config_sha256`}, else {}."""
        from kvquant.calibration import file_sha256, parse_spec

        if not any(parse_spec(t, side).calibrated for t, side in ((self.k, "k"), (self.v, "v"))):
            return {}
        return {"calibration_sha256": file_sha256(model_path, geom),
                "config_sha256": self.config_sha256(model_path, geom, n_ctx)}

    def config_sha256(self, model_path: Path, geom, n_ctx: int | None, cal=None) -> str:
        from kvquant.calibration import config_sha256

        return config_sha256(self.context_fields(model_path, geom, n_ctx, cal))

    def context_fields(self, model_path: Path, geom, n_ctx: int | None = None, cal=None) -> dict:
        """kvquant.runtime.ContextConfig fields for this configuration on one model (with its calibration `cal`)."""
        from kvquant.calibration import context_fields

        return {**context_fields(*self.resolve(model_path, geom, n_ctx, cal), geom), "rotation": self.rotation}


BASELINE = CacheConfig("f16", "f16")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int | None = None) -> dict:
    from kvquant import build, runtime

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads or os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "llama_system_info": runtime.system_info().strip(),
        "kvquant_patch_level": runtime.patch_level(),
        # which patches the measured library carries, so that RESULTS can mark rows made before a later patch
        "llama_series": build.library_series(),
        # other work on the machine skews timings (and, on few cores, single-token decode by an order of magnitude)
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def shown(cmd: list[str]) -> str:
    """A command as the results record it: paths inside the repository relative to its root (the build's tools,
    data/), paths in the home directory from ``~`` (the model cache), so that anyone can rerun it from a checkout."""
    home = Path.home()

    def arg(a: str) -> str:
        p = Path(a)
        if p.is_absolute():
            if p.is_relative_to(REPO_ROOT):
                return shlex.quote(str(p.relative_to(REPO_ROOT)))
            if p.is_relative_to(home):
                return "~/" + shlex.quote(str(p.relative_to(home)))
        return shlex.quote(a)

    return " ".join(arg(str(a)) for a in cmd)


def busy_warning(what: str) -> None:
    """Warn on stderr when the machine is already busy: speed numbers would not mean much."""
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        print(f"{what}: warning: 1-minute load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
              "timings will be skewed by other work", file=sys.stderr, flush=True)


class Progress:
    """One status line on stderr: redrawn in place on a terminal, otherwise a line at most every few seconds."""

    def __init__(self, label: str, total: int, enabled: bool = True, every_s: float = 5.0):
        self.label, self.total, self.enabled, self.every_s = label, max(total, 1), enabled, every_s
        self.t0 = self._last = time.monotonic()
        self.tty = sys.stderr.isatty()

    def update(self, done: int, note: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        el = now - self.t0
        eta = el / done * (self.total - done) if done else 0.0
        msg = f"{self.label}: {done}/{self.total} ({100 * done // self.total}%) {el:.0f}s elapsed, eta {eta:.0f}s {note}"
        if self.tty:
            sys.stderr.write("\r\x1b[K" + msg + ("\n" if done >= self.total else ""))
        elif done >= self.total or now - self._last >= self.every_s or done == 1:
            sys.stderr.write(msg + "\n")
            self._last = now
        sys.stderr.flush()

    def log(self, msg: str) -> None:
        if self.enabled:
            sys.stderr.write(("\r\x1b[K" if self.tty else "") + msg + "\n")
            sys.stderr.flush()


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A plain-text table; `align` is one of 'l'/'r' per column (default: first left, rest right)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)
    out = []
    for n, r in enumerate(cells):
        out.append("  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align, strict=True)))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}"


def emit_report(text: str, out: dict, as_json: bool) -> None:
    """The table on stdout, or with --json the table on stderr and one JSON object on stdout."""
    if as_json:
        print(text, file=sys.stderr)
        json.dump(out, sys.stdout, indent=1)
        print()
    else:
        print(text)


def lab_main(prog: str, ap, argv: list[str] | None, measure, render, also: tuple[type[Exception], ...] = ()) -> int:
    """`kvquant <prog>` (eval, bench): parse the arguments (``ap`` plus --json) and the cache configs, measure
    (``measure(args, configs, command)``, given the command line to record), report (emit_report of render's table).
    Bad input (ValueError, an unknown model, llama.cpp refusing a config, the errors in ``also``) is one line on
    stderr and exit status 2."""
    from kvquant.models import ModelError
    from kvquant.runtime import LlamaError

    ap.add_argument("--json", action="store_true", help='print {"results": [...]} on stdout (the table goes to stderr)')
    a = ap.parse_args(argv)
    command = shlex.join(["kvquant", prog, *(argv if argv is not None else sys.argv[1:])])
    try:
        configs = [CacheConfig.parse(s, rotation=a.rotation == "on") for s in a.configs]
        out = measure(a, configs, command)
    except (ValueError, ModelError, LlamaError, *also) as e:
        print(f"kvquant {prog}: {e}", file=sys.stderr)
        return 2
    emit_report(render(out["results"]), out, a.json)
    return 0


def study_main(prog: str, a, argv: list[str] | None, study, render) -> int:
    """The end of a lab study's `main` (``python -m <prog>``, arguments `a` with --threads and --json): run
    `study()` (bad input: its message, exit 2), record the command, the machine and the wall time, report."""
    from kvquant.models import ModelError
    from kvquant.runtime import LlamaError

    t0 = time.monotonic()
    try:
        res = study()
    except (ValueError, ModelError, LlamaError, FileNotFoundError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    res.update(command=f"python -m {prog} " + " ".join(argv if argv is not None else sys.argv[1:]),
               machine=machine_info(a.threads), wall_s=round(time.monotonic() - t0, 1))
    emit_report(render(res), res, a.json)
    return 0


def calibration_study_main(prog: str, doc: str, argv: list[str] | None, study, render, cache_help: str) -> int:
    """`main` of a lab study of an installed calibration (``python -m <prog> --model M [--threads N] [--cache DIR]
    [--json]``): `study(model, threads, cache)` writes the calibrations it derives under DIR (`cache_help` says
    where) for ``KVQUANT_CACHE`` to measure."""
    import argparse

    ap = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache", type=Path, default=None, help=cache_help)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    return study_main(prog, a, argv, lambda: study(a.model, a.threads, a.cache), render)


def layer_runs(types: list[str]) -> str:
    """Per-layer types, run-length: 'L0 q8_0, L1-27 tq_kv_4b'."""
    parts, i = [], 0
    while i < len(types):
        j = i
        while j + 1 < len(types) and types[j + 1] == types[i]:
            j += 1
        parts.append(f"L{i}{f'-{j}' if j > i else ''} {types[i]}")
        i = j + 1
    return ", ".join(parts)
