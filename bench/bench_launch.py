"""packxd end to end: launching /bin/true through the client, against peers.

Issue 4: the client in terminal mode runs ``/bin/true`` in a fresh container
(user, mount, pid, net, uts and ipc namespaces, the whole container tree,
privileges dropped), timed from starting the client to its exit, against

    firejail --noprofile --private --net=none true
    bwrap --unshare-all --die-with-parent --proc /proc --dev /dev --tmpfs /tmp \\
          --ro-bind /usr /usr --symlink usr/bin /bin --symlink usr/lib /lib \\
          --symlink usr/lib64 /lib64 /bin/true

all as fork + exec + wait of the whole command. Targets: <= 1x firejail;
stretch <= 2x bwrap. The client's own start counts, so its import of the
standard library alone is reported too
(`python -m packxd.client --help`).

Issue 5: a guest with ``veth``: the first launch (netns and veth pair
created; torn down before each run) against a warm launch (reused).

The daemon runs with a private config, socket and state directory under
/tmp, and is stopped (and its network torn down) at the end. Network
traffic: none; the veth subnet 10.213.250.0/24 only exists between the
host and the namespace this script creates.

Run (as root): /opt/packxd/venv/bin/python bench/bench_launch.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from _common import Stats, machine, measure, measure_round_robin, ms, print_table, ratio, target

PY = sys.executable
BWRAP = ["bwrap", "--unshare-all", "--die-with-parent", "--proc", "/proc", "--dev", "/dev",
         "--tmpfs", "/tmp", "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin",
         "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "/bin/true"]
FIREJAIL = ["firejail", "--quiet", "--noprofile", "--private", "--net=none", "true"]
GUEST = {"rootfs": "/", "hostname": "bench", "display": "none",
         "environment": {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
         "root_symlinks": {"/bin": "usr/bin", "/lib": "usr/lib", "/lib64": "usr/lib64",
                           "/sbin": "usr/sbin"}}
VETH = {"ifname": "pkbench0", "ipv4": {"address": "10.213.250.2/24",
                                       "gateway": "10.213.250.1"}}


class Daemon:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="packxd-bench-")
        os.chmod(self.dir, 0o755)
        self.config = os.path.join(self.dir, "packxd.json")
        self.socket = os.path.join(self.dir, "packxd.socket")
        with open(self.config, "w") as f:
            json.dump({"guests": {"term": GUEST, "net": {**GUEST, "veth": VETH}}}, f)
        self.log = open(os.path.join(self.dir, "daemon.log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [PY, "-m", "packxd.daemon", "--config", self.config, "--socket", self.socket,
             "--state-dir", os.path.join(self.dir, "state")],
            stdout=self.log, stderr=subprocess.STDOUT, cwd="/")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(self.socket)
                return
            except OSError:
                time.sleep(0.05)
            finally:
                probe.close()
        raise RuntimeError("the daemon did not start")

    def client(self, guest: str, profile: str = "p") -> None:
        out = subprocess.run([PY, "-m", "packxd.client", "--socket", self.socket, guest,
                              "bench", profile, "/bin/true"], capture_output=True, cwd="/")
        if out.returncode != 0:
            raise RuntimeError(f"launch failed: {out.stderr.decode(errors='replace')}")

    def teardown_network(self) -> None:
        subprocess.run([PY, "-m", "packxd.daemon", "--config", self.config,
                        "--teardown-network", "net", "--force"], capture_output=True,
                       check=True, cwd="/")

    def setup_times(self) -> list[float]:
        """The daemon's own "started ... in N ms" figures, in seconds."""
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return [float(line.rsplit(" in ", 1)[1].split()[0]) / 1000
                    for line in f if " started term/" in line]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.teardown_network()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def run_command(argv: list[str]) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description="packxd launch against firejail and bwrap")
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_launch.py: run as root (it starts the packxd daemon)")
    print(f"Machine: {machine()}\n", flush=True)
    daemon = Daemon()
    try:
        # Round robin: the VM's speed drifts by 10-20 % within a minute.
        names = ["packxd client, terminal mode, /bin/true",
                 "client alone: python -m packxd.client --help",
                 " ".join(FIREJAIL), "bwrap --unshare-all ... /bin/true"]
        stats = measure_round_robin({
            names[0]: lambda: daemon.client("term"),
            names[1]: lambda: run_command([PY, "-m", "packxd.client", "--help"]),
            names[2]: lambda: run_command(FIREJAIL),
            names[3]: lambda: run_command(BWRAP),
        }, args.runs, budget_s=45)
        packxd, client_start, firejail, bwrap = (stats[name] for name in names)
        setup = Stats("daemon: request to app started", daemon.setup_times()[-packxd.n:])
        rows: list[list[Any]] = [
            [s.name, s.n, ms(s.median, 1), ms(s.p90, 1), ratio(packxd.median, s.median)]
            for s in (packxd, setup, client_start, firejail, bwrap)]
        print_table(["what", "runs", "median ms", "p90 ms", "packxd / this"], rows,
                    "Launch /bin/true end to end (issue 4)")
        print_table(["target", "figure", "status"], [
            ["<= 1x firejail", ratio(packxd.median, firejail.median),
             target(packxd.median <= firejail.median)],
            ["stretch: <= 2x bwrap", ratio(packxd.median, bwrap.median),
             target(packxd.median <= 2 * bwrap.median)],
        ], "Launch targets")

        def first() -> None:
            daemon.teardown_network()
            daemon.client("net")

        net_runs = max(10, args.runs // 3)
        cold = measure("first launch: netns and veth created", first, net_runs, warmup=1,
                       budget_s=20)
        # A teardown before each run is part of `first` but not of the launch:
        teardown = measure("(teardown alone, subtracted above)", daemon.teardown_network,
                           net_runs, warmup=1, budget_s=10)
        warm = measure("warm launch: netns reused", lambda: daemon.client("net"), net_runs,
                       budget_s=15)
        cold_launch = cold.median - teardown.median
        print_table(["what", "runs", "median ms", "p90 ms"], [
            [cold.name + " (minus teardown)", cold.n, ms(cold_launch, 1), "-"],
            [warm.name, warm.n, ms(warm.median, 1), ms(warm.p90, 1)],
            ["no veth (fresh netns with only lo)", packxd.n, ms(packxd.median, 1),
             ms(packxd.p90, 1)],
        ], "Guest networking (issue 5)")
    finally:
        daemon.stop()


if __name__ == "__main__":
    main()
