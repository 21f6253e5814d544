"""Nothing lost under faults: deadlines, deduplication, crashes and redelivery, server restarts.

Every request ends in a reply, a clear rejection or a clear expiry. Crashes are real where a process
can be killed at the right moment (a responder subprocess, SIGKILL); where it cannot, one ack is
dropped to stand for "crashed between reply and ack", and the test says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
from nats.aio.msg import Msg
from support import Mailboxes, Outcomes, Queue, messages_in, unique

import js_request_reply as jrr


def now_ms() -> int:
    return int(time.time() * 1000)


def within(deadline: str, seconds: float, before_ms: int, after_ms: int) -> bool:
    """True if a Nats-Deadline was set to now + `seconds` at some moment in [before_ms, after_ms] (1 ms rounding)."""
    return before_ms + seconds * 1000 - 1 <= int(deadline) <= after_ms + seconds * 1000 + 1


class Calls:
    """A handler that records (request id, delivery count) for every call, then answers `hello <payload>`."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def __call__(self, msg: Msg) -> bytes:
        self.seen.append((jrr.request_id(msg), msg.metadata.num_delivered))
        return b"hello " + msg.data


@contextlib.contextmanager
def ack_lost_once(monkeypatch, subject: str) -> Iterator[list[Msg]]:
    """Drop the first ack of a request on `subject`.

    This stands for a responder that crashed after it had sent (and, in mailbox mode, stored) its
    reply but before its ack left: a subprocess cannot be killed at exactly that point.
    """
    lost: list[Msg] = []
    real_ack = Msg.ack

    async def ack(self: Msg) -> None:
        if self.subject == subject and not lost:
            lost.append(self)
            return
        await real_ack(self)

    monkeypatch.setattr(Msg, "ack", ack)
    try:
        yield lost
    finally:
        monkeypatch.setattr(Msg, "ack", real_ack)


# A Responder in a process of its own, whose handler says which request it has and then hangs, so
# the test can kill the process (SIGKILL) while it holds the request, unacked.
HANGING_RESPONDER = """
import asyncio, sys
import js_request_reply as jrr

async def main(stream, durable, ack_wait, max_deliver):
    nc = await jrr.connect()

    async def hang(msg):
        print("handling", jrr.request_id(msg), msg.metadata.num_delivered, flush=True)
        await asyncio.Event().wait()

    options = dict(stream=stream, durable=durable, ack_wait=float(ack_wait), max_deliver=int(max_deliver))
    async with jrr.Responder(nc, hang, **options):
        print("serving", flush=True)
        await asyncio.Event().wait()

asyncio.run(main(*sys.argv[1:]))
"""


class ResponderProcess:
    """A responder subprocess: read what it prints (every wait bounded), and kill it."""

    def __init__(self, process: asyncio.subprocess.Process):
        self.process = process
        self.output: list[str] = []

    async def wait_for(self, text: str, timeout: float = 20.0) -> str:
        """The next line containing `text`; fails the test if none comes in time."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    line = (await self.process.stdout.readline()).decode().rstrip("\n")
                    if not line and self.process.stdout.at_eof():
                        pytest.fail(f"the responder process ended before printing {text!r}:\n" + "\n".join(self.output))
                    self.output.append(line)
                    if text in line:
                        return line
        except TimeoutError:
            pytest.fail(f"no line with {text!r} within {timeout}s; output so far:\n" + "\n".join(self.output))

    async def handling(self) -> tuple[str, int]:
        """Wait until its handler has a request: (request id, delivery count)."""
        _, request_id, delivery = (await self.wait_for("handling ")).split()
        return request_id, int(delivery)

    async def kill(self) -> None:
        """Crash it: SIGKILL, so nothing is acked, nak'd or cleaned up."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        async with asyncio.timeout(10):
            await self.process.wait()


@contextlib.asynccontextmanager
async def hanging_responder(url: str, stream: str, durable: str, *, ack_wait: float, max_deliver: int = 5):
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HANGING_RESPONDER,
        stream,
        durable,
        str(ack_wait),
        str(max_deliver),
        env={**os.environ, "NATS_URL": url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    responder = ResponderProcess(process)
    try:
        await responder.wait_for("serving")
        yield responder
    finally:
        await responder.kill()


async def terminated_advisories(nc, stream: str, durable: str):
    """A subscription to the server's MSG_TERMINATED advisories for one consumer."""
    return await nc.subscribe(f"$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{stream}.{durable}")


# -- 1. deadlines ---------------------------------------------------------------------------------


async def test_deadline_and_ttl_travel_as_headers_the_handler_can_read(nc, queue, mailboxes):
    def show_headers(msg) -> str:
        return json.dumps({name: msg.headers.get(name) for name in ("Nats-TTL", "Nats-Deadline")})

    async with jrr.Responder(nc, show_headers, stream=queue.stream, durable="serve"):
        before_ms = now_ms()
        waited = await jrr.request(nc, queue.subject("order"), timeout=5)
        async with mailboxes.requester(nc, unique("ann")) as requester:
            sent = await requester.request(queue.subject("order"), timeout=5, ttl=3)
        after_ms = now_ms()

    waited_headers, sent_headers = json.loads(waited.data), json.loads(sent.data)
    assert waited_headers["Nats-TTL"] is None, "request() without ttl sets no server-side TTL"
    assert within(waited_headers["Nats-Deadline"], 5, before_ms, after_ms), "deadline = now + timeout"
    assert sent_headers["Nats-TTL"] == "3"
    assert within(sent_headers["Nats-Deadline"], 5, before_ms, after_ms), "the wait, not the ttl"


async def test_send_with_ttl_sets_the_deadline_to_now_plus_ttl(nc, js, queue, mailboxes):
    async with mailboxes.requester(nc, unique("ben")) as requester:
        before_ms = now_ms()
        await requester.send(queue.subject("order"), b"soon", ttl=30)
        after_ms = now_ms()

    stored = await js.get_last_msg(queue.stream, queue.subject("order"))
    assert stored.headers["Nats-TTL"] == "30"
    assert within(stored.headers["Nats-Deadline"], 30, before_ms, after_ms)


async def test_a_request_whose_ttl_ran_out_never_reaches_a_handler_and_is_reported_expired(nc, js, queue, mailboxes):
    handler = Calls()
    async with mailboxes.requester(nc, unique("cy")) as requester:
        expired_id = await requester.send(queue.subject("order"), b"stale", ttl=1)
        assert await messages_in(js, queue.stream) == 1
        assert await jrr.wait_for_messages(js, queue.stream, 0, timeout=15) == 0, "the server removed it at its TTL"

        async with jrr.Responder(nc, handler, stream=queue.stream, durable="serve"):
            fresh = await requester.request(queue.subject("order"), b"fresh", timeout=5)
        replies = await requester.collect()

    assert fresh.text == "hello fresh"
    assert [request_id for request_id, _ in handler.seen] == [fresh.request_id], "the expired one never ran"
    assert [(reply.request_id, reply.error.code) for reply in replies] == [(expired_id, 408)]
    assert replies[0].error.description.startswith("expired: no responder took the request")
    assert await jrr.wait_for_messages(js, mailboxes.stream, 0) == 0


async def test_a_request_that_reaches_a_responder_after_its_deadline_is_terminated_unprocessed(
    nc, js, queue, mailboxes
):
    # A requester in another language sets Nats-Deadline itself, without a TTL; this one had passed
    # a minute before any responder took the request. (send() without ttl leaves the header alone.)
    past = str(int((time.time() - 60) * 1000))
    handler, outcomes = Calls(), Outcomes()
    advisories = await terminated_advisories(nc, queue.stream, "serve")
    async with mailboxes.requester(nc, unique("dee")) as requester:
        late_id = await requester.send(queue.subject("order"), b"late", headers={"Nats-Deadline": past})

        async with jrr.Responder(nc, handler, stream=queue.stream, durable="serve", on_handled=outcomes):
            handled = await outcomes.wait_for(lambda h: h.request_id == late_id)
            fresh = await requester.request(queue.subject("order"), b"fresh", timeout=5)
        replies = await requester.collect()
    advisory = json.loads((await advisories.next_msg(timeout=10)).data)
    await advisories.unsubscribe()

    assert handler.seen == [(fresh.request_id, 1)], "the handler never saw the late request"
    assert fresh.text == "hello fresh"
    assert (handled.outcome, handled.detail[:12]) == ("rejected", "408 expired:")
    assert [(reply.request_id, reply.error.code) for reply in replies] == [(late_id, 408)]
    assert replies[0].error.description.startswith("expired: the requester's deadline passed")
    assert advisory["reason"].startswith("408 expired:")
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0, "terminated: it left the work queue"
    assert await jrr.wait_for_messages(js, mailboxes.stream, 0) == 0


# -- 2. exactly-once effects ----------------------------------------------------------------------


async def test_a_retried_send_with_the_same_msg_id_is_stored_once_and_answered_once(nc, js, queue, mailboxes):
    order_id = unique("order-")
    handler, outcomes = Calls(), Outcomes()
    async with mailboxes.requester(nc, unique("eli")) as requester:
        first = await requester.send(queue.subject("pay"), b"10 EUR", msg_id=order_id)
        retried = await requester.send(queue.subject("pay"), b"10 EUR", msg_id=order_id)
        assert first == retried == order_id, "msg_id is the request id, so the retry maps to the same reply"
        assert await messages_in(js, queue.stream) == 1, "stored once"
        ack = await js.publish(queue.subject("pay"), b"10 EUR", headers={"Nats-Msg-Id": order_id})
        assert (ack.duplicate, ack.seq) == (True, 1), "the server's PubAck calls a third copy a duplicate"

        async with jrr.Responder(nc, handler, stream=queue.stream, durable="serve", on_handled=outcomes):
            await outcomes.wait_for(lambda h: h.outcome == "replied")
        replies = await requester.collect()

    assert handler.seen == [(order_id, 1)]
    assert [(reply.request_id, reply.text) for reply in replies] == [(order_id, "hello 10 EUR")]
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0
    assert await jrr.wait_for_messages(js, mailboxes.stream, 0) == 0


async def test_request_retried_with_the_msg_id_of_a_timed_out_request_says_it_was_not_stored(nc, js, queue):
    order_id, subject = unique("order-"), queue.subject("pay")
    with pytest.raises(jrr.RequestTimeout, match=r"was deleted"):
        await jrr.request(nc, subject, msg_id=order_id, timeout=0.5)

    async with jrr.Responder(nc, Calls(), stream=queue.stream, durable="serve"):
        with pytest.raises(jrr.RequestTimeout) as caught:
            # The server drops this copy as a duplicate of the deleted one: nobody ever answers it.
            await jrr.request(nc, subject, msg_id=order_id, timeout=1)
        fresh = await jrr.request(nc, subject, b"again", msg_id=unique("order-"), timeout=5)

    assert str(caught.value) == (
        f"no reply to {subject!r} within 1s; it was not stored, being a duplicate (same msg_id) of "
        f"{queue.stream} #1, which was left alone (it may be another requester's, or already gone); retry with a new msg_id"
    )
    assert fresh.data == b"hello again"
    assert await messages_in(js, queue.stream) == 0


async def test_a_redelivered_request_leaves_one_reply_in_the_mailbox(monkeypatch, nc, js, queue, mailboxes):
    subject = queue.subject("pay")
    handler, outcomes = Calls(), Outcomes()
    with ack_lost_once(monkeypatch, subject) as lost:
        async with mailboxes.requester(nc, unique("fin")) as requester:
            request_id = await requester.send(subject, b"5 EUR")
            serving = jrr.Responder(nc, handler, stream=queue.stream, durable="serve", ack_wait=1, on_handled=outcomes)
            async with serving:
                await outcomes.wait_for(lambda h: h.delivery == 2 and h.outcome == "replied")
            assert await jrr.wait_for_messages(js, mailboxes.stream, 1) == 1, "the second reply was dropped"
            replies = await requester.collect()

    assert len(lost) == 1
    assert handler.seen == [(request_id, 1), (request_id, 2)], "at least once: the handler ran again"
    assert [(reply.request_id, reply.text) for reply in replies] == [(request_id, "hello 5 EUR")]
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0
    assert await jrr.wait_for_messages(js, mailboxes.stream, 0) == 0


async def test_an_idempotent_handler_keyed_on_request_id_applies_its_effect_once(monkeypatch, nc, js, queue):
    subject, order_id = queue.subject("charge"), unique("order-")
    charges: dict[str, int] = {}  # the side effect: request id -> charge number
    calls: list[tuple[str, int]] = []

    def charge(msg) -> str:
        request, delivery = jrr.request_id(msg), msg.metadata.num_delivered
        calls.append((request, delivery))
        if delivery > 1 and request in charges:
            return f"charge #{charges[request]}"  # a redelivery: the effect is done, answer the same
        charges[request] = len(charges) + 1
        return f"charge #{charges[request]}"

    outcomes = Outcomes()
    with ack_lost_once(monkeypatch, subject):
        async with jrr.Responder(nc, charge, stream=queue.stream, durable="serve", ack_wait=1, on_handled=outcomes):
            reply = await jrr.request(nc, subject, b"9 EUR", msg_id=order_id, timeout=5)
            await outcomes.wait_for(lambda h: h.delivery == 2 and h.outcome == "replied")

    assert reply.data == b"charge #1"
    assert calls == [(order_id, 1), (order_id, 2)], "the msg_id is the request id the handler sees"
    assert charges == {order_id: 1}, "charged once"
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0


# -- 3. crash and redelivery ----------------------------------------------------------------------


async def test_a_request_whose_responder_dies_is_redelivered_to_another_and_answered_once(
    nats_url, nc, js, queue, mailboxes
):
    handler, outcomes = Calls(), Outcomes()
    async with mailboxes.requester(nc, unique("gil")) as requester:
        async with hanging_responder(nats_url, queue.stream, "kitchen", ack_wait=1) as doomed:
            request_id = await requester.send(queue.subject("order"), b"soup")
            assert await doomed.handling() == (request_id, 1)
            await doomed.kill()
        assert await messages_in(js, queue.stream) == 1, "unacked: still in the work queue"

        serving = jrr.Responder(nc, handler, stream=queue.stream, durable="kitchen", ack_wait=1, on_handled=outcomes)
        async with serving:
            await outcomes.wait_for(lambda h: h.request_id == request_id)
        replies = await requester.collect()

    assert handler.seen == [(request_id, 2)], "the second delivery went to the new responder"
    assert [(reply.request_id, reply.text) for reply in replies] == [(request_id, "hello soup")]
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0
    assert await jrr.wait_for_messages(js, mailboxes.stream, 0) == 0


async def test_a_handler_running_past_ack_wait_is_kept_alive_and_not_started_twice(nc, other_nc, js, queue):
    durable = "slow"
    in_progress = 0
    long_enough = asyncio.Event()

    def count_in_progress_acks(msg: Msg) -> None:
        nonlocal in_progress
        if msg.data == b"+WPI" and f".{queue.stream}.{durable}." in msg.subject:
            in_progress += 1
            if in_progress == 4:  # two ack_waits have passed since the request was delivered
                long_enough.set()

    async def count(msg):
        count_in_progress_acks(msg)

    acks = await nc.subscribe("$JS.ACK.>", cb=count)
    calls: list[tuple[str, int]] = []

    async def slow(msg) -> bytes:
        calls.append((jrr.request_id(msg), msg.metadata.num_delivered))
        async with asyncio.timeout(20):
            await long_enough.wait()
        return b"done"

    options = dict(stream=queue.stream, durable=durable, ack_wait=1)
    try:
        # Two responders share the durable: a redelivery would start the handler again on either.
        async with jrr.Responder(nc, slow, **options), jrr.Responder(other_nc, slow, **options):
            reply = await jrr.request(nc, queue.subject("stew"), timeout=30)
            info = await js.consumer_info(queue.stream, durable)
    finally:
        await acks.unsubscribe()

    assert reply.data == b"done"
    assert in_progress >= 4
    assert calls == [(calls[0][0], 1)], "one call, first delivery"
    assert info.num_redelivered == 0
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0


async def test_max_deliver_exhausted_ends_in_an_error_reply_not_silence(nats_url, nc, js, queue):
    options = dict(ack_wait=1, max_deliver=2)
    pending = asyncio.create_task(jrr.request(nc, queue.subject("poison"), b"crashes everyone", timeout=60))
    try:
        for delivery in (1, 2):
            async with hanging_responder(nats_url, queue.stream, "kitchen", **options) as doomed:
                assert (await doomed.handling())[1] == delivery
                await doomed.kill()

        # The server gives up an ack_wait after the last delivery and says so in an advisory, which
        # this responder (started well within that second) answers.
        outcomes = Outcomes()
        async with jrr.Responder(nc, Calls(), stream=queue.stream, durable="kitchen", on_handled=outcomes, **options):
            with pytest.raises(jrr.RequestRejected) as caught:
                async with asyncio.timeout(30):
                    await pending
            gave_up = await outcomes.wait_for(lambda h: h.outcome == "gave up")
    finally:
        pending.cancel()

    assert (caught.value.code, caught.value.description) == (500, "gave up after 2 deliveries")
    assert (gave_up.subject, gave_up.delivery) == (queue.subject("poison"), 2)
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0, "the request left the stream"


# -- 4. server restart ----------------------------------------------------------------------------


@pytest.mark.parametrize("outage", ["restart", "kill"])
async def test_waiting_requests_and_replies_survive_an_outage_and_connections_carry_on(fresh_server, outage):
    suffix = uuid.uuid4().hex[:10]
    served, waiting = Queue(f"SV_{suffix}", f"sv{suffix}"), Queue(f"WT_{suffix}", f"wt{suffix}")
    boxes = Mailboxes(f"RP_{suffix}", f"rp{suffix}")
    back = {"requester": asyncio.Event(), "responder": asyncio.Event()}

    def on_reconnect(name: str):
        async def reconnected() -> None:
            back[name].set()

        return reconnected

    requester_nc = await jrr.connect(fresh_server.url, reconnected_cb=on_reconnect("requester"))
    responder_nc = await jrr.connect(fresh_server.url, reconnected_cb=on_reconnect("responder"))
    js = requester_nc.jetstream()
    await jrr.ensure_request_stream(js, served.stream, [f"{served.prefix}.*"])
    await jrr.ensure_request_stream(js, waiting.stream, [f"{waiting.prefix}.*"])
    await jrr.ensure_reply_stream(js, boxes.stream, [f"{boxes.prefix}.>"])
    greet = Calls()
    outcomes = Outcomes()
    requester = boxes.requester(requester_nc, "alice")
    try:
        async with jrr.Responder(responder_nc, greet, stream=served.stream, durable="serve", on_handled=outcomes):
            answered_id = await requester.send(served.subject("greet"), b"before")  # its reply waits in REPLIES
            await outcomes.wait_for(lambda h: h.request_id == answered_id)
            waiting_id = await requester.send(waiting.subject("greet"), b"queued")  # nobody serves this stream yet
            assert await jrr.wait_for_messages(js, boxes.stream, 1) == 1
            assert await messages_in(js, waiting.stream) == 1

            if outage == "restart":
                await asyncio.to_thread(fresh_server.restart)
            else:
                await asyncio.to_thread(fresh_server.kill)  # SIGKILL, as a power cut would
                await asyncio.to_thread(fresh_server.start)
            async with asyncio.timeout(15):
                await back["requester"].wait()
                await back["responder"].wait()

            assert await messages_in(js, boxes.stream) == 1, "the stored reply survived"
            assert await messages_in(js, waiting.stream) == 1, "the waiting request survived"
            after = await requester.request(served.subject("greet"), b"after", timeout=15)
            assert after.text == "hello after", "the responder running through the outage carries on"

            async with jrr.Responder(responder_nc, greet, stream=waiting.stream, durable="serve", on_handled=outcomes):
                await outcomes.wait_for(lambda h: h.request_id == waiting_id)
        replies = await requester.collect()

        assert {reply.request_id: reply.text for reply in replies} == {
            answered_id: "hello before",
            waiting_id: "hello queued",
        }
        for stream in (served.stream, waiting.stream, boxes.stream):
            assert await jrr.wait_for_messages(js, stream, 0) == 0
    finally:
        await requester.close()
        await jrr.delete_streams(js, served.stream, waiting.stream, boxes.stream)
        await requester_nc.drain()
        await responder_nc.drain()
