"""Mailbox mode (mailbox.py) on the run's server: what collect() hands over, what it drops, and that it hands over once.

Each test has a request stream and a reply stream of its own.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

import pytest
import pytest_asyncio
from support import SETTLE, eventually, holds, messages_in

import js_request_reply as jrr
from js_request_reply.ledger import Ledger


@pytest_asyncio.fixture
async def responder(nc, queue, mailboxes):
    """A Responder on the test's request stream that answers "hello <payload>" into the test's mailboxes."""
    responder = jrr.Responder(nc, lambda msg: b"hello " + msg.data, stream=queue.stream, reply_prefix=mailboxes.prefix)
    await responder.start()
    yield responder
    await responder.stop()


async def collect_until(requester: jrr.Requester, done: Callable[[dict[str, list[jrr.Reply]]], bool]):
    """Collect until `done(handed)` holds; `handed` maps each request id to every reply handed over for it."""
    handed: dict[str, list[jrr.Reply]] = collections.defaultdict(list)

    async def check() -> bool:
        for reply in await requester.collect():
            handed[reply.request_id].append(reply)
        return done(handed)

    await eventually(check)
    return handed


async def test_collect_hands_over_the_replies_to_the_requests_its_mailbox_sent(nc, js, queue, mailboxes, responder):
    alice = mailboxes.requester(nc, "alice")
    sent = [await alice.send(queue.subject("greet"), f"alice {n}") for n in range(3)]

    handed = await collect_until(alice, lambda handed: set(sent) <= handed.keys())

    assert {request_id: [reply.text for reply in replies] for request_id, replies in handed.items()} == {
        request_id: [f"hello alice {n}"] for n, request_id in enumerate(sent)
    }
    assert alice.dropped == collections.Counter()
    assert await eventually(lambda: holds(js, mailboxes.stream, 0)), "a reply handed over stayed in the stream"


async def test_a_reply_its_ledger_never_noted_is_dropped_and_counted(nc, js, queue, mailboxes, responder):
    alice = mailboxes.requester(nc, "alice")
    await Ledger(nc, mailboxes.stream, "bob").note_sent("bobs", {"subject": queue.subject("greet")})
    await js.publish(f"{mailboxes.prefix}.alice.stray", b"nobody asked")  # noted by no ledger
    await js.publish(f"{mailboxes.prefix}.alice.bobs", b"bob asked")  # noted in bob's ledger, not alice's
    sent = await alice.send(queue.subject("greet"), "alice")

    handed = await collect_until(alice, lambda handed: sent in handed and alice.dropped["not requested"] >= 2)

    assert list(handed) == [sent]
    assert alice.dropped == collections.Counter({"not requested": 2})
    assert await eventually(lambda: holds(js, mailboxes.stream, 0)), "a dropped reply stayed in the stream"


async def test_a_request_no_responder_takes_within_its_ttl_is_reported_expired_exactly_once(
    nc, other_nc, js, queue, mailboxes
):
    alice = mailboxes.requester(nc, "alice")
    sent = await alice.send(queue.subject("unserved"), "anyone?", ttl=1)

    handed = await collect_until(alice, lambda handed: sent in handed)
    later = await alice.collect()
    elsewhere = await mailboxes.requester(other_nc, "alice").collect()

    [expired] = handed[sent]
    assert expired.error is not None and expired.error.code == 408, expired
    assert "expired: no responder took the request within its TTL of 1s" in expired.error.description
    assert later == [] and elsewhere == []
    assert await messages_in(js, queue.stream) == 0, "the server kept a request past its TTL"


async def test_a_reply_handed_over_by_request_is_not_handed_over_again_by_collect(
    nc, other_nc, js, queue, mailboxes, responder
):
    alice = mailboxes.requester(nc, "alice")

    reply = await alice.request(queue.subject("greet"), "once", timeout=SETTLE)
    again = await alice.collect()
    elsewhere = await mailboxes.requester(other_nc, "alice").collect()

    assert reply.text == "hello once"
    assert again == [] and elsewhere == []
    assert alice.dropped == collections.Counter()
    assert await eventually(lambda: holds(js, mailboxes.stream, 0))


async def test_many_waiting_requests_share_one_pull_and_each_gets_its_own_reply(
    nats_url, nc, js, queue, mailboxes, responder
):
    alice = mailboxes.requester(nc, "alice")
    await alice.collect()  # opens the mailbox before the wiretap listens
    count = 50

    async with jrr.Wiretap(nats_url, connections=[nc]) as tap:
        replies = await asyncio.gather(
            *(alice.request(queue.subject("greet"), str(n), timeout=SETTLE) for n in range(count))
        )
        await alice.close()  # lets the last pull end
    pulls = [m for m in tap.messages if m.subject == f"$JS.API.CONSUMER.MSG.NEXT.{mailboxes.stream}.mailbox-alice"]

    assert [reply.text for reply in replies] == [f"hello {n}" for n in range(count)]
    assert len(pulls) < count, f"{len(pulls)} pulls for {count} waiting requests: one pull serves them all"
    assert await alice.collect() == []
    assert alice.dropped == collections.Counter()


async def test_a_reply_a_request_waits_for_is_not_taken_by_a_collect_meanwhile(nc, js, queue, mailboxes):
    alice = mailboxes.requester(nc, "alice")
    waiting = asyncio.create_task(alice.request(queue.subject("greet"), "mine", timeout=SETTLE))
    await eventually(lambda: holds(js, queue.stream, 1))

    async with jrr.Responder(nc, lambda msg: b"hello " + msg.data, stream=queue.stream, reply_prefix=mailboxes.prefix):
        collected = []
        while not waiting.done():  # collect() again and again while the reply arrives
            collected += await alice.collect(timeout=1)
        reply = await waiting

    assert reply.text == "hello mine"
    assert collected == []
    assert await alice.collect() == []


async def test_request_in_mailbox_mode_records_the_hand_over_and_forgets_the_request(nc, queue, mailboxes, responder):
    alice = mailboxes.requester(nc, "alice")
    ledger = Ledger(nc, mailboxes.stream, "alice")

    reply = await alice.request(queue.subject("greet"), "noted", timeout=SETTLE)

    assert await ledger.done(reply.request_id) == {"seq": 1}
    assert await eventually(lambda: _forgotten(ledger, reply.request_id))


async def _forgotten(ledger: Ledger, request_id: str) -> bool:
    return await ledger.sent(request_id) is None


async def test_closing_the_requester_ends_a_waiting_request_with_a_clear_error(nc, js, queue, mailboxes):
    alice = mailboxes.requester(nc, "alice")
    waiting = asyncio.create_task(alice.request(queue.subject("greet"), "later", timeout=SETTLE))
    await eventually(lambda: holds(js, queue.stream, 1))  # sent; no responder runs

    await alice.close()

    with pytest.raises(jrr.RequesterClosed, match=r"while request '.+' waited for its reply"):
        await waiting
    async with jrr.Responder(nc, lambda msg: b"hello " + msg.data, stream=queue.stream, reply_prefix=mailboxes.prefix):
        await eventually(lambda: holds(js, mailboxes.stream, 1))
    assert [reply.text for reply in await alice.collect()] == ["hello later"], "the reply waited for collect()"
