"""``homering profile``: measure this device for a model."""

from __future__ import annotations

import click

from homering.cli.options import MODEL_OPTION


@click.command()
@MODEL_OPTION
@click.option(
    "--threads",
    "-t",
    type=click.IntRange(1, 512),
    default=None,
    help="llama.cpp threads to time with [default: all cores but one].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the profile as one JSON object.")
@click.option("--refresh", is_flag=True, help="Measure again even if a cached profile exists.")
def profile(model, threads, as_json, refresh) -> None:
    """Measure this device for a model and print its profile (what the agent publishes).

    RAM available to homering (cgroup limits included), the window cache's
    disk read speed, and decode time per layer and of the output head on the
    CPU (and the GPU, if llama.cpp has one). The slow figures are cached per
    device and model under <home>/profiles; --refresh measures them again.
    """
    from rich.console import Console

    from homering.client.local import default_threads
    from homering.models.registry import resolve_model
    from homering.profiler import profile_device

    path = resolve_model(model)
    with Console(stderr=True).status("profiling this device") as status:
        prof = profile_device(
            path, threads=threads or default_threads(), refresh=refresh, progress=lambda msg: status.update(msg)
        )
    if as_json:
        click.echo(prof.model_dump_json(indent=2))
    else:
        _print_profile(prof, path)


def _print_profile(prof, model_path) -> None:
    """A rich table of a :class:`~homering.profiler.profile.DeviceProfile`."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"device profile for {model_path.name}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("os", prof.os)
    table.add_row("RAM available to homering", f"{prof.ram_gib:.2f} GiB")
    table.add_row("disk read", f"{prof.disk_gbps:.2f} GB/s")
    threads = f"{prof.threads} thread" + ("" if prof.threads == 1 else "s")
    table.add_row("CPU decode per layer", f"{prof.cpu_ms_per_layer:.3f} ms ({threads})")
    table.add_row("CPU output head", f"{prof.cpu_ms_output:.3f} ms")
    if prof.gpu is None:
        table.add_row("GPU", "none")
    else:
        table.add_row("GPU free VRAM", f"{prof.gpu.vram_gib:.2f} GiB" + (" (unified)" if prof.gpu.unified else ""))
        table.add_row("GPU decode per layer", f"{prof.gpu.ms_per_layer:.3f} ms")
    table.add_row("model fingerprint", prof.model_fingerprint or "-")
    # the same facts as --json: profile_ms (the measurement's time, kept in the cache) and cached
    took = f"{(prof.profile_ms or 0) / 1000:.1f} s"
    table.add_row("measured in", f"{took}, cached (--refresh measures again)" if prof.cached else took)
    Console().print(table)
