"""A device's measured profile: the planner's device inputs (PRIMA.CPP §3.1).

Plain data (pydantic, strict): the profiler makes it, the planner reads it, and
the wire carries it inside :class:`~homering.wire.messages.AgentProfile`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN/Infinity would reach the planner


OsName = Literal["linux", "android", "macos"]


class GpuProfile(_Strict):
    """A device's GPU as the planner sees it (PRIMA.CPP's device profile, §3.1)."""

    vram_gib: float = Field(ge=0, description="free VRAM, GiB (2^30 bytes)")
    ms_per_layer: float = Field(gt=0, description="decode time of one layer offloaded to the GPU, ms")
    unified: bool = Field(description="GPU memory is system RAM (Apple Metal): GPU layers count in RAM too")


class DeviceProfile(_Strict):
    """Measured facts of one device for one model: the planner's device inputs.

    Produced by :func:`homering.profiler.profile_device` and published inside
    :class:`~homering.wire.messages.AgentProfile`. ``link_ms``/``link_mbps`` describe the link to the
    head; they are measured over the data plane at plan time and are 0/0 until then.
    """

    os: OsName
    ram_gib: float = Field(ge=0, description="RAM available to homering, GiB (2^30 bytes)")
    disk_gbps: float = Field(gt=0, description="read throughput of the window cache's disk, GB/s (1e9 bytes)")
    fault_gbps: float | None = Field(
        default=None,
        gt=0,
        description="a mixture of experts: read speed of the page faults a decode from a cold page cache takes, "
        "GB/s (homering.profiler.experts); None for a dense model or where it was not measured",
    )
    cpu_ms_per_layer: float = Field(gt=0, description="decode time of one token through one layer on the CPU, ms")
    cpu_ms_output: float = Field(ge=0, description="output norm + vocabulary projection for one token, ms")
    gpu: GpuProfile | None = None
    link_ms: float = Field(ge=0, default=0.0, description="one-way latency to the head, ms")
    link_mbps: float = Field(ge=0, default=0.0, description="bandwidth to the head, Mbit/s (1e6 bits)")
    model_fingerprint: str | None = Field(default=None, description="the model the timings are for")
    threads: int = Field(ge=1, default=1, description="CPU threads the timings were measured with")
    profile_ms: float | None = Field(
        default=None,
        description="how long the measurement took, ms (also when the figures come from the cache: see cached)",
    )
    read_share: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="a mixture of experts: share of a streamed layer's bytes a decoded token reads from disk "
        "(homering.profiler.experts); None for a dense model or where it was not measured",
    )
    hot_share: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="a mixture of experts: share of its layers' bytes a stream of decoded tokens touches "
        "(homering.profiler.experts); None for a dense model or where it was not measured",
    )
    novel_share: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="a mixture of experts: share of the layer bytes not in the page cache one more decoded "
        "token reads (homering.profiler.experts); None for a dense model or where it was not measured",
    )
    cached: bool = Field(
        default=False, description="the slow figures come from this device's profile cache (measured earlier, not now)"
    )
