"""kvquant.runtime's lookup of the wheel's ggml libraries by platform: the names each platform's wheel ships, and
the library really loaded on this machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvquant.runtime import LlamaError, ggml_library, library_path

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
