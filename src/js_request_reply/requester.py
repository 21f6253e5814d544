"""The requesting side: `request()` and `Requester`, the Python counterpart of the nats.go trial's `js.Request`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from asyncio import FIRST_COMPLETED
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, KeyNotFoundError, NotFoundError
from nats.nuid import NUID

from . import protocol as p
from .errors import (
    NoReplyStream,
    NoRequestStream,
    PayloadTooLarge,
    RequestNotStored,
    RequestRejected,
    RequestTimeout,
)
from .failover import UNAVAILABLE, Backoff, in_cluster, is_leaderless, while_electing

# Why a request was not stored although a stream captures its subject.
LEADERLESS = (
    "; the stream that captures it had no leader all that time (a server of its cluster was lost, and "
    "the others were electing a new leader), so retry"
)
REPUBLISH_AFTER = 1.0  # seconds without a PubAck before a request is published again, in a cluster
MAILBOX_IDLE_LIMIT = 7 * 24 * 3600.0  # the server forgets a mailbox consumer unused for a week
HEADER_ALLOWANCE = 512  # bytes kept free under max_payload for our headers


@dataclass(frozen=True)
class ReplyError:
    """An error reply: the ADR-32 code and description."""

    code: int
    description: str


@dataclass
class Reply:
    """A reply as handed to the requester."""

    request_id: str
    subject: str
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)
    error: ReplyError | None = None

    @property
    def text(self) -> str:
        """The payload decoded as UTF-8 (undecodable bytes shown as U+FFFD)."""
        return self.data.decode("utf-8", errors="replace")

    @classmethod
    def from_msg(cls, msg: Msg) -> Reply:
        """Build a Reply from a reply message, reading the error headers."""
        headers = dict(msg.headers or {})
        return cls(p.request_id_of(msg.subject), msg.subject, msg.data, headers, error_of(headers))


def error_of(headers: dict[str, str] | None) -> ReplyError | None:
    """The ADR-32 error carried in `headers`, or None for a normal reply."""
    if not headers or (p.SERVICE_ERROR_HEADER not in headers and p.SERVICE_ERROR_CODE_HEADER not in headers):
        return None
    raw_code = headers.get(p.SERVICE_ERROR_CODE_HEADER, "")
    code = int(raw_code) if raw_code.strip().isdigit() else p.HANDLER_FAILED
    return ReplyError(code, headers.get(p.SERVICE_ERROR_HEADER, ""))


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
    from any connection or process.
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
        self._mailbox_sub: Any = None
        self._fetch_lock = asyncio.Lock()
        self._kv: Any = None  # the mailbox ledger, once opened
        self._opening = asyncio.Lock()  # concurrent sends bind the mailbox once
        self._fetched: dict[str, Msg] = {}  # mailbox replies fetched but not yet handed over

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
        responder works on a request nobody waits for.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        request_id = self._request_id(msg_id)
        reply_subject = self._reply_subject(request_id)
        reply_future = None if self.mailbox else self._inbox.expect(request_id)
        attempt = _Attempt()
        try:
            async with asyncio.timeout_at(deadline):
                await self._store(
                    subject, payload, request_id, reply_subject, headers, ttl, msg_id, attempt, timeout, reply_future
                )
                if reply_future is not None:
                    msg = await reply_future
                    _raise_if_error(msg, subject)
                    return msg
                reply = await self._wait_in_mailbox(request_id)
                if reply.error:
                    raise RequestRejected(reply.error.code, reply.error.description, subject)
                return reply
        except TimeoutError:
            raise RequestTimeout(await self._timed_out(subject, timeout, attempt)) from None
        finally:
            self._inbox.forget(request_id, request_id + ".ack")

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

        Returns once the server confirmed storing the request. Needs a mailbox.
        """
        if not self.mailbox:
            raise ValueError(
                "send() needs a mailbox, so the reply has somewhere to wait: Requester(nc, mailbox='alice')"
            )
        request_id = self._request_id(msg_id)
        attempt = _Attempt()
        try:
            async with asyncio.timeout(timeout):
                reply_subject = self._reply_subject(request_id)
                await self._store(subject, payload, request_id, reply_subject, headers, ttl, msg_id, attempt)
                await self._note_sent(request_id, subject, attempt.stored, ttl)
        except TimeoutError:
            if attempt.stored is not None:
                raise RequestTimeout(
                    f"the request to {subject!r} was stored ({attempt.stored.stream} #{attempt.stored.seq}), but the "
                    f"mailbox ledger did not confirm noting it within {timeout:g}s (its stream may have no leader "
                    "now); its reply will still be stored in the mailbox"
                ) from None
            said = f"the server did not confirm storing the request to {subject!r} within {timeout:g}s"
            raise RequestTimeout(f"{said}{LEADERLESS if attempt.leaderless else ''}") from None
        finally:
            self._inbox.forget(request_id + ".ack")
        return request_id

    async def collect(self, timeout: float = 5.0) -> list[Reply]:
        """Every reply stored for this mailbox that no earlier `collect()` returned, oldest first.

        Each reply is acknowledged as it is handed over, so it leaves REPLIES and is never handed
        over twice. A request sent with `send()` that has left the request stream with no reply
        (its TTL passed before any responder took it) comes back as an expired Reply, error code
        408, so nothing the mailbox sent is silently lost. Requests still waiting are not listed.
        Waits at most `timeout` seconds; returns [] when nothing is waiting.

        A reply is handed over in steps that are each safe to repeat: the ledger notes it as handed
        over (with the reply's stream sequence), then the reply is acked, then the request's entry
        is purged. A step that fails leaves the reply for the next collect(), never lost. A second
        reply to a request already handed over (stored again after a server restart made REPLIES
        forget its Nats-Msg-Id) is acked and dropped.
        """
        if not self.mailbox:
            raise ValueError("collect() needs a mailbox: Requester(nc, mailbox='alice')")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        vanished: dict[str, dict] = {}
        try:
            async with asyncio.timeout_at(deadline):
                sent = await self._sent_entries()
                with_reply = await self._stored_reply_ids()
                for rid, entry in sent.items():
                    if rid not in with_reply and not await _still_stored(self.nc, entry):
                        vanished[rid] = entry
                await self._fetch_waiting()
        except (TimeoutError, nats.errors.Error, OSError):
            vanished = {}  # hand over what was fetched; the rest is found by the next collect()
        handed: list[Reply] = []
        try:
            async with asyncio.timeout_at(max(deadline, loop.time() + 1)):
                for msg in sorted(self._fetched.values(), key=lambda msg: msg.metadata.sequence.stream):
                    rid, seq = p.request_id_of(msg.subject), msg.metadata.sequence.stream
                    done = await self._handed_over(rid)
                    if done is None:
                        await self._note_handed_over(rid, {"seq": seq})
                    if done is None or done.get("seq") == seq:
                        await msg.ack_sync()
                        handed.append(Reply.from_msg(msg))
                    else:
                        await msg.ack_sync()  # a second reply to a request already handed over: drop it
                    self._fetched.pop(rid, None)
                    vanished.pop(rid, None)
                    with contextlib.suppress(nats.errors.Error, TimeoutError):
                        await self._forget_sent([rid])
                for rid, entry in vanished.items():
                    if await self._handed_over(rid) is None:
                        await self._note_handed_over(rid, {"expired": True})
                        handed.append(self._expired(rid, entry))
                    with contextlib.suppress(nats.errors.Error, TimeoutError):
                        await self._forget_sent([rid])
        except (TimeoutError, nats.errors.Error, OSError):
            pass  # what was not handed over stays in self._fetched, or in the ledger, for the next collect()
        return handed

    async def _stored_reply_ids(self) -> set[str]:
        """Ids of requests whose reply is stored in REPLIES now (waiting, or delivered and not yet acked)."""
        filter_subject = f"{self.reply_prefix}.{self.mailbox}.>"
        info = await self.nc.jetstream().stream_info(self.reply_stream, subjects_filter=filter_subject)
        return {p.request_id_of(subject) for subject in info.state.subjects or {}}

    async def _handed_over(self, request_id: str) -> dict | None:
        """How a request's outcome was handed over ({"seq": reply's sequence} or {"expired": True}), or None."""
        ledger = await self._ledger()
        try:
            return json.loads((await while_electing(lambda: ledger.get(f"{self.mailbox}.done.{request_id}"))).value)
        except KeyNotFoundError:
            return None

    async def _note_handed_over(self, request_id: str, how: dict) -> None:
        ledger = await self._ledger()
        await while_electing(lambda: ledger.put(f"{self.mailbox}.done.{request_id}", json.dumps(how).encode()))

    async def close(self) -> None:
        """Drop the mailbox subscription (the durable mailbox and its replies stay on the server)."""
        sub, self._mailbox_sub = self._mailbox_sub, None
        if sub is not None:
            await sub.unsubscribe()

    async def __aenter__(self) -> Requester:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    # -- the steps ----------------------------------------------------------------------------------

    def _request_id(self, msg_id: str | None) -> str:
        if msg_id is None:
            return self._nuid.next().decode()
        if not p.is_valid_token(msg_id):
            raise ValueError(f"msg_id {msg_id!r} must be one subject token (letters, digits, '-' or '_')")
        return msg_id

    def _reply_subject(self, request_id: str) -> str:
        if self.mailbox:
            return p.mailbox_subject(self.mailbox, request_id, self.reply_prefix)
        return self._inbox.prefix + request_id

    async def _store(
        self, subject, payload, request_id, reply_subject, headers, ttl, msg_id, attempt, wait=None, reply=None
    ) -> None:
        """Publish the request with its reply subject in `Nats-Reply`, and wait for the stream's PubAck.

        `wait` (or else `ttl`) is how long the requester will want the answer: it travels as the
        `Nats-Deadline` header, so a responder that gets the request later does not work on it.
        A 503 from a stream that exists but has no leader (a cluster electing one) is retried with
        short pauses, under the caller's deadline; a 503 with no stream raises NoRequestStream.
        The reply, when it comes first (its PubAck was lost with a dying leader), ends the wait too.
        Where the request was stored, and whether its stream had no leader, goes into `attempt`.
        """
        if not p.is_valid_publish_subject(subject):
            raise ValueError(f"subject {subject!r} is not a valid subject to publish to")
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
        if self.mailbox:
            await self._open_mailbox()
        all_headers = dict(headers or {})
        all_headers[p.REPLY_HEADER] = reply_subject
        if self.mailbox:
            all_headers[p.REPLY_STREAM_HEADER] = self.reply_stream
        # In a cluster the stream's leader can die after storing a request and before its PubAck: the
        # request is published again, and the request id as Nats-Msg-Id makes the stream store it once.
        republish = in_cluster(self.nc)
        if msg_id is not None or republish:
            all_headers[p.MSG_ID_HEADER] = request_id
        if ttl is not None:
            if ttl < 1:
                raise ValueError(f"ttl must be at least 1 second (the server counts whole seconds), not {ttl}")
            all_headers[p.MSG_TTL_HEADER] = str(int(ttl))
        if wait is not None or ttl is not None:
            all_headers[p.DEADLINE_HEADER] = p.deadline_header(wait if wait is not None else ttl)
        await self._inbox.ready()
        ack_token = request_id + ".ack"
        backoff = Backoff()
        while True:
            ack_future = self._inbox.expect(ack_token)
            await self.nc.publish(subject, data, reply=self._inbox.prefix + ack_token, headers=all_headers)
            waiting = {ack_future} if reply is None else {ack_future, reply}
            await asyncio.wait(waiting, timeout=REPUBLISH_AFTER if republish else None, return_when=FIRST_COMPLETED)
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

    async def _timed_out(self, subject: str, timeout: float, attempt: _Attempt) -> str:
        said = f"no reply to {subject!r} within {timeout:g}s"
        stored = attempt.stored
        if stored is None:
            if attempt.leaderless:
                return f"{said}; the request was not stored{LEADERLESS}"
            return f"{said}; the server did not confirm storing the request"
        if await delete_request(self.nc, stored):
            return f"{said}; the stored request ({stored.stream} #{stored.seq}) was deleted"
        if stored.duplicate:
            # The server remembers a msg_id for its duplicate window even after the message is gone, so
            # a request retried with the msg_id of one deleted on timeout is dropped, and nobody answers it.
            return (
                f"{said}; it was not stored, being a duplicate (same msg_id) of {stored.stream} #{stored.seq}, "
                "which had already left the stream; retry with a new msg_id"
            )
        return f"{said}; a responder had already taken the request ({stored.stream} #{stored.seq})"

    # -- the mailbox --------------------------------------------------------------------------------

    async def _ledger(self):
        """The mailbox ledger's key-value bucket, opened once per Requester."""
        if self._kv is not None:
            return self._kv
        js = self.nc.jetstream()
        try:
            self._kv = await while_electing(lambda: js.key_value(p.ledger_bucket(self.reply_stream)))
            return self._kv
        except NotFoundError:
            raise NoReplyStream(
                f"the mailbox ledger {p.ledger_bucket(self.reply_stream)!r} does not exist; "
                "create it with ensure_reply_stream(js)"
            ) from None

    async def _note_sent(self, request_id: str, subject: str, stored: Stored, ttl: float | None) -> None:
        """Write down what was sent, so any later collect() can report it if it expires unanswered."""
        if await self._handed_over(request_id) is not None:
            return  # a send retried after its outcome was handed over: do not make it wait again
        entry = json.dumps({"subject": subject, "stream": stored.stream, "seq": stored.seq, "ttl": ttl}).encode()
        ledger = await self._ledger()
        await while_electing(lambda: ledger.put(f"{self.mailbox}.{request_id}", entry))

    async def _sent_entries(self) -> dict[str, dict]:
        """The ledger's entries for this mailbox: request id -> what was sent, where it is stored."""
        ledger = await self._ledger()
        # The bucket's stream lists the keys present; nats-py's keys() and watch() can miss entries.
        bucket = p.ledger_bucket(self.reply_stream)
        prefix = f"$KV.{bucket}."
        info = await self.nc.jetstream().stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}{self.mailbox}.*")
        entries = {}
        for subject in info.state.subjects or {}:
            key = subject[len(prefix) :]
            with contextlib.suppress(NotFoundError, ValueError, TypeError):  # purged: already settled
                entries[key.split(".", 1)[1]] = json.loads((await ledger.get(key)).value)
        return entries

    async def _forget_sent(self, request_ids: list[str]) -> None:
        if not request_ids:
            return
        ledger = await self._ledger()
        for request_id in request_ids:
            with contextlib.suppress(KeyNotFoundError):
                await ledger.purge(f"{self.mailbox}.{request_id}")

    def _expired(self, request_id: str, entry: dict) -> Reply:
        ttl = entry.get("ttl")
        why = f"its TTL of {ttl:g}s passed" if ttl else "it was removed"
        description = f"expired: the request left {entry['stream']} unanswered ({why} before any responder took it)"
        headers = {p.REQUEST_SUBJECT_HEADER: entry["subject"]}
        subject = self._reply_subject(request_id)
        return Reply(request_id, subject, b"", headers, ReplyError(p.EXPIRED, description))

    async def _open_mailbox(self) -> None:
        """Bind to this mailbox's durable consumer on REPLIES, creating it on first use.

        Concurrent sends open it once. In a cluster, JetStream may be electing a leader meanwhile:
        both calls are safe to repeat, so they are retried under the caller's deadline.
        """
        async with self._opening:
            if self._mailbox_sub is None:
                self._mailbox_sub = await self._bind_mailbox()

    async def _bind_mailbox(self):
        js = self.nc.jetstream()
        filter_subject = f"{self.reply_prefix}.{self.mailbox}.>"
        try:
            stream = await while_electing(lambda: js.find_stream_name_by_subject(filter_subject))
        except NotFoundError:
            stream = None
        if stream != self.reply_stream:
            raise NoReplyStream(
                f"no stream {self.reply_stream!r} stores replies for mailbox {self.mailbox!r} "
                f"({filter_subject}); create it with ensure_reply_stream(js)"
            )
        config = ConsumerConfig(
            durable_name=f"mailbox-{self.mailbox}",
            filter_subject=filter_subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            inactive_threshold=MAILBOX_IDLE_LIMIT,
        )
        try:
            return await while_electing(
                lambda: js.pull_subscribe(
                    filter_subject, durable=config.durable_name, stream=self.reply_stream, config=config
                )
            )
        except APIError as exc:
            raise NoReplyStream(
                f"mailbox {self.mailbox!r} could not be opened on {self.reply_stream!r}: {exc.description}"
            ) from None

    def _keep(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            self._fetched[p.request_id_of(msg.subject)] = msg  # a redelivered copy replaces the older one

    async def _fetch_waiting(self) -> None:
        """Fetch every reply waiting in the mailbox right now."""
        await self._open_mailbox()
        async with self._fetch_lock:
            waiting = (await self._mailbox_sub.consumer_info()).num_pending
            while waiting > 0:
                msgs = await self._mailbox_sub.fetch(min(waiting, 256), timeout=5)
                self._keep(msgs)
                waiting -= len(msgs)

    async def _wait_in_mailbox(self, request_id: str) -> Reply:
        """Wait (under the caller's deadline) until this request's reply is in the mailbox, and take it."""
        async with self._fetch_lock:
            backoff = Backoff()
            while request_id not in self._fetched:
                try:
                    self._keep(await self._mailbox_sub.fetch(1, timeout=1))
                except TimeoutError:
                    continue
                except UNAVAILABLE:
                    await backoff.wait()  # the mailbox's consumer is electing a leader
        msg = self._fetched.pop(request_id)
        await msg.ack_sync()
        return Reply.from_msg(msg)


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


async def _still_stored(nc: Client, entry: dict) -> bool:
    """True while a sent request is still in its stream (waiting, or being worked on)."""
    try:
        await nc.jetstream().get_msg(entry["stream"], entry["seq"])
    except NotFoundError:
        return False
    return True


async def delete_request(nc: Client, stored: Stored, timeout: float = 1.0) -> bool:
    """Delete a stored request; False when it was already gone (taken and acked, or expired)."""
    try:
        async with asyncio.timeout(timeout):
            return await nc.jetstream().delete_msg(stored.stream, stored.seq)
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
