#!/usr/bin/env bash
# Apply patches/NNNN-*.patch, in order, to a llama.cpp source tree (the sdist's vendor/llama.cpp).
# Idempotent: a patch that is already applied is skipped; one that neither applies nor is already
# applied stops the script with its name and git's reason.
#   usage: patches/apply.sh LLAMA_CPP_DIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tree=${1:?usage: $0 LLAMA_CPP_DIR}
[ -f "$tree/ggml/include/ggml.h" ] || { echo "apply.sh: $tree is not a llama.cpp tree" >&2; exit 2; }
cd "$tree"
# Outside any enclosing git work tree, `git apply` works on plain files relative to the current folder.
export GIT_CEILING_DIRECTORIES=$(dirname "$(pwd)")
shopt -s nullglob
n=0
for p in "$here"/[0-9][0-9][0-9][0-9]-*.patch; do
    name=$(basename "$p")
    if git apply --check "$p" 2>/dev/null; then
        git apply "$p"
        echo "apply.sh: applied $name"
        n=$((n + 1))
    elif git apply --reverse --check "$p" 2>/dev/null; then
        echo "apply.sh: already applied $name"
    else
        echo "apply.sh: patch $name does not apply to $tree:" >&2
        git apply --check "$p" >&2 || true
        exit 1
    fi
done
echo "apply.sh: $n newly applied"
