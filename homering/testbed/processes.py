"""Starting a process inside a device (its cgroups, then its network namespace) and stopping processes.

A process joins a device with ``setns`` in the child, not with ``ip netns exec``: that remounts ``/sys``
and so hides ``/sys/fs/cgroup``, where the agent's profiler reads its memory limit.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from homering.errors import HomeringError

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def spawn_in(
    argv: list[str], *, netns: Path, cgroups: list[Path], env: dict[str, str], stdin, stdout, stderr, cwd
) -> subprocess.Popen:
    """Run ``argv`` in the cgroups (their directories) and then the network namespace (its file under
    ``/run/netns``). The child starts a new session, so a Ctrl-C at the terminal reaches only its parent.

    Raises:
        HomeringError: the namespace is gone.
        OSError: the child could not join them (raised by :class:`subprocess.Popen`).
    """
    procs = [cg / "cgroup.procs" for cg in cgroups]
    if not netns.exists():
        raise HomeringError(f"network namespace {netns} is gone")
    libc = _libc
    if libc is None:
        raise HomeringError("testbed needs root on Linux")

    def enter() -> None:  # runs in the child between fork and exec: no logging, no locks
        pid = str(os.getpid()).encode()
        for f in procs:
            fd = os.open(f, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)
        fd = os.open(netns, os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"setns: {os.strerror(e)}")
        finally:
            os.close(fd)

    return subprocess.Popen(
        argv, env=env, stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd, preexec_fn=enter, start_new_session=True
    )


def _alive(pid: int, children: dict[int, subprocess.Popen]) -> bool:
    if pid in children:
        return children[pid].poll() is None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def comm(pid: int) -> str:
    """A process's command name (``/proc/PID/comm``), ``"?"`` when it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(pids: set[int], children: dict[int, subprocess.Popen], timeout: float, poll: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        time.sleep(poll)
        pids = {p for p in pids if _alive(p, children)}
    return pids


def terminate(
    find_pids: Callable[[], set[int]], grace: float = 5.0, children: dict[int, subprocess.Popen] | None = None
) -> list[str]:
    """SIGTERM what ``find_pids()`` returns, SIGKILL what is left after ``grace`` s; repeat for late forks.

    ``children``: processes this process started, by pid (polled and reaped rather than read in /proc).
    Returns ``"process PID (comm)"`` for each process it signalled.
    """
    children = children or {}
    me = {os.getpid(), os.getppid()}
    done: list[str] = []
    signalled: set[int] = set()
    for _ in range(5):
        pids = {p for p in find_pids() if p not in me and _alive(p, children)}
        if not pids:
            break
        done += [f"process {p} ({comm(p)})" for p in sorted(pids - signalled)]
        signalled |= pids
        _signal_all(pids, signal.SIGTERM)
        pids = _wait_gone(pids, children, grace, 0.05)
        _signal_all(pids, signal.SIGKILL)
        _wait_gone(pids, children, 5.0, 0.02)
    for pid in signalled & children.keys():  # reap our own children
        try:
            children[pid].wait(1.0)
        except subprocess.TimeoutExpired:
            pass
    return done
