"""Connecting: a clear error when no server is there, and reconnection on its own when one restarts."""

from __future__ import annotations

import asyncio
import uuid

import pytest

import js_request_reply as jrr
from js_request_reply.connection import server_list
from js_request_reply.server import free_port


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


async def test_connect_gives_a_connected_client(nats_url):
    nc = await jrr.connect(nats_url)
    try:
        assert nc.is_connected
        sub = await nc.subscribe(subject := unique("hello."))
        await nc.publish(subject, b"hi")
        assert (await sub.next_msg(timeout=5)).data == b"hi"
    finally:
        await nc.drain()


def ports_of(url: str) -> set[int]:
    """The ports of the servers in `url`, one server or a comma-separated list."""
    return {int(server.rsplit(":", 1)[1]) for server in server_list(url)}


async def test_connect_without_url_uses_server_url(nats_url):
    nc = await jrr.connect()
    try:
        assert nc.is_connected
        assert nc.connected_url.port in ports_of(nats_url)
    finally:
        await nc.drain()


async def test_closed_port_fails_fast_naming_url_and_how_to_start_a_server():
    url = f"nats://127.0.0.1:{free_port()}"

    with pytest.raises(jrr.ServerUnreachable) as caught:
        async with asyncio.timeout(10):  # fails, rather than hanging on reconnect attempts
            await jrr.connect(url)

    message = str(caught.value)
    assert f"no NATS server answered at {url}" in message
    assert "python -m js_request_reply server" in message
    assert "make lab" in message
    assert isinstance(caught.value, ConnectionError)


async def test_a_port_that_accepts_but_never_speaks_nats_gives_up_after_the_timeout():
    # A listener that accepts connections and says nothing: nats-py waits for an INFO that never comes.
    silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    url = f"nats://127.0.0.1:{silent.sockets[0].getsockname()[1]}"
    try:
        with pytest.raises(jrr.ServerUnreachable, match=r"within 0\.5s"):
            async with asyncio.timeout(10):
                await jrr.connect(url, first_connect_timeout=0.5)
    finally:
        silent.close()


async def test_closed_port_error_gives_the_real_reason():
    url = f"nats://127.0.0.1:{free_port()}"

    with pytest.raises(jrr.ServerUnreachable) as caught:
        async with asyncio.timeout(10):
            await jrr.connect(url, first_connect_timeout=1)

    assert "ConnectionRefusedError" in str(caught.value)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("nats//nope", "is not a NATS URL"),
        ("http://127.0.0.1:4222", "is not a NATS URL"),
        ("nats://host:notaport", "has a port that is not a number"),
    ],
)
async def test_malformed_url_is_a_clear_error(url, says):
    with pytest.raises(jrr.ServerUnreachable) as caught:
        async with asyncio.timeout(10):
            await jrr.connect(url)

    message = str(caught.value)
    assert repr(url) in message
    assert says in message
    assert "nats://127.0.0.1:4222" in message, "the message shows what a NATS URL looks like"


async def test_reconnects_on_its_own_after_server_restart(fresh_server):
    reconnected = asyncio.Event()

    async def on_reconnect():
        reconnected.set()

    nc = await jrr.connect(fresh_server.url, reconnected_cb=on_reconnect)
    stream, subject = unique("RECON_"), unique("recon") + ".ping"
    await jrr.ensure_request_stream(nc, stream, [subject])
    async with jrr.Responder(nc, lambda msg: b"pong", stream=stream, durable="recon"):
        assert (await jrr.request(nc, subject, timeout=5)).data == b"pong"

        await asyncio.to_thread(fresh_server.restart)
        async with asyncio.timeout(10):
            await reconnected.wait()

        reply = await jrr.request(nc, subject, timeout=10)
    assert reply.data == b"pong"
    assert nc.is_connected
    await nc.drain()


async def test_a_bare_host_and_port_is_read_as_a_nats_url(nats_url):
    nc = await jrr.connect(nats_url.removeprefix("nats://"))  # as nats-py and the nats CLI accept it
    try:
        assert nc.is_connected
    finally:
        await nc.drain()


async def test_a_list_of_servers_none_of_which_answers_fails_fast_naming_every_one():
    urls = [f"nats://127.0.0.1:{free_port()}" for _ in range(3)]

    with pytest.raises(jrr.ServerUnreachable) as caught:
        async with asyncio.timeout(10):
            await jrr.connect(",".join(urls))

    message = str(caught.value)
    assert f"no NATS server answered at any of {', '.join(urls)} (ConnectionRefusedError" in message
    assert "python -m js_request_reply server" in message


async def test_a_list_of_servers_connects_to_the_one_that_answers(nats_url):
    dead = f"nats://127.0.0.1:{free_port()}"

    for urls in (f"{dead}, {nats_url}", [dead, nats_url]):
        nc = await jrr.connect(urls)
        try:
            assert nc.is_connected
            assert nc.connected_url.port in ports_of(nats_url)
        finally:
            await nc.close()


@pytest.mark.parametrize("url", [",", " , ,"], ids=["comma", "commas"])
async def test_a_list_that_names_no_server_says_so(url):
    with pytest.raises(
        jrr.ServerUnreachable, match=r"names no server; expected something like nats://127\.0\.0\.1:4222"
    ):
        await jrr.connect(url)
