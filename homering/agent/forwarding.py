"""The link threads: frames from the predecessor go through this agent's windows and on to the successor.

This is where a hidden state enters a window. Each data link accepted by the
:class:`~homering.transport.links.LinkServer` is served by :meth:`Forwarder.serve` in a thread of its own:
blocking sockets, so that a hop costs one wake-up, and decode runs there while the event loop serves MQTT.
"""

from __future__ import annotations

import logging
import select
import socket
from collections.abc import Callable

from homering.agent.ring import Ring
from homering.engine.window import DecodeError
from homering.transport.links import recv_group, send_frame
from homering.wire import Frame, FrameError, FrameKind

log = logging.getLogger("homering.agent")


class Forwarder:
    """Runs the frames that arrive on data links through the loaded plan's windows (see :meth:`handle`).

    Args:
        name: the agent's name (in ERROR frames' messages).
        current: the loaded :class:`Ring`, or None.
    """

    def __init__(self, name: str, current: Callable[[], Ring | None]) -> None:
        self.name = name
        self._current = current

    def serve(self, sock: socket.socket) -> None:
        """Handle groups of frames from the predecessor, in order, until it disconnects (a link thread).

        A ring link starts with a HELLO frame naming the sender's plan; its frames run only while this
        agent has that plan loaded (frames a neighbour sent under an old plan would corrupt the new KV
        caches). PING frames (link probes) are answered with PONG.
        """
        peer, tag, dropped = "?", None, 0
        try:
            peer = sock.getpeername()
            while (group := recv_group(sock)) is not None:
                kind = group[0].header.kind
                if kind is FrameKind.PING:
                    send_frame(sock, Frame.pong())
                    continue
                if kind is FrameKind.HELLO:
                    tag = group[0].plan_tag
                    continue
                if kind is FrameKind.PONG:
                    continue
                ring = self._current()
                if ring is None or ring.tag != tag or not ring.gate.enter():
                    dropped += len(group)
                    if dropped == len(group):
                        log.warning("dropping frames from %s: sent under another plan than the one loaded", peer)
                    continue
                try:
                    self.handle(ring, merge_waiting(ring, sock, group))
                finally:
                    ring.gate.exit()
        except (FrameError, ConnectionError, OSError) as exc:
            log.warning("dropping data link from %s: %s", peer, exc)
        except Exception:  # a bug: this link ends, the agent keeps serving
            log.exception("dropping data link from %s", peer)

    def handle(self, ring: Ring, group: list[Frame]) -> None:
        """Run a group of frames through this agent's windows and pass the results on, as one group.

        Piped-ring rounds (PRIMA.CPP §3.2): a FORWARD frame of round r runs this agent's r-th window. The
        head, which holds the last window of every round, sends round r's output back into the ring as
        round r + 1; after the last round it hands the logits to the request's generation loop.
        Consecutive FORWARD frames of the same round (several requests' tokens, or one prompt's
        micro-batches) share llama_decode calls (:meth:`LayerWindow.forward_many`).
        """
        last_round = len(ring.windows) - 1
        onward = []
        for frame_in, out in self._outputs(ring, group):
            h = frame_in.header
            if ring.is_head and (out.header.kind is not FrameKind.FORWARD or h.round == last_round):
                ring.deliver(h.request_id, out)
            else:
                onward.append(out)
        if onward:
            ring.pass_on(onward)

    def _outputs(self, ring: Ring, group: list[Frame]) -> list[tuple[Frame, Frame]]:
        """(input, output) of every frame of the group, in order."""
        last_round = len(ring.windows) - 1
        outs: list[tuple[Frame, Frame]] = []
        i = 0
        while i < len(group):
            h = group[i].header
            if h.kind is FrameKind.FORWARD and h.round <= last_round:
                j = i + 1
                while j < len(group) and group[j].header.kind is FrameKind.FORWARD and group[j].header.round == h.round:
                    j += 1
                run = group[i:j]
                outs.extend(zip(run, self._forward_run(ring, run)))
                ring.after_window(h.round)
                i = j
                continue
            outs.append((group[i], self._other(ring, group[i])))
            i += 1
        return outs

    def _forward_run(self, ring: Ring, run: list[Frame]) -> list[Frame]:
        """FORWARD frames of one round through that round's window in shared batches; the output frames."""
        r = run[0].header.round
        last_round = len(ring.windows) - 1
        items = [(f.payload, f.header.pos, f.header.seq_id) for f in run]
        rows = [f.header.rows for f in run]  # speculative verifications: every token's logits
        embed = [ring.is_head and r == last_round and ring.embeds(f.header.request_id) for f in run]
        try:
            n_tokens = sum(f.header.n_tokens for f in run)
            results = ring.meter.timed(r, n_tokens, ring.windows[r].forward_many, items, rows, embed)
        except (DecodeError, ValueError) as exc:
            return [Frame.error(f.header.request_id, f.header.seq_id, f"{self.name}: {exc}") for f in run]
        outs = []
        for f, result in zip(run, results):
            h = f.header
            if ring.is_head and r == last_round:  # the ring is closed: the logits (embeddings) go to the loop
                outs.append(Frame(h, result.hidden if result.logits is None else result.logits))
            elif result.hidden is None:  # a window that gives logits in the middle of a round: a bad plan
                outs.append(Frame.error(h.request_id, h.seq_id, f"{self.name}: window {r} gives no hidden state"))
            else:
                nxt = r + 1 if ring.is_head else r
                outs.append(Frame.forward(h.request_id, h.seq_id, h.pos, result.hidden, nxt, rows=h.rows))
        return outs

    def _other(self, ring: Ring, frame: Frame) -> Frame:
        """The output of a frame that runs no window: KV removal, a FORWARD of a round this plan does not
        have (an ERROR), or the frame itself (ERROR frames go on to the head)."""
        h = frame.header
        if h.kind is FrameKind.FORWARD:
            return Frame.error(
                h.request_id, h.seq_id, f"{self.name}: round {h.round} of a {len(ring.windows)}-round plan"
            )
        if h.kind is FrameKind.KV_REMOVE:
            try:
                for w in ring.windows:
                    w.kv_remove(h.seq_id, h.pos)
            except ValueError as exc:
                return Frame.error(h.request_id, h.seq_id, f"{self.name}: {exc}")
        return frame


def merge_waiting(ring: Ring, sock: socket.socket, group: list[Frame]) -> list[Frame]:
    """Append the groups that already wait on the link (this device is the ring's bottleneck right now), up
    to ``n_batch`` tokens: they then share llama_decode calls instead of queueing."""
    if group[0].header.kind is not FrameKind.FORWARD:
        return group
    tokens = sum(f.header.n_tokens for f in group)
    while tokens < ring.plan.n_batch and select.select([sock], [], [], 0)[0]:
        more = recv_group(sock)
        if more is None:
            break
        group = group + more
        tokens += sum(f.header.n_tokens for f in more)
    return group
