#!/usr/bin/env bash
# Installs everything packxd needs on a Debian 12 machine, as root:
# Debian packages, a world-readable virtual environment in /opt/packxd/venv
# built from Debian's /usr/bin/python3 (so unprivileged users can run the
# client), and this checkout installed into it.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
VENV=${PACKXD_VENV:-/opt/packxd/venv}

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: must run as root (it installs Debian packages)" >&2
    exit 1
fi

packages=(
    python3 python3-venv python3-dev gcc libcap-dev   # venv; python-prctl builds against libcap
    iproute2 nftables procps util-linux               # ip, nft, ps, unshare for tests
    bubblewrap firejail                               # peers measured by bench/
    xpra python3-pil xvfb xterm python3-gi-cairo x11-apps x11-utils xdotool imagemagick  # display, demo, e2e (xpra takes no client without PIL)
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup.sh: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
    install -d -m 0755 "$(dirname "$VENV")"
    /usr/bin/python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
# Non-editable: the installed copy lives under /opt and is readable by the
# unprivileged users that run the client; the checkout may not be.
"$VENV/bin/pip" install -q --disable-pip-version-check "$here[dev]"
# Builds are isolated, so nothing needs setuptools at run time; its .pth hook
# would cost every start of the client an import.
"$VENV/bin/pip" uninstall -q -y setuptools >/dev/null 2>&1 || true
chmod -R a+rX "$(dirname "$VENV")"
