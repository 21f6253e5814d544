"""Reading what a pull consumer holds now (pulls.py), on the run's server."""

from __future__ import annotations

import asyncio

from nats.js.api import AckPolicy, ConsumerConfig

from js_request_reply.pulls import held_now


async def test_held_now_yields_every_message_held_in_order_then_stops_without_waiting(nc, js, queue):
    for n in range(300):  # more than one pull's batch
        await js.publish(queue.subject(f"m{n}"), str(n).encode())
    await js.add_consumer(queue.stream, ConsumerConfig(name="reader", ack_policy=AckPolicy.EXPLICIT))

    async with asyncio.timeout(10):  # far less than one pull's wait for messages that do not come
        read = [msg.data.decode() async for msg in held_now(nc, queue.stream, "reader", batch=128)]

    assert read == [str(n) for n in range(300)]


async def test_held_now_on_an_empty_consumer_yields_nothing(nc, js, queue):
    await js.add_consumer(queue.stream, ConsumerConfig(name="idle", ack_policy=AckPolicy.EXPLICIT))
    subscriptions = len(nc._subs)

    assert [msg async for msg in held_now(nc, queue.stream, "idle")] == []
    assert len(nc._subs) == subscriptions, "its inbox subscription is gone"
