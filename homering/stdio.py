"""Standard output belongs to homering: what libraries print there goes to stderr.

Commands such as ``homering plan --json`` or ``homering up --prompt … --raw`` promise
that their stdout is exactly their result. Native libraries do not know that: HiGHS
1.16 prints its banner (``Running HiGHS 1.16.0 (git hash: …)``) on file descriptor 1
even with ``msg=False``, and a C library's ``printf`` never passes through Python's
``sys.stdout``. So the entry point moves the real standard output to a private file
descriptor for homering's own writes (``sys.stdout``, ``click.echo``, rich), and
points descriptor 1 at stderr, where the log is; once the verbosity is known, at
``/dev/null`` unless ``-v`` asked for more log (:func:`route_stray_output`). Child
processes inherit the same arrangement.
"""

from __future__ import annotations

import io
import os
import sys


_reserved = False


def reserve_stdout() -> None:
    """Keep the process's standard output for ``sys.stdout``; send raw writes to fd 1 to stderr.

    After the call ``sys.stdout`` writes to a duplicate of the original stdout, and
    file descriptor 1 is a duplicate of stderr (fd 2), so anything that writes to
    fd 1 directly (a solver's banner, a C ``printf``) lands beside the log. Call it
    once, at the start of the command line's entry point, before any library is
    imported that might print. Does nothing when stdout or stderr is closed or
    ``sys.stdout`` has no file descriptor (e.g. under a test runner's capture).
    """
    stream = sys.stdout
    if stream is None or sys.stderr is None:
        return
    try:
        if stream.fileno() != 1:
            return
        stream.flush()
        saved = os.dup(1)  # not inheritable: children get our stderr as their stdout
        os.dup2(2, 1)
    except (OSError, ValueError, io.UnsupportedOperation):
        return
    global _reserved
    _reserved = True
    sys.stdout = io.TextIOWrapper(io.FileIO(saved, "w", closefd=True), encoding=stream.encoding,
                                  errors=stream.errors, line_buffering=stream.line_buffering,
                                  write_through=True)


def route_stray_output(to_log: bool) -> None:
    """After :func:`reserve_stdout`: raw writes to fd 1 go to stderr (``to_log``) or to ``/dev/null``.

    The CLI calls it with ``to_log`` true at ``-v`` and above, so a solver's banner
    stays out of the chat and the default log. Does nothing if stdout was not reserved.
    """
    if not _reserved:
        return
    if to_log:
        os.dup2(2, 1)
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
    finally:
        os.close(null)
