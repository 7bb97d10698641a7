"""Window distribution: window files named by their SHA-256, checked, cached, downloaded.

The controller slices the plan's windows (it has the model), records each
file's SHA-256 and size in the plan (:class:`~homering.wire.WindowAssignment`)
and serves the files by hash from its API server (``GET /v1/windows/<sha256>``,
the API key required). An agent that has the model slices its windows itself
and checks them against the plan's hashes (slicing is deterministic: the same
model and homering give the same bytes); an agent without it downloads only its
own windows into ``<home>/windows/sha256/<sha256>.gguf``, so a re-plan fetches
only windows it does not have. Every file is checked before it is loaded: a
mismatch (a corrupted download or cache) is deleted and fetched again.

Profiling an agent without the model works the same way: its probe windows
(a few layers, see :mod:`homering.profiler.compute`) are asked for by range
and role (``GET /v1/windows/probe/<start>-<end>-<role>`` → their hash), then
downloaded by hash.

A file's hash is remembered beside it (:mod:`homering.models.filehash`); the
slicer writes that memo as it writes a window.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from homering import paths
from homering.errors import HomeringError
from homering.models.filehash import file_sha256, forget
from homering.models.gguf_info import ModelInfo
from homering.models.slicing import Role, WindowSpec, window_path
from homering.wire import WINDOWS_PATH, ModelFacts, Plan, WindowFile

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("homering.windows")

FETCH_ATTEMPTS = 3
"""Downloads of one window before giving up (a hash mismatch or a broken connection counts as one)."""
CHUNK_BYTES = 1 << 20
HTTP_TIMEOUT_S = 30.0  # connect / between two chunks


class WindowError(HomeringError):
    """A window file could not be had: refused by the controller, or still wrong after every attempt."""


# ------------------------------------------------------------------ hashes
def matches(path: Path, sha256: str, size: int | None) -> bool:
    """The file exists with this size (bytes; None: any) and this SHA-256."""
    try:
        if size is not None and path.stat().st_size != size:
            return False
        return file_sha256(path) == sha256
    except OSError:
        return False


def remove(path: Path) -> None:
    """Delete a window file and its hash memo."""
    path.unlink(missing_ok=True)
    forget(path)


def cache_path(sha256: str) -> Path:
    """Where a downloaded window lives: ``<home>/windows/sha256/<sha256>.gguf`` (folder created)."""
    folder = paths.windows_dir() / "sha256"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{sha256}.gguf"


def cached(sha256: str, size: int | None, label: str = "") -> Path | None:
    """The downloaded window with this hash, when it is there and intact; a corrupted one is deleted."""
    path = cache_path(sha256)
    if not path.exists():
        return None
    if matches(path, sha256, size):
        return path
    log.warning("cached window %s does not match the plan's sha256: deleted, fetching it again", label or path.name)
    remove(path)
    return None


# ------------------------------------------------------------------ cache size
CACHE_MIN_AGE_S = 600.0
"""Window files written this recently are never pruned (another cluster on this machine may be loading them)."""


def plan_files(plan: Plan) -> set[Path]:
    """The cache files of every window of ``plan`` (sliced by label, downloaded by hash), whoever holds them."""
    out = set()
    for agent in plan.ring:
        for w in agent.windows:
            spec = WindowSpec(w.start, w.end, Role.for_range(w.start, w.end, plan.n_layers))
            if spec.role is not Role.WHOLE:
                out.add(window_path(Path(plan.model_path), spec, plan.model_fingerprint))
            if w.sha256:
                out.add(cache_path(w.sha256))
    return out


def prune_cache(keep: set[Path], *, spare_bytes: int, min_age_s: float = CACHE_MIN_AGE_S) -> int:
    """Keep the window cache bounded: delete window files beyond ``spare_bytes``, oldest first.

    Every plan can need other windows, and each one is cached, so without
    this the cache grows with every re-plan (13 GB of a 1.6 GB model's
    windows after a day of benchmarks). Files in ``keep`` (the plan in force)
    and files written within ``min_age_s`` seconds stay; of the rest, the
    oldest are deleted (with their hash memos) until at most ``spare_bytes``
    remain, so a re-plan back to a recent assignment still finds its windows.

    Returns:
        Bytes deleted.
    """
    root = paths.windows_dir()
    keep = {Path(p).resolve() for p in keep}
    now = time.time()
    files = []
    for p in root.glob("*/*.gguf"):
        try:
            st = p.stat()
        except OSError:
            continue
        if p.resolve() not in keep:
            files.append((st.st_mtime, st.st_size, p))
    total, freed = sum(f[1] for f in files), 0
    for mtime, size, p in sorted(files):
        if total <= spare_bytes:
            break
        if now - mtime < min_age_s:
            continue
        remove(p)
        total -= size
        freed += size
    if freed:
        log.info("window cache: deleted %.1f MB of windows no plan used recently", freed / 1e6)
    return freed


# ------------------------------------------------------------------ model facts
def model_facts(info: ModelInfo) -> ModelFacts:
    """What an agent without the model needs to know of it (published in the controller's status; a MoE's
    routing probe text is tokenized once per model file, :func:`~homering.profiler.experts.routing_tokens`).

    Raises:
        ModelError: a MoE whose vocabulary llama.cpp cannot load.
    """
    from homering.profiler.experts import routing_tokens  # llama.cpp's vocabulary, for a MoE only

    return ModelFacts(
        arch=info.arch,
        name=info.name,
        n_layers=info.n_layers,
        n_embd=info.n_embd,
        n_ctx_train=info.n_ctx_train,
        size_bytes=info.size_bytes,
        layer_bytes=list(info.layer_bytes),
        n_expert=info.n_expert,
        n_expert_used=info.n_expert_used,
        layer_active_bytes=list(info.layer_active_bytes),
        routing_tokens=list(routing_tokens(str(info.path))) if info.n_expert else [],
    )


def model_info(facts: ModelFacts, path: str, fingerprint: str) -> ModelInfo:
    """A :class:`ModelInfo` rebuilt from :class:`ModelFacts` (``path`` is the controller's, not readable here)."""
    return ModelInfo(
        path=Path(path),
        arch=facts.arch,
        n_layers=facts.n_layers,
        n_embd=facts.n_embd,
        n_ctx_train=facts.n_ctx_train,
        name=facts.name,
        fingerprint=fingerprint,
        size_bytes=facts.size_bytes,
        layer_bytes=tuple(facts.layer_bytes),
        n_expert=facts.n_expert,
        n_expert_used=facts.n_expert_used,
        layer_active_bytes=tuple(facts.layer_active_bytes),
    )


# ------------------------------------------------------------------ the client
def reachable_url(api: str, broker_host: str) -> str:
    """The controller's API URL as seen from this machine.

    The controller announces a loopback address when it listens on every
    interface (0.0.0.0); an agent on another machine then uses the broker's
    host (a home server runs both) instead.
    """
    parts = urlsplit(api)
    loopback = ("127.0.0.1", "localhost", "::1")
    if parts.hostname in loopback and broker_host not in loopback:
        host = f"[{broker_host}]" if ":" in broker_host else broker_host
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc))
    return api


class WindowClient:
    """Downloads window files from the controller (blocking: call it from a worker thread).

    Args:
        api: the controller's API base URL (``http://host:port/v1``).
        api_key: sent as ``Authorization: Bearer <key>`` (None: no header).
        progress: show a rich progress bar (on a TTY); otherwise one log line per window.
        attempts: downloads of one window before :class:`WindowError`.
    """

    def __init__(self, api: str, api_key: str | None, *, progress: bool | None = None, attempts: int = FETCH_ATTEMPTS):
        self.api = api.rstrip("/")
        self.attempts = attempts
        self.progress = sys.stderr.isatty() if progress is None else progress
        import httpx  # here, not at import: it costs an agent that never downloads ~7 MiB of RAM

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(HTTP_TIMEOUT_S), follow_redirects=False)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> WindowClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _refused(self, resp: httpx.Response, what: str) -> WindowError:
        try:
            reason = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            reason = resp.reason_phrase
        hint = " (set $HOMERING_API_KEY or --api-key-file)" if resp.status_code == 401 else ""
        return WindowError(f"the controller refused {what}: HTTP {resp.status_code} {reason}{hint}")

    def probe_window(self, spec: WindowSpec) -> WindowFile:
        """Ask the controller for a probe window's hash and size (it slices it on demand).

        Raises:
            WindowError: refused (401, 404: not a probe window) or unreachable.
        """
        import httpx

        url = f"{self.api}{WINDOWS_PATH}/probe/{spec.label()}"
        try:
            resp = self._http.get(url, timeout=httpx.Timeout(HTTP_TIMEOUT_S * 10))  # slicing takes a while
        except httpx.HTTPError as exc:
            raise WindowError(f"cannot reach the controller at {self.api}: {exc}") from None
        if resp.status_code != 200:
            raise self._refused(resp, f"probe window {spec.label()}")
        try:
            return WindowFile.model_validate_json(resp.content)
        except ValueError:
            raise WindowError(
                f"the controller at {self.api} answered probe window {spec.label()} "
                "with something else than a window file description"
            ) from None

    def fetch(self, sha256: str, size: int | None, label: str) -> Path:
        """The window with this hash: from the cache if intact, else downloaded and checked.

        A download streams into a temporary file that is renamed into the
        cache only once its SHA-256 matches; a mismatch or a broken connection
        is retried up to ``attempts`` times in all.

        Returns:
            ``<home>/windows/sha256/<sha256>.gguf``.

        Raises:
            WindowError: refused by the controller (401, 404), or every attempt failed.
        """
        import httpx

        hit = cached(sha256, size, label)
        if hit is not None:
            return hit
        target = cache_path(sha256)
        why = ""
        for attempt in range(1, self.attempts + 1):
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            try:
                t0 = time.perf_counter()
                digest, n = self._download(sha256, size, label, tmp)
                dt = time.perf_counter() - t0
                if digest == sha256 and (size is None or n == size):
                    os.replace(tmp, target)
                    log.info(
                        "downloaded window %s (%.1f MB) in %.2f s (%.0f MB/s)",
                        label,
                        n / 1e6,
                        dt,
                        n / 1e6 / max(dt, 1e-6),
                    )
                    return target
                why = f"got {n} bytes with sha256 {digest[:12]}…, the plan says {sha256[:12]}…"
                log.warning("window %s: corrupted download (%s); attempt %d of %d", label, why, attempt, self.attempts)
            except httpx.HTTPError as exc:
                why = f"{type(exc).__name__}: {exc}"
                log.warning("window %s: download failed (%s); attempt %d of %d", label, why, attempt, self.attempts)
                time.sleep(min(2.0, 0.25 * attempt))
            finally:
                tmp.unlink(missing_ok=True)
        raise WindowError(f"window {label} could not be downloaded intact after {self.attempts} attempts: {why}")

    def _download(self, sha256: str, size: int | None, label: str, tmp: Path) -> tuple[str, int]:
        """Stream one window into ``tmp``; returns (its sha256, bytes). Raises WindowError when refused."""
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        url = f"{self.api}{WINDOWS_PATH}/{sha256}"
        h, n = hashlib.sha256(), 0
        with self._http.stream("GET", url) as resp:
            if resp.status_code != 200:
                resp.read()
                raise self._refused(resp, f"window {label}")
            total = size or int(resp.headers.get("content-length") or 0) or None
            if not self.progress:
                log.info(
                    "downloading window %s (%s) from %s",
                    label,
                    f"{total / 1e6:.1f} MB" if total else "size unknown",
                    self.api,
                )
            with (
                open(tmp, "wb") as fh,
                Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    DownloadColumn(),
                    TransferSpeedColumn(),
                    disable=not self.progress,
                    transient=True,
                ) as bar,
            ):
                task = bar.add_task(f"window {label}", total=total)
                for chunk in resp.iter_bytes(CHUNK_BYTES):
                    fh.write(chunk)
                    h.update(chunk)
                    n += len(chunk)
                    bar.advance(task, len(chunk))
        return h.hexdigest(), n
