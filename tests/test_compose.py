"""docker/compose.yaml agrees with the README's "Home server" section, the mosquitto config, the ACL and the
secrets script (no Docker engine needed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
SERVICES = {"mosquitto", "controller", "agent"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _default(text: str) -> str:
    """``${VAR:-default}`` → ``default`` (what Compose uses when VAR is unset)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", str(text))


def readme_services() -> dict[str, dict]:
    """The service table of the README's "Home server" section: name → {"ports", "volumes"}."""
    text = (REPO / "README.md").read_text()
    start = text.index("\n## Home server\n")
    section = text[start + 1 : text.find("\n## ", start + 1)]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| `") or len(cells) < 3:
            continue
        name = cells[0].strip("`")
        rows[name] = {
            "ports": set(re.findall(r"`(\d+)`", cells[1])),
            "volumes": set(re.findall(r"`([\w.-]+)`", cells[2])),
        }
    return rows


def host_ports(service: dict) -> set[str]:
    out = set()
    for p in service.get("ports", []):
        parts = _default(p).split(":")
        assert len(parts) >= 2, f"port {p} has no host side"
        out.add(parts[-2])
    return out


def named_volumes(service: dict, compose: dict) -> set[str]:
    names = {str(v).split(":")[0] for v in service.get("volumes", [])}
    return {n for n in names if n in (compose.get("volumes") or {})}


def test_services_ports_and_volumes_match_the_readme(compose):
    readme = readme_services()
    assert set(compose["services"]) == SERVICES
    assert set(readme) == SERVICES, f"README's Home server table lists {sorted(readme)}"
    for name, svc in compose["services"].items():
        assert host_ports(svc) == readme[name]["ports"], name
        assert named_volumes(svc, compose) == readme[name]["volumes"], name


def test_readme_commands_use_this_compose_file():
    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## Home server\n") :]
    assert "docker compose -f docker/compose.yaml up -d" in section
    assert "--scale agent=" in section
    assert "mqtt://homeserver:1883" in section  # the mosquitto service's published port
    assert text.lstrip().splitlines()[0] == "# homering"
    first_block = text[text.index("```sh") : text.index("```", text.index("```sh") + 5)]
    assert "make run" in first_block and "make test" in first_block


def test_every_service_has_a_healthcheck(compose):
    for name, svc in compose["services"].items():
        check = svc.get("healthcheck")
        assert check and check.get("test") and check["test"][0] in ("CMD", "CMD-SHELL"), name
    assert compose["services"]["controller"]["depends_on"]["mosquitto"]["condition"] == "service_healthy"
    assert compose["services"]["agent"]["depends_on"]["mosquitto"]["condition"] == "service_healthy"


def test_agent_is_scalable(compose):
    agent = compose["services"]["agent"]
    assert "container_name" not in agent
    assert not agent.get("ports"), "a fixed host port would clash between replicas"


def test_mosquitto_allows_no_anonymous_access(compose):
    svc = compose["services"]["mosquitto"]
    assert svc["image"].startswith("eclipse-mosquitto:2")
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in svc["volumes"]}
    assert mounts["/mosquitto/config/mosquitto.conf"] == "./mosquitto/mosquitto.conf"
    assert mounts["/mosquitto/config/acl"] == "./mosquitto/acl"
    assert mounts["/mosquitto/config/passwd"] == "./mosquitto/passwd"
    conf = {}
    for line in (DOCKER / "mosquitto" / "mosquitto.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            conf.setdefault(key, []).append(value.strip())
    assert conf["allow_anonymous"] == ["false"]
    assert conf["password_file"] == ["/mosquitto/config/passwd"]
    assert conf["acl_file"] == ["/mosquitto/config/acl"]
    assert (
        not (DOCKER / "mosquitto" / "passwd").exists() or "docker/mosquitto/passwd" in (REPO / ".gitignore").read_text()
    )


def test_clients_log_in_with_secret_files_known_to_the_acl(compose):
    acl_users = set(re.findall(r"^user (\S+)$", (DOCKER / "mosquitto" / "acl").read_text(), re.M))
    script = (DOCKER / "make-secrets.sh").read_text()
    made = set(re.search(r"for user in ([^;]+?) \"\$@\"", script).group(1).split())
    secrets = compose["secrets"]
    for name in ("controller", "agent"):
        cmd = " ".join(compose["services"][name]["command"])
        assert "--broker=mqtt://mosquitto:1883" in cmd
        user = re.search(r"--user=(\S+)", cmd).group(1)
        assert user in acl_users and user in made, user
        pw = re.search(r"--password-file=/run/secrets/(\S+)", cmd).group(1)
        assert pw in compose["services"][name]["secrets"]
        assert secrets[pw]["file"] == f"./secrets/mqtt_{user}"
        assert "--password=" not in cmd and "HOMERING_MQTT_PASSWORD=" not in str(compose["services"][name])
    controller = " ".join(compose["services"]["controller"]["command"])
    assert "--api-key-file=/run/secrets/api_key" in controller and secrets["api_key"]["file"] == "./secrets/api_key"
    assert "secrets/api_key" in script
    assert "docker/secrets/" in (REPO / ".gitignore").read_text()


def test_env_example_documents_every_variable(compose):
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", (DOCKER / "compose.yaml").read_text()))
    documented = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", (DOCKER / ".env.example").read_text(), re.M))
    assert used and used <= documented, f"not in docker/.env.example: {sorted(used - documented)}"
