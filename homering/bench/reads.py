"""What the benchmarked devices read from disk per decoded token, against what the plan predicted.

``homering bench cluster`` checks the planner's disk term (issue: a MoE token reads only its experts' pages,
:attr:`~homering.planner.cluster.ModelShape.read_share`) against the bytes each device's cgroup actually read
from its block device (``io.stat`` / ``blkio.throttle.io_service_bytes``): a snapshot at the answer's first
token and one at its end, so that the prefill's reads are left out.
"""

from __future__ import annotations

from collections.abc import Callable

from homering.wire import StreamEvent


class DecodeReads:
    """Per-device disk bytes read between the first token and the end of one answer.

    ``read(device)`` returns the device's cumulative read bytes (None when it has no I/O controller).
    Use :meth:`on_text` as :func:`~homering.client.chat.ask`'s ``on_text`` (the first call snapshots the
    counters), then :meth:`finish` with the answer's token count.
    """

    def __init__(self, devices: list[str], read: Callable[[str], int | None]):
        self.devices = devices
        self._read = read
        self._first: dict[str, int | None] | None = None
        self.per_token: dict[str, float] = {}

    def on_event(self, event: StreamEvent) -> None:
        """Snapshot the counters at the first token (its text may be empty: a special token, or part of a
        character); later calls do nothing."""
        if self._first is None and event.token_id is not None:
            self._first = {d: self._read(d) for d in self.devices}

    def finish(self, tokens: int) -> None:
        """Bytes per token after the first, per device with an I/O controller (``tokens``: the answer's)."""
        if self._first is None or tokens < 2:
            return
        for d in self.devices:
            a, b = self._first[d], self._read(d)
            if a is not None and b is not None:
                self.per_token[d] = (b - a) / (tokens - 1)

    def report(self, plan: dict) -> dict:
        """``{"devices": {name: {"measured", "predicted"}}, "measured", "predicted", "error"}`` in bytes per
        token; ``plan`` is the plan's JSON (its agents' ``predicted.disk_bytes``). ``error`` is
        (predicted − measured) / measured over all devices (None when nothing was read or predicted)."""
        predicted = {
            a["name"]: float((a.get("predicted") or {}).get("disk_bytes") or 0.0) for a in plan.get("ring", [])
        }
        devices = {
            d: {"measured": self.per_token[d], "predicted": predicted.get(d, 0.0)} for d in sorted(self.per_token)
        }
        m = sum(v["measured"] for v in devices.values())
        p = sum(v["predicted"] for v in devices.values())
        return {"devices": devices, "measured": m, "predicted": p, "error": (p - m) / m if m > 0 else None}
