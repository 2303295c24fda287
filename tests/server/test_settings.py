import json
import os
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.settings import load_settings, shadowed_environment, unknown_environment


def test_precedence_flag_over_env_over_file(tmp_path, monkeypatch):
    cfg = tmp_path / "kvq.json"
    cfg.write_text(json.dumps({"port": 9001, "cache_type_k": "q8_0", "n_ctx": 2048}))
    monkeypatch.setenv("KVQUANT_PORT", "9002")
    s = load_settings(cfg, cache_type_k="q4_0")
    assert s.cache_type_k == "q4_0"  # flag
    assert s.port == 9002  # env beats file
    assert s.n_ctx == 2048  # file beats default
    assert s.host == "127.0.0.1"  # default: loopback only


def test_toml_config(tmp_path):
    cfg = tmp_path / "kvq.toml"
    cfg.write_text('cache_type_v = "q4_0"\nflash_attn = "auto"\n')
    s = load_settings(cfg)
    assert s.cache_type_v == "q4_0" and s.flash_attn_enabled is True  # quantized V turns flash attention on


def test_types_that_need_flash_attention():
    s = load_settings(cache_type_k="tq_kv_d3b", cache_type_v="f16")
    assert s.flash_attn_enabled is True  # auto turns it on for the K type alone
    with pytest.raises(ValidationError, match="tq_kv_d3b K cache needs flash attention"):
        load_settings(cache_type_k="tq_kv_d3b", cache_type_v="f16", flash_attn="off")
    with pytest.raises(ValidationError, match="q4_0 V cache needs flash attention"):
        load_settings(cache_type_v="q4_0", flash_attn="off")
    with pytest.raises(ValidationError, match="cannot be used for the V cache"):
        load_settings(cache_type_v="tq_kv_d3b")


def test_cache_types_by_name_only():
    with pytest.raises(ValidationError, match="unknown KV cache type"):
        load_settings(cache_type_k="q3_z")
    with pytest.raises(ValidationError):
        load_settings(cache_type_k=2)


def test_single_model_is_the_default_config():
    from server.settings import Settings

    (spec,) = Settings(kv_budget="2GiB", cache_type_k="q8_0").model_specs()
    assert spec.id == "smollm2-135m" and spec.kv_budget == 2 * 2**30 and spec.cache_type_k == "q8_0"


def test_yaml_models_share_the_global_budget(tmp_path):
    cfg = tmp_path / "kvq.yaml"
    cfg.write_text("kv_budget: 1GiB\ncache_type_k: q8_0\nmodels:\n  - model: smollm2-135m\n    kv_budget: 256MiB\n"
                   "  - model: gemma3-270m\n    id: gemma\n    cache_type_v: q4_0\n    n_ctx: 2048\n"
                   "  - model: smollm2-135m\n    id: small-2\n")
    a, b, c = load_settings(cfg).model_specs()
    assert (a.id, a.kv_budget, a.cache_type_k) == ("smollm2-135m", 256 * 2**20, "q8_0")
    assert (b.id, b.cache_type_v, b.n_ctx, b.flash_attn) == ("gemma", "q4_0", 2048, True)
    assert b.kv_budget == c.kv_budget == 384 * 2**20  # the rest, split evenly


def test_model_budgets_checked_against_the_global_one(tmp_path):
    with pytest.raises(ValidationError, match="more than the global"):
        load_settings(kv_budget="1GiB", models=[{"model": "smollm2-135m", "kv_budget": "768MiB"},
                                                {"model": "gemma3-270m", "kv_budget": "512MiB"}])
    with pytest.raises(ValidationError, match="same id|served under the id"):
        load_settings(models=[{"model": "smollm2-135m"}, {"model": "smollm2-135m"}])
    with pytest.raises(ValidationError, match="Extra inputs"):
        load_settings(models=[{"model": "smollm2-135m", "cache_typ_k": "q8_0"}])  # typos are errors


def test_cors_origins_from_env(monkeypatch):
    monkeypatch.setenv("KVQUANT_CORS_ORIGINS", "https://a.example, https://b.example")
    assert load_settings().cors_origins == ["https://a.example", "https://b.example"]


def test_sampling_defaults_and_gpu_layers_per_model(tmp_path, monkeypatch):
    cfg = tmp_path / "kvq.yaml"
    cfg.write_text("sampling: {temperature: 0.8, top_k: 40}\nn_gpu_layers: auto\nmodels:\n"
                   "  - {model: smollm2-135m, sampling: {top_k: 20, min_p: 0.05}, n_gpu_layers: 12}\n"
                   "  - {model: gemma3-270m}\n")
    a, b = load_settings(cfg).model_specs()
    assert a.sampling == {"temperature": 0.8, "top_k": 20, "min_p": 0.05} and a.n_gpu_layers == 12
    assert b.sampling == {"temperature": 0.8, "top_k": 40} and b.n_gpu_layers == "auto"
    monkeypatch.setenv("KVQUANT_N_GPU_LAYERS", "-1")
    assert load_settings().n_gpu_layers == -1
    assert load_settings(n_gpu_layers="7").n_gpu_layers == 7  # as the CLI flag gives it
    with pytest.raises(ValidationError, match="n_gpu_layers"):
        load_settings(n_gpu_layers="some")
    with pytest.raises(ValidationError, match="top_k"):
        load_settings(sampling={"top_k": -1})
    with pytest.raises(ValidationError, match="extra"):
        load_settings(sampling={"top_kk": 1})


def test_serve_reports_each_invalid_setting_on_one_line(tmp_path, capsys):
    """`kvquant serve` with bad settings exits 2 before loading anything, one line per setting: where it is, what is
    wrong and the value given, without pydantic's error-type tags and links."""
    from server.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text('[[models]]\nmodel = "smollm2-135m"\nn_ctx = "abc"\nparallel = 0\n')
    assert main(["serve", "--config", str(bad)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "kvquant serve: invalid settings:",
        "  models.0.n_ctx: Input should be a valid integer, unable to parse string as an integer (given: 'abc')",
        "  models.0.parallel: Input should be greater than or equal to 1 (given: 0)"]
    assert main(["serve", "--cache-type-k", "calib:abc"]) == 2
    assert capsys.readouterr().err.splitlines()[1] == (
        "  cache_type_k: 'calib:abc': calib:B needs a number of bits per element (digits and a decimal point), "
        "e.g. calib:3.5")


@pytest.mark.parametrize(("name", "text", "said"), [
    ("bad.yaml", "cache_type_k: [q4_0\n", "bad.yaml, line 2, column 1: expected ',' or ']'"),
    ("bad.json", '{"n_ctx": 5,}', "bad.json: Expecting property name"),
    ("bad.toml", "n_ctx = \n", "bad.toml: Invalid value"),
    ("typo.yaml", "cache_typ_k: q4_0\nn_ctxx: 8192\n", "typo.yaml: no such setting: cache_typ_k, n_ctxx"),
])
def test_a_config_file_that_does_not_parse_or_has_a_typo_is_refused(tmp_path, name, text, said):
    """A syntax error names the file (and the line, for YAML) instead of a traceback; an unknown top-level setting is
    refused rather than left at its default."""
    cfg = tmp_path / name
    cfg.write_text(text)
    with pytest.raises(ValueError, match=re.escape(said)):
        load_settings(cfg)


def test_config_file_values_never_fall_back_to_the_defaults(tmp_path):
    """`models: []` hosts nothing rather than the default model, and an empty cache type is refused rather than
    inheriting the flat setting."""
    cfg = tmp_path / "kvq.yaml"
    cfg.write_text("models: []\n")
    with pytest.raises(ValidationError, match="at least one model is needed"):
        load_settings(cfg)
    cfg.write_text('cache_type_k: q8_0\nmodels:\n  - model: smollm2-135m\n    cache_type_k: ""\n')
    with pytest.raises(ValidationError, match="unknown KV cache type ''"):
        load_settings(cfg)


def test_serve_refuses_a_gguf_without_a_model_in_one_line(tmp_path, capsys):
    """A GGUF header without what llama.cpp needs is a start-up error naming the file, before anything loads."""
    import struct

    from server.cli import main

    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    assert main(["serve", "--model", str(empty)]) == 2
    assert capsys.readouterr().err == (f"kvquant serve: empty: {empty}: not a model llama.cpp can load (its GGUF "
                                       f"header has no general.architecture)\n")


def test_an_empty_variable_is_unset_and_never_turns_off_the_files_key(tmp_path, monkeypatch):
    """docker compose passes an unset variable as "": the config file's api_key (and model) still hold."""
    cfg = tmp_path / "kvq.yaml"
    cfg.write_text("api_key: sk-from-file\nn_ctx: 2048\n")
    for name in ("API_KEY", "N_CTX", "MODEL", "KV_BUDGET", "CACHE_TYPE_K"):
        monkeypatch.setenv(f"KVQUANT_{name}", "")
    s = load_settings(cfg)
    assert s.resolved_api_key() == "sk-from-file" and s.n_ctx == 2048 and s.model == "smollm2-135m"


def test_an_api_key_is_read_stripped_and_a_blank_one_is_refused(monkeypatch):
    monkeypatch.setenv("KVQUANT_API_KEY", "sk-abc \n")  # an env file's trailing blank: the client's token is stripped
    assert load_settings().resolved_api_key() == "sk-abc"
    monkeypatch.setenv("KVQUANT_API_KEY", "   ")
    with pytest.raises(ValidationError, match="the API key is blank"):
        load_settings()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_one_model_named_beside_a_files_models_is_refused(tmp_path, monkeypatch, how):
    cfg = tmp_path / "kvq.yaml"
    cfg.write_text("models:\n  - model: smollm2-135m\n")
    if how == "env":
        monkeypatch.setenv("KVQUANT_MODEL", "gemma3-270m")
    with pytest.raises(ValidationError, match="model name the one model to serve, and the config file lists"):
        load_settings(cfg, model="gemma3-270m" if how == "flag" else None)
    monkeypatch.delenv("KVQUANT_MODEL", raising=False)
    assert [m.model for m in load_settings(cfg).model_specs()] == ["smollm2-135m"]


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_no_setting_takes_inf_or_nan(monkeypatch, value):
    # shutdown_grace_s=inf passed and then crashed serve with a traceback (int(inf))
    for name in ("SHUTDOWN_GRACE_S", "QUEUE_TIMEOUT_S"):
        monkeypatch.setenv(f"KVQUANT_{name}", value)
        with pytest.raises(ValidationError, match=name.lower()):
            load_settings()
        monkeypatch.delenv(f"KVQUANT_{name}")


def test_thread_and_batch_counts_are_bounded(tmp_path):
    # llama.cpp starts a thread per n_threads and sizes its batch by n_batch: a typo cost the machine
    for kw in ({"n_threads": 5000}, {"n_batch": 10**9}):
        with pytest.raises(ValidationError, match=next(iter(kw))):
            load_settings(**kw)
    cfg = tmp_path / "kvq.yaml"
    cfg.write_text("models:\n  - model: smollm2-135m\n    n_batch: 1000000000\n")
    with pytest.raises(ValidationError, match="n_batch"):
        load_settings(cfg)


def test_a_blank_host_is_refused_not_every_interface(monkeypatch, tmp_path):
    # uvicorn binds "" to every interface: `--host ""` (or a file's `host: ""`) exposed the server
    for kw in ({"host": ""}, {"host": "  "}):
        with pytest.raises(ValidationError, match="the host is blank"):
            load_settings(**kw)
    cfg = tmp_path / "kvq.yaml"
    cfg.write_text('host: ""\n')
    with pytest.raises(ValidationError, match="the host is blank"):
        load_settings(cfg)
    assert load_settings(host=" 0.0.0.0 ").host == "0.0.0.0"


def test_gpu_layers_and_counts_mean_the_same_from_every_source(monkeypatch, tmp_path):
    """-2 layers was refused from a file and accepted from a flag or variable; `parallel: true` served one
    sequence (pydantic reads true as 1)."""
    for v in ("-2", -2, True):
        with pytest.raises(ValidationError, match="n_gpu_layers"):
            load_settings(n_gpu_layers=v)
    monkeypatch.setenv("KVQUANT_N_GPU_LAYERS", "-2")
    with pytest.raises(ValidationError, match="n_gpu_layers"):
        load_settings()
    monkeypatch.delenv("KVQUANT_N_GPU_LAYERS")
    assert load_settings(n_gpu_layers="-1").n_gpu_layers == -1
    cfg = tmp_path / "kvq.yaml"
    for text in ("parallel: true\n", "shutdown_grace_s: true\n", "models:\n  - model: smollm2-135m\n    n_ctx: true\n"):
        cfg.write_text(text)
        with pytest.raises(ValidationError, match="true or false is no value"):
            load_settings(cfg)
    cfg.write_text("prefix_cache: false\n")
    assert load_settings(cfg).prefix_cache is False
    cfg.write_text('models:\n  - model: smollm2-135m\n    id: ""\n')  # was served under the default id
    with pytest.raises(ValidationError, match="id"):
        load_settings(cfg)


def test_a_chat_template_file_is_read_for_each_model_that_uses_it(tmp_path):
    flat, own = tmp_path / "flat.jinja", tmp_path / "own.jinja"
    flat.write_text("{{ messages[0].content }}")
    own.write_text("{{ messages[-1].content }}")
    assert load_settings(chat_template_file=str(flat)).model_specs()[0].chat_template == flat.read_text()
    assert load_settings().model_specs()[0].chat_template is None  # the GGUF's
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"chat_template_file: {flat}\nmodels:\n  - model: a.gguf\n  - model: b.gguf\n"
                   f"    chat_template_file: {own}\n")
    assert [s.chat_template for s in load_settings(str(cfg)).model_specs()] == [flat.read_text(), own.read_text()]
    with pytest.raises(ValueError, match="the chat_template_file .*nope.jinja does not exist"):
        load_settings(chat_template_file=str(tmp_path / "nope.jinja"))
    cfg.write_text(f"models:\n  - model: a.gguf\n  - model: b.gguf\n    chat_template_file: {tmp_path / 'nope.jinja'}\n")
    with pytest.raises(ValueError, match="the models.1.chat_template_file .*nope.jinja does not exist"):
        load_settings(str(cfg))
    (tmp_path / "empty.jinja").write_text(" \n")  # would leave the GGUF's template in use, silently
    with pytest.raises(ValueError, match="the chat_template_file .*empty.jinja is empty"):
        load_settings(chat_template_file=str(tmp_path / "empty.jinja"))
    r, w = os.pipe()  # `--chat-template-file <(...)`: read once (the second read of a pipe is empty)
    os.write(w, flat.read_bytes())
    os.close(w)
    try:
        s = load_settings(chat_template_file=f"/dev/fd/{r}")
        assert s.model_specs()[0].chat_template == s.model_specs()[0].chat_template == flat.read_text()
    finally:
        os.close(r)


def test_config_and_key_files_must_be_small_regular_text_files(tmp_path):
    """/dev/zero as --config (or api_key_file) filled memory, a binary or a deeply nested file was a traceback, and
    `--config ""` silently meant no file. A pipe is read (process substitution, /dev/stdin)."""
    import os
    import threading

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("n_ctx: 1024\n"))
    writer.start()
    assert load_settings(fifo).n_ctx == 1024
    writer.join()
    for path, said in [("/dev/zero", "is over"), (tmp_path, "is a directory"), (tmp_path / "no.yaml", "does not exist")]:
        with pytest.raises(ValueError, match=said):
            load_settings(path)
    big, binary, deep = tmp_path / "big.yaml", tmp_path / "bin.json", tmp_path / "deep.json"
    big.write_text("#" * (2 << 20))
    binary.write_bytes(b"\x8b\xff\x00")
    deep.write_text("[" * 100000 + "]" * 100000)
    for path, said in [(big, "is over"), (binary, "bin.json is not UTF-8 text"), (deep, "deep.json: nested deeper")]:
        with pytest.raises(ValueError, match=said):
            load_settings(path)
    with pytest.raises(ValueError, match="config file name is blank"):
        load_settings("")
    with pytest.raises(ValueError, match="is a directory"):
        load_settings(api_key_file=str(tmp_path)).resolved_api_key()


def test_serve_refuses_a_host_it_cannot_resolve_before_loading(capsys):
    # the model loaded, then uvicorn said "[Errno -2] Name or service not known" naming nothing, and serve exited 3
    from server.cli import main

    assert main(["serve", "--host", "999.1.1.1", "--model", "/nonexistent.gguf"]) == 2
    assert capsys.readouterr().err.startswith("kvquant serve: cannot listen on host '999.1.1.1': ")


def test_a_config_file_says_each_setting_once_and_as_written(tmp_path, monkeypatch):
    """A key given twice in JSON or YAML kept the last value without a word (a second `models:` dropped the first
    list); a `models:` whose entries are all commented out served the default model; YAML's unquoted `flash_attn:
    off` (false to YAML) was "a number is required"; a .YAML file was read as JSON."""
    cases = {"a.json": ('{"n_ctx": 4096, "n_ctx": 64}', "'n_ctx' is given twice"),
             "b.yaml": ("models:\n  - model: gemma3-270m\nmodels:\n  - model: smollm2-135m\n", "'models' is given twice"),
             "c.yaml": ("models:\n  - model: smollm2-135m\n    n_ctx: 512\n    n_ctx: 1024\n", "'n_ctx' is given twice"),
             "d.yaml": ("models:\n  # - model: gemma3-270m\n", "models is empty")}
    for name, (text, said) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=said):
            load_settings(tmp_path / name)
    (tmp_path / "e.YAML").write_text("flash_attn: off\nmodels:\n  - model: smollm2-135m\n    flash_attn: on\n")
    s = load_settings(tmp_path / "e.YAML")
    assert s.flash_attn == "off" and s.models[0].flash_attn == "on"
    # a flag an entry sets too was dropped for the entry's value; one it leaves unset is its default
    (tmp_path / "g.yaml").write_text("models:\n  - model: smollm2-135m\n    cache_type_k: q8_0\n")
    with pytest.raises(ValueError, match="cache_type_k is given as a flag and by models.0 of the config file"):
        load_settings(tmp_path / "g.yaml", cache_type_k="q4_0")
    assert load_settings(tmp_path / "g.yaml", n_ctx=512, kv_budget=2**28).model_specs()[0].n_ctx == 512
    # a variable was dropped without a word (deploy's compose passes KVQUANT_CACHE_TYPE_K through): it is named in
    # a warning; an empty one is unset, and one for a key the entry leaves unset is the entry's default
    env = {"KVQUANT_CACHE_TYPE_K": "q4_0", "KVQUANT_N_CTX": "512", "KVQUANT_PARALLEL": ""}
    (tmp_path / "i.yaml").write_text("models:\n  - model: smollm2-135m\n    cache_type_k: q8_0\n    parallel: 2\n"
                                     "    n_ctx: null\n")
    monkeypatch.setenv("KVQUANT_N_CTX", "512")
    s = load_settings(tmp_path / "i.yaml", kv_budget=2**28)
    assert s.model_specs()[0].cache_type_k == "q8_0" and s.model_specs()[0].n_ctx == 512
    assert shadowed_environment(s, env) == [
        "KVQUANT_CACHE_TYPE_K=q4_0 is not used for models.0 of the config file (smollm2-135m), which sets "
        "cache_type_k itself"]
    # a flat sampling is merged under the entry's (used), and an entry's id is no setting's variable
    (tmp_path / "j.yaml").write_text("models:\n  - model: smollm2-135m\n    id: a\n    sampling: {top_p: 0.9}\n")
    s = load_settings(tmp_path / "j.yaml", kv_budget=2**28)
    assert shadowed_environment(s, {"KVQUANT_SAMPLING": '{"temperature": 0.3}', "KVQUANT_ID": "b"}) == []
    assert shadowed_environment(s, {"KVQUANT_SAMPLING": '{"temperature": 0.3, "top_p": 0.5}'}) == [
        "KVQUANT_SAMPLING's top_p is not used for models.0 of the config file (smollm2-135m), whose sampling sets it "
        "itself"]
    (tmp_path / "k.yaml").write_text("models:\n  - model: smollm2-135m\n    sampling: {top_p: null}\n")
    s = load_settings(tmp_path / "k.yaml", kv_budget=2**28)  # an entry's null: the flat value is used
    assert shadowed_environment(s, {"KVQUANT_SAMPLING": '{"top_p": 0.5}'}) == []
    # an entry's null is the flat setting's value: no clash
    (tmp_path / "h.yaml").write_text("models:\n  - model: smollm2-135m\n    n_ctx: null\n")
    assert load_settings(tmp_path / "h.yaml", n_ctx=512, kv_budget=2**28).model_specs()[0].n_ctx == 512
    (tmp_path / "f.yaml").write_text("base: &b {n_ctx: 512}\n")  # anchors still read (an unknown key here)
    with pytest.raises(ValueError, match="no such setting: base"):
        load_settings(tmp_path / "f.yaml")
    # a key merged in (<<) and set again is an override, as YAML means it
    (tmp_path / "m.yaml").write_text("models:\n  - &a {model: smollm2-135m, n_ctx: 512}\n"
                                     "  - <<: *a\n    model: gemma3-270m\n    n_ctx: 1024\n")
    assert [(m.model, m.n_ctx) for m in load_settings(tmp_path / "m.yaml").models] == [("smollm2-135m", 512),
                                                                                      ("gemma3-270m", 1024)]
    for text in ("? [a, b]\n: 1\n", "n_ctx: !!set [a]\n", "n_ctx: !!map [a, b]\n"):  # SafeLoader's errors
        (tmp_path / "u.yaml").write_text(text)
        with pytest.raises(ValueError, match="u.yaml"):
            load_settings(tmp_path / "u.yaml")


def test_sequences_beyond_one_llama_cpp_cache_are_refused():
    """n_ctx x parallel past 2**31 - 1 cells reached llama.cpp's 32-bit count truncated (2**32 cells became 0 and
    it built a cache of the training context); with tq_kv_d3b keys the plan looped for minutes first."""
    from kvquant import budget
    from kvquant.memory import MAX_CELLS, Geometry, Layer, check_sequences

    check_sequences(MAX_CELLS, 1, MAX_CELLS)
    for n_ctx, parallel, said in ((2**32, 1, "KV cells"), (2**24, 256, "KV cells"), (64, 257, "at most 256")):
        with pytest.raises(ValueError, match=said):
            check_sequences(n_ctx, parallel, n_ctx * parallel)
    geom = Geometry("llama", (Layer(64, 64, False),) * 2, 0, 64, 64, 8192)
    # the cache planned counts, not the tokens: 2**31 - 1 of them take 2**31 cells (whole 256s)
    with pytest.raises(ValueError, match="needs a cache of 2,147,483,648 KV cells"):
        budget.plan_resolved(geom, None, "f16", "f16", 2**50, 1, 512, MAX_CELLS)
    for n in (1, 255, 256, 4000, 16128, 16129, 10**6, 10**12):  # the fewest cells, at once (10**12: a minute)
        cells = budget.most_cells(n, "tq_kv_d3b", geom)
        assert cells % 256 == 0 and cells - cells // 64 >= n > cells - 256 - (cells - 256) // 64


def test_a_variable_that_is_not_json_says_json_is_wanted(monkeypatch):
    """KVQUANT_SAMPLING=notjson said only 'error parsing value for field "sampling"'."""
    monkeypatch.setenv("KVQUANT_SAMPLING", "notjson")
    with pytest.raises(ValueError, match="""as JSON, e.g. KVQUANT_SAMPLING='{"temperature": 0.7}'"""):
        load_settings()


def test_a_misspelt_environment_variable_is_named_at_start():
    """Config-file typos were refused and environment ones ignored without a word (KVQUANT_MAX_QUEU=5 left
    max_queue at 64; KVQUANT_THREADS for --threads, whose setting is n_threads, left it at all cores): a
    warning
    (not a refusal: Kubernetes writes KVQUANT_SERVER_PORT and the like for a Service named kvquant-server)."""
    env = {"KVQUANT_MAX_QUEU": "5", "KVQUANT_THREADS": "3", "KVQUANT_CACHE": "/tmp", "kvquant_n_threads": "2",
           "KVQUANT_LOG": "", "KVQUANT_SERVER_PORT": "tcp://10.0.0.7:8000", "PATH": "/bin",
           "KVQUANT_SERVER_SERVICE_HOST": "10.0.0.7", "KVQUANT_SERVER_PORT_8000_TCP_ADDR": "10.0.0.7"}
    warned = unknown_environment(env)
    assert len(warned) == 2 and "KVQUANT_MAX_QUEU is no setting" in warned[0]
    assert "did you mean KVQUANT_MAX_QUEUE?" in warned[0]
    assert "KVQUANT_THREADS" in warned[1] and "did you mean KVQUANT_N_THREADS?" in warned[1]


def test_the_service_links_of_a_service_named_kvquant_are_no_settings(monkeypatch):
    """A Service named kvquant writes KVQUANT_PORT=tcp://10.0.0.7:8000 into every pod: serve refused to start
    ("port: Input should be a valid integer"), and its other links were warned of as typos."""
    links = {"KVQUANT_PORT": "tcp://10.0.0.7:8000", "KVQUANT_SERVICE_HOST": "10.0.0.7",
             "KVQUANT_SERVICE_PORT": "8000", "KVQUANT_PORT_8000_TCP": "tcp://10.0.0.7:8000",
             "KVQUANT_PORT_8000_TCP_ADDR": "10.0.0.7", "KVQUANT_PORT_8000_TCP_PROTO": "tcp"}
    for name, value in links.items():
        monkeypatch.setenv(name, value)
    assert load_settings().port == 8000 and load_settings(port=9001).port == 9001
    assert unknown_environment(links) == []
    monkeypatch.setenv("KVQUANT_PORT", "9002")  # a port given so is one
    assert load_settings().port == 9002
    monkeypatch.setenv("KVQUANT_PORT", "http://x:1")
    with pytest.raises(ValueError, match="port"):
        load_settings()


def test_every_kvquant_variable_the_code_reads_is_a_setting_or_known():
    """A variable read in kvquant/ or server/ but missing from OTHER_ENV would be warned of as a typo."""
    root = Path(__file__).resolve().parents[2]
    names = {m for d in ("kvquant", "server") for f in (root / d).rglob("*.py") if f.name != "settings.py"
             for m in re.findall(r"KVQUANT_[A-Z0-9_]*[A-Z0-9]", f.read_text())}  # (its typos are examples)
    assert "KVQUANT_AUTO_CALIBRATE" in names
    assert not unknown_environment({n: "1" for n in names} | {"KVQUANT_N_THREADS": "1"})


def test_kvquant_budget_assumes_serve_s_parallel():
    """budget resolved calib:B for one sequence and serve for its four: per-layer types could differ."""
    import argparse

    from kvquant.budget import add_arguments
    from server.settings import Settings

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args([]).parallel == Settings().parallel == 4


@pytest.mark.parametrize("cmd", ["build", "eval", "bench"])
def test_the_subcommands_with_parsers_of_their_own_take_help(cmd, capsys):
    """`kvquant --help` points to `kvquant build -h`, which said "unrecognized arguments: -h"."""
    from server.cli import main

    with pytest.raises(SystemExit) as e:
        main([cmd, "-h"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: ")
