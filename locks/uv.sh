#!/usr/bin/env bash
# The one uv that writes (`make locks`), checks (locks/check.sh) and installs (locks/install.sh) the locks, kept in
# a throwaway venv under .cache/. Sourced: sets UV_VERSION and UV, and `ensure_uv` installs that version unless it
# is there (returns non-zero where it cannot). Run (`bash locks/uv.sh`): the same, failing where it cannot.
UV_VERSION=0.13.9
UV=.cache/lock-tools/bin/uv
ensure_uv() {
    if "$UV" --version 2>/dev/null | grep -q " $UV_VERSION"; then
        return 0
    fi
    python3 -m venv .cache/lock-tools && .cache/lock-tools/bin/pip install -q "uv==$UV_VERSION"
}
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    cd "$(dirname "$0")/.."
    ensure_uv
fi
