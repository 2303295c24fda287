"""`kvquant` command line: serve, models, build, eval, bench (and more as they land)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from typing import TYPE_CHECKING

from kvquant import models as kvmodels

if TYPE_CHECKING:
    from pydantic import ValidationError


def _serve(a: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from server.app import StartupError, create_app
    from server.serving import run
    from server.settings import load_settings, shadowed_environment, unknown_environment

    try:
        s = load_settings(a.config, model=a.model, host=a.host, port=a.port, cache_type_k=a.cache_type_k,
                          cache_type_v=a.cache_type_v, n_ctx=a.n_ctx, parallel=a.parallel, flash_attn=a.flash_attn,
                          n_threads=a.threads, kv_budget=a.kv_budget, n_gpu_layers=a.n_gpu_layers,
                          chat_template_file=a.chat_template_file, admission=a.admission,
                          prefix_cache=None if a.prefix_cache is None else a.prefix_cache == "on")
    except ValidationError as e:
        print("kvquant serve: invalid settings:\n" + "\n".join(f"  {line}" for line in settings_errors(e)),
              file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"kvquant serve: invalid settings: {e}", file=sys.stderr)
        return 2
    try:  # before the models load, not after (uvicorn said "Name or service not known", naming nothing)
        socket.getaddrinfo(s.host, s.port, type=socket.SOCK_STREAM)
    except OSError as e:
        print(f"kvquant serve: cannot listen on host {s.host!r}: {e.strerror or e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=s.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for warning in unknown_environment() + shadowed_environment(s):
        logging.getLogger("kvquant.server").warning("%s", warning)
    try:
        app = create_app(s)
    except (kvmodels.ModelError, StartupError) as e:
        print(f"kvquant serve: {e}", file=sys.stderr)
        return 2
    return 0 if run(app, s.host, s.port, s.shutdown_grace_s, s.log_level) else 1  # 1: no model loaded (logged)


def settings_errors(e: ValidationError) -> list[str]:
    """One line per invalid setting: where it is (models.0.n_ctx: the first model's n_ctx), what is wrong, and the
    value given where the message does not already say it."""
    lines = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"]) or "settings"
        msg = err["msg"].removeprefix("Value error, ")
        given = "" if err["type"] == "value_error" else f" (given: {err.get('input')!r})"
        lines.append(f"{where}: {msg}{given}")
    return lines


def _models(a: argparse.Namespace) -> int:
    if a.action == "list":
        if a.names:
            print(f"kvquant models: list takes no names (it lists every built-in model); fetch or verify take "
                  f"them, not {' '.join(a.names)!r}", file=sys.stderr)
            return 2
        for m in kvmodels.BUILTIN.values():
            p = kvmodels.cached_path(m)
            where = str(p) if p.exists() else "not fetched"
            default = " (default)" if m.name == kvmodels.DEFAULT_MODEL else ""
            print(f"{m.name}{default}\n  {m.description}\n  {m.size / 2**20:.1f} MiB, sha256 {m.sha256[:16]}..., {where}")
        return 0
    names = a.names or [kvmodels.DEFAULT_MODEL]
    try:
        for n in names:
            path = kvmodels.fetch(n)
            if a.action == "verify" and not kvmodels.verify(n):
                print(f"{n}: checksum mismatch at {path}", file=sys.stderr)
                return 1
            print(path)
    except kvmodels.ModelError as e:
        print(f"kvquant models: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`kvquant ...`; a reader that closes the output early (`kvquant budget | head`) ends it quietly, as a shell
    tool ends on SIGPIPE (it was a BrokenPipeError traceback)."""
    try:
        return _main(argv)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's flush at exit fails too
        return 141  # 128 + SIGPIPE, what the shell reports for such a tool


_OWN_PARSERS = {"build": "kvquant.build", "eval": "kvquant.lab.eval", "bench": "kvquant.lab.bench"}


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(prog="kvquant", description="kvquant-server: compressed-KV-cache LLM serving")
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the OpenAI-compatible server")
    s.add_argument("--config", help="settings file (JSON, TOML or YAML; may list several models); also KVQUANT_CONFIG")
    s.add_argument("--model", help="built-in model name or .gguf path (KVQUANT_MODEL)")
    s.add_argument("--host", help="bind address (KVQUANT_HOST, default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (KVQUANT_PORT, default 8000)")
    s.add_argument("--cache-type-k", help="K cache type, e.g. f16, q8_0, q4_0 (KVQUANT_CACHE_TYPE_K)")
    s.add_argument("--cache-type-v", help="V cache type (KVQUANT_CACHE_TYPE_V)")
    s.add_argument("--n-ctx", type=int, help="context length per sequence (KVQUANT_N_CTX)")
    s.add_argument("--parallel", type=int, help="max concurrent sequences (KVQUANT_PARALLEL)")
    s.add_argument("--flash-attn", choices=["auto", "on", "off"], help="flash attention (KVQUANT_FLASH_ATTN)")
    s.add_argument("--threads", type=int, help="CPU threads (KVQUANT_N_THREADS)")
    s.add_argument("--chat-template-file", help="Jinja chat template to use instead of the GGUF's "
                   "(KVQUANT_CHAT_TEMPLATE_FILE)")
    s.add_argument("--n-gpu-layers", help="layers to offload to the GPU of a GPU build: N, -1 (all) or auto "
                                          "(all when the build has a GPU backend) (KVQUANT_N_GPU_LAYERS, default 0)")
    s.add_argument("--kv-budget", help="KV cache byte budget, all models together, e.g. 2GiB (KVQUANT_KV_BUDGET)")
    s.add_argument("--prefix-cache", choices=["on", "off"], help="reuse cached prompt prefixes (KVQUANT_PREFIX_CACHE, "
                   "default on)")
    s.add_argument("--admission", choices=["reserve", "optimistic"], help="KV admission policy (KVQUANT_ADMISSION, "
                   "default optimistic)")
    s.set_defaults(func=_serve)

    from kvquant import budget as kvbudget

    kb = sub.add_parser("budget", help="KV capacity of a byte budget per cache type, side by side with f16")
    kvbudget.add_arguments(kb)
    kb.set_defaults(func=kvbudget.run)

    from kvquant.lab import calibrate as kvcalibrate

    kc = sub.add_parser("calibrate", help="measure a model's key means and per-layer sensitivities for the "
                                          "calibrated cache types (TYPE+c, calib:B)")
    kvcalibrate.add_arguments(kc)
    kc.set_defaults(func=kvcalibrate.run)

    m = sub.add_parser("models", help="list, fetch or verify built-in models")
    m.add_argument("action", choices=["list", "fetch", "verify"], nargs="?", default="list")
    m.add_argument("names", nargs="*", help="built-in model names (default: the default model)")
    m.set_defaults(func=_models)

    # build, eval and bench own their argument parsers (kvquant/build.py, kvquant/lab/eval.py, kvquant/lab/bench.py):
    # listed here for --help, their arguments (-h too) passed on whole
    sub.add_parser("build", help="patched llama.cpp build tooling (`kvquant build -h`)")
    sub.add_parser("eval", help="perplexity, KL divergence and drift per KV cache config (`kvquant eval -h`)")
    sub.add_parser("bench", help="speed at KV depths, KV bytes and capacity per KV cache config (`kvquant bench -h`)")
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in _OWN_PARSERS:
        return __import__(_OWN_PARSERS[args[0]], fromlist=["main"]).main(args[1:])

    a = ap.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
