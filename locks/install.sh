#!/usr/bin/env bash
# Install pinned packages into a virtualenv exactly as given (--no-deps: no resolver), for `make setup`.
# Usage: bash locks/install.sh VENV ARGS...   (ARGS as pip takes them: -r FILE, -e ., name==version)
#
# uv (the version the Makefile writes the locks with) where it can be had: it downloads in parallel and compiles
# the bytecode on every core, where pip does both one file at a time (a fresh machine: about 2 minutes against
# pip's 10). pip where uv cannot be installed, or with SELFTRAIN_INSTALLER=pip. Either way every module is
# compiled at install time: with PYTHONDONTWRITEBYTECODE set (as on CI machines), a module not compiled then is
# compiled again at every import, in every stage's kernel.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$1
shift
source locks/uv.sh                # UV_VERSION, UV, ensure_uv: the uv that writes the locks
installer=${SELFTRAIN_INSTALLER:-uv}
case $installer in
    uv | pip) ;;
    *) echo "SELFTRAIN_INSTALLER=$installer: expected uv or pip" >&2; exit 2 ;;
esac
if [ "$installer" = uv ] && ! ensure_uv; then
    echo "uv $UV_VERSION could not be installed: installing with pip instead (slower)" >&2
    installer=pip
fi
if [ "$installer" = pip ]; then
    exec "$venv/bin/pip" install -q --no-deps "$@"
fi
# uv does not read pip's configuration: pass on what this project relies on. pip's find-links (a folder of wheels,
# where some machines keep torch's CPU build) and PIP_EXTRA_INDEX_URL (README: PyTorch's CPU index elsewhere).
sources=()
for link in $("$venv/bin/pip" config get global.find-links 2>/dev/null || true) ${PIP_FIND_LINKS:-}; do
    if [ -e "$link" ] && [[ " ${sources[*]} " != *" $link "* ]]; then sources+=(--find-links "$link"); fi
done
if [ -n "${PIP_EXTRA_INDEX_URL:-}" ]; then
    for url in $PIP_EXTRA_INDEX_URL; do sources+=(--extra-index-url "$url"); done
    # pip takes each pin from whichever index has it; uv by default only from the first index that lists the name
    # (PyTorch's index lists numpy, jinja2, ... at other versions).
    sources+=(--index-strategy unsafe-best-match)
fi
if ! "$UV" pip install --python "$venv/bin/python" --quiet --no-deps --compile-bytecode "${sources[@]}" "$@"; then
    # e.g. a cache folder uv cannot write, or an index only pip's configuration knows: pip may still get there
    echo "uv could not install $* (above): installing with pip instead (slower)" >&2
    exec "$venv/bin/pip" install -q --no-deps "$@"
fi
