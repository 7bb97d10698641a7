"""Standard output belongs to homering: what libraries print there goes to the log or nowhere.

Commands such as ``homering plan --json`` or ``homering up --prompt … --raw`` promise
that their stdout is exactly their result. Native libraries do not know that: HiGHS
1.16 prints its banner (``Running HiGHS 1.16.0 (git hash: …)``) on file descriptor 1
even with ``msg=False``, and a C library's ``printf`` never passes through Python's
``sys.stdout``. So the command line moves the real standard output to a private file
descriptor for homering's own writes (``sys.stdout``, ``click.echo``, rich), and
points descriptor 1 at stderr, where the log is (with ``-v``), or at ``/dev/null``.
Child processes inherit the same arrangement.
"""

from __future__ import annotations

import io
import os
import sys


def reserve_stdout(stray_to_log: bool) -> None:
    """Keep the process's standard output for ``sys.stdout``; raw writes to fd 1 go to stderr or nowhere.

    After the call ``sys.stdout`` writes to a duplicate of the original stdout, and
    file descriptor 1 is a duplicate of stderr (``stray_to_log``) or of ``/dev/null``,
    so whatever writes to fd 1 directly (a solver's banner, a C ``printf``) lands in
    the log or is dropped. Call it once, before anything is planned or loaded. Does
    nothing when stdout or stderr is closed or ``sys.stdout`` is not fd 1 (e.g. under
    a test runner's capture).
    """
    stream = sys.stdout
    if stream is None or sys.stderr is None:
        return
    try:
        if stream.fileno() != 1:
            return
        stream.flush()
        saved = os.dup(1)  # not inheritable: children get our stderr (or nothing) as their stdout
        target = 2 if stray_to_log else os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(target, 1)
        finally:
            if target != 2:
                os.close(target)
    except (OSError, ValueError, io.UnsupportedOperation):
        return
    sys.stdout = io.TextIOWrapper(
        io.FileIO(saved, "w", closefd=True),
        encoding=stream.encoding,
        errors=stream.errors,
        line_buffering=bool(stream.line_buffering),
        write_through=True,
    )
