"""Requests the server gave up on are answered, even when it gave up while no responder was running."""

from __future__ import annotations

import asyncio

import pytest
from support import Outcomes, eventually, holds

import js_request_reply as jrr
from js_request_reply import protocol as p

OPTIONS = dict(durable="kitchen", ack_wait=1, max_deliver=1)


async def give_up_with_nobody_listening(nc, js, stream: str) -> None:
    """Let the durable's only delivery of the one waiting request run out while no responder runs.

    The consumer allows one delivery. A plain pull takes the request and never acks it; an
    ack_wait later the server gives up and emits its advisory, with no responder subscribed.
    """
    pull = await js.pull_subscribe_bind("kitchen", stream)
    try:
        (taken,) = await pull.fetch(1, timeout=5)
        assert taken.metadata.num_delivered == 1
    finally:
        await pull.unsubscribe()

    await eventually(lambda: holds(js, p.gave_up_stream(stream), 1))


async def create_durable(nc, stream: str) -> None:
    async with jrr.Responder(nc, lambda msg: b"never called", stream=stream, **OPTIONS):
        pass


async def test_a_request_given_up_while_no_responder_runs_is_answered_once_when_responders_start(
    nc, other_nc, js, queue
):
    await create_durable(nc, queue.stream)
    pending = asyncio.create_task(jrr.request(nc, queue.subject("poison"), b"left behind", timeout=60))
    try:
        await eventually(lambda: holds(js, queue.stream, 1))
        await give_up_with_nobody_listening(nc, js, queue.stream)

        outcomes = Outcomes()
        first = jrr.Responder(nc, lambda msg: b"late", stream=queue.stream, on_handled=outcomes, **OPTIONS)
        second = jrr.Responder(other_nc, lambda msg: b"late", stream=queue.stream, on_handled=outcomes, **OPTIONS)
        async with first, second:
            with pytest.raises(jrr.RequestRejected) as caught:
                async with asyncio.timeout(20):
                    await pending
            await eventually(lambda: holds(js, p.gave_up_stream(queue.stream), 0))
            assert await jrr.wait_for_messages(js, queue.stream, 0) == 0, "the request left the stream"
    finally:
        pending.cancel()

    assert (caught.value.code, caught.value.description) == (500, "gave up after 1 deliveries")
    gave_up = [h for h in outcomes.records if h.outcome == "gave up"]
    assert len(gave_up) == 1, f"answered by {len(gave_up)} responders, not one: {gave_up}"
    assert gave_up[0].subject == queue.subject("poison")


async def test_a_mailbox_collects_one_gave_up_reply_for_a_request_given_up_while_no_responder_ran(
    nc, other_nc, js, queue, mailboxes
):
    await create_durable(nc, queue.stream)
    alice = mailboxes.requester(nc, "alice")
    sent = await alice.send(queue.subject("poison"), b"left behind")
    await give_up_with_nobody_listening(nc, js, queue.stream)

    outcomes = Outcomes()
    async with (
        jrr.Responder(
            nc, lambda msg: b"late", stream=queue.stream, reply_prefix=mailboxes.prefix, on_handled=outcomes, **OPTIONS
        ),
        jrr.Responder(
            other_nc,
            lambda msg: b"late",
            stream=queue.stream,
            reply_prefix=mailboxes.prefix,
            on_handled=outcomes,
            **OPTIONS,
        ),
    ):
        await eventually(lambda: holds(js, mailboxes.stream, 1))
        replies = await alice.collect()

    assert [(r.request_id, r.error) for r in replies] == [(sent, jrr.ReplyError(500, "gave up after 1 deliveries"))]
    assert await alice.collect(timeout=1) == []
    assert dict(alice.dropped) == {}, "no second reply was stored"
    assert [h.outcome for h in outcomes.records] == ["gave up"], "answered by one responder of the two"


async def test_without_the_gave_up_stream_a_running_responder_still_answers_the_advisory(nc, js, queue):
    await js.delete_stream(p.gave_up_stream(queue.stream))  # a request stream made before there was one
    options = {**OPTIONS, "ack_wait": 3}
    async with jrr.Responder(nc, lambda msg: b"never called", stream=queue.stream, **options):
        pass
    pending = asyncio.create_task(jrr.request(nc, queue.subject("poison"), b"crashes", timeout=60))
    try:
        await eventually(lambda: holds(js, queue.stream, 1))
        pull = await js.pull_subscribe_bind("kitchen", queue.stream)
        try:
            await pull.fetch(1, timeout=5)  # its one delivery, never acked
        finally:
            await pull.unsubscribe()
        # Started within the ack_wait, so it is subscribed to the advisory when the server gives up.
        async with jrr.Responder(nc, lambda msg: b"late", stream=queue.stream, **options) as responder:
            assert responder._gave_up.kept is False, "no gave-up stream: the advisory is read as it is emitted"
            with pytest.raises(jrr.RequestRejected) as caught:
                async with asyncio.timeout(20):
                    await pending
    finally:
        pending.cancel()
    assert (caught.value.code, caught.value.description) == (500, "gave up after 1 deliveries")
