"""The terminal chat as a person uses it: real processes in a real terminal (tmux), keys sent with send-keys,
the screen read with capture-pane; and the same chat with its input piped."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

from homering.rate import WorkRate
from homering.transport.broker import free_port

HOMERING = [sys.executable, "-m", "homering"]
READY_S = 300.0  # hang guards: a cluster starting on a shared two-core machine ...
ANSWER_S = 180.0  # ... and an answer


class Terminal:
    """A tmux session on a private server running one command; the pane stays after the command exits."""

    def __init__(self, argv: list[str], env: dict[str, str], *, width: int = 200, height: int = 50):
        if shutil.which("tmux") is None:
            pytest.fail("tmux is not installed: run 'make test' (it installs it)")
        self.socket = f"homering-test-{uuid.uuid4().hex[:8]}"
        env = {"COLUMNS": str(width), "LINES": str(height), **env}  # rich's tables: as wide as the pane, always
        with tempfile.NamedTemporaryFile("w", suffix=".conf") as conf:  # set before the command starts
            conf.write("set -g remain-on-exit on\nset -g history-limit 100000\n")
            conf.flush()
            self._tmux(
                "-f",
                conf.name,
                "new-session",
                "-d",
                "-s",
                "t",
                "-x",
                str(width),
                "-y",
                str(height),
                "-c",
                os.getcwd(),
                *(a for k, v in env.items() for a in ("-e", f"{k}={v}")),
                " ".join(_quote(a) for a in argv),
            )

    def _tmux(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True, timeout=30
        ).stdout

    def screen(self) -> str:
        """Everything the pane showed (its scrollback too), wrapped lines joined."""
        return self._tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "t")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "t", *keys)

    def type(self, text: str) -> None:
        self._tmux("send-keys", "-t", "t", "-l", text)

    def paste(self, text: str, folder: Path) -> None:
        """Paste ``text`` as a terminal does (bracketed, when the program asked for it)."""
        path = folder / "paste.txt"
        path.write_text(text)
        self._tmux("load-buffer", "-b", "p", str(path))
        self._tmux("paste-buffer", "-p", "-b", "p", "-t", "t")

    def wait_for(self, predicate, what: str, timeout: float = ANSWER_S) -> str:
        """Poll the screen until ``predicate(screen)`` holds (a hang guard of ``timeout`` s); return the screen."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if predicate(screen):
                return screen
            if self.exit_status() is not None:
                pytest.fail(f"the chat exited (status {self.exit_status()}) before {what}:\n{screen[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout:.0f} s:\n{screen[-4000:]}")
            time.sleep(0.3)

    def wait_count(self, text: str, n: int, what: str, timeout: float = ANSWER_S) -> str:
        """:meth:`wait_for` ``text`` to be on the screen ``n`` times."""
        return self.wait_for(lambda s: s.count(text) >= n, what, timeout)

    def exit_status(self) -> int | None:
        """The command's exit status (minus the signal that killed it); None while it runs."""
        dead, status, sig = (
            self._tmux("display-message", "-p", "-t", "t", "#{pane_dead}:#{pane_dead_status}:#{pane_dead_signal}")
            .strip()
            .split(":")
        )
        if dead != "1":
            return None
        return int(status) if status else -int(sig or 0)

    def wait_exit(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while (status := self.exit_status()) is None:
            if time.monotonic() > deadline:
                pytest.fail(f"the chat did not exit within {timeout:.0f} s:\n{self.screen()[-4000:]}")
            time.sleep(0.2)
        return status

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\"'\"'") + "'"


def _processes_marked(mark: str) -> list[str]:
    """Processes whose environment holds ``HOMERING_TEST_MARK=mark`` (every child of a command inherits it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if f"HOMERING_TEST_MARK={mark}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{entry.name}: {cmdline}")
        except OSError:
            continue
    return found


def _answers(screen: str) -> int:
    """Finished answers on the screen: each ends with a line '<n> tokens · <rate> tokens/s …'."""
    return len(re.findall(r"^\d+ tokens · [\d.]+ tokens/s", screen, re.M))


NOISE = ("Traceback", "Broken pipe", "Future exception was never retrieved", "Task exception", "Exception ignored")


def _in_flight(api: str) -> float:
    text = httpx.get(f"{api}/metrics", timeout=10).text
    return float(re.search(r"^homering_requests_in_flight ([\d.]+)$", text, re.M).group(1))


def test_ctrl_c_cancels_the_answer_on_the_cluster_and_ctrl_c_at_the_prompt_exits_0(smollm2):
    """`homering up`: Ctrl-C during an answer stops it on the cluster (the head ends it as cancelled, its sequence
    is free: the controller has no request in flight) and the chat goes on; Ctrl-C at the empty prompt ends
    everything with exit code 0 and not a line of noise, and no process of the cluster is left.

    It ended the whole cluster: the terminal's SIGINT reached the broker, controller and agents too."""
    mark, port = uuid.uuid4().hex, free_port()
    term = Terminal(
        [
            *HOMERING,
            "up",
            "--agents",
            "2",
            "--model",
            str(smollm2),
            "--threads",
            "1",
            "--parallel",
            "1",
            "--temperature",
            "0",
            "--max-tokens",
            "1500",
            "--api-port",
            str(port),
        ],
        {"HOMERING_TEST_MARK": mark},
    )
    api = f"http://127.0.0.1:{port}"
    try:
        term.wait_for(lambda s: "you>" in s, "prompt", READY_S)
        term.type("Tell me a very long story about a lighthouse keeper.")
        term.keys("Enter")
        # a good part of the answer is out (the head generates it: it is in flight), then Ctrl-C
        term.wait_for(lambda s: "ai>" in s and len(s.split("ai>", 1)[1].split()) >= 40, "answer under way")
        assert _in_flight(api) == 1
        term.keys("C-c")
        screen = term.wait_for(lambda s: re.search(r"cancelled after \d+ token", s), "note that it was cancelled")
        n = int(re.search(r"cancelled after (\d+) token", screen).group(1))
        assert 40 <= n < 1500, "the head did not stop the answer early"
        deadline = time.monotonic() + 60
        while _in_flight(api) != 0:  # the controller freed its sequence
            assert time.monotonic() < deadline, "the cancelled request is still in flight"
            time.sleep(0.3)
        # the cluster goes on: the one sequence (--parallel 1) serves the next question
        term.wait_for(lambda s: s.rstrip().endswith("you>"), "the prompt again")
        term.type("Hi!")
        term.keys("Enter")
        term.wait_for(lambda s: _answers(s) >= 1, "an answer after the cancel")
        term.wait_for(lambda s: s.rstrip().endswith("you>"), "the prompt after the answer")
        term.keys("C-c")
        assert term.wait_exit() == 0
        screen = term.screen()
        for noise in NOISE:
            assert noise not in screen, f"{noise!r} on the screen:\n{screen[-4000:]}"
        deadline = time.monotonic() + 30
        while left := _processes_marked(mark):
            assert time.monotonic() < deadline, f"processes of the cluster outlived `up`: {left}"
            time.sleep(0.3)
    finally:
        term.close()
        for line in _processes_marked(mark):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)


@pytest.fixture(scope="module")
def chat_cluster(smollm2, mosquitto, tmp_path_factory):
    """A controller and one agent on mosquitto (context 2048, as `homering up`'s default) for `homering chat`."""
    from homering.client.local import LocalCluster

    log_path = tmp_path_factory.mktemp("logs") / "chat-cluster.log"
    with (
        open(log_path, "w") as log_file,
        LocalCluster(smollm2, n_agents=1, broker=mosquitto, threads=1, n_ctx=2048, log_file=log_file) as c,
    ):
        yield c


def _chat(cluster, *args: str) -> Terminal:
    term = Terminal(
        [*HOMERING, "chat", "--broker", str(cluster.broker), "--temperature", "0", *args],
        {"HOMERING_TEST_MARK": uuid.uuid4().hex},
    )
    term.wait_for(lambda s: "you>" in s, "prompt", READY_S)
    return term


def test_a_32k_paste_arrives_whole_and_is_refused_in_one_line(chat_cluster, tmp_path):
    """A paste longer than the terminal's line limit (4095 bytes in canonical mode) reaches the controller whole;
    more tokens than the context holds are refused with one line, and the chat goes on.

    It was cut at 4095 characters without a word, and the model answered the cut text."""
    words = "the keeper climbs the stairs of the lighthouse at night and lights the lamp for the ships".split()
    end = "END-OF-THE-PASTE"
    text = " ".join(words[i % len(words)] + str(i % 7) for i in range(6000))[: 32768 - len(end) - 1] + " " + end
    flat = lambda s: s.replace("\n", "")  # noqa: E731 - the line editor wraps the long line
    term = _chat(chat_cluster)
    try:
        term.paste(text, tmp_path)
        term.wait_for(lambda s: end in flat(s), "the end of the paste in the line editor", 60)
        term.keys("Enter")
        screen = term.wait_for(lambda s: "error:" in flat(s).split(end, 1)[-1], "the refusal")
        notes = [line for line in screen.splitlines() if "error:" in line]
        assert len(notes) == 1, notes
        m = re.search(r"error: the prompt has (\d+) tokens but the context holds 2048", notes[0])
        assert m, notes[0]
        assert int(m.group(1)) > 4096, "the paste did not arrive whole"  # 4095 bytes are ~1,000 tokens
        assert _answers(screen) == 0
        term.type("Hi!")
        term.keys("Enter")
        term.wait_for(lambda s: _answers(s) == 1, "an answer after the refusal")
    finally:
        term.close()


def test_line_editing_history_and_reset_say_what_they_do(chat_cluster):
    """Left arrow and history (up arrow) edit and recall lines; Ctrl-C clears a line (and leaves the chat only at
    an empty prompt); /reset says what it forgot."""
    term = _chat(chat_cluster)
    try:
        term.type("a line to drop")
        term.keys("C-c")  # cleared: what follows is a command of its own
        term.type("/pln")
        term.keys("Left")
        term.type("a")
        term.keys("Enter")  # /plan: its table after the banner's
        term.wait_count("┃ # ┃ agent", 2, "the plan table")
        term.keys("Up", "Enter")  # /plan again
        screen = term.wait_count("┃ # ┃ agent", 3, "the plan table again")
        assert "unknown command" not in screen
        term.type("Hi!")
        term.keys("Enter")
        term.wait_for(lambda s: _answers(s) == 1, "an answer")
        term.type("/reset")
        term.keys("Enter")
        term.wait_for(lambda s: "forgot the conversation (1 exchange(s))" in s, "what /reset did")
        term.type("/reset")
        term.keys("Enter")
        term.wait_for(lambda s: "nothing to forget" in s, "that there is nothing to forget")
        term.keys("C-d")
        assert term.wait_exit() == 0
        assert "Traceback" not in term.screen()
    finally:
        term.close()


def test_cluster_shows_the_heads_rate_after_an_answer(chat_cluster):
    """/cluster after an answer shows the head at that answer's rate; it showed 0.0 tokens/s once a telemetry
    interval (1 s) without work had passed."""
    term = _chat(chat_cluster)
    try:
        term.type("Write a haiku about the sea.")
        term.keys("Enter")
        screen = term.wait_for(lambda s: _answers(s) == 1, "an answer")
        chat_rate = float(re.search(r"^\d+ tokens · ([\d.]+) tokens/s", screen, re.M).group(1))
        time.sleep(3)  # a few telemetry intervals without work pass
        term.type("/cluster")
        term.keys("Enter")
        row = re.compile(r"^│ agent-0 +│ ready +│ head +│.*│ +([\d.]+) │$", re.M)
        screen = term.wait_for(lambda s: row.search(s.rsplit("/cluster", 1)[-1]), "the head in the /cluster table")
        rate = float(row.search(screen.rsplit("/cluster", 1)[-1]).group(1))
        assert chat_rate / 2 <= rate <= chat_rate * 2, (rate, chat_rate)
    finally:
        term.close()


def test_piped_input_is_read_line_by_line_and_sigint_at_the_prompt_exits_0(chat_cluster):
    """Without a terminal the chat reads standard input line by line (scripts and tests pipe it); SIGINT while it
    waits for a line ends it with 0 and no traceback."""
    proc = subprocess.run(
        [*HOMERING, "chat", "--broker", str(chat_cluster.broker), "--temperature", "0", "--max-tokens", "16"],
        input="Hi!\n/reset\n/quit\n",
        capture_output=True,
        text=True,
        timeout=READY_S + ANSWER_S,
    )
    assert proc.returncode == 0, proc.stderr
    assert _answers(proc.stdout) == 1, proc.stdout
    assert "forgot the conversation (1 exchange(s))" in proc.stdout
    with subprocess.Popen(
        [*HOMERING, "chat", "--broker", str(chat_cluster.broker)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as chat:
        try:
            deadline = time.monotonic() + READY_S
            seen = ""
            while "you>" not in seen:  # the prompt (not followed by a newline: read it byte by byte)
                assert time.monotonic() < deadline and chat.poll() is None, seen
                seen += os.read(chat.stdout.fileno(), 1).decode(errors="replace")
            chat.send_signal(signal.SIGINT)
            out, err = chat.communicate(timeout=60)
        finally:
            if chat.poll() is None:
                chat.kill()
    assert chat.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_work_rate_is_that_of_the_last_run_of_work():
    """The telemetry's rate: of the current run while it goes on, of the last one while idle, never diluted by a
    pause (the agents' tokens_per_s; see the /cluster test)."""
    r = WorkRate()
    assert r.per_s() == 0.0
    for i in range(21):  # 20 tokens/s for a second
        r.add(1, now=100.0 + i * 0.05)
    assert r.per_s() == pytest.approx(20.0)
    assert r.per_s() == pytest.approx(20.0)  # idle: still the last run's
    r.restart()  # a request arrives at an idle head
    r.add(1, now=200.0)
    assert r.per_s() == pytest.approx(20.0)  # one event is no rate yet
    r.add(1, now=200.1)
    assert r.per_s() == pytest.approx(10.0)
    r.add(1, now=260.0)  # a long pause: a new run (without restart, as on agents that are not the head)
    r.add(1, now=260.5)
    assert r.per_s() == pytest.approx(2.0)
    slow = WorkRate()
    for i in range(5):  # a slow ring: 5 s per token is one run
        slow.add(1, now=i * 5.0)
    assert slow.per_s() == pytest.approx(0.2)
