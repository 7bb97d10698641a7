"""The device profiler: cgroup parsing on fake trees, disk probe, real profiles of SmolLM2, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import llama_cpp
import psutil
import pytest

from homering.profiler import (
    AGENT_RESERVE_BYTES,
    available_ram_bytes,
    cgroup_memory_headroom,
    detect_os,
    gpu_free_vram,
    measure_disk_gbps,
    profile_device,
    profiles_dir,
)
from homering.profiler.disk import DISK_PROBE_NAME
from homering.profiler.memory import V1_UNLIMITED, parse_proc_cgroup
from homering.wire import DeviceProfile

MiB, GiB = 1 << 20, 1 << 30
V1_NO_LIMIT = "9223372036854771712"  # what the kernel writes for "no limit" (x86-64)


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def homering(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "homering", *args], capture_output=True, text=True, timeout=300, env=env
    )


# ------------------------------------------------------------------ RAM / cgroups


def test_parse_proc_cgroup_hybrid_and_unified():
    hybrid = "9:name=systemd:/\n4:memory:/lxc/dev1\n2:cpu,cpuacct:/x\n0::/\n"
    assert parse_proc_cgroup(hybrid).v1_memory == "/lxc/dev1"
    assert parse_proc_cgroup(hybrid).v2 == "/"
    unified = parse_proc_cgroup("0::/system.slice/homering-agent.service\n")
    assert (unified.v1_memory, unified.v2) == (None, "/system.slice/homering-agent.service")


def test_cgroup_v2_limit_and_tighter_parent(tmp_path):
    cg = "sys/fs/cgroup/homering/dev1"
    root = write_tree(
        tmp_path,
        {
            "proc/self/cgroup": "0::/homering/dev1\n",
            "sys/fs/cgroup/cgroup.controllers": "cpu memory\n",
            f"{cg}/memory.max": f"{GiB}\n",
            f"{cg}/memory.current": f"{300 * MiB}\n",
            f"{cg}/memory.stat": f"anon {200 * MiB}\nfile {100 * MiB}\ninactive_file {40 * MiB}\nactive_file 7\n",
            "sys/fs/cgroup/homering/memory.max": "max\n",
        },
    )
    assert cgroup_memory_headroom(root) == GiB - 300 * MiB + 40 * MiB + 7  # page cache is reclaimable
    # a cgroup limit below what the machine has available wins, minus the agent's reserve,
    # which on a small device is an eighth of what is available
    headroom = GiB - 260 * MiB + 7
    assert available_ram_bytes(root=root) == headroom - headroom // 8
    assert available_ram_bytes(root=root, reserve=50 * MiB) == headroom - 50 * MiB
    # a big device keeps the full reserve back
    write_tree(root, {f"{cg}/memory.max": f"{4 * GiB}\n"})
    assert available_ram_bytes(root=root) == 4 * GiB - 260 * MiB + 7 - AGENT_RESERVE_BYTES
    write_tree(root, {f"{cg}/memory.max": f"{GiB}\n"})
    # a parent's limit binds its children
    write_tree(
        root,
        {
            "sys/fs/cgroup/homering/memory.max": f"{512 * MiB}\n",
            "sys/fs/cgroup/homering/memory.current": f"{500 * MiB}\n",
        },
    )
    assert cgroup_memory_headroom(root) == 12 * MiB
    assert available_ram_bytes(root=root) == 0  # less than the smallest reserve
    write_tree(root, {"sys/fs/cgroup/homering/memory.current": f"{300 * MiB}\n"})
    assert available_ram_bytes(root=root) == 212 * MiB - 64 * MiB  # the smallest reserve: 64 MiB
    # the agent's own code and libraries are page cache in use: not available
    write_tree(root, {"proc/self/status": "Name:\tpython\nRssAnon:\t  1000 kB\nRssFile:\t   2048 kB\n"})
    assert available_ram_bytes(root=root) == 210 * MiB - 64 * MiB
    write_tree(root, {"sys/fs/cgroup/homering/memory.current": f"{600 * MiB}\n"})
    assert available_ram_bytes(root=root) == 0  # over the limit: never negative


def test_cgroup_v2_max_means_no_limit(tmp_path):
    root = write_tree(
        tmp_path,
        {
            "proc/self/cgroup": "0::/user.slice\n",
            "sys/fs/cgroup/cgroup.controllers": "memory\n",
            "sys/fs/cgroup/user.slice/memory.max": "max\n",
            "sys/fs/cgroup/user.slice/memory.current": f"{GiB}\n",
        },
    )
    assert cgroup_memory_headroom(root) is None
    ram = available_ram_bytes(root=root, reserve=0)
    assert 0 < ram <= psutil.virtual_memory().total


def test_cgroup_cpu_quota_v1_and_v2(tmp_path):
    from homering.profiler.memory import cgroup_cpu_quota

    v1 = write_tree(
        tmp_path / "v1",
        {
            "proc/self/cgroup": "4:memory:/tb/d4\n2:cpu,cpuacct:/tb/d4\n0::/\n",
            "sys/fs/cgroup/cpu,cpuacct/tb/d4/cpu.cfs_quota_us": "4250\n",
            "sys/fs/cgroup/cpu,cpuacct/tb/d4/cpu.cfs_period_us": "10000\n",
            "sys/fs/cgroup/cpu,cpuacct/tb/cpu.cfs_quota_us": "-1\n",  # no limit on the parent
            "sys/fs/cgroup/cpu,cpuacct/tb/cpu.cfs_period_us": "100000\n",
        },
    )
    (v1 / "proc/self/mountinfo").write_text(
        "30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
    )
    assert cgroup_cpu_quota(v1) == pytest.approx(0.425)
    v2 = write_tree(
        tmp_path / "v2",
        {
            "proc/self/cgroup": "0::/a/b\n",
            "sys/fs/cgroup/cgroup.controllers": "cpu memory\n",
            "sys/fs/cgroup/a/b/cpu.max": "max 100000\n",
            "sys/fs/cgroup/a/cpu.max": "150000 100000\n",  # a parent's quota binds its children
        },
    )
    assert cgroup_cpu_quota(v2) == pytest.approx(1.5)
    write_tree(v2, {"sys/fs/cgroup/a/cpu.max": "max 100000\n"})
    assert cgroup_cpu_quota(v2) is None


def test_cgroup_v1_limit_on_a_hybrid_host(tmp_path):
    cg = "sys/fs/cgroup/memory/lxc/dev1"
    root = write_tree(
        tmp_path,
        {
            "proc/self/cgroup": "9:name=systemd:/\n4:memory:/lxc/dev1\n0::/\n",
            f"{cg}/memory.limit_in_bytes": f"{2 * GiB}\n",
            f"{cg}/memory.usage_in_bytes": f"{1536 * MiB}\n",
            f"{cg}/memory.stat": f"inactive_file {MiB}\ntotal_inactive_file {512 * MiB}\n",
            "sys/fs/cgroup/memory/lxc/memory.limit_in_bytes": V1_NO_LIMIT + "\n",
            "sys/fs/cgroup/memory/lxc/memory.usage_in_bytes": f"{20 * GiB}\n",
            "sys/fs/cgroup/unified/cgroup.procs": "1\n",  # v2 without the memory controller
        },
    )
    assert cgroup_memory_headroom(root) == GiB  # total_inactive_file counts, not inactive_file


def test_cgroup_v1_huge_limit_means_no_limit(tmp_path):
    assert int(V1_NO_LIMIT) >= V1_UNLIMITED
    root = write_tree(
        tmp_path,
        {
            "proc/self/cgroup": "4:memory:/docker/abc\n",
            "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes": V1_NO_LIMIT + "\n",
            "sys/fs/cgroup/memory/docker/abc/memory.usage_in_bytes": f"{GiB}\n",
        },
    )
    assert cgroup_memory_headroom(root) is None


def test_cgroup_v1_container_sees_its_cgroup_at_the_mount_point(tmp_path):
    # no cgroup namespace: /proc/self/cgroup names /docker/abc, mounted at .../memory itself
    root = write_tree(
        tmp_path,
        {
            "proc/self/cgroup": "4:memory:/docker/abc\n",
            "proc/self/mountinfo": (
                "35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
            ),
            "sys/fs/cgroup/memory/memory.limit_in_bytes": f"{GiB}\n",
            "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{256 * MiB}\n",
            "sys/fs/cgroup/memory/memory.stat": "total_inactive_file 0\n",
        },
    )
    assert cgroup_memory_headroom(root) == 768 * MiB


def test_no_cgroup_files_means_no_limit(tmp_path):
    assert cgroup_memory_headroom(tmp_path) is None
    assert available_ram_bytes() <= psutil.virtual_memory().total  # the real system


# ------------------------------------------------------------------ disk, OS, GPU


def test_disk_probe_leaves_no_file_behind(tmp_path):
    """The scratch file goes once read; the file earlier versions kept (256 MiB in every agent's home) and
    a probe file of a process that died go at the next measurement; a live process's probe stays."""
    window = tmp_path / "fp" / "0-30-first.f2.gguf"
    window.parent.mkdir()
    window.write_bytes(b"window")
    assert measure_disk_gbps(tmp_path, size_bytes=8 * MiB) > 0
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["fp", "fp/0-30-first.f2.gguf"]

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    legacy, orphan = tmp_path / DISK_PROBE_NAME, tmp_path / f".homering-disk-probe.{int(dead.stdout)}.0a1b2c3d.bin"
    live = tmp_path / f".homering-disk-probe.{os.getppid()}.0a1b2c3d.bin"
    for p in (legacy, orphan, live):
        p.write_bytes(b"\0" * MiB)
    assert measure_disk_gbps(tmp_path, size_bytes=4 * MiB) > 0
    assert not legacy.exists() and not orphan.exists() and live.exists()
    live.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp"]
    with pytest.raises(ValueError):
        measure_disk_gbps(tmp_path, size_bytes=1000)


def test_os_detection(monkeypatch):
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("ANDROID_ROOT", "/system")
        assert detect_os() == "android"
        monkeypatch.delenv("ANDROID_ROOT")
        assert detect_os() == ("android" if Path("/system/build.prop").exists() else "linux")


def test_no_gpu_means_no_vram():
    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this machine has a GPU backend")
    assert gpu_free_vram() is None


# ------------------------------------------------------------------ real profiles


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty HOMERING_HOME (profile cache, window cache, disk probe)."""
    path = tmp_path / "home"
    monkeypatch.setenv("HOMERING_HOME", str(path))
    return path


def test_profile_measures_then_caches_then_refreshes(smollm2, home):
    messages = []
    first = profile_device(smollm2, threads=1, disk_bytes=32 * MiB, progress=messages.append)
    assert first.os in ("linux", "android", "macos")
    assert 0 < first.ram_gib <= psutil.virtual_memory().total / GiB
    assert first.disk_gbps > 0 and first.cpu_ms_per_layer > 0 and first.cpu_ms_output >= 0
    assert first.threads == 1 and first.profile_ms > 0 and not first.cached
    assert first.link_ms == 0 and first.link_mbps == 0
    if not llama_cpp.llama_supports_gpu_offload():
        assert first.gpu is None
    assert len(first.model_fingerprint) == 16
    assert any("disk" in m for m in messages) and any("decode" in m for m in messages)
    assert not [p for p in (home / "windows").rglob("*") if "disk-probe" in p.name]  # measured, then removed
    assert len(list(profiles_dir().glob("*.json"))) == 1

    cached = profile_device(smollm2, threads=1, disk_bytes=32 * MiB)
    assert cached.cached and cached.profile_ms == first.profile_ms  # the measurement's time, kept
    slow = ("disk_gbps", "cpu_ms_per_layer", "cpu_ms_output", "gpu", "model_fingerprint", "threads")
    assert cached.model_dump(include=set(slow)) == first.model_dump(include=set(slow))

    refreshed = profile_device(smollm2, threads=1, disk_bytes=32 * MiB, refresh=True)
    assert refreshed.profile_ms > 0 and not refreshed.cached
    assert refreshed.cpu_ms_per_layer != first.cpu_ms_per_layer  # measured again (floats never repeat)
    again = profile_device(smollm2, threads=1, disk_bytes=32 * MiB)
    assert again.cached and again.profile_ms == refreshed.profile_ms
    assert again.cpu_ms_per_layer == refreshed.cpu_ms_per_layer

    # another thread count is another device key: measured, cached beside the first
    assert not profile_device(smollm2, threads=2, disk_bytes=32 * MiB).cached
    assert len(list(profiles_dir().glob("*.json"))) == 2

    # the CLI (its own process) finds the cached profile and prints a DeviceProfile
    proc = homering("profile", "--model", str(smollm2), "--threads", "1", "--json", env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    printed = DeviceProfile.model_validate_json(proc.stdout)
    assert printed.cached and printed.profile_ms == refreshed.profile_ms
    assert printed.cpu_ms_per_layer == refreshed.cpu_ms_per_layer


def test_concurrent_profilers_measure_once(smollm2, home):
    script = (
        "import sys; from homering.profiler import profile_device; "
        f"print(profile_device(sys.argv[1], threads=1, disk_bytes={16 * MiB}).model_dump_json())"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(smollm2)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )
        for _ in range(2)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        outs.append(DeviceProfile.model_validate_json(out))
    # one measured; the other waited for the lock, then read the cache
    assert sorted(o.cached for o in outs) == [False, True]
    assert outs[0].profile_ms == outs[1].profile_ms > 0  # the one measurement's time
    assert outs[0].cpu_ms_per_layer == outs[1].cpu_ms_per_layer


def test_profile_cli_table_and_json_agree(smollm2, home):
    """`homering profile` measures (the table says how long), then --json and the table again read the
    cache: all three give the same measurement time, and both cached outputs say cached. No disk probe
    file is left in the window cache."""
    env = dict(os.environ, COLUMNS="100")
    args = ("profile", "--model", str(smollm2), "--threads", "1")

    def took(table: str) -> str:
        row = next(line for line in table.splitlines() if "measured in" in line)
        return row.split("measured in", 1)[1].strip(" │|")

    measured = homering(*args, env=env)
    assert measured.returncode == 0, measured.stderr
    as_json = homering(*args, "--json", env=env)
    assert as_json.returncode == 0, as_json.stderr
    again = homering(*args, env=env)
    assert again.returncode == 0, again.stderr

    printed = DeviceProfile.model_validate_json(as_json.stdout)
    seconds = f"{printed.profile_ms / 1000:.1f} s"
    assert printed.cached and printed.profile_ms > 0
    assert took(measured.stdout) == seconds, measured.stdout  # measured now: not "cached"
    assert took(again.stdout) == f"{seconds}, cached (--refresh measures again)", again.stdout
    assert not [p for p in home.rglob("*") if "disk-probe" in p.name]


def test_profile_cli_bad_model_is_one_line(tmp_path):
    for model, needle in (("llama-9000", "unknown model"), (str(tmp_path / "nope.gguf"), "not found")):
        proc = homering("profile", "--model", model, "--json")
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("homering: error:") and needle in lines[0], proc.stderr
        assert proc.stdout == ""


def test_probe_windows_fit_in_the_devices_ram():
    """The probe must time the CPU, not the disk: its windows stay within half the available RAM."""
    from pathlib import Path

    from homering.models.gguf_info import ModelInfo
    from homering.models.slicing import Role, WindowSpec
    from homering.profiler.compute import PROBE_RAM_FRACTION, doubles, probe_plan, probe_specs

    layer, out = 57 * MiB, 85 * MiB  # Llama-3.2-3B Q4_0 layers, SmolLM2-sized head
    info = ModelInfo(
        path=Path("m.gguf"),
        arch="llama",
        n_layers=28,
        n_embd=3072,
        n_ctx_train=4096,
        name="m",
        fingerprint="f",
        size_bytes=28 * layer + out,
        layer_bytes=(layer,) * 28,
    )
    assert probe_plan(info, None, True) == (4, 4)  # no RAM figure: the usual probe
    assert probe_plan(info, 16 * GiB, True) == (4, 4)
    for ram in (120 * MiB, 281 * MiB, 355 * MiB, 606 * MiB, 1433 * MiB):
        n, n_out = probe_plan(info, ram, True)
        used = layer * n + ((2 * layer * n_out + out) if n_out else 0)
        assert n >= 1 and (used <= PROBE_RAM_FRACTION * ram or n == 1 and n_out is None)
    assert probe_plan(info, 281 * MiB, True)[1] is None  # a phone-sized device estimates the head
    assert probe_plan(info, 606 * MiB, True)[1] == 1
    assert probe_plan(info, 606 * MiB, False)[1] is None
    for ram in (120 * MiB, 281 * MiB, 355 * MiB, 606 * MiB, 1433 * MiB, 16 * GiB):
        n, n_out = probe_plan(info, ram, True)
        specs = probe_specs(info, n, n_out, doubles(info, ram, n, n_out))
        assert sum(s.end - s.start for s in specs) * layer + (out if n_out else 0) <= PROBE_RAM_FRACTION * ram or (
            len(specs) == 1  # the smallest probe there is
        )
    assert probe_specs(info, 4, 4, True)[-1] == WindowSpec(12, 20, Role.MIDDLE)  # 2n layers, from the same start


def test_a_layers_time_leaves_out_the_decode_calls_fixed_cost():
    """A decode call costs a fixed time besides its layers (graph, Python): a 1-layer probe (a Qwen3-30B-A3B
    layer fills the probe) would charge all of it to the layer. The n- and 2n-layer windows' difference does
    not; a burst of load on one window keeps it between half and all of the n-layer time per layer."""
    from homering.profiler.compute import _per_layer

    assert _per_layer([[2.4, 2.3, 2.35]], 1, double=False) == 2.35
    assert _per_layer([[2.3, 2.35, 2.4], [4.2, 4.25, 4.3]], 1, double=True) == pytest.approx(1.9)
    assert _per_layer([[8.0], [8.1]], 4, double=True) == 1.0  # not free: half the whole
    assert _per_layer([[8.0], [30.0]], 4, double=True) == 2.0  # never dearer than the whole call per layer


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_measuring_ram_gives_the_freed_c_heap_back_first():
    """What llama.cpp freed stays in glibc's arenas (a profiled agent held 25-40 MiB more than one with a
    cached profile, and reported that much less RAM): measuring the RAM first returns those pages, so a
    device reports the same RAM whether it profiled or not."""
    import ctypes

    from homering.profiler.memory import release_free_heap

    if not release_free_heap():
        pytest.skip("no malloc_trim in this C library")
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def anon() -> int:
        return psutil.Process().memory_full_info().uss

    # 8 MiB in blocks below the mmap threshold (in the heap), each followed by a pin, so that freeing the
    # blocks leaves holes that glibc does not give back by itself (it trims only the heap's top)
    blocks, pins = [], []
    for _ in range(128):
        blocks.append(libc.malloc(64 << 10))
        pins.append(libc.malloc(64 << 10))
        ctypes.memset(blocks[-1], 1, 64 << 10)
    for b in blocks:
        libc.free(b)
    before = anon()
    available_ram_bytes()
    after = anon()
    for p in pins:
        libc.free(p)
    assert before - after > 4 << 20
