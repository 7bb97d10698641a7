"""An emulated home cluster on one Linux machine: :class:`Testbed` composes the parts that own its state.

- :mod:`.netns`: the network namespaces, the bridge, the veth pairs and their tc shaping (layout there);
- :mod:`.delay` (and :mod:`.delayer`): link delay and jitter through NFQUEUE where the kernel has no netem;
- :mod:`.limits` (on :mod:`.cgroups`): every device's cgroups with its RAM, CPU quota and disk read limits;
- :mod:`.processes`: starting a process in a device (cgroups first, then ``setns``), stopping processes;
- :mod:`.broker`: the MQTT broker in the bridge namespace;
- :mod:`.cleanup`: taking it all down again, also what a crashed testbed left (:func:`down_all`);
- :mod:`.device`: what each device got (address, namespace, cgroups, home), once up.

The testbed records what it created in ``<workdir>/state.json``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from homering.errors import HomeringError
from homering.testbed import limits
from homering.testbed.broker import BROKER_PORT, start_broker, stop_broker
from homering.testbed.cleanup import down_all, leftovers, refuse_leftovers, remove
from homering.testbed.device import Device
from homering.testbed.limits import Cgroups
from homering.testbed.netns import (
    NETNS_DIR,
    Network,
    choose_subnet,
    netns_pids,
    require_root,
)
from homering.testbed.processes import spawn_in
from homering.testbed.spec import TestbedSpec

T = TypeVar("T")
log = logging.getLogger("homering.testbed")

__all__ = ["Testbed", "default_workdir", "down_all", "require_root"]


def _per_device(fn: Callable[[str, list[Path]], T]) -> Callable[[Testbed, str], T]:
    """A :class:`Testbed` method ``(device) -> fn(device, the device's cgroups)``, documented as ``fn``."""

    def method(self: Testbed, device: str) -> T:
        return fn(device, self._device(device).cgroups)

    method.__doc__, method.__name__ = fn.__doc__, fn.__name__
    return method


def default_workdir(spec) -> Path:
    """Where a testbed keeps its files by default: ``<HOMERING_HOME>/testbeds/<name>``."""
    from homering import paths

    return paths.home() / "testbeds" / spec.name


def _fresh_logs(workdir: Path) -> None:
    """Make ``<workdir>/logs`` (and the workdir), without a previous run's ``*.log`` files."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    for old in (workdir / "logs").glob("*.log"):
        old.unlink()


def _child_env(env: dict[str, str] | None, home: Path | None, profile_lock: Path) -> dict[str, str]:
    """A child's environment: ``env`` (None: this process's), with ``HOMERING_HOME`` set to the device's
    ``home`` unless ``env`` sets it (``home`` None: the bridge namespace, left as is), and the testbed's
    profiling lock (devices on one host profile one at a time: :func:`homering.agent.profiling.profile_lock`)."""
    child_env = dict(os.environ if env is None else env)
    if home is not None and (env is None or "HOMERING_HOME" not in env):
        child_env["HOMERING_HOME"] = str(home)
    child_env.setdefault("HOMERING_PROFILE_LOCK", str(profile_lock))
    return child_env


class Testbed:
    """An emulated home cluster: one network namespace and one set of cgroups per device.

    A context manager: ``with Testbed(spec, workdir=…) as tb:`` brings it up (if not yet) and takes it
    down on exit, errors and Ctrl-C included. ``tb.shaping`` says how links are shaped (see :attr:`shaping`);
    ``tb.warnings`` lists the limits it could not emulate. :meth:`up` refuses (HomeringError) a delay that
    neither netem nor NFQUEUE (:mod:`.delay`) can emulate, unless ``allow_no_delay``.
    """

    __test__ = False  # not a pytest class

    def __init__(self, spec: TestbedSpec, *, workdir: Path, grace: float = 5.0, allow_no_delay: bool = False):
        self.spec = spec
        self.name = spec.name
        self.workdir = Path(workdir).resolve()
        self.grace = grace
        self.warnings: list[str] = []
        self.subnet: ipaddress.IPv4Network | None = None
        self._network = Network(self.name, self._warn, log_dir=self.workdir / "logs", allow_no_delay=allow_no_delay)
        self._cgroups = Cgroups(self.name, self.workdir, self._warn)
        self._devices: dict[str, Device] = {}
        self._children: dict[int, subprocess.Popen] = {}
        self._broker: subprocess.Popen | None = None
        self._broker_port = BROKER_PORT
        self._up = False

    def _warn(self, msg: str) -> None:
        if msg not in self.warnings:
            log.warning(msg)
            self.warnings.append(msg)

    # ------------------------------------------------------------ queries
    @property
    def shaping(self) -> str:
        """How links are shaped: ``"netem"``, ``"nfqueue"`` (the delay by user-space delayers where the kernel
        lacks sch_netem, the rate by tbf), ``"tbf"`` (rate only) or ``"none"``; in words: :func:`.shaping_summary`.
        """
        return self._network.shaping

    @property
    def devices(self) -> list[str]:
        """Device names, in spec order."""
        return [d.name for d in self.spec.devices]

    @property
    def bridge_address(self) -> str:
        """The bridge namespace's address (.1): the broker and the controller live there."""
        return str(self._subnet()[1])

    @property
    def host_address(self) -> str:
        """This host's address on the testbed network (the last one of the subnet)."""
        return str(self._subnet()[-2])

    @property
    def broker_url(self) -> str:
        """``mqtt://<bridge address>:1883``: reachable from the host and every device."""
        return f"mqtt://{self.bridge_address}:{self._broker_port}"

    @property
    def bridge_netns(self) -> str:
        """The bridge namespace's name: ``homering-testbed-NAME``."""
        return self._network.bridge_netns

    def address(self, device: str | None) -> str:
        """A device's address (None: the bridge namespace's)."""
        if device is None:
            return self.bridge_address
        return self._device(device).address

    def netns(self, device: str | None) -> str:
        """The network namespace of a device (None: the bridge's)."""
        return self.bridge_netns if device is None else self._device(device).netns

    def home(self, device: str) -> Path:
        """The device's ``HOMERING_HOME``: ``<workdir>/devices/<name>/home``."""
        return self._device(device).home

    def describe(self, device: str) -> dict:
        """What the device got: address, RAM limit, CPUs, disk throttle and link shaping (and its namespace
        and cgroups)."""
        return self._device(device).describe()

    def _device(self, device: str) -> Device:
        if not self._devices:
            raise HomeringError(f"testbed {self.name!r} is not up")
        try:
            return self._devices[device]
        except KeyError:
            raise HomeringError(f"testbed {self.name!r} has no device {device!r}") from None

    def _subnet(self) -> ipaddress.IPv4Network:
        if self.subnet is None:
            raise HomeringError(f"testbed {self.name!r} is not up")
        return self.subnet

    # a device's cgroup counters (homering.testbed.limits), each with its function's docstring
    memory_usage = _per_device(limits.memory_usage)
    memory_limit = _per_device(limits.memory_limit)
    memory_peak = _per_device(limits.memory_peak)
    disk_read_bytes = _per_device(limits.disk_read_bytes)
    oom_kills = _per_device(limits.oom_kills)

    def pids(self, device: str | None) -> list[int]:
        """Processes in a device (its cgroups and namespace), or in the bridge namespace for None."""
        if device is None:
            return sorted(netns_pids(self.bridge_netns))
        return self._device(device).pids()

    # ------------------------------------------------------------ up
    def __enter__(self) -> Testbed:
        if not self._up:
            self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> Testbed:
        """Create the namespaces, bridge, links, shaping and cgroups; returns self.

        Raises:
            HomeringError: not root on Linux, leftovers of a testbed with this name, no memory
                cgroup controller, or an ``ip``/``tc`` command that failed. Whatever was created
                is removed again.
        """
        require_root()
        if self._up:
            return self
        refuse_leftovers(self.name)
        try:
            self._up = True
            _fresh_logs(self.workdir)
            self.subnet = choose_subnet(self.name, self.spec.subnet)
            self._make_network(self.subnet)
            try:
                self._make_cgroups()
            except OSError as exc:
                raise HomeringError(
                    f"cannot set up the cgroups of testbed {self.name!r}: {exc.strerror or exc} ({exc.filename or ''})"
                ) from None
            self._save()
        except BaseException:
            self.down(quiet=True)
            raise
        log.info(
            "testbed %s is up: %d devices on %s, shaping %s", self.name, len(self._devices), self.subnet, self.shaping
        )
        return self

    def _make_network(self, net: ipaddress.IPv4Network) -> None:
        self._network.add_bridge(self.bridge_address, self.host_address, net.prefixlen)
        for i, spec in enumerate(self.spec.devices):
            home = self.workdir / "devices" / spec.name / "home"
            home.mkdir(parents=True, exist_ok=True)
            dev = self._devices[spec.name] = Device(spec, i, str(net[i + 2]), "", home)
            dev.netns, dev.shaping = self._network.add_device(i, spec, dev.address, net.prefixlen)

    def _make_cgroups(self) -> None:
        self._cgroups.make(list(self.spec.devices))
        for dev in self._devices.values():
            dev.cgroups, dev.disk = self._cgroups.add_device(dev.spec)

    # ------------------------------------------------------------ processes
    def spawn(
        self,
        device: str | None,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        stdout=None,
        stderr=None,
        cwd=None,
        stdin=subprocess.DEVNULL,
    ) -> subprocess.Popen:
        """Run ``argv`` in a device: its cgroups, then its network namespace (None: the bridge
        namespace, no limits). ``HOMERING_HOME`` is the device's home unless ``env`` sets it.

        The child starts a new session (a Ctrl-C at the terminal reaches only this process, which
        takes the testbed down). The process gets a ``device`` attribute (the ``device`` argument).

        Raises:
            HomeringError: the testbed is not up, has no such device, or its namespace is gone.
        """
        if not self._up:
            raise HomeringError(f"testbed {self.name!r} is not up")
        ns_path = NETNS_DIR / self.netns(device)
        cgroups = (self._device(device).cgroups) if device is not None else []
        child_env = _child_env(env, None if device is None else self.home(device), Path(self.workdir) / "profile.lock")
        proc = spawn_in(
            argv, netns=ns_path, cgroups=cgroups, env=child_env, stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd
        )
        proc.device = device  # type: ignore[attr-defined]
        self._children[proc.pid] = proc
        self._save()
        return proc

    def cut(self, device: str, cut: bool = True) -> None:
        """Cut a device off the network (its bridge-side veth down: every packet to or from it is dropped,
        as when a laptop's Wi-Fi sleeps), or reconnect it (``cut=False``). Its processes keep running."""
        self._network.cut(self._device(device).index, cut)

    def log_path(self, name: str) -> Path:
        """``<workdir>/logs/<name>.log``."""
        return self.workdir / "logs" / f"{name}.log"

    def spawn_logged(self, device: str | None, argv: list[str], log_name: str, **kw) -> subprocess.Popen:
        """:meth:`spawn` with stdout and stderr appended to ``<workdir>/logs/<log_name>.log``."""
        with open(self.log_path(log_name), "ab") as f:
            return self.spawn(device, argv, stdout=f, stderr=subprocess.STDOUT, **kw)

    def start_broker(self, port: int = BROKER_PORT, timeout: float = 20.0) -> str:
        """Start mosquitto (or, without it, homering's embedded amqtt broker) in the bridge namespace on
        the bridge address; wait until it accepts connections from the host. Returns :attr:`broker_url`.
        """
        if self._broker is not None and self._broker.poll() is None:
            return self.broker_url
        self._broker_port = port

        def spawn(argv: list[str]) -> subprocess.Popen:
            self._broker = self.spawn_logged(None, argv, "broker")
            return self._broker

        start_broker(
            spawn,
            workdir=self.workdir,
            host=self.bridge_address,
            port=port,
            timeout=timeout,
            log_file=self.log_path("broker"),
        )
        self._save()
        return self.broker_url

    def stop_broker(self, grace: float = 5.0) -> None:
        """Stop the broker :meth:`start_broker` started (its retained messages go with it)."""
        proc, self._broker = self._broker, None
        stop_broker(proc, grace)

    # ------------------------------------------------------------ state and down
    def _save(self) -> None:
        state = {
            "name": self.name,
            "workdir": str(self.workdir),
            "pid": os.getpid(),
            "created": time.time(),
            "subnet": str(self.subnet) if self.subnet else None,
            "bridge_address": self.bridge_address if self.subnet else None,
            "host_address": self.host_address if self.subnet else None,
            "broker_url": self.broker_url if self._broker else None,
            "shaping": self.shaping,
            "delayers": sorted(self._network.delayers),
            "warnings": self.warnings,
            "netns": self._network.netns,
            "links": self._network.links,
            "cgroups": [str(c) for c in self._cgroups.roots],
            "devices": {n: self.describe(n) for n in self._devices},
            "pids": sorted(self._children),
        }
        tmp = self.workdir / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.workdir / "state.json")

    def down(self, *, quiet: bool = False) -> list[str]:
        """Stop every process of the testbed (SIGTERM, SIGKILL after the grace), delete its namespaces,
        links and cgroups and the state file. Idempotent; never raises for what is already gone.
        Returns what it removed. ``quiet``: say it is down at debug level only (after a failed :meth:`up`)."""
        if not self._up:
            return []
        last = frozenset({self._broker.pid} if self._broker is not None else ())
        self._children.update(self._network.delayers)
        removed = remove(
            netns=self._network.netns,
            links=self._network.links,
            cgroups=self._cgroups.roots,
            grace=self.grace,
            children=self._children,
            last=last,
        )
        # a sweep by name, for anything created between a failure and its record
        removed += down_all({self.name}, grace=self.grace, quiet=True) if leftovers(self.name) else []
        (self.workdir / "state.json").unlink(missing_ok=True)
        (self.workdir / "state.json.tmp").unlink(missing_ok=True)
        self._up = False
        self._broker = None
        self._children.clear()
        self._devices.clear()
        self._network.forget()
        self._cgroups.forget()
        log.log(logging.DEBUG if quiet else logging.INFO, "testbed %s is down", self.name)
        return removed
