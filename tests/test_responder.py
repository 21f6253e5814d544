"""The responding side: handlers of every shape, shared durables, a graceful stop, and surviving a restart."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from support import Queue, messages_in

import js_request_reply as jrr


def responder(nc, queue: Queue, handlers, **options) -> jrr.Responder:
    options.setdefault("durable", "serve")
    return jrr.Responder(nc, handlers, stream=queue.stream, **options)


# -- handlers -------------------------------------------------------------------------------------


async def test_sync_handler_returning_str_is_sent_as_utf8(nc, js, queue):
    def sandwich(msg) -> str:
        return "🥪"

    async with responder(nc, queue, {queue.subject("sandwich"): sandwich}):
        reply = await jrr.request(nc, queue.subject("sandwich"), timeout=5)

    assert reply.data == "🥪".encode()
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0


async def test_async_handler_returning_bytes_is_sent_as_is(nc, js, queue):
    async def upper(msg) -> bytes:
        await asyncio.sleep(0)  # a handler that awaits something
        return msg.data.upper()

    async with responder(nc, queue, {queue.subject("upper"): upper}):
        reply = await jrr.request(nc, queue.subject("upper"), b"shout", timeout=5)

    assert reply.data == b"SHOUT"
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0


async def test_single_callable_serves_every_subject(nc, js, queue):
    def which(msg) -> str:
        return msg.subject

    async with responder(nc, queue, which):
        first = await jrr.request(nc, queue.subject("one"), timeout=5)
        second = await jrr.request(nc, queue.subject("two"), timeout=5)

    assert (first.data.decode(), second.data.decode()) == (queue.subject("one"), queue.subject("two"))


async def test_wildcard_handler_key_serves_matching_subjects(nc, queue):
    async with responder(nc, queue, {f"{queue.prefix}.*": lambda msg: b"any"}):
        reply = await jrr.request(nc, queue.subject("whatever"), timeout=5)

    assert reply.data == b"any"


async def test_handler_returning_neither_bytes_nor_str_is_a_500(nc, js, queue):
    async with responder(nc, queue, lambda msg: 42):
        with pytest.raises(jrr.RequestRejected) as caught:
            await jrr.request(nc, queue.subject("answer"), timeout=5)

    assert caught.value.code == 500
    assert caught.value.description == "handler failed: TypeError: handler returned int, expected bytes or str"
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0


async def test_handled_records_each_outcome(nc, queue):
    def sold_out(msg):
        raise jrr.Reject(409, "sold out")

    serving = responder(nc, queue, {queue.subject("ok"): lambda msg: b"ok", queue.subject("no"): sold_out}, name="till")
    async with serving:
        await jrr.request(nc, queue.subject("ok"), timeout=5)
        with pytest.raises(jrr.RequestRejected):
            await jrr.request(nc, queue.subject("no"), timeout=5)

    outcomes = [(h.responder, h.subject, h.outcome, h.detail) for h in serving.handled]
    assert outcomes == [
        ("till", queue.subject("ok"), "replied", ""),
        ("till", queue.subject("no"), "rejected", "409 sold out"),
    ]


async def test_request_without_reply_header_is_terminated(nc, js, queue):
    terminated = asyncio.Event()
    serving = responder(nc, queue, lambda msg: b"unused", on_handled=lambda handled: terminated.set())
    async with serving:
        await js.publish(queue.subject("raw"), b"who do I answer?")
        async with asyncio.timeout(10):
            await terminated.wait()

    assert [(h.outcome, h.detail) for h in serving.handled] == [("terminated", "no Nats-Reply header")]
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0


async def test_terminate_removes_a_request_from_the_work_queue(js, queue):
    await js.publish(queue.subject("unwanted"), b"no thanks")
    sub = await js.pull_subscribe(queue.subject("unwanted"), durable="manual", stream=queue.stream)
    [msg] = await sub.fetch(1, timeout=5)

    await jrr.terminate(msg, "400 not today")

    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0


# -- lifecycle ------------------------------------------------------------------------------------


async def test_running_and_repr_follow_start_and_stop(nc, queue):
    serving = responder(nc, queue, lambda msg: b"", name="desk")
    assert not serving.running

    assert await serving.start() is serving
    assert await serving.start() is serving, "a second start() is harmless"
    assert serving.running
    assert repr(serving) == f"<Responder 'desk' on {queue.stream}/serve running>"

    await serving.stop()
    await serving.stop()
    assert not serving.running
    assert "stopped" in repr(serving)


async def test_requests_wait_for_a_responder_that_starts_later(nc, js, queue):
    pending = asyncio.create_task(jrr.request(nc, queue.subject("later"), b"patient", timeout=10))
    assert await jrr.wait_for_messages(js, queue.stream, 1) == 1, "the request is stored, waiting"

    async with responder(nc, queue, lambda msg: b"served " + msg.data):
        reply = await pending

    assert reply.data == b"served patient"
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0


async def test_two_responders_sharing_a_durable_both_serve(nc, other_nc, js, queue):
    busy = 0
    both_busy = asyncio.Event()

    async def hold_until_both_busy(msg) -> bytes:
        # Each responder takes one request at a time, so two requests in hand means both responders serve.
        nonlocal busy
        busy += 1
        if busy == 2:
            both_busy.set()
        async with asyncio.timeout(10):
            await both_busy.wait()
        return b"done"

    first = responder(nc, queue, hold_until_both_busy, durable="shared", name="first", max_in_flight=1)
    second = responder(other_nc, queue, hold_until_both_busy, durable="shared", name="second", max_in_flight=1)
    async with first, second:
        replies = await asyncio.gather(*(jrr.request(nc, queue.subject("work"), timeout=15) for _ in range(2)))

    assert [reply.data for reply in replies] == [b"done", b"done"]
    assert sorted(h.responder for h in [*first.handled, *second.handled]) == ["first", "second"]
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0


async def test_stop_finishes_the_request_in_flight(nc, js, queue):
    entered, release = asyncio.Event(), asyncio.Event()

    async def held(msg) -> bytes:
        entered.set()
        async with asyncio.timeout(10):
            await release.wait()
        return b"finished"

    serving = await responder(nc, queue, held).start()
    pending = asyncio.create_task(jrr.request(nc, queue.subject("slow"), timeout=15))
    async with asyncio.timeout(10):
        await entered.wait()

    stopping = asyncio.create_task(serving.stop())
    await asyncio.sleep(0)  # let stop() begin
    assert not serving.running
    release.set()
    async with asyncio.timeout(15):
        reply = await pending
        await stopping

    assert reply.data == b"finished"
    assert [h.outcome for h in serving.handled] == ["replied"]
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0


async def test_a_replacement_responder_serves_at_once(nc, js, queue):
    """Stopping and starting again, as re-running a notebook does, leaves no request stranded."""
    async with responder(nc, queue, lambda msg: b"old"):
        assert (await jrr.request(nc, queue.subject("x"), timeout=5)).data == b"old"

    async with responder(nc, queue, lambda msg: b"new"):
        reply = await jrr.request(nc, queue.subject("x"), timeout=5)

    assert reply.data == b"new"


async def test_reply_that_cannot_be_stored_keeps_the_request_until_it_can(nats_url, nc, js, queue):
    suffix = uuid.uuid4().hex[:10]
    replies, prefix = f"RR_{suffix}", f"rr{suffix}"
    await jrr.ensure_reply_stream(js, replies, [f"{prefix}.>"])
    async with jrr.Requester(nc, mailbox="kim", reply_stream=replies, reply_prefix=prefix) as requester:
        request_id = await requester.send(queue.subject("order"), b"soup")
    await js.delete_stream(replies)  # the mailbox vanishes before the reply is ready

    retried, replied = asyncio.Event(), asyncio.Event()

    def note(handled: jrr.Handled) -> None:
        (replied if handled.outcome == "replied" else retried).set()

    async with responder(nc, queue, lambda msg: b"hot " + msg.data, on_handled=note) as serving:
        async with asyncio.timeout(10):
            await retried.wait()
        assert await messages_in(js, queue.stream) == 1, "the request waits rather than being lost"

        await jrr.ensure_reply_stream(js, replies, [f"{prefix}.>"])
        async with asyncio.timeout(15):
            await replied.wait()

    try:
        assert serving.handled[0].outcome == "retried"
        assert f"reply not stored in {replies}" in serving.handled[0].detail
        async with jrr.Requester(nc, mailbox="kim", reply_stream=replies, reply_prefix=prefix) as requester:
            collected = await requester.collect()
        assert [(reply.request_id, reply.data) for reply in collected] == [(request_id, b"hot soup")]
        assert await jrr.wait_for_messages(js, queue.stream, 0) == 0
    finally:
        await jrr.delete_streams(js, replies)


async def test_requests_stored_before_a_restart_are_served_after_it(fresh_server):
    nc = await jrr.connect(fresh_server.url)
    await jrr.ensure_request_stream(nc)
    await jrr.ensure_reply_stream(nc)
    async with jrr.Requester(nc, mailbox="alice") as requester:
        sent = {await requester.send(subject): item for subject, item in jrr.MENU.items()}
    await nc.drain()

    await asyncio.to_thread(fresh_server.restart)

    nc = await jrr.connect(fresh_server.url)
    js = nc.jetstream()
    assert await messages_in(js, "REQUESTS") == len(sent), "the requests survived the restart"
    all_served = asyncio.Event()
    serving = jrr.Responder(
        nc, jrr.menu_handlers(), on_handled=lambda h: len(serving.handled) == len(sent) and all_served.set()
    )
    async with serving, jrr.Requester(nc, mailbox="alice") as requester:
        async with asyncio.timeout(15):
            await all_served.wait()
        replies = await requester.collect()

    assert {reply.request_id: reply.text for reply in replies} == sent
    assert await jrr.wait_for_messages(js, "REQUESTS", 0) == 0
    assert await jrr.wait_for_messages(js, "REPLIES", 0) == 0
    await nc.drain()


# -- errors ---------------------------------------------------------------------------------------


async def test_missing_stream_says_to_create_it(nc):
    missing = f"NOPE_{uuid.uuid4().hex[:10]}"

    with pytest.raises(jrr.StreamNotFound) as caught:
        await jrr.Responder(nc, lambda msg: b"", stream=missing).start()

    assert f"stream {missing!r} does not exist" in str(caught.value)
    assert "ensure_request_stream" in str(caught.value)


async def test_second_durable_on_a_work_queue_is_a_conflict_naming_it(nc, queue):
    async with responder(nc, queue, lambda msg: b"", durable="first"):
        with pytest.raises(jrr.StreamConflict) as caught:
            await responder(nc, queue, lambda msg: b"", durable="second").start()

    message = str(caught.value)
    assert "durable 'second'" in message
    assert repr(queue.stream) in message


async def test_second_durable_on_a_work_queue_says_to_share_the_durable(nc, queue):
    async with responder(nc, queue, lambda msg: b"", durable="first"):
        with pytest.raises(jrr.StreamConflict) as caught:
            await responder(nc, queue, lambda msg: b"", durable="second").start()

    assert "Give every Responder the same durable" in str(caught.value)


@pytest.mark.parametrize("durable", ["a.b", "*", "has space", ""])
async def test_invalid_durable_is_a_value_error(nc, durable):
    with pytest.raises(ValueError, match=r"must be one token"):
        jrr.Responder(nc, lambda msg: b"", durable=durable)


async def test_max_in_flight_under_one_is_a_value_error(nc):
    with pytest.raises(ValueError, match=r"max_in_flight must be at least 1"):
        jrr.Responder(nc, lambda msg: b"", max_in_flight=0)


async def test_a_durable_made_by_hand_with_a_filter_keeps_it_and_serves_every_request(nc, js, queue):
    # A learner's own pull consumer first (notebook 03 builds one), then a Responder on the same durable.
    hand_made = await js.pull_subscribe(queue.subject("*"), durable="responder", stream=queue.stream)
    await hand_made.unsubscribe()
    async with jrr.Responder(nc, lambda msg: b"served", stream=queue.stream):
        replies = [await jrr.request(nc, queue.subject("order"), timeout=5) for _ in range(3)]
    info = await js.consumer_info(queue.stream, "responder")

    assert [reply.data for reply in replies] == [b"served"] * 3
    assert info.config.filter_subject == queue.subject("*"), "the durable keeps the filter it was made with"
