"""The emulated cluster: real network namespaces, veths, a bridge and cgroups (root on Linux only).

The spec tests run everywhere; the others need root, Linux and iproute2's ``ip`` and skip otherwise.
Every test uses its own testbed name, so they can run next to a testbed someone else has up.
"""

from __future__ import annotations

import gc
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from homering.errors import HomeringError
from homering.testbed import Testbed, down_all, load_spec, parse_bytes, parse_spec
from homering.testbed.broker import BROKER_PORT, port_open
from homering.testbed.cgroups import find_cgroups
from homering.testbed.netns import PREFIX, host_links, link_prefix, list_netns, which

ROOT = Path(__file__).resolve().parent.parent


def _can_run() -> str | None:
    if sys.platform != "linux":
        return "the testbed needs Linux"
    if os.geteuid() != 0:
        return "the testbed needs root (network namespaces, cgroups)"
    if which("ip") is None or which("tc") is None:
        return "the testbed needs iproute2 (ip, tc)"
    return None


needs_root = pytest.mark.skipif(_can_run() is not None, reason=_can_run() or "")


def unique(tag: str) -> str:
    """A testbed name nobody else uses (names are at most 20 characters)."""
    return f"t{tag}-{uuid.uuid4().hex[:6]}"


def spec(name: str, *devices: dict) -> object:
    return parse_spec({"name": name, "devices": list(devices)})


def leftovers(name: str) -> list[str]:
    """Everything of testbed ``name`` that still exists: netns, host links, cgroups."""
    found = [ns for ns in list_netns() if ns == PREFIX + name or ns.startswith(f"{PREFIX}{name}.")]
    found += [link for link in host_links() if link.startswith(link_prefix(name))]
    found += [str(p) for p in find_cgroups({name})]
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def disk_dir(tmp_path: Path) -> Path:
    """A folder on a disk-backed filesystem (not tmpfs: its pages stay charged to their writer)."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        mounts.append((left.split()[4], right.split()[0]))
    for cand in (tmp_path, Path("/var/tmp"), ROOT):
        real = os.path.realpath(cand)
        fstype = max(
            ((mp, fs) for mp, fs in mounts if (real + "/").startswith(mp.rstrip("/") + "/")), key=lambda m: len(m[0])
        )[1]
        if fstype not in ("tmpfs", "ramfs"):
            path = cand / f"testbed-{uuid.uuid4().hex[:8]}"
            path.mkdir()
            return path
    pytest.skip("no disk-backed folder for the page-cache test")


def swap_unaccounted(tb: Testbed, device: str) -> bool:
    """Swap is on but the device's cgroup cannot limit it (cgroup v1 booted with swapaccount=0)."""
    swap = int(
        next(
            line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("SwapTotal:")
        )
    )
    cgs = [Path(c) for c in tb.describe(device)["cgroups"]]
    v1 = [c for c in cgs if (c / "memory.limit_in_bytes").exists()]
    return swap > 0 and bool(v1) and not (v1[0] / "memory.memsw.limit_in_bytes").exists()


def cpu_cores(tb: Testbed, device: str) -> float | None:
    """The device's CPU quota in cores, as the kernel has it (cgroup v1 or v2)."""
    for cg in map(Path, tb.describe(device)["cgroups"]):
        if (cg / "cpu.cfs_quota_us").exists():
            return int((cg / "cpu.cfs_quota_us").read_text()) / int((cg / "cpu.cfs_period_us").read_text())
        if (cg / "cpu.max").exists():
            quota, period = (cg / "cpu.max").read_text().split()
            return int(quota) / int(period)
    return None


def run_in(tb: Testbed, device: str | None, code: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run Python ``code`` in a device; return its exit code and output."""
    p = tb.spawn(device, [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out.decode(), err.decode())


# ---------------------------------------------------------------- (a) addresses and connectivity
@needs_root
def test_devices_have_their_own_addresses_and_reach_each_other_and_the_broker(tmp_path):
    name = unique("net")
    s = spec(
        name,
        {"name": "a", "ram": "128MiB", "cpus": 0.5, "rate_mbit": 200, "delay_ms": 2, "jitter_ms": 0.5},
        {"name": "b", "ram": "96MiB", "cpus": 1},
    )
    with Testbed(s, workdir=tmp_path / "tb") as tb:
        a, b = tb.address("a"), tb.address("b")
        assert a != b and tb.bridge_address not in (a, b) and tb.host_address not in (a, b)
        assert tb.shaping in ("netem", "nfqueue")  # nfqueue when the kernel lacks sch_netem
        assert tb.describe("b")["shaping"] == "none"

        # a process in A sees A's address on its interface, and not B's
        p = tb.spawn("a", [which("ip"), "-o", "-4", "addr", "show"], stdout=subprocess.PIPE)
        out = p.communicate(timeout=10)[0].decode()
        assert f"inet {a}/" in out and f"inet {b}/" not in out, out

        # the limits were written
        assert tb.memory_limit("a") == 128 << 20 and tb.memory_limit("b") == 96 << 20
        if not any("cpu cgroup controller" in w for w in tb.warnings):
            assert cpu_cores(tb, "a") == 0.5 and cpu_cores(tb, "b") == 1.0

        # a server in B on B's address, a client in A
        server = tb.spawn(
            "b",
            [
                sys.executable,
                "-c",
                textwrap.dedent(f"""
            import socket
            s = socket.create_server(({b!r}, 7000))
            print("listening", flush=True)
            c, peer = s.accept()
            c.sendall(b"pong " + c.recv(64) + b" from " + peer[0].encode())
            """),
            ],
            stdout=subprocess.PIPE,
        )
        assert server.stdout.readline() == b"listening\n"
        client = run_in(
            tb,
            "a",
            f"""
            import socket
            with socket.create_connection(({b!r}, 7000), timeout=5) as c:
                c.sendall(b"ping")
                print(c.recv(64).decode())
            """,
        )
        assert client.returncode == 0, client.stderr
        assert client.stdout.strip() == f"pong ping from {a}"
        server.wait(10)

        # the broker in the bridge namespace: reachable from a device and from the host
        url = tb.start_broker()
        assert url == f"mqtt://{tb.bridge_address}:{BROKER_PORT}"
        probe = run_in(
            tb,
            "b",
            f"""
            import socket
            socket.create_connection(({tb.bridge_address!r}, {BROKER_PORT}), timeout=5).close()
            """,
        )
        assert probe.returncode == 0, probe.stderr
        assert port_open(tb.bridge_address, BROKER_PORT)
        assert tb.pids(None)  # the broker runs in the bridge namespace
    assert leftovers(name) == []


# ---------------------------------------------------------------- (b) memory limits
@needs_root
def test_memory_limit_kills_a_hog_and_counts_the_page_cache(tmp_path, request):
    name = unique("mem")
    limit = 64 << 20
    s = spec(name, {"name": "hog", "ram": limit, "cpus": 1}, {"name": "reader", "ram": limit, "cpus": 1})
    workdir = tmp_path / "tb"
    with Testbed(s, workdir=workdir) as tb:
        # 256 MiB, every page written, in a 64 MiB device: the cgroup's OOM killer ends it
        if not swap_unaccounted(tb, "hog"):
            hog = run_in(tb, "hog", "b = b'x' * (256 << 20)\nprint('survived')")
            assert hog.returncode == -signal.SIGKILL, (hog.returncode, hog.stdout, hog.stderr)
            assert "survived" not in hog.stdout
            assert tb.oom_kills("hog") >= 1
            assert tb.memory_usage("hog") <= limit

        # a file 3x the limit, not in the page cache; reading it in a device charges its cache to the
        # device, and the kernel reclaims it there to stay under the limit
        folder = disk_dir(tmp_path)
        request.addfinalizer(lambda: shutil.rmtree(folder, ignore_errors=True))
        big = folder / "big.bin"
        chunk = os.urandom(1 << 20)
        with open(big, "wb") as f:
            for _ in range(192):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        read_before = tb.disk_read_bytes("reader")
        reader = tb.spawn("reader", ["cat", str(big)], stdout=subprocess.DEVNULL)
        assert reader.wait(60) == 0
        if read_before is not None:  # the device's I/O counter saw the file come from disk (bench cluster's reads)
            read = tb.disk_read_bytes("reader")
            assert read is not None and read - read_before >= 180 << 20, (read_before, read)
        used = tb.memory_usage("reader")
        assert limit // 2 <= used <= limit, used  # the cache counted, up to the limit
        peak = tb.memory_peak("reader")
        assert peak is None or peak <= limit
        assert tb.oom_kills("reader") == 0
        if swap_unaccounted(tb, "hog"):
            pytest.skip("swap is on and cgroup v1 does not account it (swapaccount=0): a hog would swap")
    assert leftovers(name) == []


# ---------------------------------------------------------------- (c) down leaves nothing
def _sleepers(tb: Testbed) -> list[int]:
    procs = [tb.spawn(d, ["sleep", "300"]) for d in tb.devices] + [tb.spawn(None, ["sleep", "300"])]
    return [p.pid for p in procs]


@needs_root
def test_down_removes_processes_namespaces_links_and_cgroups(tmp_path):
    name = unique("down")
    tb = Testbed(
        spec(
            name,
            {"name": "a", "ram": "32MiB", "cpus": 0.5, "rate_mbit": 100},
            {"name": "b", "ram": "32MiB", "cpus": 0.5, "disk_read_mbps": 50},
        ),
        workdir=tmp_path / "tb",
        grace=2.0,
    ).up()
    try:
        tb.start_broker()
        pids = _sleepers(tb)
        assert set(pids[:1]) <= set(tb.pids("a")) and pids[-1] in tb.pids(None)
        assert len(leftovers(name)) >= 3 + 1 + 1  # 3 netns, the host link, cgroups
        assert (tmp_path / "tb" / "state.json").exists()
    finally:
        removed = tb.down()
    assert any(r.startswith("netns") for r in removed)
    assert leftovers(name) == []
    assert not any(alive(p) for p in pids)
    assert not (tmp_path / "tb" / "state.json").exists()
    assert tb.down() == []  # idempotent


@needs_root
def test_down_all_cleans_up_after_a_crash(tmp_path):
    crashed, dropped = unique("crash"), unique("drop")
    try:
        # 1. the process that owns the testbed is killed with SIGKILL
        s = {
            "name": crashed,
            "devices": [{"name": "a", "ram": "32MiB", "cpus": 0.5}, {"name": "b", "ram": "32MiB", "cpus": 0.5}],
        }
        owner = subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent("""
            import json, sys, time
            from pathlib import Path
            from homering.testbed import Testbed, parse_spec
            tb = Testbed(parse_spec(json.loads(sys.argv[1])), workdir=Path(sys.argv[2])).up()
            tb.start_broker()
            for d in tb.devices:
                tb.spawn(d, ["sleep", "300"])
            print("ready", flush=True)
            time.sleep(300)
            """),
                json.dumps(s),
                str(tmp_path / "crashed"),
            ],
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        try:
            assert owner.stdout.readline() == b"ready\n"
        finally:
            owner.kill()
            owner.wait()
        state = json.loads((tmp_path / "crashed" / "state.json").read_text())
        orphans = state["pids"]
        assert len(orphans) == 3 and all(alive(p) for p in orphans)

        # 2. a Testbed object dropped without down()
        tb = Testbed(spec(dropped, {"name": "a", "ram": "32MiB", "cpus": 0.5}), workdir=tmp_path / "dropped").up()
        orphans += _sleepers(tb)
        del tb
        gc.collect()
        assert leftovers(crashed) and leftovers(dropped)

        removed = down_all({crashed, dropped}, grace=2.0)
        assert leftovers(crashed) == [] and leftovers(dropped) == []
        deadline = time.monotonic() + 5
        while any(alive(p) for p in orphans) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(p) for p in orphans)
        assert any(r.startswith("process") for r in removed) and any(r.startswith("cgroup") for r in removed)
        assert down_all({crashed, dropped}) == []  # idempotent
    finally:
        down_all({crashed, dropped}, grace=1.0, quiet=True)


@needs_root
def test_cli_down_reports_and_a_name_in_use_is_refused(tmp_path):
    name = unique("cli")
    s = spec(name, {"name": "a", "ram": "32MiB", "cpus": 0.5})
    with Testbed(s, workdir=tmp_path / "one"):
        with pytest.raises(HomeringError, match="already up"):
            Testbed(s, workdir=tmp_path / "two").up()
        res = subprocess.run(
            [sys.executable, "-m", "homering", "testbed", "down", "--name", name],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr
        assert f"removed netns {PREFIX}{name}" in res.stdout
        assert leftovers(name) == []


# ---------------------------------------------------------------- (e) link delay
ECHO_SERVER = """
import socket, sys
s = socket.create_server((sys.argv[1], 7001))
print("listening", flush=True)
c, _ = s.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while data := c.recv(4096):
    c.sendall(data)
"""

ECHO_CLIENT = """
import json, socket, sys, time
c = socket.create_connection((sys.argv[1], 7001), timeout=10)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for i in range(int(sys.argv[2])):
    t = time.perf_counter()
    c.sendall(b"x" * 64)
    got = b""
    while len(got) < 64:
        got += c.recv(4096)
    rtts.append((time.perf_counter() - t) * 1000)
    time.sleep(0.01)
print(json.dumps(rtts[5:]))
"""


def round_trips(tb: Testbed, client: str, server: str, n: int = 45) -> list[float]:
    """TCP round trips in ms of 64-byte messages from ``client`` to an echo server in ``server`` (the
    first five, with the handshake's effects, left out)."""
    srv = tb.spawn(server, [sys.executable, "-c", ECHO_SERVER, tb.address(server)], stdout=subprocess.PIPE)
    try:
        assert srv.stdout.readline() == b"listening\n"
        cli = tb.spawn(
            client,
            [sys.executable, "-c", ECHO_CLIENT, tb.address(server), str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = cli.communicate(timeout=120)
        assert cli.returncode == 0, err.decode()
        return json.loads(out)
    finally:
        srv.kill()
        srv.wait(10)


SINK = """
import socket, sys, time
s = socket.create_server((sys.argv[1], 7002))
print("listening", flush=True)
c, _ = s.accept()
n, t = 0, time.perf_counter()
while data := c.recv(1 << 20):
    n += len(data)
print(n * 8 / (time.perf_counter() - t) / 1e6, flush=True)
"""


def throughput(tb: Testbed, client: str, server: str, size: int) -> float:
    """Mbit/s of one TCP flow of ``size`` bytes from ``client`` to ``server`` (as the receiver saw it)."""
    srv = tb.spawn(server, [sys.executable, "-c", SINK, tb.address(server)], stdout=subprocess.PIPE)
    try:
        assert srv.stdout.readline() == b"listening\n"
        send = f"import socket\nc = socket.create_connection(({tb.address(server)!r}, 7002))\n"
        send += f"c.sendall(bytes({size}))\nc.close()\n"
        assert tb.spawn(client, [sys.executable, "-c", send]).wait(120) == 0
        return float(srv.stdout.readline())
    finally:
        srv.kill()
        srv.wait(10)


@needs_root
def test_round_trip_between_two_devices_is_twice_the_delay(tmp_path):
    """delay_ms is the one-way delay to a device: a TCP round trip between two takes 2 x delay (± jitter), with
    netem or, where the kernel has none, the NFQUEUE delayers (tbf alone: about 0.15 ms); and a TCP flow
    still gets most of the rate (delayed on their way out, packets capped it at about 20 Mbit/s)."""
    name = unique("rtt")
    delay, jitter = 5.0, 1.0
    link = {"delay_ms": delay, "jitter_ms": jitter, "rate_mbit": 465}
    s = spec(name, {"name": "a", "ram": "128MiB", "cpus": 1, **link}, {"name": "b", "ram": "128MiB", "cpus": 1, **link})
    with Testbed(s, workdir=tmp_path / "tb") as tb:
        assert tb.shaping in ("netem", "nfqueue"), tb.warnings
        assert "5±1 ms" in tb.describe("a")["shaping"] and "465 Mbit/s" in tb.describe("b")["shaping"]
        rtts = round_trips(tb, "a", "b")
        mbit = throughput(tb, "a", "b", 50 << 20)
    median = statistics.median(rtts)
    tolerance = 0.75  # ms: Python on both ends and four wake-ups of the delayers on a busy 2-core host
    assert abs(median - 2 * delay) <= jitter + tolerance, (median, sorted(rtts))
    assert min(rtts) >= 2 * delay - 2 * jitter - 0.5, sorted(rtts)  # no packet skips its delay
    assert mbit >= 150, mbit  # of 465 Mbit/s (429 measured on a busy 2-core VM)
    assert leftovers(name) == []


@needs_root
def test_up_refuses_a_delay_it_cannot_emulate_unless_allowed(tmp_path):
    """Without netem and NFQUEUE (here: no NetfilterQueue package), `testbed up` refuses a spec with a delay
    in one line, and with --allow-no-delay brings it up with tbf alone and says so."""
    name = unique("nodelay")
    f = tmp_path / "spec.yaml"
    f.write_text(f"name: {name}\ndevices:\n  - {{name: a, ram: 64MiB, cpus: 0.5, delay_ms: 5, rate_mbit: 100}}\n")
    with Testbed(
        spec(name, {"name": "a", "ram": "64MiB", "cpus": 0.5, "delay_ms": 5}), workdir=tmp_path / "probe"
    ) as tb:
        if tb.shaping == "netem":
            pytest.skip("this kernel has sch_netem: every delay can be emulated")
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "netfilterqueue.py").write_text("raise ImportError('hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": f"{hide}{os.pathsep}{ROOT}"}
    up = [sys.executable, "-m", "homering", "testbed", "up", "--spec", str(f), "--workdir", str(tmp_path / "w")]
    try:
        res = subprocess.run(up, capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
        assert res.returncode != 0 and res.stderr.count("\n") == 1, (res.returncode, res.stderr)
        assert "--allow-no-delay" in res.stderr and "NetfilterQueue" in res.stderr, res.stderr
        assert leftovers(name) == []
        res = subprocess.run([*up, "--allow-no-delay"], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
        assert res.returncode == 0, res.stderr
        assert "tbf rate only" in res.stdout, res.stdout
    finally:
        down_all({name}, grace=1.0, quiet=True)
    assert leftovers(name) == []


# ---------------------------------------------------------------- (d) the spec
def test_spec_errors_name_the_field(tmp_path):
    good = {"name": "x", "devices": [{"name": f"d{i}", "ram": "64MiB", "cpus": 1} for i in range(3)]}

    def error(doc) -> str:
        with pytest.raises(HomeringError) as info:
            parse_spec(doc)
        return str(info.value)

    bad = json.loads(json.dumps(good))
    bad["devices"][2]["ram"] = "lots"
    assert error(bad).startswith("devices.2.ram: 'lots' is not a size")
    bad = json.loads(json.dumps(good))
    del bad["devices"][0]["cpus"]
    assert error(bad).startswith("devices.0.cpus: ")
    bad = json.loads(json.dumps(good))
    bad["devices"][1]["cpus"] = -1
    assert error(bad).startswith("devices.1.cpus: ")
    bad = json.loads(json.dumps(good))
    bad["devices"][1]["rate_mbit"] = 0
    assert error(bad).startswith("devices.1.rate_mbit: ")
    bad = json.loads(json.dumps(good))
    bad["devices"][0]["colour"] = "red"
    assert error(bad) == "devices.0.colour: unknown field"
    assert error({**good, "name": "Bad_Name"}).startswith("name: ")
    assert error({**good, "subnet": "10.1.2.3/24"}).startswith("subnet: ")
    assert error({**good, "subnet": "10.1.2.0/30"}).startswith("subnet: ")
    assert "two devices are called 'd0'" in error({**good, "devices": good["devices"] + [good["devices"][0]]})
    assert error({"name": "x", "devices": []}).startswith("devices: ")

    f = tmp_path / "bad.yaml"
    f.write_text("name: x\ndevices:\n  - {name: a, ram: 1GiB, cpus: 1}\n  - {name: b, ram: 2 parsecs, cpus: 1}\n")
    with pytest.raises(HomeringError, match=r"bad\.yaml: devices\.1\.ram: "):
        load_spec(f)
    f.write_text("name: [x\n")
    with pytest.raises(HomeringError, match="not valid YAML"):
        load_spec(f)
    # and the command line says it in one line, exit code 2
    res = subprocess.run(
        [sys.executable, "-m", "homering", "testbed", "run", "--spec", str(f)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "not valid YAML" in res.stderr


def test_sizes_and_the_home4_example():
    assert parse_bytes("355MiB") == 355 << 20
    assert parse_bytes("1.4GiB") == round(1.4 * (1 << 30))
    assert parse_bytes("512M") == 512_000_000
    assert parse_bytes(1024) == 1024
    home4 = load_spec(ROOT / "examples" / "clusters" / "home4.yaml")
    assert home4.name == "home4" and home4.model == "llama3.2-3b-q4_0"
    got = {d.name: (d.ram >> 20, d.cpus, d.disk_read_mbps, d.delay_ms, d.jitter_ms, d.rate_mbit) for d in home4.devices}
    assert got == {
        "d1-mac-m1": (355, 1.0, 72, 5, 1, 465),
        "d2-laptop": (606, 0.77, 298, 5, 1, 465),
        "d3-desktop": (1433, 0.875, 317, 5, 1, 465),
        "d4-phone": (281, 0.425, 137, 5, 1, 465),
    }
    assert max(d.ram for d in home4.devices) < 1.56 * (1 << 30)  # no device holds the whole model
    over = load_spec(ROOT / "examples" / "clusters" / "home4-overflow.yaml")
    assert over.model == home4.model  # the same devices with half the RAM: less than the model in all
    assert {d.name: (d.cpus, d.disk_read_mbps) for d in over.devices} == {k: v[1:3] for k, v in got.items()}
    assert all(abs(o.ram / h.ram - 0.5) < 0.01 for o, h in zip(over.devices, home4.devices))
    assert sum(d.ram for d in over.devices) < 1.56 * (1 << 30)


def test_the_home4_32b_examples():
    """The paper's four devices at their real available RAM (home4-32b) and at 0.6 x (home4-32b-tight)."""
    real = load_spec(ROOT / "examples" / "clusters" / "home4-32b.yaml")
    tight = load_spec(ROOT / "examples" / "clusters" / "home4-32b-tight.yaml")
    assert real.model == tight.model == "qwen2.5-32b-q4_k_m"
    gib = 1 << 30
    got = {
        d.name: (round(d.ram / gib, 2), d.cpus, d.disk_read_mbps, d.delay_ms, d.jitter_ms, d.rate_mbit)
        for d in real.devices
    }
    assert got == {
        "d1-mac-m1": (2.4, 1.0, 720, 5, 1, 465),
        "d2-laptop": (4.1, 0.77, 2980, 5, 1, 465),
        "d3-desktop": (9.7, 0.875, 3170, 5, 1, 465),
        "d4-phone": (1.9, 0.425, 1370, 5, 1, 465),
    }
    home4 = load_spec(ROOT / "examples" / "clusters" / "home4.yaml")
    assert [d.cpus for d in real.devices] == [d.cpus for d in home4.devices]  # the paper's CPU ratios
    assert [d.name for d in tight.devices] == list(got)
    assert all(abs(t.ram / r.ram - 0.6) < 0.01 for t, r in zip(tight.devices, real.devices))
    assert [(d.cpus, d.disk_read_mbps, d.delay_ms, d.jitter_ms, d.rate_mbit) for d in tight.devices] == [
        v[1:] for v in got.values()
    ]
    model = 18.4 * gib  # Qwen2.5-32B / QwQ-32B at Q4_K_M: about 18.5 GiB of weights
    assert sum(d.ram for d in real.devices) < model and sum(d.ram for d in tight.devices) < 0.6 * model


@needs_root
def test_a_benchmark_profiles_each_device_alone_and_its_agent_finds_the_profile(tmp_path, smollm2):
    """Before a benchmark's runs each device is profiled alone, in its own cgroups and home (agents starting
    together would time each other's loading); the profile an agent of that device then asks for, with the
    agents' thread count, is the cached one. A failed profile names its log."""
    from rich.console import Console

    from homering.bench.profiles import profile_devices_alone

    name = unique("prof")
    with Testbed(spec(name, {"name": "a", "ram": "2GiB", "cpus": 1}), workdir=tmp_path / "tb") as tb:
        quiet = Console(file=io.StringIO())
        first = profile_devices_alone(tb, smollm2, threads=1, console=quiet)
        assert list(first) == ["a"] and first["a"]["cpu_ms_per_layer"] > 0 and not first["a"]["cached"]
        assert list((tb.home("a") / "profiles").glob("*.json"))  # in the device's own home
        again = profile_devices_alone(tb, smollm2, threads=1, console=quiet)
        assert again["a"] == {**first["a"], "cached": True}
        with pytest.raises(HomeringError, match="profiling a failed .*profile-a.log"):
            profile_devices_alone(tb, tmp_path / "missing.gguf", threads=1, console=quiet)
