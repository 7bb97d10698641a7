"""stdout is the command's result alone: libraries' prints and progress go to stderr (real subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

PRIMA = Path(__file__).resolve().parents[1] / "examples" / "clusters" / "prima-home4.json"


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def test_raw_writes_to_fd_1_go_to_the_log_or_nowhere_and_sys_stdout_stays_clean():
    """The mechanism, independent of which library prints: C-level writes to fd 1 after reserve_stdout()."""
    for to_log in (True, False):
        code = textwrap.dedent(f"""
            import os, subprocess, sys
            from homering.stdio import reserve_stdout
            reserve_stdout(stray_to_log={to_log})
            os.write(1, b"a banner on fd 1\\n")
            subprocess.run(["echo", "a child's stdout"])
            print('{{"result": 1}}')
        """)
        proc = _run("-c", code)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == {"result": 1}
        assert ("a banner on fd 1" in proc.stderr) is to_log and ("a child's stdout" in proc.stderr) is to_log
        assert "banner" not in proc.stdout


def test_plan_json_is_the_whole_of_stdout_and_the_solver_banner_is_not_in_it():
    """HiGHS >= 1.16 prints a banner on fd 1 when a solver is made; `plan --json` stays one JSON document."""
    proc = _run("-m", "homering", "plan", "--cluster", str(PRIMA), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # the whole of stdout
    assert doc["planner"] == "halda" and doc["devices"]
    verbose = _run("-m", "homering", "-v", "plan", "--cluster", str(PRIMA), "--json")
    assert json.loads(verbose.stdout)["devices"] == doc["devices"]
    from importlib.metadata import version

    if tuple(int(x) for x in version("highspy").split(".")[:2]) >= (1, 16):
        # with -v the banner is in the log; by default it goes nowhere
        assert "Running HiGHS" in verbose.stderr and "Running HiGHS" not in proc.stderr


def test_up_prompt_raw_prints_only_the_answer_and_shows_progress_on_stderr(smollm2):
    proc = _run(
        "-m",
        "homering",
        "up",
        "--agents",
        "2",
        "--model",
        str(smollm2),
        "--threads",
        "1",
        "--prompt",
        "The capital of France is",
        "--raw",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "no answer on stdout"
    for noise in ("·", "ready in", "WARNING", "INFO", "Running HiGHS", "planning"):
        assert noise not in proc.stdout
    assert "ready in" in proc.stderr  # the progress lines, on stderr


def test_up_with_its_api_port_taken_stops_everything_and_exits_at_once(smollm2):
    """The controller cannot listen: `up` says so and exits non-zero; no broker or agent is left behind."""
    import os
    import signal
    import socket
    import uuid

    from tests.test_chat_terminal import _processes_marked

    mark = uuid.uuid4().hex
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "homering",
                "up",
                "--agents",
                "2",
                "--model",
                str(smollm2),
                "--threads",
                "1",
                "--api-port",
                str(port),
                "--no-chat",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "HOMERING_TEST_MARK": mark},
        )
        try:
            out, err = proc.communicate(timeout=120)  # a hang guard: it used to wait 301 s
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode not in (0, None)
    assert f"127.0.0.1:{port}" in err and "homering: error:" in err
    assert out == ""
    try:  # every child was in up's process group: none is left
        os.killpg(proc.pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive, "a broker, controller or agent of `up` outlived it"
    # the broker (mosquitto) has a session of its own (Ctrl-C is the chat's): every child inherited the mark
    assert not _processes_marked(mark), "a broker, controller or agent of `up` outlived it"
