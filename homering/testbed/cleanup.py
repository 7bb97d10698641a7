"""Taking testbeds down: their processes, then their namespaces, host links and cgroups.

:func:`remove` takes down what one :class:`~homering.testbed.testbed.Testbed` recorded; :func:`down_all`
finds what any testbed left behind by name prefix (after a crash too).
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from homering.errors import HomeringError
from homering.testbed.cgroups import cgroup_pids, find_cgroups, rmdir_tree
from homering.testbed.netns import (
    LINK,
    LINK_PREFIX,
    host_links,
    ip,
    link_prefix,
    list_netns,
    netns_pids,
    require_root,
    testbed_of_netns,
)
from homering.testbed.processes import comm, terminate

log = logging.getLogger("homering.testbed")


def remove(
    *,
    netns: list[str],
    links: list[str],
    cgroups: list[Path],
    grace: float,
    children: dict[int, subprocess.Popen] | None = None,
    last: frozenset[int] = frozenset(),
) -> list[str]:
    """Kill the processes of the given namespaces and cgroups, then delete them; never raises.

    ``last``: processes of the bridge namespace to stop after the devices' (the broker; a mosquitto
    is recognised by its name). Returns what it removed (``"process …"``, ``"link …"``, ``"netns …"``,
    ``"cgroup …"``).
    """
    device_ns = [n for n in netns if "." in n]
    bridge_ns = [n for n in netns if "." not in n]

    def cgroups_pids() -> set[int]:
        pids: set[int] = set()
        for cg in cgroups:
            pids |= cgroup_pids(cg)
        return pids

    def device_pids() -> set[int]:
        pids = cgroups_pids()
        for ns in device_ns:
            pids |= netns_pids(ns)
        return pids

    def bridge_pids() -> set[int]:
        pids: set[int] = set()
        for ns in bridge_ns:
            pids |= netns_pids(ns)
        return pids

    def brokers() -> set[int]:
        return {p for p in bridge_pids() if p in last or comm(p) == "mosquitto"}

    # the controller first (else it logs every agent leaving), then the agents (they can still tell
    # the broker they are leaving), then the devices' link delayers (in their namespaces, outside their
    # cgroups), the broker last
    removed = terminate(lambda: bridge_pids() - brokers(), grace, children)
    removed += terminate(cgroups_pids, grace, children)
    removed += terminate(device_pids, grace, children)
    removed += terminate(bridge_pids, grace, children)
    return removed + _delete(device_ns + bridge_ns, links, cgroups)


def _delete(netns: list[str], links: list[str], cgroups: list[Path]) -> list[str]:
    """Delete host links, then namespaces, then cgroups (empty by now); never raises."""
    removed = _ip_delete("link", links, host_links)
    removed += _ip_delete("netns", netns, list_netns)
    for cg in cgroups:
        if cg.exists():
            if rmdir_tree(cg):
                removed.append(f"cgroup {cg}")
    return removed


def _ip_delete(kind: str, names: list[str], listed) -> list[str]:
    """``ip <kind> del`` each of ``names`` that ``listed()`` shows; what was removed (failures are logged)."""
    removed: list[str] = []
    present = set(listed())
    for name in names:
        if name in present:
            res = ip(kind, "del", name, check=False)
            if res.returncode == 0:
                removed.append(f"{kind} {name}")
            else:
                log.warning("cannot delete %s %s: %s", kind, name, res.stderr.strip())
    return removed


def down_all(names: set[str] | list[str] | None = None, *, grace: float = 5.0, quiet: bool = False) -> list[str]:
    """Remove what any homering testbed left behind (or only those called ``names``): processes in
    their namespaces and cgroups, then the namespaces, host links and cgroups, found by prefix, and
    the state files under ``<home>/testbeds``.

    Idempotent; never raises for an item that is already gone. Returns what it removed (and logs it
    unless ``quiet``).

    Raises:
        HomeringError: not root on Linux, or no iproute2.
    """
    require_root()
    names = set(names) if names is not None else None
    netns = [ns for ns in list_netns() if (tb := testbed_of_netns(ns)) is not None and (names is None or tb in names)]
    prefixes = {link_prefix(n) for n in names} if names is not None else None
    links = [
        link
        for link in host_links()
        if LINK.match(link) and (prefixes is None or link[: len(LINK_PREFIX) + 7] in prefixes)
    ]
    cgroups = find_cgroups(names)
    removed = remove(netns=netns, links=links, cgroups=cgroups, grace=grace)
    try:
        from homering import paths

        for state in (paths.home() / "testbeds").glob("*/state.json"):
            if names is None or state.parent.name in names:
                state.unlink(missing_ok=True)
                removed.append(f"state {state}")
    except OSError:
        pass
    if not quiet:
        for item in removed:
            log.info("removed %s", item)
    return removed


def leftovers(name: str) -> bool:
    """Whether a namespace or host link of testbed ``name`` exists."""
    return any(testbed_of_netns(ns) == name for ns in list_netns()) or any(
        link.startswith(link_prefix(name)) for link in host_links()
    )


def refuse_leftovers(name: str) -> None:
    """Raise when a namespace, host link or cgroup of testbed ``name`` exists.

    Raises:
        HomeringError: the testbed is up, or a crashed one left something behind (the message names up to
            three of them and says to run `homering testbed down`).
    """
    mine = [ns for ns in list_netns() if testbed_of_netns(ns) == name]
    mine += [link for link in host_links() if link.startswith(link_prefix(name))]
    mine += [str(p) for p in find_cgroups({name})]
    if mine:
        raise HomeringError(
            f"testbed {name!r} is already up or left over ({', '.join(mine[:3])}"
            f"{', …' if len(mine) > 3 else ''}): run `homering testbed down`"
        )
