"""The user-space delayer of one device's link: holds each packet NFQUEUE hands it for its delay, then accepts it.

Run as a script in the device's network namespace (see :mod:`homering.testbed.delay`, which starts it and adds
the iptables rules)::

    python delayer.py --queues 0 --delay-ms 5 --jitter-ms 1

It imports nothing of homering (it starts fast and runs outside the device's cgroups). In each queue a
packet's release time is ``max(previous release, arrival + delay + U(-jitter,
+jitter))``, so packets leave in the order they came (jitter does not reorder a TCP flow, as with netem's
``delay … jitter`` and a rate). It prints ``ready`` once its queues are bound; SIGTERM releases what it holds
and ends it. Needs the ``NetfilterQueue`` package (bindings of libnetfilter_queue).
"""

from __future__ import annotations

import argparse
import collections
import random
import select
import signal
import sys
import time

MAX_EARLY = 0.0005
"""At most this much (s) earlier than due is a packet released, to make up for late wake-ups."""
PR_SET_TIMERSLACK = 29


def _fine_timers() -> None:
    """Ask for timer wake-ups to the microsecond (Linux's default slack is 50 µs) where prctl exists."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class Lane:
    """One queue's packets in release order: ``(release time on the monotonic clock in s, packet)``."""

    def __init__(self, delay_s: float, jitter_s: float, rng: random.Random):
        self.delay_s, self.jitter_s, self.rng = delay_s, jitter_s, rng
        self.held: collections.deque = collections.deque()
        self.last = 0.0

    def arrive(self, packet) -> None:
        """NetfilterQueue's callback: hold ``packet`` until its release time."""
        due = time.monotonic() + max(0.0, self.delay_s + self.rng.uniform(-self.jitter_s, self.jitter_s))
        self.last = max(self.last, due)
        self.held.append((self.last, packet))

    def release(self, now: float, early: float = 0.0) -> float | None:
        """Accept every packet due by ``now + early``; returns the next release time (None: nothing held)."""
        while self.held and self.held[0][0] <= now + early:
            self.held.popleft()[1].accept()
        return self.held[0][0] if self.held else None

    def flush(self) -> None:
        """Accept everything held (on the way out)."""
        while self.held:
            self.held.popleft()[1].accept()


def run(queues: list[int], delay_s: float, jitter_s: float, seed: int | None = None) -> None:
    """Bind ``queues`` and delay their packets until SIGTERM or SIGINT."""
    from netfilterqueue import COPY_META, NetfilterQueue

    rng = random.Random(seed)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    bound = []
    for q in queues:
        lane, nfq = Lane(delay_s, jitter_s, rng), NetfilterQueue()
        nfq.bind(q, lane.arrive, max_len=20000, mode=COPY_META)
        bound.append((nfq, lane))
    fds = {nfq.get_fd(): nfq for nfq, _ in bound}
    _fine_timers()
    print("ready", flush=True)
    late = 0.0  # how late a timed wake-up comes, on average (s): wake that much earlier
    try:
        while not stop:
            now = time.monotonic()
            due = [t for _, lane in bound if (t := lane.release(now, late)) is not None]
            wake = min(due) - late if due else now + 1.0
            try:
                readable, _, _ = select.select(list(fds), [], [], max(0.0, wake - time.monotonic()))
            except InterruptedError:
                continue
            for fd in readable:
                fds[fd].run(block=False)
            if due and not readable:
                late = min(MAX_EARLY, 0.9 * late + 0.1 * max(0.0, time.monotonic() - wake))
    finally:
        for nfq, lane in bound:
            lane.flush()
            nfq.unbind()


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module's docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queues", default="0", help="comma-separated NFQUEUE numbers (each keeps its order)")
    ap.add_argument("--delay-ms", type=float, required=True)
    ap.add_argument("--jitter-ms", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    queues = [int(q) for q in args.queues.split(",") if q.strip()]
    run(queues, args.delay_ms / 1000, args.jitter_ms / 1000, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
