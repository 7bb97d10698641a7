"""The command line as a package (homering/cli/): its entry points, every command's help, usage errors in one
line with exit code 2, and a startup that imports no heavy module."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from homering.cli import cli
from homering.cli.options import Duration

ROOT = Path(__file__).resolve().parent.parent


def _homering(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "homering", *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
    )


def _commands(group: click.Group = cli, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [path]
    for name in sorted(group.list_commands(click.Context(group))):
        cmd = group.get_command(click.Context(group), name)
        if isinstance(cmd, click.Group):
            out += _commands(cmd, (*path, name))
        else:
            out.append((*path, name))
    return out


def test_the_console_script_is_main_and_python_m_homering_runs_it():
    (script,) = entry_points(group="console_scripts", name="homering")
    assert script.value == "homering.cli:main"
    assert callable(script.load())
    proc = _homering("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("homering, version ")


def test_every_command_is_registered_and_its_help_works():
    paths = _commands()
    assert {" ".join(p) for p in paths} >= {
        "",
        "agent",
        "controller",
        "broker",
        "chat",
        "up",
        "profile",
        "plan",
        "models",
        "models list",
        "models pull",
        "models synth",
        "bench",
        "bench decode",
        "bench concurrent",
        "bench faults",
        "bench plan",
        "bench cluster",
        "bench grammar",
        "testbed",
        "testbed up",
        "testbed down",
        "testbed run",
        "healthcheck",
    }
    for path in paths:
        for flag in ("--help", "-h"):
            result = CliRunner().invoke(cli, [*path, flag], prog_name="homering")
            assert result.exit_code == 0, (path, result.output)
            assert result.output.startswith(f"Usage: homering {' '.join(path)}".rstrip() + " ")
    assert "broker" not in CliRunner().invoke(cli, ["--help"]).output.split("Commands:")[1]  # hidden


@pytest.mark.parametrize(
    "args, message",
    [
        (["up", "--raw"], "--raw and --json go with --prompt (see 'homering up --help')"),
        (["up", "--no-chat"], "--no-chat needs --api-port"),
        (["up", "--user", "bob", "--ca-file", "x"], "--user and --ca-file go with --broker"),
        (["agent", "--model", "pyproject.toml", "--no-local-model"], "--model and --no-local-model exclude each other"),
        (["bench", "faults", "--kill-every", "0"], "'0' must be positive"),
        (["testbed", "run", "--spec", "nowhere.yaml", "--json"], "--json goes with --prompt"),
        (["healthcheck", "--port", "0"], "'--port'"),
        (["nosuch"], "No such command 'nosuch'"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(args, message):
    proc = _homering(*args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.startswith("homering: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr


def test_durations():
    d = Duration()
    assert [d.convert(v, None, None) for v in ("10s", "500ms", "2m", "1h", "3", 1.5)] == [10, 0.5, 120, 3600, 3, 1.5]
    for bad in ("0", "-1s", "soon"):
        with pytest.raises(click.BadParameter):
            d.convert(bad, None, None)


def test_importing_the_command_line_imports_no_heavy_module():
    """Startup time: the commands import what they need when they run."""
    code = textwrap.dedent("""
        import sys
        import homering.cli
        heavy = ("rich", "pydantic", "llama_cpp", "numpy", "aiomqtt", "fastapi", "yaml", "pulp")
        print(sorted(m for m in sys.modules if m.split(".")[0] in heavy or m.startswith((
            "homering.controller", "homering.agent", "homering.client", "homering.testbed", "homering.bench",
            "homering.wire", "homering.transport", "homering.engine"))))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("flags", "expected"), [((), ("-q",)), (("-v",), ("-v",)), (("-v", "-v"), ("-v", "-v")), (("-q",), ("-q", "-q"))]
)
def test_bench_passes_its_verbosity_to_the_clusters_it_starts(monkeypatch, flags, expected):
    """`homering -v bench speculative|cluster …` starts the testbed's agents and controllers at -v (the head then
    logs every speculative trip), the default one step quieter; the flags reach their command lines."""
    import homering.bench.cluster as bench_cluster
    import homering.bench.speculative as bench_speculative
    from homering.bench.cluster import ClusterBench
    from homering.bench.cluster_runs import RunConfig

    seen: dict[str, tuple[str, ...]] = {}
    monkeypatch.setattr(bench_speculative, "run_speculative_bench", lambda *a, **k: seen.update(spec=k["log_args"]))
    monkeypatch.setattr(bench_cluster, "run_cluster_bench", lambda *a, **k: seen.update(cluster=k["log_args"]))
    spec = str(ROOT / "examples" / "clusters" / "home4.yaml")
    for cmd in (["bench", "speculative", "--spec", spec], ["bench", "cluster", "--spec", spec]):
        result = CliRunner().invoke(cli, [*flags, *cmd])
        assert result.exit_code == 0, result.output
    assert seen == {"spec": expected, "cluster": expected}

    class Testbed:  # what the command lines read of a testbed
        def address(self, dev: str) -> str:
            return "10.0.0.2"

    bench = object.__new__(ClusterBench)  # its argv only: no testbed, no model
    bench.tb, bench.log_args, bench.model_path, bench.n_ctx, bench.batch, bench.timeout = (
        Testbed(), expected, Path("m.gguf"), 128, 64, 60.0
    )  # fmt: skip
    agent = bench._agent_argv(RunConfig("halda", "halda", planner="halda"), "mqtt://x:1883", "d1")
    controller = bench._controller_argv(RunConfig("halda", "halda", planner="halda"), "mqtt://x:1883", 4)
    for argv in (agent, controller):
        assert argv[3 : 3 + len(expected)] == list(expected) and argv[3 + len(expected)] in ("agent", "controller")
