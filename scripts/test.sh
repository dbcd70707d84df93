#!/usr/bin/env bash
# Sets up the machine (scripts/setup.sh) and runs the whole test suite as root.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
VENV=${PACKXD_VENV:-/opt/packxd/venv}
bash "$here/scripts/setup.sh"
cd "$here"
"$VENV/bin/ruff" check pactors packxd tests bench
"$VENV/bin/mypy"
# PYTHONSAFEPATH: import the installed packages, not the checkout, so the
# tests see exactly what an unprivileged client sees.
set +e
PYTHONSAFEPATH=1 "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit "$rc"
