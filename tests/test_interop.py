"""The wire conventions, spoken by plain nats-py on one side and this package on the other.

A client in another language sees only what the raw side does here: a `Nats-Reply` header on the
stored request, a plain reply published to it, and ADR-32 `Nats-Service-Error-Code` /
`Nats-Service-Error` headers on an error reply.
"""

from __future__ import annotations

import asyncio
import uuid

import nats
import pytest
from nats.js.api import RetentionPolicy, StreamConfig

import js_request_reply as jrr
from js_request_reply.connection import server_list


@pytest.fixture
async def raw(nats_url):
    """A plain nats-py connection: no helpers from this package on this side."""
    client = await nats.connect(server_list(nats_url))  # nats-py takes a cluster's servers as a list
    yield client
    await client.drain()


@pytest.fixture
async def stream(raw):
    """A work-queue stream made with plain nats-py, so nothing depends on ensure_request_stream."""
    suffix = uuid.uuid4().hex[:10]
    name, prefix = f"IO_{suffix}", f"io{suffix}"
    js = raw.jetstream()
    await js.add_stream(StreamConfig(name=name, subjects=[f"{prefix}.*"], retention=RetentionPolicy.WORK_QUEUE))
    yield name, prefix
    await js.delete_stream(name)


# -- a raw requester, our Responder ----------------------------------------------------------------


async def raw_request(raw, subject: str, payload: bytes = b"") -> nats.aio.msg.Msg:
    """What any client does: subscribe to an inbox, store the request with Nats-Reply, wait on the inbox."""
    inbox = raw.new_inbox()
    sub = await raw.subscribe(inbox)
    try:
        ack = await raw.jetstream().publish(subject, payload, headers={"Nats-Reply": inbox})
        assert ack.seq >= 1
        return await sub.next_msg(timeout=10)
    finally:
        await sub.unsubscribe()


async def test_raw_requester_gets_our_responders_reply_on_its_inbox(nc, raw, stream):
    name, prefix = stream
    async with jrr.Responder(nc, {f"{prefix}.greet": lambda msg: b"hello " + msg.data}, stream=name, durable="ours"):
        reply = await raw_request(raw, f"{prefix}.greet", b"from go")

    assert reply.data == b"hello from go"
    assert "Nats-Service-Error-Code" not in (reply.headers or {})
    assert await jrr.wait_for_messages(raw.jetstream(), name, 0) == 0


async def test_raw_requester_sees_a_rejection_as_adr32_error_headers(nc, raw, stream):
    name, prefix = stream

    def sold_out(msg):
        raise jrr.Reject(409, "sold out")

    async with jrr.Responder(nc, {f"{prefix}.order": sold_out}, stream=name, durable="ours"):
        rejected = await raw_request(raw, f"{prefix}.order")
        unknown = await raw_request(raw, f"{prefix}.unknown")

    assert rejected.data == b""
    assert rejected.headers["Nats-Service-Error-Code"] == "409"
    assert rejected.headers["Nats-Service-Error"] == "sold out"
    assert unknown.headers["Nats-Service-Error-Code"] == "404"
    assert unknown.headers["Nats-Service-Error"] == f"no handler for subject '{prefix}.unknown'"
    assert await jrr.wait_for_messages(raw.jetstream(), name, 0) == 0


# -- our request(), a raw responder ----------------------------------------------------------------


async def raw_respond_once(raw, stream: str, prefix: str, data: bytes, headers: dict[str, str] | None = None) -> None:
    """What any responder does: pull one request, publish to its Nats-Reply subject, then ack."""
    sub = await raw.jetstream().pull_subscribe(f"{prefix}.*", durable="raw", stream=stream)
    [msg] = await sub.fetch(1, timeout=10)
    await raw.publish(msg.headers["Nats-Reply"], data + msg.data, headers=headers)
    await msg.ack()


async def test_our_request_gets_a_raw_responders_reply(nc, raw, stream):
    name, prefix = stream
    responding = asyncio.create_task(raw_respond_once(raw, name, prefix, b"raw says hi to "))

    reply = await jrr.request(nc, f"{prefix}.greet", b"python", timeout=10)
    await asyncio.wait_for(responding, 10)

    assert reply.data == b"raw says hi to python"
    assert await jrr.wait_for_messages(raw.jetstream(), name, 0) == 0


async def test_our_request_reads_a_raw_responders_error_headers(nc, raw, stream):
    name, prefix = stream
    error = {"Nats-Service-Error-Code": "503", "Nats-Service-Error": "kitchen closed"}
    responding = asyncio.create_task(raw_respond_once(raw, name, prefix, b"", error))

    with pytest.raises(jrr.RequestRejected) as caught:
        await jrr.request(nc, f"{prefix}.order", timeout=10)
    await asyncio.wait_for(responding, 10)

    assert (caught.value.code, caught.value.description) == (503, "kitchen closed")
    assert await jrr.wait_for_messages(raw.jetstream(), name, 0) == 0
