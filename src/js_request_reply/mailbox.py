"""Mailbox mode: replies stored in the reply stream until their requester comes back for them.

A mailbox `alice` is a durable consumer `mailbox-alice` on REPLIES, filtered to
`replies.alice.>`, and alice's entries in the ledger (see ledger.py). A reply is handed over
only if the ledger shows that this mailbox sent its request, and the reply carries the random
token the ledger noted for it (Nats-Mailbox-Token), and only once. Anything else that lands in
the mailbox (a reply to a request somebody else sent in alice's name, a message stored there by a
JetStream API call given alice's subject as its reply subject, a second reply to a request
already answered) is acked, dropped and counted in `dropped`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, NotFoundError

from . import protocol as p
from .access import mailbox_consumer
from .denials import denied_at_once
from .errors import NoReplyStream, PermissionDenied, RequesterClosed, RequestNotStored
from .failover import Backoff, in_cluster, while_electing
from .ledger import Ledger
from .pulls import held_now

MAILBOX_IDLE_LIMIT = 7 * 24 * 3600.0  # the server forgets a mailbox consumer unused for a week
EXPIRY_MARGIN = (
    1.0  # seconds after a TTL before collect() calls its request expired: the server's TTL clock ticks in seconds
)
FETCH_BATCH = 256  # replies asked for by one pull
PUMP_EXPIRY = 1.0  # seconds one pull of the pump stays open on the server before the next
CLOSE_WAIT = 2.0  # seconds close() lets the pump's last pull end and hand-overs finish
LISTING_SHARE = 0.5  # at most this share of collect()'s timeout goes to listing the ledger
RECHECKS = 5  # reads of a ledger entry, over about a second, before a reply in a cluster counts as unrequested

# Why collect() dropped a message from the mailbox instead of handing it over.
NOT_REQUESTED = "not requested"  # the ledger never noted its request: sent in this mailbox's name by someone else
SECOND_REPLY = "second reply"  # its request's outcome was handed over already


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


class Mailbox:
    """One requester's mailbox: its consumer on the reply stream, its ledger entries, and the hand-over."""

    def __init__(self, nc: Client, name: str, reply_stream: str, reply_prefix: str):
        self.nc = nc
        self.name = name
        self.reply_stream = reply_stream
        self.reply_prefix = reply_prefix
        self.ledger = Ledger(nc, reply_stream, name)
        self.dropped: collections.Counter[str] = collections.Counter()
        self._opened = False
        self._opening = asyncio.Lock()  # concurrent sends open the mailbox once
        self._fetched: dict[str, Msg] = {}  # replies fetched that nobody waits for: a later collect() takes them
        self._waiters: dict[str, asyncio.Future[Msg]] = {}  # request id -> the request() waiting for its reply
        self._pump: asyncio.Task | None = None
        self._round_end: asyncio.Future | None = None
        self._round_left = 0
        self._round_status = ""
        self._finishing: set[asyncio.Task] = set()  # entries being forgotten after a hand-over
        self._consumer = mailbox_consumer(name)
        self._api = f"$JS.API.CONSUMER.%s.{reply_stream}.{self._consumer}"

    @contextlib.contextmanager
    def owner_only(self) -> Iterator[None]:
        """Say a denial in the mailbox's terms: who may not use which mailbox, and what was denied."""
        try:
            yield
        except PermissionDenied as denied:
            if denied.action == "connect":
                raise
            who = f"user {denied.user!r}" if denied.user else "this connection"
            raise PermissionDenied(
                denied.subject,
                denied.user,
                denied.action,
                message=(
                    f"permission denied: {who} may not use mailbox {self.name!r}, which only its owner may "
                    f"read (the server denied {'publishing to' if denied.action == 'publish' else 'subscribing to'} "
                    f"{denied.subject!r})"
                ),
            ) from None

    def reply_subject(self, request_id: str) -> str:
        """Where a reply to `request_id` is stored: `<prefix>.<mailbox>.<request id>`."""
        return p.mailbox_subject(self.name, request_id, self.reply_prefix)

    # -- sending ------------------------------------------------------------------------------------

    async def note_sent(
        self, request_id: str, subject: str, ttl: float | None, token: str, *, chosen_id: bool = False
    ) -> tuple[bool, str | None]:
        """Write the request into the ledger before it is published, so its reply is recognised as ours.

        `token` travels with the request (Nats-Mailbox-Token) and comes back on its reply. Returns
        whether this mailbox sent a request with this id before, and the token the request must
        carry. A request id the caller chose (a msg_id) may be a retried send: one still waiting
        keeps the token it was noted with, and one whose outcome was handed over already is not
        written down again, so it is not waited for again.
        """
        if chosen_id:
            if await self.ledger.done(request_id) is not None:
                return True, token
            earlier = await self.ledger.sent(request_id)
            if earlier is not None:
                return True, earlier.get("token")
        expires = int((time.time() + ttl) * 1000) if ttl else None
        entry = {"subject": subject, "ttl": ttl, "expires": expires, "token": token}
        await self.ledger.note_sent(request_id, entry)
        return False, token

    async def check_not_foreign(self, request_id: str, subject: str, stored: Any, sent_before: bool) -> None:
        """Refuse a msg_id that another requester's stored request already has.

        The stream stores a request once per msg_id, whoever sends it: a copy sent with the msg_id
        of a request this mailbox never sent was dropped, and its reply would go to that sender.
        """
        if stored is None or not stored.duplicate or sent_before:
            return
        await self.forget_unsent(request_id)
        raise RequestNotStored(
            subject,
            f"msg_id {request_id!r} is taken: {stored.stream} #{stored.seq} has it, and mailbox {self.name!r} did "
            f"not send that request (every requester on {stored.stream} shares its msg_ids); choose another",
        )

    async def forget_unsent(self, request_id: str) -> None:
        """Take back the ledger entry of a request that was never stored."""
        with contextlib.suppress(nats.errors.Error, TimeoutError, NoReplyStream, PermissionDenied):
            await self.ledger.forget(request_id)

    # -- the consumer -------------------------------------------------------------------------------

    async def open(self) -> None:
        """Make sure this mailbox's durable consumer on the reply stream exists, creating it on first use.

        Concurrent sends open it once. In a cluster, JetStream may be electing a leader meanwhile:
        both calls are safe to repeat, so they are retried under the caller's deadline.
        """
        async with self._opening:
            if not self._opened:
                await self._ensure_consumer()
                self._opened = True

    async def _ensure_consumer(self) -> None:
        js = self.nc.jetstream()
        filter_subject = f"{self.reply_prefix}.{self.name}.>"
        config = ConsumerConfig(
            name=self._consumer,
            durable_name=self._consumer,
            filter_subject=filter_subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            inactive_threshold=MAILBOX_IDLE_LIMIT,
        )
        info, create = self._api % "INFO", f"{self._api % 'CREATE'}.{filter_subject}"
        try:
            try:
                await while_electing(
                    lambda: denied_at_once(self.nc, js.consumer_info(self.reply_stream, self._consumer), info)
                )
            except NotFoundError as missing:
                if missing.err_code == p.JS_ERR_STREAM_NOT_FOUND:
                    raise
                await while_electing(
                    lambda: denied_at_once(self.nc, js.add_consumer(self.reply_stream, config), create)
                )
        except NotFoundError:
            raise NoReplyStream(
                f"no stream {self.reply_stream!r} stores replies for mailbox {self.name!r} "
                f"({filter_subject}); create it with ensure_reply_stream(js)"
            ) from None
        except APIError as exc:
            raise NoReplyStream(
                f"mailbox {self.name!r} could not be opened on {self.reply_stream!r}: {exc.description}"
            ) from None

    async def close(self) -> None:
        """Stop waiting for replies (the durable mailbox and its replies stay on the server).

        The pump's last pull is let end first: the server would otherwise hand it a reply for an
        inbox nobody reads, and the reply would wait out the consumer's ack_wait before a collect() got it.
        """
        for request_id, waiter in self._waiters.items():
            if not waiter.done():
                waiter.set_exception(
                    RequesterClosed(
                        f"the Requester was closed while request {request_id!r} waited for its reply; "
                        f"the reply waits in mailbox {self.name!r} for collect()"
                    )
                )
        pending = {task for task in (self._pump, *self._finishing) if task is not None}
        if pending:
            await asyncio.wait(pending, timeout=CLOSE_WAIT)
        self._opened = False

    # -- reading the mailbox ------------------------------------------------------------------------

    def _route(self, msg: Msg) -> None:
        """Give a fetched reply to the request() waiting for it, or keep it for collect()."""
        request_id = p.request_id_of(msg.subject)
        waiter = self._waiters.get(request_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(msg)
        else:
            self._fetched[request_id] = msg  # a redelivered copy replaces the older one

    def _start_pump(self) -> None:
        if self._pump is None:
            self._pump = asyncio.create_task(self._pump_replies(), name=f"mailbox-{self.name}")

    async def _pump_replies(self) -> None:
        """Keep one pull open on the mailbox while any request() waits, routing every reply it brings.

        One pull serves every waiting request, however many: the Responder's pattern. It ends
        with the round in which nobody waits any more.
        """
        loop = asyncio.get_running_loop()
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, cb=self._on_pumped)
        pull = json.dumps({"batch": FETCH_BATCH, "expires": int(PUMP_EXPIRY * 1e9)}).encode()
        backoff = Backoff()
        try:
            while True:
                if not self._waiters:
                    self._pump = None  # before any await: a request() that waits from now on starts a new pump
                    return
                self._round_left, self._round_status = FETCH_BATCH, ""
                self._round_end = loop.create_future()
                await self.nc.publish(self._api % "MSG.NEXT", pull, reply=inbox)  # open() checked it is allowed
                await asyncio.wait({self._round_end}, timeout=PUMP_EXPIRY + 1)  # a lost pull ends nowhere
                if self._round_status == p.NO_RESPONDERS_STATUS:
                    await backoff.wait()  # the mailbox's consumer is electing a leader
                else:
                    backoff = Backoff()
        except BaseException as exc:
            self._pump = None
            for waiter in self._waiters.values():
                if not waiter.done() and isinstance(exc, Exception):
                    waiter.set_exception(exc)
            raise
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def _on_pumped(self, msg: Msg) -> None:
        headers = msg.headers or {}
        if not msg.data and p.STATUS_HEADER in headers:
            self._round_status = headers[p.STATUS_HEADER]
            if self._round_status != "100":  # a heartbeat; anything else ends the round
                self._end_round()
            return
        self._round_left -= 1
        if self._round_left <= 0:
            self._end_round()
        self._route(msg)

    def _end_round(self) -> None:
        if self._round_end is not None and not self._round_end.done():
            self._round_end.set_result(None)

    async def _read_waiting(self) -> None:
        """Fetch every reply waiting in the mailbox right now, without waiting for more.

        A 503 (no leader) ends it with NoRespondersError: what was fetched is handed over.
        """
        await self.open()
        async for msg in held_now(self.nc, self.reply_stream, self._consumer, batch=FETCH_BATCH):
            self._route(msg)

    # -- handing over -------------------------------------------------------------------------------

    async def wait_for(self, request_id: str, entry: dict) -> Reply:
        """Wait (under the caller's deadline) until this request's reply is in the mailbox, and take it.

        `entry` is what the ledger noted for the request (this process wrote it: no need to read it).
        The reply is handed over once it is claimed in the ledger and acked; its entry is
        forgotten meanwhile, in the background.
        """
        await self.open()
        while True:
            msg = self._fetched.pop(request_id, None)
            if msg is None:
                waiter = self._waiters[request_id] = asyncio.get_running_loop().create_future()
                try:
                    self._start_pump()
                    msg = await waiter
                finally:
                    if self._waiters.get(request_id) is waiter:
                        del self._waiters[request_id]
            if await self._hand_over(msg, entry, forget_later=True):
                return Reply.from_msg(msg)

    async def _hand_over(self, msg: Msg, entry: dict | None, *, forget_later: bool = False) -> bool:
        """Settle one fetched reply: True when it is to be handed over, False when it was dropped.

        The steps are each safe to repeat: the ledger notes the reply as handed over (with its
        stream sequence), the reply is acked, the request's entry is deleted. A step that fails
        leaves the reply for the next collect(), never lost.
        """
        request_id, seq = p.request_id_of(msg.subject), msg.metadata.sequence.stream
        if entry is None and in_cluster(self.nc):
            entry = await self._sent_after_all(request_id)
        if entry is None:
            earlier = await self.ledger.done(request_id)
            mine = earlier is not None and earlier.get("seq") == seq  # claimed, but not acked before a crash
        elif not _answers(msg, entry):
            # Stored under this request's subject, but not by a responder that saw the request: a
            # JetStream API answer or a PubAck given this subject as its reply subject. The real
            # reply may still come.
            await denied_at_once(self.nc, msg.ack_sync(), msg.reply)
            self.dropped[NOT_REQUESTED] += 1
            return False
        else:
            earlier = await self.ledger.claim(request_id, {"seq": seq})
            mine = earlier is None or earlier.get("seq") == seq
        await denied_at_once(self.nc, msg.ack_sync(), msg.reply)
        if entry is not None and forget_later:  # the caller waits only for the claim and the ack
            task = asyncio.create_task(self._forget_settled(request_id))
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)
        elif entry is not None:
            await self._forget_settled(request_id)
        if not mine:
            self.dropped[SECOND_REPLY if earlier is not None else NOT_REQUESTED] += 1
        return mine

    async def _forget_settled(self, request_id: str) -> None:
        """Delete a settled request's entry; one left behind is only a listing's extra line."""
        with contextlib.suppress(nats.errors.Error, TimeoutError, NoReplyStream):
            await self.ledger.forget(request_id)

    async def _sent_after_all(self, request_id: str) -> dict | None:
        """Read a request's entry again, for a second, before calling its reply one nobody asked for.

        In a cluster any copy of the ledger answers a direct get, and a copy that lags behind its
        leader may not have an entry written a moment ago: a reply must not be dropped for that.
        """
        backoff = Backoff()
        for _ in range(RECHECKS):
            await backoff.wait()
            entry = await self.ledger.sent(request_id)
            if entry is not None or await self.ledger.done(request_id) is not None:
                return entry
        return None

    async def collect(self, timeout: float) -> list[Reply]:
        """Every reply to a request this mailbox sent that nothing handed over before, oldest first.

        See Requester.collect(). A request whose TTL ran out a moment ago is waited for until the
        server has surely removed it (EXPIRY_MARGIN), within `timeout`, and then reported expired.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        outstanding: dict[str, dict] = {}
        handed: list[Reply] = []
        try:
            # Listed before the fetch, so a reply fetched is never missed. Only expiries need the
            # listing: when it fails (a cluster that lost the listing's node), replies are handed over anyway.
            async with asyncio.timeout(timeout * LISTING_SHARE):
                outstanding = await self.ledger.outstanding()
        except (TimeoutError, nats.errors.Error, OSError):
            outstanding = {}
        try:
            async with asyncio.timeout_at(deadline):
                await self._read_waiting()
        except (TimeoutError, nats.errors.Error, OSError):
            pass  # hand over what was fetched; the rest is found by the next collect()
        try:
            async with asyncio.timeout_at(max(deadline, loop.time() + 1)):
                await self._hand_over_fetched(outstanding, handed)
            settle_by = max((_expiry(entry) for entry in outstanding.values() if _due(entry)), default=None)
            if settle_by is not None and loop.time() + (settle_by - time.time()) < deadline:
                await asyncio.sleep(settle_by - time.time())  # a clock to wait for, not an event
                async with asyncio.timeout_at(max(deadline, loop.time() + 1)):
                    await self._read_waiting()
                    await self._hand_over_fetched(outstanding, handed)
            async with asyncio.timeout_at(max(deadline, loop.time() + 1)):
                for request_id, entry in outstanding.items():
                    if time.time() > _expiry(entry):
                        if await self.ledger.claim(request_id, {"expired": True}) is None:
                            handed.append(self._expired(request_id, entry))
                        with contextlib.suppress(nats.errors.Error, TimeoutError):
                            await self.ledger.forget(request_id)
        except (TimeoutError, nats.errors.Error, OSError):
            pass  # what was not handed over stays fetched, or in the ledger, for the next collect()
        return handed

    async def _hand_over_fetched(self, outstanding: dict[str, dict], handed: list[Reply]) -> None:
        """Hand over (or drop) every reply fetched, oldest first; each leaves `outstanding`.

        A reply a request() of this process is waiting for was given to it already (see _route).
        """
        for msg in sorted(self._fetched.values(), key=lambda msg: msg.metadata.sequence.stream):
            request_id = p.request_id_of(msg.subject)
            entry = outstanding.pop(request_id, None) or await self.ledger.sent(request_id)
            if await self._hand_over(msg, entry):
                handed.append(Reply.from_msg(msg))
            self._fetched.pop(request_id, None)

    def _expired(self, request_id: str, entry: dict) -> Reply:
        description = (
            f"expired: no responder took the request within its TTL of {entry['ttl']:g}s, so the server removed it"
        )
        headers = {p.REQUEST_SUBJECT_HEADER: entry.get("subject", "")}
        return Reply(request_id, self.reply_subject(request_id), b"", headers, ReplyError(p.EXPIRED, description))


def _answers(msg: Msg, entry: dict) -> bool:
    """True when `msg` carries the token and subject its ledger entry noted (entries of old have no token)."""
    headers = msg.headers or {}
    token = entry.get("token")
    if token is not None and headers.get(p.MAILBOX_TOKEN_HEADER) != token:
        return False
    subject = entry.get("subject")
    return subject is None or headers.get(p.REQUEST_SUBJECT_HEADER) == subject


def _expiry(entry: dict) -> float:
    """When (epoch seconds) the server has surely removed a request sent with a TTL; infinity without one."""
    expires = entry.get("expires")
    return expires / 1000 + EXPIRY_MARGIN if isinstance(expires, int) else math.inf


def _due(entry: dict) -> bool:
    """True for a request whose TTL has run out, though the server may not have removed it yet."""
    expiry = _expiry(entry)
    return expiry - EXPIRY_MARGIN <= time.time() < expiry
