"""One device of an up :class:`~homering.testbed.testbed.Testbed`: where it is and what it got."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from homering.testbed.cgroups import cgroup_pids
from homering.testbed.netns import netns_pids
from homering.testbed.spec import DeviceSpec


@dataclass
class Device:
    """One device of an up testbed: its spec, place (``index`` in the spec), address, network namespace,
    ``HOMERING_HOME``, link shaping, cgroups and disk throttle."""

    spec: DeviceSpec
    index: int
    address: str
    netns: str
    home: Path
    shaping: str = "none"
    cgroups: list[Path] = field(default_factory=list)  # this device's directory in every hierarchy used
    disk: str = "-"

    def describe(self) -> dict:
        """What the device got (see :meth:`Testbed.describe`)."""
        return {
            "name": self.spec.name,
            "address": self.address,
            "ram": self.spec.ram,
            "cpus": self.spec.cpus,
            "disk": self.disk,
            "shaping": self.shaping,
            "netns": self.netns,
            "cgroups": [str(c) for c in self.cgroups],
        }

    def pids(self) -> list[int]:
        """The processes in the device's cgroups and namespace, sorted."""
        pids = netns_pids(self.netns)
        for cg in self.cgroups:
            pids |= cgroup_pids(cg)
        return sorted(pids)
