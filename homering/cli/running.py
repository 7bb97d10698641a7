"""Running a command's long-lived coroutine: SIGTERM cancels it, and a watchdog can end it early."""

from __future__ import annotations

import asyncio
import signal


def run(coro) -> None:
    """Run a long-lived coroutine; SIGTERM cancels it so its cleanup (e.g. an "offline" status) runs."""

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None  # inside asyncio.run
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            await coro
        except asyncio.CancelledError:
            pass

    asyncio.run(main())


async def watch(coro, check):
    """Await ``coro``, calling ``check()`` every 0.5 s; whatever ``check`` raises (e.g. HomeringError:
    a cluster process exited) cancels ``coro`` and ends the command at once."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            check()
    finally:
        task.cancel()
