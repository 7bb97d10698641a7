"""The YAML spec of an emulated home cluster: devices with RAM, CPU, disk and link limits.

Example::

    name: home4
    model: llama3.2-3b-q4_0
    devices:
      - {name: d1, ram: 355MiB, cpus: 1.0, disk_read_mbps: 72, delay_ms: 5, jitter_ms: 1, rate_mbit: 465}

A bad spec raises :class:`~homering.errors.HomeringError` naming the field,
e.g. ``home4.yaml: devices.2.ram: ...``.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from homering.errors import HomeringError

NAME_RE = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"
MAX_NAME = 20  # a testbed name (netns and cgroup names carry it)
MAX_DEVICE_NAME = 32
MAX_DEVICES = 200  # addresses .2 … in a /24, the host side takes the last one
MIN_RAM = 8 << 20  # below this not even a Python interpreter starts

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1 << 10,
    "kib": 1 << 10,
    "mi": 1 << 20,
    "mib": 1 << 20,
    "gi": 1 << 30,
    "gib": 1 << 30,
    "ti": 1 << 40,
    "tib": 1 << 40,
}


def parse_bytes(value: Any) -> int:
    """``"355MiB"``, ``"1.4GiB"``, ``"512M"`` (decimal), ``1073741824`` → bytes (an int).

    Raises:
        ValueError: not a size.
    """
    if isinstance(value, bool):
        raise ValueError("expected a size such as 355MiB or 1.4GiB")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{value!r} is not a size: use bytes or a number with KiB, MiB, GiB (or KB, MB, GB)")
        number, unit = float(m.group(1)), m.group(2).lower()
    else:
        raise ValueError("expected a size such as 355MiB or 1.4GiB")
    return int(round(number * _UNITS[unit]))


def format_bytes(n: int) -> str:
    """Bytes as a short binary size: ``355 MiB``, ``1.40 GiB``."""
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.0f} MiB"
    return f"{n / 1024:.0f} KiB"


Bytes = Annotated[int, BeforeValidator(parse_bytes)]
Notes = str | list[str] | None


class DeviceSpec(BaseModel):
    """One emulated device: its own network namespace and cgroups.

    Attributes:
        name: ``[a-z0-9-]``, unique in the testbed; also the agent's name.
        ram: memory limit in bytes (page cache included); strings like ``355MiB`` are accepted.
        cpus: CPU quota in cores (``0.5`` = half a core).
        disk_read_mbps: read throttle in MB/s (10^6 bytes) on the disk that holds the workdir.
        delay_ms, jitter_ms: the one-way delay (± jitter, uniform) of a packet to the device, so that a round
            trip between two devices takes the sum of their delays (see :mod:`.delay`).
        rate_mbit: the device's link rate, in both directions (device → bridge and bridge → device).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=MAX_DEVICE_NAME, pattern=NAME_RE)
    ram: Bytes = Field(ge=MIN_RAM)
    cpus: float = Field(ge=0.01, le=1024)
    disk_read_mbps: float | None = Field(default=None, gt=0)
    delay_ms: float | None = Field(default=None, ge=0, le=60_000)
    jitter_ms: float | None = Field(default=None, ge=0, le=60_000)
    rate_mbit: float | None = Field(default=None, gt=0, le=1_000_000)
    notes: Notes = None

    @property
    def wants_delay(self) -> bool:
        """Whether the link has a delay or jitter (netem only)."""
        return bool(self.delay_ms) or bool(self.jitter_ms)

    @property
    def wants_shaping(self) -> bool:
        """Whether the link is shaped at all (a delay, jitter or rate)."""
        return self.wants_delay or self.rate_mbit is not None


class TestbedSpec(BaseModel):
    """A whole testbed: a name, an optional subnet and the devices.

    Attributes:
        name: short, ``[a-z0-9-]``; names the network namespaces and cgroups.
        subnet: an IPv4 network for the devices [default: a free /24 in 10.x, chosen at ``up``].
        model: the model the spec is scaled for (``homering testbed run`` uses it without ``--model``).
    """

    __test__ = False  # not a pytest class
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=MAX_NAME, pattern=NAME_RE)
    subnet: str | None = None
    model: str | None = None
    notes: Notes = None
    devices: list[DeviceSpec] = Field(min_length=1, max_length=MAX_DEVICES)

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            net = ipaddress.IPv4Network(value, strict=True)
        except ValueError as exc:
            raise ValueError(f"not an IPv4 network such as 10.77.1.0/24: {exc}") from None
        if net.prefixlen > 29:
            raise ValueError("too small: use a /29 or bigger")
        return str(net)

    @model_validator(mode="after")
    def _check(self) -> TestbedSpec:
        seen: set[str] = set()
        for d in self.devices:
            if d.name in seen:
                raise ValueError(f"two devices are called {d.name!r}")
            seen.add(d.name)
        if self.subnet is not None:
            net = ipaddress.IPv4Network(self.subnet)
            if net.num_addresses - 4 < len(self.devices):  # network, bridge, host side, broadcast
                raise ValueError(f"subnet {self.subnet} has no room for {len(self.devices)} devices")
        return self

    def device(self, name: str) -> DeviceSpec:
        """The device called ``name``; HomeringError if there is none."""
        for d in self.devices:
            if d.name == name:
                return d
        raise HomeringError(f"testbed {self.name!r} has no device {name!r}")


def _where(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "spec"


def spec_error(exc: ValidationError, source: str | None = None) -> HomeringError:
    """A one-line HomeringError from pydantic's errors: ``devices.2.ram: ...``."""
    parts = []
    for err in exc.errors():
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "string_pattern_mismatch":
            msg = "use lower-case letters, digits and '-' (not at either end)"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{_where(err['loc'])}: {msg}")
    prefix = f"{source}: " if source else ""
    return HomeringError(prefix + "; ".join(parts))


def parse_spec(data: Any, source: str | None = None) -> TestbedSpec:
    """Validate a parsed YAML/JSON document.

    Raises:
        HomeringError: naming the bad field(s).
    """
    if not isinstance(data, dict):
        raise HomeringError(f"{source + ': ' if source else ''}a testbed spec is a mapping with name and devices")
    try:
        return TestbedSpec.model_validate(data)
    except ValidationError as exc:
        raise spec_error(exc, source) from None


def load_spec(path: str | Path) -> TestbedSpec:
    """Read and validate a YAML spec file.

    Raises:
        HomeringError: unreadable file, bad YAML, or a bad field.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise HomeringError(f"cannot read the testbed spec {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise HomeringError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    return parse_spec(data, str(path))
