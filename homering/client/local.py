"""A whole cluster on this machine: the processes ``homering up`` starts and stops."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from homering.errors import HomeringError
from homering.secrets import ENV_API_KEY, ENV_API_KEY_FILE
from homering.transport.broker import (
    broker_credentials,
    free_port,
    mosquitto_binary,
    wait_for_port,
    write_mosquitto_config,
)
from homering.transport.mqtt import AUTH_ENV, BrokerAuth, BrokerURL
from homering.wire.security import ClusterKey, child_environment

log = logging.getLogger("homering.up")

API_KEY_ENV = (ENV_API_KEY, ENV_API_KEY_FILE)


def default_threads() -> int:
    """llama.cpp threads for an agent that shares this machine: all cores but one."""
    return max(1, (os.cpu_count() or 1) - 1)


@contextlib.contextmanager
def sigint_ignored_by_children():
    """Processes started in the block ignore SIGINT; this one keeps its own handler.

    Ctrl-C in a terminal sends SIGINT to the whole foreground process group, which
    holds ``homering up`` and every process it started: without this, Ctrl-C during
    an answer killed the broker, the controller and the agents at once (and each
    reported the others' broken connections). The chat handles Ctrl-C itself (it
    cancels the answer); the children stop on :meth:`LocalCluster.stop`'s SIGTERM.
    An ignored signal stays ignored across fork and exec, and a Python child then
    installs no KeyboardInterrupt handler (nor does ``asyncio.run``). Outside the
    main thread (where no handler can be set) it changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


def stop_processes(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM every process still running, wait up to ``grace`` seconds in all, then SIGKILL the rest."""
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class LocalCluster:
    """Starts an optional embedded broker, a controller and N agents as subprocesses.

    A context manager: every process it started is stopped on exit (SIGTERM,
    then SIGKILL after ``grace`` seconds), Ctrl-C and errors included.

    Args:
        model_path: the model file.
        n_agents: agent processes to start.
        broker: an existing broker, or None to start an embedded one on a free loopback port
            (anonymous). An existing broker's credentials reach the children through
            ``HOMERING_MQTT_*`` environment variables, never their command lines.
        threads: llama.cpp threads per agent [default: cores - 1: the agents share
            this machine with the broker and the controller, and llama.cpp's
            threads stall at every barrier when one of them is preempted].
        n_ctx: context size in tokens.
        planner: the controller's planner; rounds: its --rounds (None: the planner chooses);
        n_batch: its --batch, the prefill micro-batch (None: the controller's default).
        agent_args: extra options for every agent (e.g. ``("--release",)``).
        controller_args: extra options for the controller (e.g. ``("--api-port", "8000")``).
        controller_env: extra environment variables for the controller (e.g. ``HOMERING_API_KEY``:
            secrets go there, never in its arguments).
        log_args: ``-v``/``-q`` flags passed on to the children.
        log_file: an open file for the children's output [default: this process's stderr].
        key: the cluster key every child gets, through its environment (``HOMERING_CLUSTER_KEY``), never argv;
            None: the children run open (inherited key settings are removed).
    """

    def __init__(
        self,
        model_path: Path,
        *,
        n_agents: int = 3,
        broker: BrokerURL | None = None,
        threads: int | None = None,
        n_ctx: int = 2048,
        planner: str = "halda",
        rounds: int | None = None,
        n_batch: int | None = None,
        agent_args: tuple[str, ...] = (),
        controller_args: tuple[str, ...] = (),
        controller_env: dict[str, str] | None = None,
        log_args: tuple[str, ...] = (),
        grace: float = 5.0,
        log_file=None,
        key: ClusterKey | None = None,
    ):
        if n_agents < 1:
            raise HomeringError("--agents must be at least 1")
        self.model_path = model_path
        self.n_agents = n_agents
        self.broker = broker
        self.threads = threads or default_threads()
        self.n_ctx = n_ctx
        self.planner = planner
        self.rounds = rounds
        self.n_batch = n_batch
        self.agent_args = list(agent_args)
        self.controller_args = list(controller_args)
        self.controller_env = dict(controller_env or {})
        self.log_args = list(log_args)
        self.grace = grace
        self.procs: list[subprocess.Popen[bytes]] = []
        self._roles: dict[int, str] = {}  # pid -> e.g. "agent --broker mqtt://…", for error messages
        self._reported: set[int] = set()  # pids of agents whose exit was logged
        self.log_file = log_file
        self.key = key
        self._broker_dir: tempfile.TemporaryDirectory | None = None  # a started mosquitto's config

    def _spawn(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "homering", *self.log_args, *args]
        out = self.log_file.fileno() if self.log_file is not None else sys.stderr.fileno()
        with sigint_ignored_by_children():  # Ctrl-C is the chat's (see there)
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=self._child_env(env))
        self._keep(proc, " ".join(args[:3]))
        return proc

    def _keep(self, proc: subprocess.Popen[bytes], role: str) -> None:
        self.procs.append(proc)
        self._roles[proc.pid] = role

    def role(self, proc: subprocess.Popen[bytes]) -> str:
        """What ``proc`` is: ``"controller --broker …"``, ``"agent --broker …"``, ``"broker (mosquitto)"``."""
        return self._roles.get(proc.pid, "?")

    def _start_broker(self, port: int, auth: BrokerAuth) -> None:
        """mosquitto on loopback when installed (see :mod:`homering.transport.broker`), else ``homering broker``;
        either accepts only ``auth`` (no anonymous clients: other users of this machine can reach loopback)."""
        exe = mosquitto_binary()
        if exe is None:
            self._spawn("broker", "--port", str(port), env=auth.env())
            return
        self._broker_dir = tempfile.TemporaryDirectory(prefix="homering-broker-")
        conf = write_mosquitto_config(
            Path(self._broker_dir.name),
            "127.0.0.1",
            port,
            auth=auth,
            log=bool(self.log_args and self.log_args[0] == "-v"),
        )
        out = self.log_file.fileno() if self.log_file is not None else sys.stderr.fileno()
        # a session of its own: mosquitto handles SIGINT (it exits), so the terminal's Ctrl-C must not reach it
        proc = subprocess.Popen(
            [exe, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
        self._keep(proc, "broker (mosquitto)")

    def _child_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """This process's environment, with the broker's credentials (if any) as the only MQTT settings,
        exactly this cluster's key (:func:`~homering.wire.security.child_environment`), and no API key
        unless ``extra`` has one."""
        env = {k: v for k, v in child_environment(self.key).items() if k not in AUTH_ENV and k not in API_KEY_ENV}
        if self.broker is not None:
            env.update(self.broker.auth.env())
        env.update(extra or {})
        return env

    def __enter__(self) -> LocalCluster:
        from homering.models.support import check_splittable

        check_splittable(self.model_path)  # one line, before any process starts (UnsupportedModel)
        try:
            if self.broker is None:
                port, auth = free_port(), broker_credentials()
                self._start_broker(port, auth)
                if not wait_for_port("127.0.0.1", port):
                    raise HomeringError("the embedded MQTT broker did not start")
                self.broker = BrokerURL("127.0.0.1", port, auth=auth)
            url = str(self.broker)
            self._spawn(
                "controller",
                "--broker",
                url,
                "--model",
                str(self.model_path),
                "--agents",
                str(self.n_agents),
                "--ctx",
                str(self.n_ctx),
                "--planner",
                self.planner,
                *(("--rounds", str(self.rounds)) if self.rounds else ()),
                *(("--batch", str(self.n_batch)) if self.n_batch else ()),
                *self.controller_args,
                env=self.controller_env,
            )
            for i in range(self.n_agents):
                self._spawn(
                    "agent", "--broker", url, "--name", f"agent-{i}", "--threads", str(self.threads), *self.agent_args
                )
        except BaseException:
            self.stop()
            raise
        return self

    def check(self) -> None:
        """Raise HomeringError if the broker or the controller exited.

        An agent that exits is only logged (once): the controller re-plans
        over the others and the cluster goes on.
        """
        for p in self.procs:
            if p.poll() is None:
                continue
            if not self.role(p).startswith("agent"):
                raise HomeringError(f"a cluster process exited with code {p.returncode}: {self.role(p)}")
            if p.pid not in self._reported:
                self._reported.add(p.pid)
                log.warning("an agent exited with code %d; the cluster goes on without it", p.returncode)

    def stop(self) -> None:
        """Stop every child: SIGTERM, wait ``grace`` seconds, then SIGKILL.

        The controller goes first (it would log the agents leaving), then the
        agents, which can still tell the broker they are leaving; an embedded
        broker goes last.
        """
        for role in ("controller", "agent", "broker"):
            stop_processes([p for p in self.procs if self.role(p).startswith(role)], self.grace)
        self.procs.clear()
        self._roles.clear()
        self._reported.clear()
        if self._broker_dir is not None:
            self._broker_dir.cleanup()
            self._broker_dir = None

    def __exit__(self, *exc) -> None:
        self.stop()
