"""Measurements an agent makes when asked: its device, for the controller's model, and its data links.

The device profile (:func:`homering.profiler.profile_device`: compute per layer, disk, memory) is what the
planner plans with; it is measured once per model (and cached on disk by the profiler), from the model file
when this device has it, else from probe windows downloaded from the controller. A link probe
(:class:`~homering.wire.LinkProbe`) measures latency and bandwidth to the head's data port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from homering.agent.loading import ModelSource, Report
from homering.engine.pages import trim_heap
from homering.errors import HomeringError
from homering.models.slicing import WindowSpec
from homering.profiler.profile import DeviceProfile
from homering.tasks import Tasks
from homering.transport.links import measure_link
from homering.transport.windows import model_info
from homering.wire import AgentState, ControllerState, ControllerStatus, LinkProbe, LinkReport
from homering.wire.security import ClusterKey

log = logging.getLogger("homering.agent")


class Profiler:
    """Profiles this device for the controller's model, once per model (:meth:`consider` each status).

    Args:
        threads: llama.cpp threads (as the windows will use).
        source: where the model's bytes come from.
        tasks: the agent's background tasks.
        report: publishes this agent's status (``error`` when profiling fails).
        controller: the controller's latest status (a profile for a model it no longer serves is dropped).
        profiled: awaited after a new profile (:attr:`device`) is measured: publish it.
    """

    def __init__(
        self,
        *,
        threads: int,
        source: ModelSource,
        tasks: Tasks,
        report: Report,
        controller: Callable[[], ControllerStatus | None],
        profiled: Callable[[], Awaitable[object]],
    ) -> None:
        self.threads = threads
        self.source = source
        self._tasks = tasks
        self._report = report
        self._controller = controller
        self._profiled = profiled
        self.device: DeviceProfile | None = None
        self.profiling: str | None = None  # the fingerprint being profiled

    def consider(self, status: ControllerStatus) -> None:
        """Profile for the model of the controller's ``status``, unless done or under way."""
        fp, path = status.model_fingerprint, status.model_path
        if status.state == ControllerState.OFFLINE or not fp or not path or fp == self.profiling:
            return  # (an offline controller's model is a gone controller's)
        if self.device is not None and self.device.model_fingerprint == fp:
            return
        self.profiling = fp
        self._tasks.spawn(self._profile(status), name=f"profile {fp}")

    async def _profile(self, status: ControllerStatus) -> None:
        fp = status.model_fingerprint
        try:
            device = await self._measure(status)
        except (HomeringError, OSError) as exc:
            await self._failed(fp, str(exc))
            return
        except Exception as exc:  # a bug: say so, and profile again when asked
            log.exception("cannot profile this device")
            await self._failed(fp, f"internal error: {exc!r}")
            return
        ctl = self._controller()
        if ctl is not None and ctl.model_fingerprint != fp:
            log.info("profiled for a model the controller no longer serves; not published")
            if self.profiling == fp:
                self.profiling = None
            return
        self.device = device
        log.info(
            "profiled: %.2f ms/layer, output %.2f ms, disk %.2f GB/s, RAM %.1f GiB (%s)",
            device.cpu_ms_per_layer,
            device.cpu_ms_output,
            device.disk_gbps,
            device.ram_gib,
            f"measured in {(device.profile_ms or 0) / 1000:.1f} s" + (", cached" if device.cached else ""),
        )
        await self._profiled()

    async def _failed(self, fp: str | None, why: str) -> None:
        log.error("cannot profile this device: %s", why)
        if self.profiling == fp:
            self.profiling = None  # a later status asks again
        await self._report(AgentState.ERROR, None, f"cannot profile: {why}")

    async def _measure(self, status: ControllerStatus) -> DeviceProfile:
        """Profile from the local model file, or from probe windows downloaded from the controller.

        Raises:
            HomeringError: no model here and no download; the profile is not of the controller's model.
        """
        from homering.profiler import profile_device

        model_path, fp = status.model_path or "", status.model_fingerprint or ""
        local = await asyncio.to_thread(self.source.local, model_path, fp)
        if local is not None:
            device = await asyncio.to_thread(_one_at_a_time, profile_device, local, threads=self.threads)
        else:
            if status.model_facts is None:
                raise HomeringError(f"model file {model_path} is not on this device")
            info = model_info(status.model_facts, model_path, fp)
            with self.source.window_client(status.api, f"model file {model_path} is not on this device") as client:

                def probe_file(spec: WindowSpec) -> Path:
                    wf = client.probe_window(spec)
                    return client.fetch(wf.sha256, wf.size, f"probe {spec.label()}")

                device = await asyncio.to_thread(
                    _one_at_a_time,
                    profile_device,
                    None,
                    threads=self.threads,
                    info=info,
                    windows=probe_file,
                    routing_tokens=status.model_facts.routing_tokens,
                )
        trim_heap()  # the probe windows' buffers: freed, but glibc would keep them
        if device.model_fingerprint != fp:
            raise HomeringError(f"model file {model_path} does not match the controller's model")
        return device


PROFILE_LOCK_ENV = "HOMERING_PROFILE_LOCK"
"""A file that devices sharing one host lock while they profile (set by :mod:`homering.testbed`)."""


@contextlib.contextmanager
def profile_lock() -> Iterator[None]:
    """Hold the file lock named by ``$HOMERING_PROFILE_LOCK``, if set (and ``fcntl`` exists), while profiling.

    Emulated devices share the host's cores and disk: profiled at once, each measured the others' load
    (on a 2-core host, four devices measured 26-63 ms per layer in no order of their CPU quotas, and disk
    speeds that no device has alone), and Halda planned on those numbers. One at a time, each measures what
    it has while the ring runs: in a k = 1 ring one device computes at a time.
    """
    path = os.environ.get(PROFILE_LOCK_ENV)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        path = None
    if not path:
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _one_at_a_time(fn: Callable[..., DeviceProfile], *args: object, **kwargs: object) -> DeviceProfile:
    with profile_lock():
        return fn(*args, **kwargs)


async def probe_link(probe: LinkProbe, key: ClusterKey | None) -> LinkReport:
    """Measure the data-plane link a :class:`LinkProbe` names (to the head) and say how it went."""
    try:
        link_ms, link_mbps = await asyncio.to_thread(measure_link, probe.host, probe.port, key=key)
    except ConnectionError as exc:
        return LinkReport(probe_id=probe.probe_id, error=str(exc))
    return LinkReport(probe_id=probe.probe_id, link_ms=link_ms, link_mbps=link_mbps)
