"""The requesting side: `request()`, and `Requester` with and without a mailbox."""

from __future__ import annotations

import asyncio
import gc
import uuid
import weakref

import nats.errors
import pytest
from nats.js.api import DiscardPolicy
from support import Queue, messages_in

import js_request_reply as jrr


def responder(nc, queue: Queue, handlers, **options) -> jrr.Responder:
    return jrr.Responder(nc, handlers, stream=queue.stream, durable="serve", **options)


def greet(msg) -> bytes:
    return b"hello " + msg.data


# -- request() ------------------------------------------------------------------------------------


async def test_request_returns_the_reply_and_the_request_leaves_the_stream(nc, js, queue):
    async with responder(nc, queue, {queue.subject("greet"): greet}):
        reply = await jrr.request(nc, queue.subject("greet"), b"bob", timeout=5)

    assert reply.data == b"hello bob"
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0


async def test_request_accepts_a_str_payload(nc, js, queue):
    async with responder(nc, queue, greet):
        reply = await jrr.request(nc, queue.subject("greet"), "zoë", timeout=5)

    assert reply.data == "hello zoë".encode()


async def test_timeout_raises_request_timeout_and_deletes_the_stored_request(nc, js, queue):
    subject = queue.subject("nobody-listens")

    with pytest.raises(jrr.RequestTimeout) as caught:
        await jrr.request(nc, subject, b"hello?", timeout=0.5)

    message = str(caught.value)
    assert f"no reply to {subject!r} within 0.5s" in message
    assert f"the stored request ({queue.stream} #1) was deleted" in message
    assert await messages_in(js, queue.stream) == 0


async def test_request_timeout_is_caught_as_a_nats_timeout(nc, js, queue):
    try:
        await jrr.request(nc, queue.subject("nobody-listens"), timeout=0.5)
    except nats.errors.TimeoutError as exc:
        caught = exc
    else:
        pytest.fail("no TimeoutError raised")

    assert isinstance(caught, jrr.RequestTimeout)
    assert await messages_in(js, queue.stream) == 0


async def test_subject_without_handler_is_rejected_with_404_and_leaves_the_stream(nc, js, queue):
    subject = queue.subject("unknown")
    async with responder(nc, queue, {queue.subject("greet"): greet}):
        with pytest.raises(jrr.RequestRejected) as caught:
            await jrr.request(nc, subject, timeout=5)

    assert caught.value.code == 404
    assert caught.value.description == f"no handler for subject {subject!r}"
    assert caught.value.subject == subject
    assert str(caught.value) == f"request to {subject!r} rejected: 404 no handler for subject {subject!r}"
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0


async def test_reject_from_a_handler_reaches_the_requester(nc, js, queue):
    def sold_out(msg):
        raise jrr.Reject(409, "sold out")

    async with responder(nc, queue, sold_out):
        with pytest.raises(jrr.RequestRejected) as caught:
            await jrr.request(nc, queue.subject("order"), timeout=5)

    assert (caught.value.code, caught.value.description) == (409, "sold out")
    assert "rejected: 409 sold out" in str(caught.value)
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0


async def test_failing_handler_is_a_500_naming_the_exception(nc, js, queue):
    def broken(msg):
        raise RuntimeError("oven on fire")

    async with responder(nc, queue, broken):
        with pytest.raises(jrr.RequestRejected) as caught:
            await jrr.request(nc, queue.subject("order"), timeout=5)

    assert caught.value.code == 500
    assert caught.value.description == "handler failed: RuntimeError: oven on fire"
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0


async def test_no_stream_for_the_subject_raises_no_request_stream_naming_it(nc):
    subject = f"nostream{uuid.uuid4().hex[:10]}.order"

    with pytest.raises(jrr.NoRequestStream) as caught:
        await jrr.request(nc, subject, timeout=5)

    assert caught.value.subject == subject
    assert f"no stream captures subject {subject!r}" in str(caught.value)
    assert "ensure_request_stream" in str(caught.value)


async def test_request_the_stream_refuses_raises_request_not_stored_with_the_servers_reason(nc, js):
    suffix = uuid.uuid4().hex[:10]
    stream, subject = f"FULL_{suffix}", f"full{suffix}.order"
    await jrr.ensure_request_stream(js, stream, [f"full{suffix}.*"], max_msgs=1, discard=DiscardPolicy.NEW)
    try:
        await js.publish(subject, b"already waiting")

        with pytest.raises(jrr.RequestNotStored) as caught:
            await jrr.request(nc, subject, timeout=5)

        assert f"the server refused to store the request to {subject!r}" in str(caught.value)
        assert "maximum messages exceeded" in str(caught.value)
        assert await messages_in(js, stream) == 1
    finally:
        await js.delete_stream(stream)


async def test_invalid_subject_is_refused_before_sending(nc):
    with pytest.raises(ValueError, match=r"'bad subject' is not a valid subject"):
        await jrr.request(nc, "bad subject", timeout=5)


async def test_payload_over_max_payload_is_refused_and_not_stored(nc, js, queue):
    with pytest.raises(jrr.PayloadTooLarge) as caught:
        await jrr.request(nc, queue.subject("big"), b"x" * nc.max_payload, timeout=5)

    assert f"payload of {nc.max_payload} bytes is over the limit" in str(caught.value)
    assert "not sent" in str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert await messages_in(js, queue.stream) == 0


async def test_ttl_under_a_second_is_refused_and_not_stored(nc, js, queue):
    with pytest.raises(ValueError, match=r"ttl must be at least 1 second"):
        await jrr.request(nc, queue.subject("quick"), timeout=5, ttl=0.5)

    assert await messages_in(js, queue.stream) == 0


async def test_concurrent_requests_share_one_inbox_subscription(nc, js, queue):
    def echo(msg) -> bytes:
        return b"re:" + msg.data

    async with responder(nc, queue, echo):
        assert (await jrr.request(nc, queue.subject("echo"), b"first", timeout=5)).data == b"re:first"
        subscriptions = len(nc._subs)

        replies = await asyncio.gather(
            *(jrr.request(nc, queue.subject("echo"), f"n{i}", timeout=10) for i in range(50))
        )

        assert [reply.data for reply in replies] == [f"re:n{i}".encode() for i in range(50)]
        assert len(nc._subs) == subscriptions, "a request costs no subscription of its own"
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0


async def test_a_closed_connection_is_not_kept_alive_by_its_reply_inbox(nats_url, queue):
    client = await jrr.connect(nats_url)
    async with responder(client, queue, greet):
        assert (await jrr.request(client, queue.subject("greet"), b"x", timeout=5)).data == b"hello x"
    await client.close()
    closed = weakref.ref(client)
    del client

    gc.collect()

    assert closed() is None, "the closed client is still referenced"


# -- Requester with a mailbox ---------------------------------------------------------------------


async def test_mailbox_reply_waits_for_the_requester_on_another_connection(nats_url, nc, js, queue, mailboxes):
    mailbox, subject = f"alice{uuid.uuid4().hex[:6]}", queue.subject("greet")
    sender = await jrr.connect(nats_url)
    async with mailboxes.requester(sender, mailbox) as requester:
        request_id = await requester.send(subject, b"alice")
    await sender.drain()  # the requester goes away before anyone answers

    answered = asyncio.Event()
    serving = responder(nc, queue, greet, on_handled=lambda handled: answered.set())
    async with serving:
        async with asyncio.timeout(10):
            await answered.wait()
    assert [handled.outcome for handled in serving.handled] == ["replied"]

    collector = await jrr.connect(nats_url)
    try:
        async with mailboxes.requester(collector, mailbox) as requester:
            replies = await requester.collect()
            again = await requester.collect(timeout=1)
    finally:
        await collector.drain()

    assert [(reply.request_id, reply.data, reply.error) for reply in replies] == [(request_id, b"hello alice", None)]
    assert replies[0].headers["Nats-Request-Subject"] == subject
    assert again == []
    assert await jrr.wait_for_messages(js, mailboxes.stream, 0) == 0
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0


async def test_mailbox_request_returns_a_reply(nc, js, queue, mailboxes):
    async with responder(nc, queue, greet), mailboxes.requester(nc, f"bob{uuid.uuid4().hex[:6]}") as requester:
        reply = await requester.request(queue.subject("greet"), "bob", timeout=5)

    assert isinstance(reply, jrr.Reply)
    assert reply.text == "hello bob"
    assert reply.error is None
    assert await jrr.wait_for_messages(js, mailboxes.stream, 0) == 0


async def test_mailbox_request_rejection_raises(nc, js, queue, mailboxes):
    def sold_out(msg):
        raise jrr.Reject(409, "sold out")

    async with responder(nc, queue, sold_out), mailboxes.requester(nc, f"eve{uuid.uuid4().hex[:6]}") as requester:
        with pytest.raises(jrr.RequestRejected) as caught:
            await requester.request(queue.subject("order"), timeout=5)

    assert (caught.value.code, caught.value.description) == (409, "sold out")
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0


async def test_mailbox_request_timeout_deletes_the_stored_request(nc, js, queue, mailboxes):
    subject = queue.subject("nobody-listens")
    async with mailboxes.requester(nc, f"dan{uuid.uuid4().hex[:6]}") as requester:
        with pytest.raises(jrr.RequestTimeout, match=r"was deleted"):
            await requester.request(subject, timeout=0.5)

    assert await messages_in(js, queue.stream) == 0


async def test_collect_on_an_empty_mailbox_returns_nothing(nc, mailboxes):
    async with mailboxes.requester(nc, f"empty{uuid.uuid4().hex[:6]}") as requester:
        assert await requester.collect(timeout=1) == []


async def test_collect_reports_a_sent_request_that_expired_unanswered(nc, js, queue, mailboxes):
    subject = queue.subject("too-late")
    async with mailboxes.requester(nc, f"fay{uuid.uuid4().hex[:6]}") as requester:
        request_id = await requester.send(subject, b"anyone?", ttl=1)
        assert await requester.collect(timeout=1) == [], "a request still waiting is not listed"

        assert await jrr.wait_for_messages(js, queue.stream, 0, timeout=15) == 0, "the request's TTL removed it"
        replies = await requester.collect()
        again = await requester.collect(timeout=1)

    assert [(reply.request_id, reply.data, reply.error.code) for reply in replies] == [(request_id, b"", 408)]
    assert replies[0].error.description == (
        "expired: no responder took the request within its TTL of 1s, so the server removed it"
    )
    assert replies[0].headers["Nats-Request-Subject"] == subject
    assert again == []


async def test_mailbox_without_a_reply_stream_says_to_create_one(nc, queue):
    missing = f"NOREPLIES_{uuid.uuid4().hex[:10]}"
    requester = jrr.Requester(nc, mailbox="carol", reply_stream=missing, reply_prefix=missing.lower())

    with pytest.raises(jrr.NoReplyStream) as caught:
        await requester.send(queue.subject("greet"))

    assert repr(missing) in str(caught.value)
    assert "ensure_reply_stream" in str(caught.value)


async def test_send_without_a_mailbox_is_a_value_error(nc, js, queue):
    with pytest.raises(ValueError, match=r"send\(\) needs a mailbox"):
        await jrr.Requester(nc).send(queue.subject("greet"))

    assert await messages_in(js, queue.stream) == 0


async def test_collect_without_a_mailbox_is_a_value_error(nc):
    with pytest.raises(ValueError, match=r"collect\(\) needs a mailbox"):
        await jrr.Requester(nc).collect()


@pytest.mark.parametrize("mailbox", ["*", ">", "a.b", "a b", ""])
async def test_invalid_mailbox_name_is_a_value_error(nc, mailbox):
    with pytest.raises(ValueError) as caught:
        jrr.Requester(nc, mailbox=mailbox)

    assert repr(mailbox) in str(caught.value)
    assert "must be one subject token" in str(caught.value)
