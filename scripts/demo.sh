#!/usr/bin/env bash
# The main job: set everything up, start the packxd daemon with an example
# config whose guest has rootfs "/" (the Firejail-alternative case), and
# launch xterm in a container through the client, as an unprivileged user.
# Inside the xterm a shell prints `hostname; id`. The window shows on
# $DISPLAY; without one, a private Xvfb is used and a screenshot is saved to
# packxd-demo.png. Everything started here is stopped at the end.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
VENV=${PACKXD_VENV:-/opt/packxd/venv}
bash "$here/scripts/setup.sh"

DEMO_USER=packxd-demo
work=$(mktemp -d /tmp/packxd-demo.XXXXXX)
chmod 755 "$work"
pids=()
created_user=
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ -n "$created_user" ]; then userdel "$DEMO_USER" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

if ! id -u "$DEMO_USER" >/dev/null 2>&1; then
    useradd --no-create-home --user-group --shell /bin/sh "$DEMO_USER"
    created_user=1
fi

cat > "$work/packxd.json" <<JSON
{
    "permit_users": ["$DEMO_USER"],
    "guests": {
        "host": {
            "rootfs": "/",
            "hostname": "packxd-demo",
            "resolv.conf": "nameserver 8.8.8.8\n",
            "environment": {
                "LANG": "C.UTF-8",
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "SHELL": "/bin/sh"
            },
            "root_symlinks": {"/bin": "usr/bin", "/lib": "usr/lib", "/lib64": "usr/lib64",
                              "/sbin": "usr/sbin"},
            "display": "xpra"
        }
    }
}
JSON

# The daemon's whole log goes to packxd-demo.log; the terminal gets its own
# lines, not the container's xpra output it logs.
"$VENV/bin/python" -m packxd.daemon --config "$work/packxd.json" \
    --socket "$work/packxd.socket" --state-dir "$work/state" \
    2> >(tee "$here/packxd-demo.log" | grep --line-buffered -v '^packxd: host/xterm/demo: ' >&2) &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/packxd.socket" ] && break; sleep 0.1; done

display=${DISPLAY:-}
private=
if [ -z "$display" ]; then
    display=:77
    Xvfb "$display" -screen 0 1024x768x24 -nolisten tcp >/dev/null 2>&1 &
    pids+=($!)
    private=1
    for _ in $(seq 100); do [ -S "/tmp/.X11-unix/X${display#:}" ] && break; sleep 0.1; done
fi

echo "demo: launching xterm in a container as $DEMO_USER on display $display" >&2
runuser -u "$DEMO_USER" -- env DISPLAY="$display" PATH=/usr/bin:/bin \
    "$VENV/bin/python" -m packxd.client --socket "$work/packxd.socket" \
    host xterm demo /usr/bin/xterm -- -T packxd-demo -geometry 80x20 \
    -e /bin/sh -c 'hostname; id; echo; echo "this shell runs in a packxd container"; exec sh' &
client=$!
pids+=($client)

if [ -n "$private" ]; then
    for _ in $(seq 120); do
        DISPLAY=$display xdotool search --name packxd-demo >/dev/null 2>&1 && break
        sleep 0.5
    done
    sleep 2  # let the shell print
    import -display "$display" -window root "$here/packxd-demo.png"
    echo "demo: no DISPLAY, so it ran on a private Xvfb; screenshot saved to $here/packxd-demo.png" >&2
    kill -TERM "$client"
    wait "$client" || true
else
    echo "demo: close the xterm to finish" >&2
    wait "$client" || true
fi
echo "demo: done; the daemon's log is in $here/packxd-demo.log" >&2
