"""MQTT topic names, built and parsed in one place (see the table in :mod:`homering.wire`)."""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "homering"


class Topics:
    """Topic names (see the module table)."""

    @staticmethod
    def profile(name: str) -> str:
        return f"{PREFIX}/agents/{name}/profile"

    @staticmethod
    def status(name: str) -> str:
        return f"{PREFIX}/agents/{name}/status"

    @staticmethod
    def generate(name: str) -> str:
        return f"{PREFIX}/agents/{name}/generate"

    @staticmethod
    def probe(name: str) -> str:
        return f"{PREFIX}/agents/{name}/probe"

    @staticmethod
    def probe_result(name: str) -> str:
        return f"{PREFIX}/agents/{name}/probe/result"

    @staticmethod
    def stats(name: str) -> str:
        return f"{PREFIX}/agents/{name}/stats"

    @staticmethod
    def cancel(name: str) -> str:
        return f"{PREFIX}/agents/{name}/cancel"

    @staticmethod
    def replay(name: str) -> str:
        return f"{PREFIX}/agents/{name}/replay"

    ALL_PROFILES = f"{PREFIX}/agents/+/profile"
    ALL_PROBE_RESULTS = f"{PREFIX}/agents/+/probe/result"
    ALL_STREAMS = f"{PREFIX}/streams/+"
    ALL_STATUS = f"{PREFIX}/agents/+/status"
    ALL_STATS = f"{PREFIX}/agents/+/stats"
    PLAN = f"{PREFIX}/plan"
    CONTROLLER = f"{PREFIX}/controller/status"
    CONTROLLER_STATS = f"{PREFIX}/controller/stats"
    REQUESTS = f"{PREFIX}/requests"

    @staticmethod
    def stream(request_id: str) -> str:
        return f"{PREFIX}/streams/{request_id}"


@dataclass(frozen=True)
class TopicRef:
    """A parsed topic: its ``kind`` (``"profile"``, ``"status"``, …, ``"plan"``, ``"stream"``) and the agent
    name or request id it names (None for the cluster-wide topics)."""

    kind: str
    name: str | None = None


_AGENT_KINDS = {"profile", "status", "generate", "probe", "stats", "cancel", "replay"}
_FIXED = {
    Topics.PLAN: "plan",
    Topics.CONTROLLER: "controller",
    Topics.CONTROLLER_STATS: "controller_stats",
    Topics.REQUESTS: "requests",
}


def parse(topic: str) -> TopicRef | None:
    """The :class:`TopicRef` of a homering topic, or None when it is not one.

    ``homering/agents/<name>/probe/result`` parses as kind ``"probe_result"``;
    ``homering/streams/<request_id>`` as kind ``"stream"``.
    """
    if topic in _FIXED:
        return TopicRef(_FIXED[topic])
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != PREFIX:
        return None
    if parts[1] == "streams" and len(parts) == 3 and parts[2]:
        return TopicRef("stream", parts[2])
    if parts[1] != "agents" or not parts[2]:
        return None
    rest = "/".join(parts[3:])
    if rest == "probe/result":
        return TopicRef("probe_result", parts[2])
    if rest in _AGENT_KINDS:
        return TopicRef(rest, parts[2])
    return None
