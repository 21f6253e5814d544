"""Trace context carried end to end: the W3C `traceparent` header, and OpenTelemetry spans when installed.

A requester adds a `traceparent` header to every request that carries none (a caller's own is
kept). The Responder hands the request, header included, to its handler, and copies the header
onto the reply: a trace started by a requester no longer stops at the stream.

When `opentelemetry-api` is importable (`pip install -e .[otel]`), the requester opens a span for
each request and puts that span's context in the header, and the responder opens a span for the
handler whose parent is the one the header names: the two are linked across the stream. Without
it, nothing else changes.
"""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

try:  # the optional extra: pip install -e .[otel]
    from opentelemetry import context as otel_context
    from opentelemetry import trace as otel_trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # without it, requests still carry a traceparent; no spans are opened
    otel_trace = None

# W3C Trace Context: https://www.w3.org/TR/trace-context/
TRACEPARENT_HEADER = "traceparent"
SAMPLED = "01"
INSTRUMENTATION = "js_request_reply"

# version-trace id-parent id-flags, lower-case hex; a later version may append fields after a '-'.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZEROS = re.compile(r"0+")


@dataclass(frozen=True)
class TraceParent:
    """A parsed `traceparent`: which trace a message belongs to, and the span that sent it."""

    trace_id: str
    parent_id: str
    flags: str = SAMPLED
    version: str = "00"

    def __str__(self) -> str:
        return f"{self.version}-{self.trace_id}-{self.parent_id}-{self.flags}"

    @property
    def sampled(self) -> bool:
        """True when the sender may have recorded the trace (flag bit 0)."""
        return bool(int(self.flags, 16) & 1)


def parse_traceparent(value: str | None) -> TraceParent | None:
    """The trace context in a `traceparent` value; None when it is missing or not valid W3C trace context."""
    match = _TRACEPARENT.fullmatch((value or "").strip())
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or _ZEROS.fullmatch(trace_id) or _ZEROS.fullmatch(parent_id):
        return None
    return TraceParent(trace_id, parent_id, flags, version)


def new_traceparent() -> str:
    """A `traceparent` for a new trace: random trace and parent ids, sampled (so a tracing responder records it).

    The ids need to be unique, not secret (W3C asks for random ones, as OpenTelemetry makes them), and
    one is made for every request: so the fast generator, not the secrets module. Never all zeros.
    """
    trace_id, parent_id = random.getrandbits(128) or 1, random.getrandbits(64) or 1
    return f"00-{trace_id:032x}-{parent_id:016x}-{SAMPLED}"


def trace_id_of(headers: Mapping[str, str] | None) -> str | None:
    """The trace id a message's headers carry, or None."""
    parsed = parse_traceparent((headers or {}).get(TRACEPARENT_HEADER))
    return parsed.trace_id if parsed else None


def tracing_enabled() -> bool:
    """True when opentelemetry-api is installed, so requesters and responders open spans."""
    return otel_trace is not None


def _checked_caller_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """A copy of the caller's headers; a `traceparent` that is not W3C trace context is refused."""
    headers = dict(headers or {})
    given = headers.get(TRACEPARENT_HEADER)
    if given is not None and parse_traceparent(given) is None:
        raise ValueError(
            f"traceparent {given!r} is not W3C trace context: 00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>, "
            "lower-case, ids not all zeros; leave it out and one is made for the request"
        )
    return headers


def request_span(
    operation: str, subject: str, headers: Mapping[str, str] | None
) -> contextlib.AbstractContextManager[dict[str, str]]:
    """The headers to send one request with, holding a `traceparent`, inside a requester span when tracing.

    The caller's `traceparent` is kept as given; the span is then its child. Otherwise the header
    names the span (or, without OpenTelemetry, a new trace).
    """
    headers = _checked_caller_headers(headers)
    if otel_trace is None:  # no span to open: a plain context, since this is on every request's path
        if TRACEPARENT_HEADER not in headers:
            headers[TRACEPARENT_HEADER] = new_traceparent()
        return contextlib.nullcontext(headers)
    return _requester_span(operation, subject, headers)


@contextlib.contextmanager
def _requester_span(operation: str, subject: str, headers: dict[str, str]) -> Iterator[dict[str, str]]:
    given = headers.get(TRACEPARENT_HEADER)
    parent = _remote_context(given) if given else None  # None: the caller's current span, if any
    attributes = {"messaging.system": "nats", "messaging.destination.name": subject, "messaging.operation.type": "send"}
    tracer = otel_trace.get_tracer(INSTRUMENTATION)
    with tracer.start_as_current_span(
        f"{operation} {subject}", context=parent, kind=otel_trace.SpanKind.PRODUCER, attributes=attributes
    ) as span:
        if given is None:
            headers[TRACEPARENT_HEADER] = _traceparent_of(span) or new_traceparent()
        yield headers


def process_span(
    subject: str, headers: Mapping[str, str] | None, consumer: str = ""
) -> contextlib.AbstractContextManager[None]:
    """A responder span around one request's handler, a child of the span its `traceparent` names.

    Without OpenTelemetry it does nothing. A handler's own spans nest inside it, and an exception
    the handler raises (a rejection included) is recorded on it.
    """
    if otel_trace is None:
        return _NO_SPAN
    return _responder_span(subject, headers, consumer)


_NO_SPAN = contextlib.nullcontext()


@contextlib.contextmanager
def _responder_span(subject: str, headers: Mapping[str, str] | None, consumer: str) -> Iterator[None]:
    given = (headers or {}).get(TRACEPARENT_HEADER)
    # No header: a trace of its own, never a child of whatever span started the responder.
    parent = _remote_context(given) or otel_context.Context()
    attributes = {
        "messaging.system": "nats",
        "messaging.destination.name": subject,
        "messaging.operation.type": "process",
        "messaging.consumer.group.name": consumer,
    }
    tracer = otel_trace.get_tracer(INSTRUMENTATION)
    with tracer.start_as_current_span(
        f"process {subject}", context=parent, kind=otel_trace.SpanKind.CONSUMER, attributes=attributes
    ):
        yield


def _remote_context(traceparent: str | None):
    """An OpenTelemetry context whose parent is the remote span `traceparent` names, or None if it names none."""
    if parse_traceparent(traceparent) is None:
        return None
    return TraceContextTextMapPropagator().extract({TRACEPARENT_HEADER: traceparent}, context=otel_context.Context())


def _traceparent_of(span) -> str | None:
    """The `traceparent` naming `span`, or None for a span with no valid context (no SDK, so nothing records)."""
    span_context = span.get_span_context()
    if not span_context.is_valid:
        return None
    flags = f"{int(span_context.trace_flags):02x}"
    return str(TraceParent(f"{span_context.trace_id:032x}", f"{span_context.span_id:016x}", flags))
