"""The requesting side: `request()` and `Requester`, the Python counterpart of the nats.go trial's `js.Request`."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import secrets
from asyncio import FIRST_COMPLETED
from dataclasses import dataclass

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import APIError
from nats.nuid import NUID

from . import protocol as p
from .denials import denials_for, denied_at_once
from .errors import (
    NoRequestStream,
    PayloadTooLarge,
    PermissionDenied,
    RequestNotStored,
    RequestRejected,
    RequestTimeout,
)
from .failover import Backoff, in_cluster, is_leaderless
from .mailbox import Mailbox, Reply, ReplyError, error_of
from .tracing import request_span

__all__ = ["Reply", "ReplyError", "Requester", "delete_request", "error_of", "request"]

# Why a request was not stored although a stream captures its subject.
LEADERLESS = (
    "; the stream that captures it had no leader all that time (a server of its cluster was lost, and "
    "the others were electing a new leader), so retry"
)
REPUBLISH_AFTER = 1.0  # seconds without a PubAck before a request is published again, in a cluster
HEADER_ALLOWANCE = 512  # bytes kept free under max_payload for our headers


@dataclass(frozen=True)
class Stored:
    """Where the server stored a request (from its PubAck)."""

    stream: str
    seq: int
    duplicate: bool = False


@dataclass
class _Attempt:
    """What one request got to before its deadline, for a timeout message that says why."""

    stored: Stored | None = None
    leaderless: bool = False  # a stream captures the subject, but had no leader to store the request
    noted: bool = False  # mailbox mode: the request is written in the mailbox's ledger
    token: str | None = None  # mailbox mode: the token the request carries, noted in the ledger


class _ReplyInbox:
    """One wildcard subscription per connection. Replies and PubAcks are routed to futures by token.

    This is why a request costs no subscribe or unsubscribe: the subscription is made once.
    """

    def __init__(self, nc: Client):
        self.nc = nc
        self.prefix = nc.new_inbox() + "."
        self._waiting: dict[str, asyncio.Future] = {}
        self._subscribed: asyncio.Task | None = None

    async def ready(self) -> None:
        if self._subscribed is None:
            self._subscribed = asyncio.ensure_future(self.nc.subscribe(self.prefix + ">", cb=self._route))
        await self._subscribed

    def expect(self, token: str) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        return future

    def forget(self, *tokens: str) -> None:
        for token in tokens:
            self._waiting.pop(token, None)

    async def _route(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject[len(self.prefix) :], None)
        if future is not None and not future.done():
            future.set_result(msg)


def _inbox_for(nc: Client) -> _ReplyInbox:
    """The connection's one reply inbox, kept on the connection so it lives and dies with it."""
    inbox = getattr(nc, "_jrr_reply_inbox", None)
    if inbox is None:
        inbox = nc._jrr_reply_inbox = _ReplyInbox(nc)
    return inbox


def header_size(headers: dict[str, str] | None) -> int:
    """Bytes that `headers` take on the wire (`Name: value` and CRLF per header)."""
    return sum(len(name.encode()) + len(str(value).encode()) + 4 for name, value in (headers or {}).items())


def as_bytes(payload: bytes | str | None) -> bytes:
    """Accept bytes or str payloads; str is sent as UTF-8."""
    if payload is None:
        return b""
    if isinstance(payload, str):
        return payload.encode()
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    raise TypeError(f"payload must be bytes or str, not {type(payload).__name__}")


class Requester:
    """Sends requests into a work-queue stream and gets their replies.

    Without a mailbox, replies come straight back on the connection's one multiplexed inbox.
    With `mailbox="alice"`, replies are addressed to `replies.alice.<request-id>` and stored in
    REPLIES, so they wait there while this requester is offline; `collect()` hands each over once,
    from any connection or process. Mailbox mode lives in mailbox.py.
    """

    def __init__(
        self,
        nc: Client,
        *,
        mailbox: str | None = None,
        reply_stream: str = p.DEFAULT_REPLY_STREAM,
        reply_prefix: str = p.DEFAULT_REPLY_PREFIX,
    ):
        if mailbox is not None and not p.is_valid_token(mailbox):
            raise ValueError(
                f"mailbox {mailbox!r} must be one subject token of letters, digits, '-' or '_' "
                "(no dots, spaces or wildcards), so it can only ever read its own replies"
            )
        self.nc = nc
        self.mailbox = mailbox
        self.reply_stream = reply_stream
        self.reply_prefix = reply_prefix
        self._nuid = NUID()
        self._inbox = _inbox_for(nc)
        self._box = None if mailbox is None else Mailbox(nc, mailbox, reply_stream, reply_prefix)

    @property
    def dropped(self) -> collections.Counter[str]:
        """What collect() found in the mailbox and dropped, by reason: 'not requested' (a reply to a
        request this mailbox never sent) and 'second reply' (its request was answered already)."""
        return self._box.dropped if self._box is not None else collections.Counter()

    # -- requesting ---------------------------------------------------------------------------------

    async def request(
        self,
        subject: str,
        payload: bytes | str = b"",
        *,
        timeout: float = 1.0,
        headers: dict[str, str] | None = None,
        ttl: float | None = None,
        msg_id: str | None = None,
    ) -> Msg | Reply:
        """Store a request and wait up to `timeout` seconds for its reply.

        Returns the reply message (a `Reply` in mailbox mode). Raises RequestRejected on an error
        reply, NoRequestStream when no stream captures `subject`, and RequestTimeout when no reply
        came in time; the stored request is then deleted, as the nats.go trial does, so no
        responder works on a request nobody waits for. A user not allowed to delete requests
        leaves it to its `Nats-Deadline`: a responder that takes it later rejects it unrun.
        """
        # A traceparent on every request (the caller's, or a new one), and a span around it when tracing. The
        # caller's headers alone count against the payload limit: ours, traceparent included, fit the allowance.
        with request_span("request", subject, headers) as traced:
            return await self._request(subject, payload, timeout, headers, traced, ttl, msg_id)

    async def send(
        self,
        subject: str,
        payload: bytes | str = b"",
        *,
        ttl: float | None = None,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
    ) -> str:
        """Store a request and return its id without waiting for the reply, which waits in the mailbox.

        Returns once the server confirmed storing the request. Needs a mailbox. The request is
        noted in the mailbox's ledger first, so that its reply is recognised as this mailbox's.
        """
        if self._box is None:
            raise ValueError(
                "send() needs a mailbox, so the reply has somewhere to wait: Requester(nc, mailbox='alice')"
            )
        with request_span("send", subject, headers) as traced:
            return await self._send(subject, payload, ttl, msg_id, headers, traced, timeout)

    async def collect(self, timeout: float = 5.0) -> list[Reply]:
        """Every reply stored for this mailbox that no earlier `collect()` returned, oldest first.

        Each reply is acknowledged as it is handed over, so it leaves REPLIES and is never handed
        over twice. Only replies to requests this mailbox noted in its ledger are handed over;
        anything else found in the mailbox is dropped and counted in `dropped`. A request sent
        with a TTL that no responder took in time comes back as an expired Reply, error code 408,
        so nothing the mailbox sent is silently lost. Requests still waiting are not listed.
        Waits at most `timeout` seconds; returns [] when nothing is waiting.
        """
        if self._box is None:
            raise ValueError("collect() needs a mailbox: Requester(nc, mailbox='alice')")
        with self._box.owner_only():
            return await self._box.collect(timeout)

    async def close(self) -> None:
        """Drop the mailbox subscription (the durable mailbox and its replies stay on the server)."""
        if self._box is not None:
            await self._box.close()

    async def __aenter__(self) -> Requester:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    # -- the steps ----------------------------------------------------------------------------------

    async def _request(
        self,
        subject: str,
        payload: bytes | str,
        timeout: float,
        headers: dict[str, str] | None,
        traced: dict[str, str],
        ttl: float | None,
        msg_id: str | None,
    ) -> Msg | Reply:
        """request(), with `traced`: the caller's headers and the trace context."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        data = self._checked(subject, payload, headers, ttl)
        request_id = self._request_id(msg_id)
        reply_subject = self._reply_subject(request_id)
        reply_future = None if self._box else self._inbox.expect(request_id)
        attempt = _Attempt()
        try:
            async with asyncio.timeout_at(deadline):
                sent_before = False
                if self._box is not None:
                    sent_before = await self._note(request_id, subject, ttl, msg_id, attempt)
                await self._store(
                    subject, data, request_id, reply_subject, traced, ttl, msg_id, attempt, timeout, reply_future
                )
                if self._box is not None:
                    await self._box.check_not_foreign(request_id, subject, attempt.stored, sent_before)
                if reply_future is not None:
                    msg = await reply_future
                    _raise_if_error(msg, subject)
                    return msg
                with self._box.owner_only():
                    reply = await self._box.wait_for(request_id, {"subject": subject, "token": attempt.token})
                if reply.error:
                    raise RequestRejected(reply.error.code, reply.error.description, subject)
                return reply
        except TimeoutError:
            raise RequestTimeout(await self._timed_out(subject, request_id, timeout, attempt)) from None
        except (NoRequestStream, RequestNotStored, PermissionDenied):
            if attempt.noted and attempt.stored is None:
                await self._box.forget_unsent(request_id)
            raise
        finally:
            self._inbox.forget(request_id, request_id + ".ack")

    async def _send(
        self,
        subject: str,
        payload: bytes | str,
        ttl: float | None,
        msg_id: str | None,
        headers: dict[str, str] | None,
        traced: dict[str, str],
        timeout: float,
    ) -> str:
        """send(), with `traced`: the caller's headers and the trace context."""
        data = self._checked(subject, payload, headers, ttl)
        request_id = self._request_id(msg_id)
        attempt = _Attempt()
        try:
            async with asyncio.timeout(timeout):
                sent_before = await self._note(request_id, subject, ttl, msg_id, attempt)
                reply_subject = self._reply_subject(request_id)
                await self._store(subject, data, request_id, reply_subject, traced, ttl, msg_id, attempt)
                await self._box.check_not_foreign(request_id, subject, attempt.stored, sent_before)
        except TimeoutError:
            said = f"the server did not confirm storing the request to {subject!r} within {timeout:g}s"
            if not attempt.noted:
                said = f"the mailbox ledger did not confirm noting the request to {subject!r} within {timeout:g}s"
            raise RequestTimeout(f"{said}{LEADERLESS if attempt.leaderless else ''}") from None
        except (NoRequestStream, RequestNotStored, PermissionDenied):
            if attempt.noted and attempt.stored is None:
                await self._box.forget_unsent(request_id)
            raise
        finally:
            self._inbox.forget(request_id + ".ack")
        return request_id

    async def _note(
        self, request_id: str, subject: str, ttl: float | None, msg_id: str | None, attempt: _Attempt
    ) -> bool:
        """Open the mailbox and note the request in its ledger, with a fresh token; True if it was sent before."""
        token = secrets.token_urlsafe(16)  # unguessable: the reply must carry it back
        with self._box.owner_only():
            await self._box.open()
            sent_before, attempt.token = await self._box.note_sent(
                request_id, subject, ttl, token, chosen_id=msg_id is not None
            )
        attempt.noted = True
        return sent_before

    def _request_id(self, msg_id: str | None) -> str:
        if msg_id is None:
            return self._nuid.next().decode()
        if not p.is_valid_token(msg_id):
            raise ValueError(f"msg_id {msg_id!r} must be one subject token (letters, digits, '-' or '_')")
        return msg_id

    def _reply_subject(self, request_id: str) -> str:
        if self._box is not None:
            return self._box.reply_subject(request_id)
        return self._inbox.prefix + request_id

    def _checked(self, subject: str, payload: bytes | str, headers: dict[str, str] | None, ttl: float | None) -> bytes:
        """The payload as bytes, once the subject, its size and the TTL are known to be acceptable."""
        if not p.is_valid_publish_subject(subject):
            raise ValueError(f"subject {subject!r} is not a valid subject to publish to")
        if ttl is not None and ttl < 1:
            raise ValueError(f"ttl must be at least 1 second (the server counts whole seconds), not {ttl}")
        data = as_bytes(payload)
        # The server counts headers and payload together, and closes the connection of a client that
        # sends more than max_payload: the caller's own headers take their share of the limit too.
        yours = header_size(headers)
        limit = self.nc.max_payload - HEADER_ALLOWANCE - yours
        if len(data) > limit:
            theirs = f", {yours} bytes of them your headers" if yours else ""
            raise PayloadTooLarge(
                f"payload of {len(data)} bytes is over the limit of {limit} bytes "
                f"(the server's max_payload of {self.nc.max_payload} less room for headers{theirs}); not sent"
            )
        return data

    async def _store(
        self, subject, data, request_id, reply_subject, headers, ttl, msg_id, attempt, wait=None, reply=None
    ) -> None:
        """Publish the request with its reply subject in `Nats-Reply`, and wait for the stream's PubAck.

        `wait` (or else `ttl`) is how long the requester will want the answer: it travels as the
        `Nats-Deadline` header, so a responder that gets the request later does not work on it.
        A 503 from a stream that exists but has no leader (a cluster electing one) is retried with
        short pauses, under the caller's deadline; a 503 with no stream raises NoRequestStream.
        The reply, when it comes first (its PubAck was lost with a dying leader), ends the wait too.
        A publish the server denies this user raises PermissionDenied at once.
        Where the request was stored, and whether its stream had no leader, goes into `attempt`.
        """
        all_headers = dict(headers or {})
        all_headers[p.REPLY_HEADER] = reply_subject
        if self._box is not None:
            all_headers[p.REPLY_STREAM_HEADER] = self.reply_stream
            if attempt.token is not None:
                all_headers[p.MAILBOX_TOKEN_HEADER] = attempt.token
        # In a cluster the stream's leader can die after storing a request and before its PubAck: the
        # request is published again, and the request id as Nats-Msg-Id makes the stream store it once.
        republish = in_cluster(self.nc)
        if msg_id is not None or republish:
            all_headers[p.MSG_ID_HEADER] = request_id
        if ttl is not None:
            all_headers[p.MSG_TTL_HEADER] = str(int(ttl))
        if wait is not None or ttl is not None:
            all_headers[p.DEADLINE_HEADER] = p.deadline_header(wait if wait is not None else ttl)
        await self._inbox.ready()
        ack_token = request_id + ".ack"
        backoff = Backoff()
        denials = denials_for(self.nc)
        denied = denials.watch(subject)
        try:
            while True:
                ack_future = self._inbox.expect(ack_token)
                await self.nc.publish(subject, data, reply=self._inbox.prefix + ack_token, headers=all_headers)
                waiting = {ack_future, denied} if reply is None else {ack_future, reply, denied}
                timeout = REPUBLISH_AFTER if republish else None
                await asyncio.wait(waiting, timeout=timeout, return_when=FIRST_COMPLETED)
                if denied.done():
                    raise denied.exception()
                if reply is not None and reply.done():
                    return  # answered already: the request was stored, though its PubAck never came
                if not ack_future.done():
                    continue  # no PubAck: the message went to a leader that died; publish it again
                ack = ack_future.result()
                if not _is_no_responders(ack):
                    stored = _stored_from(ack, subject)
                    # A duplicate of our own first copy (its PubAck lost) is the request itself, stored once.
                    attempt.stored = stored if msg_id is not None else dataclasses.replace(stored, duplicate=False)
                    return
                if not (attempt.leaderless or await is_leaderless(self.nc, subject)):
                    raise NoRequestStream(subject)
                attempt.leaderless = True  # not stored: try again once the stream has a leader
                await backoff.wait()
        finally:
            denials.unwatch(denied)

    async def _timed_out(self, subject: str, request_id: str, timeout: float, attempt: _Attempt) -> str:
        said = f"no reply to {subject!r} within {timeout:g}s"
        stored = attempt.stored
        if stored is None:
            if attempt.noted:
                await self._box.forget_unsent(request_id)
            if attempt.leaderless:
                return f"{said}; the request was not stored{LEADERLESS}"
            return f"{said}; the server did not confirm storing the request"
        if stored.duplicate:
            # The stored copy has this msg_id but may be another requester's (msg_ids are shared by
            # everyone who publishes to the stream): it is left alone.
            return (
                f"{said}; it was not stored, being a duplicate (same msg_id) of {stored.stream} #{stored.seq}, "
                "which was left alone (it may be another requester's, or already gone); retry with a new msg_id"
            )
        deleted = await delete_request(self.nc, stored)
        if deleted is True:
            if attempt.noted:
                await self._box.forget_unsent(request_id)
            return f"{said}; the stored request ({stored.stream} #{stored.seq}) was deleted"
        if deleted is None:
            return (
                f"{said}; this user may not delete the stored request ({stored.stream} #{stored.seq}), so it "
                "stays until a responder takes it and, its deadline past, rejects it without running it"
            )
        return f"{said}; a responder had already taken the request ({stored.stream} #{stored.seq})"


def _is_no_responders(ack: Msg) -> bool:
    """True for a 503 status: nobody took the message (no stream captures it, or its stream has no leader)."""
    return bool(ack.headers) and ack.headers.get(p.STATUS_HEADER) == p.NO_RESPONDERS_STATUS


def _stored_from(ack: Msg, subject: str) -> Stored:
    """Read a PubAck, turning 'no stream' and server refusals into clear errors."""
    if _is_no_responders(ack):
        raise NoRequestStream(subject)
    try:
        body = json.loads(ack.data)
    except ValueError:
        body = None
    if not isinstance(body, dict) or ("stream" not in body and "error" not in body):
        # Something other than a stream answered: a core subscriber, not JetStream.
        raise NoRequestStream(subject)
    if "error" in body:
        error = body["error"]
        raise RequestNotStored(subject, error.get("description", "unknown error"), error.get("err_code"))
    return Stored(body["stream"], int(body["seq"]), bool(body.get("duplicate", False)))


def _raise_if_error(msg: Msg, subject: str) -> None:
    error = error_of(msg.headers)
    if error is not None:
        raise RequestRejected(error.code, error.description, subject)


async def delete_request(nc: Client, stored: Stored, timeout: float = 1.0) -> bool | None:
    """Delete a stored request: True if deleted, False when it was already gone (taken and acked, or
    expired), None when this user may not delete it."""
    subject = f"$JS.API.STREAM.MSG.DELETE.{stored.stream}"
    try:
        async with asyncio.timeout(timeout):
            return await denied_at_once(nc, nc.jetstream().delete_msg(stored.stream, stored.seq), subject)
    except PermissionDenied:
        return None
    except (APIError, TimeoutError):
        return False


async def request(
    nc: Client,
    subject: str,
    payload: bytes | str = b"",
    *,
    timeout: float = 1.0,
    headers: dict[str, str] | None = None,
    ttl: float | None = None,
    msg_id: str | None = None,
) -> Msg:
    """Store a request in the stream that captures `subject` and wait for its reply.

    The counterpart of the nats.go trial's `js.Request`: the reply subject travels in the
    `Nats-Reply` header, and on timeout the stored request is deleted and RequestTimeout raised.
    An error reply raises RequestRejected; no stream for `subject` raises NoRequestStream.
    """
    return await Requester(nc).request(subject, payload, timeout=timeout, headers=headers, ttl=ttl, msg_id=msg_id)
