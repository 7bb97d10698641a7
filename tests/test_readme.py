"""The README stays true: the intervals and timeouts it names are the code's, and every `homering …` command
line it shows names subcommands and options that exist (per their --help)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from homering.cli import cli

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
TEXT = " ".join(README.split())  # prose wraps anywhere


def said(pattern: str) -> float:
    """The one number the README says where ``pattern`` (a regex with one group, on the unwrapped text) is."""
    found = re.findall(pattern, TEXT)
    assert len(found) == 1, f"the README should say {pattern!r} once, found {found}"
    return float(found[0])


def test_readme_intervals_and_timeouts_are_the_codes():
    from homering.agent import agent
    from homering.controller import controller, membership
    from homering.transport import windows
    from homering.wire import security

    assert said(r"Agents publish their telemetry every ([\d.]+) s") == agent.STATS_INTERVAL_S
    assert said(r"the controller every ([\d.]+) s on `homering/controller/stats`") == controller.STATS_INTERVAL_S
    assert agent.STATS_INTERVAL_S == 1.0 and "(`AgentStats` every second;" in TEXT
    assert said(r"silent for ([\d.]+) s counts as lost") == membership.LOST_AFTER_S
    assert said(r"keepalive ([\d.]+) s\)") == agent.KEEPALIVE_S
    assert said(r"within ([\d.]+) s plus \d+ times the plan's prediction") == agent.RING_STALL_MIN_S
    assert said(r"within [\d.]+ s plus (\d+) times the plan's prediction") == agent.RING_STALL_FACTOR
    assert said(r"after it has stayed up ([\d.]+) s") == membership.JOIN_HOLD_S
    assert said(r"doubling with each loss in the last (\d+) minutes") * 60 == membership.FLAP_WINDOW_S
    assert said(r"doubling with each loss in the last \d+ minutes, up to (\d+) s") == membership.JOIN_HOLD_MAX_S
    assert said(r"clocks within (\d+) minutes") * 60 == security.MAX_AGE_S
    assert said(r"anything written in the last (\d+) minutes") * 60 == windows.CACHE_MIN_AGE_S


def test_readme_says_when_an_agent_needs_the_model_file():
    """No "every agent needs the model file" left: with --api-port the controller serves the windows."""
    assert not re.search(r"[Ee]very agent needs the model", TEXT.replace("then every agent needs", ""))
    assert "A controller without `--api-port` serves no windows" in TEXT


# ------------------------------------------------------------------ commands and options


def command_lines() -> list[str]:
    """Every `homering …` command line in the README: inline code spans and lines of code blocks."""
    lines, prose = [], []
    in_block = False
    for raw in README.splitlines():
        if raw.startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            code = raw.split(" #", 1)[0].strip()
            code = re.sub(r"^(sudo|\$)\s+", "", code)
            if code.startswith("homering "):
                lines.append(code)
        else:
            prose.append(raw)
    spans = (" ".join(span.split()) for span in re.findall(r"`([^`]+)`", "\n".join(prose)))  # spans may wrap
    return lines + [span for span in spans if span.startswith(("homering ", "… --broker"))]


def help_of(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(cli, [*path, "--help"], prog_name="homering")
    assert result.exit_code == 0, (path, result.output)
    return result.output


def commands_of(path: tuple[str, ...]) -> list[str] | None:
    """The subcommands of the group at ``path`` (None: a command, not a group)."""
    import click

    cmd = cli
    for name in path:
        cmd = cmd.commands[name]
    return sorted(cmd.commands) if isinstance(cmd, click.Group) else None


def resolve(line: str) -> tuple[list[tuple[str, ...]], list[str]]:
    """(the command paths a README line names, the options it names)."""
    tokens = line.replace("\\|", "|").split()
    paths: list[tuple[str, ...]] = [()]
    rest = tokens[1:]
    while rest and commands_of(paths[0]) is not None:
        word = rest[0].strip("[]")
        names = word.split("|")
        subs = commands_of(paths[0])
        assert all(n in subs for n in names), f"`{line}`: no subcommand {word!r} of homering {' '.join(paths[0])}"
        paths = [(*p, n) for p in paths for n in names]
        rest = rest[1:]
    options = []
    for token in rest:
        for opt in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", token):
            options.append(opt)
    return paths, options


def test_every_command_line_in_the_readme_exists():
    lines = command_lines()
    assert len(lines) > 30, lines  # the commands table, the examples
    broker_commands = [("agent",), ("controller",), ("chat",), ("up",)]
    checked = 0
    for line in lines:
        if line.startswith("… --broker"):  # "on every command that takes --broker"
            paths, options = broker_commands, re.findall(r"(--[a-z][a-z0-9-]*)", line)
        else:
            paths, options = resolve(line)
            assert paths != [()], f"`{line}` names no subcommand"
        for path in paths:
            text = help_of(path)
            for opt in options:
                assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text), (
                    f"`{line}`: homering {' '.join(path)} has no option {opt}"
                )
                checked += 1
    assert checked > 50


@pytest.mark.parametrize(
    "line, problem",
    [
        ("homering up --no-such-option", "no option --no-such-option"),
        ("homering models frobnicate", "no subcommand 'frobnicate'"),
    ],
)
def test_the_readme_check_catches_a_wrong_command(line, problem):
    with pytest.raises(AssertionError, match=problem):
        paths, options = resolve(line)
        for path in paths:
            for opt in options:
                assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", help_of(path)), (
                    f"`{line}`: homering {' '.join(path)} has no option {opt}"
                )
