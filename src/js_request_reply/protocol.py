"""Wire conventions: header names, error codes and subject rules, in one place.

`docs/protocol.md` describes the same conventions for clients in other languages.
"""

from __future__ import annotations

import re
import time

from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER

# The request's reply subject. The nats.go trial of `js.Request` uses the same header.
REPLY_HEADER = "Nats-Reply"
# Set by a mailbox-mode requester: the stream that stores its replies, so the responder
# waits for that stream's PubAck before acking the request.
REPLY_STREAM_HEADER = "Nats-Reply-Stream"
# Set by a mailbox-mode requester, noted in its ledger entry, and copied onto the stored reply: a
# random token only the mailbox's owner (and the responder) sees. A reply is handed over only if it
# carries the token its ledger entry noted, so nobody who merely knows a request id can answer it.
MAILBOX_TOKEN_HEADER = "Nats-Mailbox-Token"
# Carried on every reply: the subject of the request it answers.
REQUEST_SUBJECT_HEADER = "Nats-Request-Subject"
# Set by the requester: when its answer stops being useful, in Unix epoch milliseconds. A responder
# that receives the request later terminates it as expired instead of working on it.
DEADLINE_HEADER = "Nats-Deadline"

# ADR-32 service error headers, as nats.micro uses them.
SERVICE_ERROR_HEADER = ERROR_HEADER
SERVICE_ERROR_CODE_HEADER = ERROR_CODE_HEADER

# Server-defined headers we rely on.
MSG_ID_HEADER = "Nats-Msg-Id"
MSG_TTL_HEADER = "Nats-TTL"
STATUS_HEADER = "Status"
NO_RESPONDERS_STATUS = "503"

# Error codes a Responder sends, HTTP-style as ADR-32 suggests.
NO_HANDLER = 404
HANDLER_FAILED = 500
BAD_REQUEST = 400
EXPIRED = 408  # a request past its deadline, or one collect() found gone from the stream unanswered
GAVE_UP = 500  # the consumer's max_deliver ran out
NOT_YOUR_MAILBOX = 403  # Nats-Reply names a mailbox whose ledger never noted the request: nobody is answered

# JetStream API error codes we handle by number.
JS_ERR_NO_MESSAGE_FOUND = 10037
JS_ERR_STREAM_NOT_FOUND = 10059
JS_ERR_CONSUMER_OVERLAP = 10100
JS_ERR_CONSUMER_WQ_UNFILTERED = 10099  # a second unfiltered consumer on a work-queue stream
JS_ERR_REPLICAS_NOT_CLUSTERED = 10074  # replicas > 1 on a server that is not part of a cluster
JS_ERR_MSG_TTL_DISABLED = 10166  # a message with a TTL, to a stream that does not allow them

# An error description is cut to this many bytes (UTF-8) before it goes into a header: the server
# closes the connection of a client whose headers and payload together exceed max_payload.
MAX_DESCRIPTION = 1024

DEFAULT_REQUEST_STREAM = "REQUESTS"
DEFAULT_REQUEST_SUBJECTS = ("requests.*",)
DEFAULT_REPLY_STREAM = "REPLIES"
DEFAULT_REPLY_PREFIX = "replies"
DEFAULT_REPLY_SUBJECTS = (f"{DEFAULT_REPLY_PREFIX}.>",)

_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


def is_valid_token(token: str) -> bool:
    """True for one subject token made of letters, digits, '-' and '_' (no wildcards, dots or spaces)."""
    return bool(_TOKEN.fullmatch(token))


# A publish subject: dot-separated tokens, none empty, none exactly "*" or ">", no white space.
# One regex, because every request and every reply passes through here.
_TOKEN_RE = r"(?![*>](?:\.|$))[^.\s]+"
_PUBLISH_SUBJECT = re.compile(rf"{_TOKEN_RE}(?:\.{_TOKEN_RE})*")


def is_valid_publish_subject(subject: str) -> bool:
    """True for a subject a message can be published to: dot-separated, no wildcards, no white space."""
    return bool(subject) and _PUBLISH_SUBJECT.fullmatch(subject) is not None


def deadline_header(seconds_from_now: float) -> str:
    """The `Nats-Deadline` value for a deadline `seconds_from_now` seconds away."""
    return str(int((time.time() + seconds_from_now) * 1000))


def seconds_past_deadline(headers: dict[str, str] | None) -> float | None:
    """How many seconds ago the request's deadline passed; None when it has none or it has not passed."""
    raw = (headers or {}).get(DEADLINE_HEADER, "").strip()
    if not raw.isdigit():
        return None
    late = time.time() - int(raw) / 1000
    return late if late > 0 else None


def fit_description(description: str, limit: int = MAX_DESCRIPTION) -> str:
    """`description` cut to at most `limit` UTF-8 bytes, ending in '…' when cut."""
    data = description.encode()
    if len(data) <= limit:
        return description
    return data[: limit - len("…".encode())].decode(errors="ignore") + "…"


def request_id_of(reply_subject: str) -> str:
    """The request id is the last token of the request's reply subject."""
    return reply_subject.rsplit(".", 1)[-1]


def mailbox_subject(mailbox: str, request_id: str, prefix: str = DEFAULT_REPLY_PREFIX) -> str:
    """The subject a reply to `request_id` is stored under in `mailbox`."""
    return f"{prefix}.{mailbox}.{request_id}"


def mailbox_of(reply_subject: str, prefix: str = DEFAULT_REPLY_PREFIX) -> str:
    """The mailbox a reply subject `<prefix>.<mailbox>.<request id>` names; "" for any other shape."""
    rest = reply_subject[len(prefix) + 1 :] if reply_subject.startswith(prefix + ".") else ""
    mailbox, _, request_id = rest.partition(".")
    return mailbox if is_valid_token(mailbox) and is_valid_token(request_id) else ""


def ledger_bucket(reply_stream: str) -> str:
    """The key-value bucket beside a reply stream where mailboxes note what they sent (keys: <mailbox>.<id>).

    It lets a later collect() tell "still waiting" from "expired unanswered".
    """
    return f"{reply_stream}-ledger"


def gave_up_stream(request_stream: str) -> str:
    """The stream beside a request stream that keeps the server's max-deliveries advisories for it.

    An advisory is an event, gone if nobody listens when the server gives up on a request: kept in
    a stream, it waits for the next responder to answer the request it names.
    """
    return f"{request_stream}-gave-up"


def max_deliveries_subject(request_stream: str, durable: str = "*") -> str:
    """The subject of the advisory the server emits when `durable` gives up redelivering a request."""
    return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{request_stream}.{durable}"


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` matches one token, a final `>` matches one or more."""
    pattern_tokens, subject_tokens = pattern.split("."), subject.split(".")
    for i, token in enumerate(pattern_tokens):
        if token == ">":
            return len(subject_tokens) > i
        if i >= len(subject_tokens) or (token != "*" and token != subject_tokens[i]):
            return False
    return len(pattern_tokens) == len(subject_tokens)
