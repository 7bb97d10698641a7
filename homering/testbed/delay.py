"""Link delay and jitter without ``sch_netem``: NFQUEUE and a user-space delayer in each device's namespace.

Where the kernel has no ``sch_netem``, iptables (``mangle`` table, in the device's namespace) sends every
packet that arrives on the device's veth (``PREROUTING -i``) through NFQUEUE. A small process
(:mod:`homering.testbed.delayer`, in that namespace but outside the device's cgroups, so it takes none of its
RAM or CPU quota) holds each packet for the spec's delay ± its jitter and then lets it go. The rate stays
with tbf on both ends of the veth.

What ``delay_ms`` means (netem and NFQUEUE alike): the one-way delay of a packet to the device, so that a
round trip between two devices A and B takes ``delay_A + delay_B`` (``2 × delay`` on one Wi-Fi, ± the
jitter), and one between a device and the bridge namespace (the broker, the controller) ``delay``.

Packets are delayed on the way in only: a packet held on the way out would still be charged to its
sender's socket, and TCP's small-queue limit (about 1 ms of data in the host's queues) would then cap a
flow at a few tens of Mbit/s; a veth hands the packet over and frees the sender's charge (as netem orphans
the packets it holds). Inspired by netem's ``delay TIME JITTER`` (uniform jitter, packets kept in order).
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

from homering.errors import HomeringError
from homering.testbed.netns import ip, which
from homering.testbed.processes import spawn_in

QUEUE_IN = 0
"""The NFQUEUE number of a device's incoming packets (queues are per network namespace)."""
DELAYER = Path(__file__).with_name("delayer.py")


def which_iptables() -> str | None:
    """The path of ``iptables`` on $PATH or in /usr/sbin or /sbin, else None."""
    return which("iptables")


def unavailable() -> str | None:
    """Why packets cannot be delayed through NFQUEUE on this machine (None: they can, as far as one can tell
    without trying: the kernel's NFQUEUE target is only known when a rule is added)."""
    if sys.platform != "linux":
        return "NFQUEUE needs Linux"
    if which_iptables() is None:
        return "no iptables (apt install iptables)"
    try:
        import netfilterqueue  # noqa: F401
    except ImportError:
        return "no NetfilterQueue package (pip install 'homering[testbed]'; it builds with libnetfilter-queue-dev)"
    return None


def describe(delay_ms: float | None, jitter_ms: float | None) -> str:
    """``"5±1 ms"``: the spec's delay and jitter, as shown to a user."""
    return f"{delay_ms or 0:g}" + (f"±{jitter_ms:g}" if jitter_ms else "") + " ms"


def _iptables(ns: str, *args: str) -> subprocess.CompletedProcess:
    exe = which_iptables()
    if exe is None:
        raise HomeringError("no iptables (apt install iptables)")
    return ip("netns", "exec", ns, exe, "-w", *args, check=False)


def _wait_ready(proc: subprocess.Popen, timeout: float) -> bool:
    """Whether ``proc`` printed ``ready`` within ``timeout`` s (its stdout is closed after)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 0.1)[0]:
                return proc.stdout.readline().strip() == b"ready"
            if proc.poll() is not None:
                return False
        return False
    finally:
        proc.stdout.close()


def start_delayer(
    ns_path: Path, link: str, delay_ms: float | None, jitter_ms: float | None, log_file: Path, timeout: float = 20.0
) -> subprocess.Popen:
    """Start the delayer of one device's link in its namespace (file ``ns_path``), then send the packets that
    arrive on ``link`` through it: each is held ``delay_ms`` ± ``jitter_ms`` (see the module's docstring).

    Returns the delayer's process (stopped with the testbed's other processes; the rules go with the
    namespace).

    Raises:
        HomeringError: it did not start (its log says why), or iptables refused the rules (no NFQUEUE).
    """
    argv = [sys.executable, "-s", str(DELAYER), "--queues", str(QUEUE_IN)]
    argv += ["--delay-ms", f"{delay_ms or 0:g}", "--jitter-ms", f"{jitter_ms or 0:g}"]
    with open(log_file, "ab") as log:
        proc = spawn_in(
            argv, netns=ns_path, cgroups=[], env=dict(os.environ), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=log, cwd=None,
        )  # fmt: skip
    if not _wait_ready(proc, timeout):
        _stop(proc)
        raise HomeringError(f"the link delayer of {ns_path.name} did not start: see {log_file}")
    ns = ns_path.name
    res = _iptables(ns, "-t", "mangle", "-A", "PREROUTING", "-i", link, "-j", "NFQUEUE", "--queue-num", str(QUEUE_IN))
    if res.returncode != 0:
        _stop(proc)
        raise HomeringError(f"cannot queue the packets of {ns} (NFQUEUE): {(res.stderr or res.stdout).strip()}")
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass
