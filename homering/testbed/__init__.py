"""An emulated home cluster on this one Linux machine (root): ``homering testbed up|down|run``.

Each device of a YAML spec gets a network namespace on a bridge (shaped links)
and cgroups (RAM, CPU quota, disk read throttle). See :mod:`.spec` and :mod:`.testbed`
(which composes :mod:`.netns` with :mod:`.delay`, :mod:`.limits`, :mod:`.processes`, :mod:`.broker`, :mod:`.cleanup` and
:mod:`.device`).
"""

from homering.testbed.cleanup import down_all
from homering.testbed.netns import require_root
from homering.testbed.spec import DeviceSpec, TestbedSpec, load_spec, parse_bytes, parse_spec
from homering.testbed.testbed import Testbed, default_workdir

__all__ = [
    "DeviceSpec",
    "Testbed",
    "TestbedSpec",
    "default_workdir",
    "down_all",
    "load_spec",
    "parse_bytes",
    "parse_spec",
    "require_root",
]
