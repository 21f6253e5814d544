"""The mailbox ledger (ledger.py) on the run's server: what a mailbox noted, listed, settled and claimed.

Each test has a reply stream of its own, so its ledger holds only what the test wrote.
"""

from __future__ import annotations

import asyncio

import pytest
from nats.js.api import ConsumerConfig
from nats.js.errors import NotFoundError
from support import eventually, unique

import js_request_reply as jrr
from js_request_reply.ledger import Ledger


def entry(n: int) -> dict:
    return {"subject": f"orders.{n}", "ttl": None, "expires": None}


def listing_config(ledger: Ledger) -> ConsumerConfig:
    """The consumer outstanding() lists a mailbox's entries with, as a listing that crashed leaves it."""
    return ledger.listing_config()


async def test_a_noted_request_is_sent_until_it_is_forgotten(nc, mailboxes):
    alice = Ledger(nc, mailboxes.stream, "alice")

    await alice.note_sent("r1", entry(1))
    noted = await alice.sent("r1")
    await alice.forget("r1")

    assert noted == entry(1)
    assert await alice.sent("r1") is None
    assert await alice.sent("never-sent") is None


async def test_outstanding_lists_this_mailboxs_unsettled_requests_only(nc, js, mailboxes):
    alice, bob, al = (Ledger(nc, mailboxes.stream, name) for name in ("alice", "bob", "al"))
    for n in (1, 2, 3):
        await alice.note_sent(f"a{n}", entry(n))
    await bob.note_sent("b1", entry(4))
    await al.note_sent("x1", entry(5))  # a mailbox whose name begins alice's
    await alice.forget("a2")
    await alice.claim("a1", {"seq": 1})  # a hand-over record is not a request

    listed = await alice.outstanding()

    assert listed == {"a1": entry(1), "a3": entry(3)}
    assert await bob.outstanding() == {"b1": entry(4)}
    assert await al.outstanding() == {"x1": entry(5)}
    assert await Ledger(nc, mailboxes.stream, "carol").outstanding() == {}
    with pytest.raises(NotFoundError):
        await js.consumer_info(alice.stream, "ledger-alice")  # the listing consumer is gone after it


async def test_a_request_noted_again_after_it_was_forgotten_is_outstanding_again(nc, mailboxes):
    alice = Ledger(nc, mailboxes.stream, "alice")
    await alice.note_sent("r1", entry(1))
    await alice.forget("r1")

    await alice.note_sent("r1", entry(2))

    assert await alice.outstanding() == {"r1": entry(2)}


async def test_listing_reads_only_the_outstanding_entries_however_long_the_history(nc, js, mailboxes):
    """collect() lists a mailbox's outstanding requests: its cost must follow them, not every request ever sent."""
    alice = Ledger(nc, mailboxes.stream, "alice")
    for first in range(0, 10_000, 500):  # 10,000 old requests, settled
        batch = [f"old{n}" for n in range(first, first + 500)]
        await asyncio.gather(*(alice.note_sent(request_id, entry(1)) for request_id in batch))
        await asyncio.gather(*(alice.forget(request_id) for request_id in batch))
    for n in range(10):
        await alice.note_sent(f"new{n}", entry(n))

    async def listing_holds_only_the_outstanding() -> bool:
        info = await js.add_consumer(alice.stream, listing_config(alice))
        await js.delete_consumer(alice.stream, info.name)
        return info.num_pending == 10

    # A settled entry's delete marker lasts a second, then the key is gone from the ledger.
    await eventually(listing_holds_only_the_outstanding)
    assert await alice.outstanding() == {f"new{n}": entry(n) for n in range(10)}
    assert (await js.stream_info(alice.stream)).state.messages == 10


async def test_a_listing_skips_the_entries_just_forgotten_while_their_markers_last(nc, mailboxes):
    alice = Ledger(nc, mailboxes.stream, "alice")
    await asyncio.gather(*(alice.note_sent(f"old{n}", entry(n)) for n in range(300)))
    await asyncio.gather(*(alice.forget(f"old{n}") for n in range(300)))
    await alice.note_sent("new", entry(1))

    # Listed at once, while the markers are there, and again as they expire: each answer is complete.
    for _ in range(3):
        assert await alice.outstanding() == {"new": entry(1)}


async def test_a_listing_consumer_left_behind_hides_no_entry(nc, js, mailboxes):
    alice = Ledger(nc, mailboxes.stream, "alice")
    for n in range(5):
        await alice.note_sent(f"r{n}", entry(n))
    await js.add_consumer(alice.stream, listing_config(alice))
    sub = await js.pull_subscribe_bind(consumer="ledger-alice", stream=alice.stream)
    read = await sub.fetch(2, timeout=5)  # a listing that crashed part way through
    await sub.unsubscribe()

    listed = await alice.outstanding()

    assert len(read) == 2
    assert listed == {f"r{n}": entry(n) for n in range(5)}


async def test_claim_records_a_hand_over_once_and_returns_the_earlier_record_after(nc, mailboxes):
    alice = Ledger(nc, mailboxes.stream, "alice")

    first = await alice.claim("r1", {"seq": 7})
    second = await alice.claim("r1", {"seq": 8})
    third = await alice.claim("r1", {"expired": True})

    assert first is None
    assert second == third == {"seq": 7}
    assert await alice.done("r1") == {"seq": 7}
    assert await alice.done("r2") is None


async def test_of_two_collectors_racing_to_claim_one_reply_exactly_one_wins(nc, other_nc, mailboxes):
    here, there = Ledger(nc, mailboxes.stream, "alice"), Ledger(other_nc, mailboxes.stream, "alice")

    results = await asyncio.gather(*(ledger.claim("r1", {"seq": n}) for n, ledger in enumerate([here, there] * 3)))

    assert results.count(None) == 1, results
    winner = results.index(None)
    assert all(result == {"seq": winner} for result in results if result is not None), results


@pytest.mark.parametrize("call", ["note_sent", "sent", "forget", "claim", "done"])
async def test_a_missing_ledger_raises_no_reply_stream_saying_how_to_create_it(nc, call):
    stream = unique("NONE_")
    alice = Ledger(nc, stream, "alice")
    calls = {
        "note_sent": lambda: alice.note_sent("r1", entry(1)),
        "sent": lambda: alice.sent("r1"),
        "forget": lambda: alice.forget("r1"),
        "claim": lambda: alice.claim("r1", {"seq": 1}),
        "done": lambda: alice.done("r1"),
    }

    with pytest.raises(jrr.NoReplyStream) as raised:
        await asyncio.wait_for(calls[call](), 10)

    assert str(raised.value) == (
        f"the mailbox ledger '{stream}-ledger' does not exist; create it with ensure_reply_stream(js)"
    )


async def test_listing_a_missing_ledger_raises_no_reply_stream_too(nc):
    stream = unique("NONE_")

    with pytest.raises(jrr.NoReplyStream, match=f"the mailbox ledger '{stream}-ledger' does not exist"):
        await asyncio.wait_for(Ledger(nc, stream, "alice").outstanding(), 10)
