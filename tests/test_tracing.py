"""Trace context end to end: a `traceparent` on every request, seen by the handler, carried back on every reply.

With opentelemetry-api and its SDK installed (`pip install -e .[otel]` and `opentelemetry-sdk`),
the requester's and the responder's spans are checked to be linked by that header; without them
those tests are skipped, and everything else holds the same.
"""

from __future__ import annotations

import asyncio

import pytest
from support import SETTLE

import js_request_reply as jrr
from js_request_reply import tracing

EXAMPLE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"  # the W3C specification's example


class Seen:
    """A handler that answers, and keeps the traceparent of each request it handled."""

    def __init__(self, answer: str = "🥪") -> None:
        self.traceparents: list[str | None] = []
        self.answer = answer

    def __call__(self, msg) -> str:
        self.traceparents.append((msg.headers or {}).get("traceparent"))
        return self.answer


def refusing(msg):
    raise jrr.Reject(409, "sold out")


# -- the header -----------------------------------------------------------------------------------


def test_a_new_traceparent_is_valid_w3c_trace_context():
    made = jrr.new_traceparent()
    parsed = jrr.parse_traceparent(made)

    assert parsed is not None and str(parsed) == made
    assert (len(parsed.trace_id), len(parsed.parent_id), parsed.sampled) == (32, 16, True)
    assert jrr.new_traceparent() != made


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",  # no flags
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # no trace
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # no parent
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # a forbidden version
        EXAMPLE + "-extra",  # version 00 has exactly four fields
    ],
)
def test_what_is_not_w3c_trace_context_is_not_parsed(value):
    assert jrr.parse_traceparent(value) is None


def test_a_later_version_may_carry_more_fields():
    parsed = jrr.parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more")

    assert parsed is not None and parsed.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"


# -- carried end to end ---------------------------------------------------------------------------


async def test_a_request_without_traceparent_gets_one_that_the_handler_and_the_reply_carry(nc, queue):
    seen = Seen()
    async with jrr.Responder(nc, {queue.subject("sandwich"): seen}, stream=queue.stream, durable="traced"):
        reply = await jrr.request(nc, queue.subject("sandwich"), timeout=5)

    assert jrr.parse_traceparent(seen.traceparents[0]) is not None, f"the handler saw {seen.traceparents}"
    assert reply.headers["traceparent"] == seen.traceparents[0]


async def test_the_callers_traceparent_is_kept_to_the_reply(nc, queue):
    seen = Seen()
    async with jrr.Responder(nc, {queue.subject("sandwich"): seen}, stream=queue.stream, durable="traced"):
        reply = await jrr.request(nc, queue.subject("sandwich"), timeout=5, headers={"traceparent": EXAMPLE})

    assert seen.traceparents == [EXAMPLE]
    assert jrr.trace_id_of(reply.headers) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert reply.headers["traceparent"] == EXAMPLE


async def test_an_error_reply_carries_the_requests_traceparent(nc, js, queue):
    inbox, replies = nc.new_inbox(), asyncio.Queue()
    sub = await nc.subscribe(inbox, cb=replies.put)
    try:
        async with jrr.Responder(nc, {queue.subject("soup"): refusing}, stream=queue.stream, durable="traced"):
            await js.publish(queue.subject("soup"), b"", headers={"Nats-Reply": inbox, "traceparent": EXAMPLE})
            async with asyncio.timeout(SETTLE):
                reply = await replies.get()
    finally:
        await sub.unsubscribe()

    assert reply.headers["Nats-Service-Error-Code"] == "409"
    assert reply.headers["traceparent"] == EXAMPLE


async def test_a_stored_reply_carries_the_traceparent_of_the_request_sent(nc, js, queue, mailboxes):
    seen = Seen("🥯")
    alice = mailboxes.requester(nc, "alice")
    try:
        request_id = await alice.send(queue.subject("bagel"), headers={"traceparent": EXAMPLE})
        async with jrr.Responder(nc, {queue.subject("bagel"): seen}, stream=queue.stream, durable="traced"):
            await jrr.wait_for_messages(js, mailboxes.stream, 1)
        replies = await alice.collect()
        unsent = await alice.send(queue.subject("bagel"))  # no traceparent given: one is made
        async with jrr.Responder(nc, {queue.subject("bagel"): seen}, stream=queue.stream, durable="traced"):
            await jrr.wait_for_messages(js, mailboxes.stream, 1)
        made = await alice.collect()
    finally:
        await alice.close()

    assert [(reply.request_id, reply.headers["traceparent"]) for reply in replies] == [(request_id, EXAMPLE)]
    assert [reply.request_id for reply in made] == [unsent]
    assert made[0].headers["traceparent"] == seen.traceparents[1] != EXAMPLE


async def test_a_traceparent_that_is_not_w3c_trace_context_is_refused_before_sending(nc, js, queue):
    with pytest.raises(ValueError, match="traceparent 'abc' is not W3C trace context"):
        await jrr.request(nc, queue.subject("sandwich"), timeout=5, headers={"traceparent": "abc"})

    assert (await js.stream_info(queue.stream)).state.messages == 0


async def test_without_opentelemetry_requests_still_carry_a_traceparent(nc, queue, monkeypatch):
    monkeypatch.setattr(tracing, "otel_trace", None)
    seen = Seen()
    async with jrr.Responder(nc, {queue.subject("sandwich"): seen}, stream=queue.stream, durable="traced"):
        reply = await jrr.request(nc, queue.subject("sandwich"), timeout=5)

    assert not tracing.tracing_enabled()
    assert reply.headers["traceparent"] == seen.traceparents[0]


# -- OpenTelemetry spans, when installed ----------------------------------------------------------


@pytest.fixture(scope="module")
def spans():
    """Every span finished while a test runs, kept in memory by the OpenTelemetry SDK."""
    pytest.importorskip("opentelemetry.trace", reason="opentelemetry-api is not installed (pip install -e .[otel])")
    sdk_trace = pytest.importorskip("opentelemetry.sdk.trace", reason="opentelemetry-sdk is not installed")
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # once per process: OpenTelemetry refuses to replace it
    return exporter


async def test_the_requester_and_responder_spans_are_linked_by_the_header(nc, queue, spans):
    spans.clear()
    seen = Seen()
    async with jrr.Responder(nc, {queue.subject("sandwich"): seen}, stream=queue.stream, durable="traced"):
        reply = await jrr.request(nc, queue.subject("sandwich"), timeout=5)

    by_name = {span.name: span for span in spans.get_finished_spans()}
    sent = by_name[f"request {queue.subject('sandwich')}"]
    processed = by_name[f"process {queue.subject('sandwich')}"]
    header = jrr.parse_traceparent(reply.headers["traceparent"])
    assert (header.trace_id, header.parent_id) == (f"{sent.context.trace_id:032x}", f"{sent.context.span_id:016x}")
    assert processed.context.trace_id == sent.context.trace_id
    assert processed.parent.span_id == sent.context.span_id and processed.parent.is_remote
    assert seen.traceparents == [reply.headers["traceparent"]]


async def test_a_callers_traceparent_is_the_parent_of_both_spans(nc, queue, spans):
    spans.clear()
    async with jrr.Responder(nc, {queue.subject("soup"): refusing}, stream=queue.stream, durable="traced"):
        with pytest.raises(jrr.RequestRejected):
            await jrr.request(nc, queue.subject("soup"), timeout=5, headers={"traceparent": EXAMPLE})

    finished = spans.get_finished_spans()
    assert {f"{span.context.trace_id:032x}" for span in finished} == {"4bf92f3577b34da6a3ce929d0e0e4736"}
    assert {span.parent.span_id for span in finished} == {0x00F067AA0BA902B7}
    assert {span.status.status_code.name for span in finished} == {"ERROR"}, "a rejection is recorded on both spans"
