"""What the HTTP API may see and do of the cluster: the :class:`ClusterView` protocol.

The API's routers read this protocol, never the controller's class, so that ``api/``
imports nothing from ``controller/`` (the controller passes itself, or an adapter, to
:func:`homering.api.app.serve`). Everything here is read on the controller's event loop.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import Protocol

from homering.wire import AgentProfile, AgentStats, AgentStatus, GenerateRequest, Plan, StreamEvent, WindowFile


class RequestRefused(Exception):
    """A request the cluster refuses before any token: an HTTP ``status``, a message and an OpenAI error ``code``.

    Raised by :meth:`ClusterView.submit`; the API answers it as an error object.
    """

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


class SequencesView(Protocol):
    """The head's KV sequences as the API sees them: how many, how many are taken, the queue for them."""

    @property
    def n(self) -> int:
        """Sequences in all: requests served at once."""
        ...

    @property
    def in_use(self) -> int:
        """Sequences taken by requests."""
        ...

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a sequence."""
        ...

    @property
    def busy_since(self) -> float | None:
        """``time.monotonic()`` when the last free sequence was taken; None while one is free."""
        ...


class TokenizerView(Protocol):
    """What the API reads of the model's tokenizer: the vocabulary's size and its longest token's text."""

    @property
    def n_vocab(self) -> int:
        """Token ids are below this."""
        ...

    @property
    def max_token_bytes(self) -> int:
        """Bytes of the longest token's text (bounds the body of a request that fits the context)."""
        ...


class MetricsView(Protocol):
    """The controller's Prometheus metrics (:class:`homering.api.metrics.Metrics` is one)."""

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        ...


class ClusterView(Protocol):
    """The cluster as the API sees it (the controller implements it).

    Its properties are snapshots that the API never changes (plain attributes implement them):
    ``broker`` is printed (its ``str``) in ``/v1/cluster``; ``started`` is the controller's start
    (``time.time()``, the model card's ``created``); ``fingerprint`` the model's (the answers'
    ``system_fingerprint``); ``state`` a :class:`~homering.wire.ControllerState` (a ``str``) and
    ``detail`` what it waits for or why it failed; ``links`` maps an agent to its measured
    (one-way ms, Mbit/s) link to the head; ``in_flight`` holds the requests being generated
    (by id); ``tokenizer`` is None until the model's vocabulary is read.
    """

    @property
    def broker(self) -> object: ...

    @property
    def model_path(self) -> Path: ...

    @property
    def n_ctx(self) -> int: ...

    @property
    def n_parallel(self) -> int: ...

    @property
    def api_key(self) -> str | None: ...

    @property
    def started(self) -> float: ...

    @property
    def fingerprint(self) -> str | None: ...

    @property
    def plan(self) -> Plan | None: ...

    @property
    def state(self) -> str: ...

    @property
    def detail(self) -> str | None: ...

    @property
    def profiles(self) -> Mapping[str, AgentProfile]: ...

    @property
    def statuses(self) -> Mapping[str, AgentStatus]: ...

    @property
    def agent_stats(self) -> Mapping[str, AgentStats]: ...

    @property
    def links(self) -> Mapping[str, tuple[float, float]]: ...

    @property
    def in_flight(self) -> Mapping[str, object]: ...

    @property
    def sequences(self) -> SequencesView: ...

    @property
    def tokenizer(self) -> TokenizerView | None: ...

    @property
    def metrics(self) -> MetricsView: ...

    @property
    def model_id(self) -> str: ...

    @property
    def ready(self) -> bool: ...

    @property
    def measured_ms_per_token(self) -> float | None: ...

    def live_agents(self) -> list[AgentProfile]: ...

    def submit(self, req: GenerateRequest) -> AsyncGenerator[StreamEvent, None]:
        """Run ``req``: its events up to ``done`` or ``error``. Admission errors (400, 413, 429, 503) are raised
        as :class:`RequestRefused` by the first ``__anext__``, before any event; closing the iterator early
        cancels the request and frees its sequence."""
        ...

    def window_file(self, sha256: str) -> Path | None:
        """The window file of the current plan (or a probe window) with this SHA-256; None for any other."""
        ...

    async def probe_window(self, label: str) -> WindowFile | None:
        """Slice the probe window ``<start>-<end>-<role>`` (None: not one of this model)."""
        ...
