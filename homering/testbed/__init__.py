"""An emulated home cluster on this one Linux machine (root): ``homering testbed up|down|run``.

Each device of a YAML spec gets a network namespace on a bridge (shaped links)
and cgroups (RAM, CPU quota, disk read throttle). See :mod:`.spec` and :mod:`.testbed`.
"""

from homering.testbed.spec import DeviceSpec, TestbedSpec, load_spec, parse_bytes, parse_spec
from homering.testbed.testbed import Testbed, default_workdir, down_all, require_root

__all__ = ["DeviceSpec", "Testbed", "TestbedSpec", "default_workdir", "down_all", "load_spec", "parse_bytes", "parse_spec",
           "require_root"]
