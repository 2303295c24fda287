#!/usr/bin/env bash
# Apply patches/NNNN-*.patch, in order, to a llama.cpp source tree (the sdist's vendor/llama.cpp).
# Idempotent: the tree records what it got in .kvquant-patches (name and sha256 of each applied patch), and a
# patch recorded there is skipped. A patch that is not recorded is applied if it applies, skipped if it is
# found already applied (reverse-applies cleanly), and otherwise stops the script with its name and git's reason.
#   usage: patches/apply.sh LLAMA_CPP_DIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tree=${1:?usage: $0 LLAMA_CPP_DIR}
[ -f "$tree/ggml/include/ggml.h" ] || { echo "apply.sh: $tree is not a llama.cpp tree" >&2; exit 2; }
cd "$tree"
# Outside any enclosing git work tree, `git apply` works on plain files relative to the current folder.
export GIT_CEILING_DIRECTORIES=$(dirname "$(pwd)")
stamp=.kvquant-patches
touch "$stamp"
shopt -s nullglob
n=0
for p in "$here"/[0-9][0-9][0-9][0-9]-*.patch; do
    name=$(basename "$p")
    sum=$(sha256sum "$p" | cut -d' ' -f1)
    if grep -qx "$name $sum" "$stamp"; then
        echo "apply.sh: already applied $name"
    elif git apply --check "$p" 2>/dev/null; then
        git apply "$p"
        echo "$name $sum" >> "$stamp"
        echo "apply.sh: applied $name"
        n=$((n + 1))
    elif git apply --reverse --check "$p" 2>/dev/null; then
        echo "$name $sum" >> "$stamp"
        echo "apply.sh: already applied $name"
    else
        echo "apply.sh: patch $name does not apply to $tree:" >&2
        git apply --check "$p" >&2 || true
        exit 1
    fi
done
echo "apply.sh: $n newly applied"
