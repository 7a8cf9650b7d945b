#!/usr/bin/env bash
# Install the Azurite storage emulator (used by tests/azure) into the repo-local, git-ignored .tools/.
#
# Azurite 3.35.0 is the last release that runs on Node 20 (3.36+ need Node >= 21), so it is pinned.
# Override with AZURITE_VERSION=... if the machine has a newer Node.
# Result: .tools/node_modules/.bin/azurite-blob  (the tests look there, or at $AZURITE_BLOB).
set -euo pipefail

AZURITE_VERSION="${AZURITE_VERSION:-3.35.0}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="$ROOT/.tools"
BIN="$PREFIX/node_modules/.bin/azurite-blob"

command -v node >/dev/null 2>&1 || { echo "install-azurite: node is not installed (Node >= 18 needed)" >&2; exit 1; }
command -v npm >/dev/null 2>&1 || { echo "install-azurite: npm is not installed" >&2; exit 1; }

installed="$(node -p "require('$PREFIX/node_modules/azurite/package.json').version" 2>/dev/null || true)"
if [ -x "$BIN" ] && [ "$installed" = "$AZURITE_VERSION" ]; then
    echo "install-azurite: azurite $installed already in $PREFIX"
    exit 0
fi

mkdir -p "$PREFIX"
# --prefix keeps it out of the repo root (its package.json and lock file land in .tools, which is ignored).
npm install --prefix "$PREFIX" --no-audit --no-fund --loglevel=error "azurite@$AZURITE_VERSION"
"$BIN" --version >/dev/null
echo "install-azurite: azurite $("$BIN" --version) installed at $BIN"
