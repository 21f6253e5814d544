"""The responding side: a Responder pulls requests from the work queue, replies, and only then acks."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Union

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, NotFoundError

from . import protocol as p
from .denials import denials_for, denied_at_once, processed
from .errors import NoLeader, PayloadTooLarge, PermissionDenied, Reject, StreamConflict, StreamNotFound
from .failover import Backoff, is_leaderless, while_electing
from .gave_up import AnswerLater, GaveUpWatch
from .requester import HEADER_ALLOWANCE, REPUBLISH_AFTER
from .service import ResponderService
from .settling import ACK, NAK_LATER, Settler, term_verdict
from .tracing import TRACEPARENT_HEADER, process_span

Handler = Callable[[Msg], Union[bytes, str, Awaitable[Union[bytes, str]]]]  # noqa: UP007 - a runtime alias
Handlers = Union[Handler, Mapping[str, Handler]]  # noqa: UP007

PULL_EXPIRY = 1.0  # seconds a pull request waits on the server; a lost one is re-issued after this
START_TIMEOUT = 15.0  # seconds start() waits for the consumer, through a leader election
STATUS_HEARTBEAT = "100"


@dataclass(frozen=True)
class Handled:
    """What a Responder did with one request.

    `outcome` is 'replied', 'rejected', 'terminated', 'retried' (nak'd to try again), 'gave up'
    (max_deliver ran out) or 'refused' (its Nats-Reply names a mailbox that did not send it).
    """

    responder: str
    subject: str
    request_id: str
    outcome: str
    detail: str = ""
    delivery: int = 1


class Responder:
    """Serves requests stored in a work-queue stream.

    For each request it calls the handler for the request's subject, publishes the reply to the
    request's `Nats-Reply` subject, and only then acks, so a crash between the two leaves the
    request in the stream to be redelivered, never a request that is gone without a reply. When
    the reply subject is stored by a stream (mailbox mode), it waits for that stream's PubAck
    before acking. A handler that raises `Reject(code, description)`, or a subject with no handler,
    gets an error reply and the request is terminated (`+TERM` with the reason).

    Several Responders with the same `durable` share one pull consumer and split the work.

    A request past its `Nats-Deadline` is terminated as expired without calling the handler. A
    handler that runs longer than half the `ack_wait` is kept alive with in-progress acks, so no
    second responder starts on the same request. A request redelivered `max_deliver` times (its
    responders crashed or could not store the reply) gets an error reply, "gave up after N
    deliveries", instead of silence.

    A reply is stored in a mailbox (a `Nats-Reply` under `reply_prefix`) only when that mailbox's
    ledger noted the request, which only the mailbox's owner may write: a request sent in somebody
    else's name is terminated with `403` and answered to nobody (`check_mailboxes=False` skips
    the check, for requesters that keep no ledger).
    """

    def __init__(
        self,
        nc: Client,
        handlers: Handlers,
        *,
        stream: str = p.DEFAULT_REQUEST_STREAM,
        durable: str = "responder",
        name: str | None = None,
        max_in_flight: int = 64,
        ack_wait: float = 30.0,
        max_deliver: int = 5,
        reply_timeout: float = 10.0,
        on_handled: Callable[[Handled], None] | None = None,
        reply_prefix: str = p.DEFAULT_REPLY_PREFIX,
        check_mailboxes: bool = True,
    ):
        if not p.is_valid_token(durable):
            raise ValueError(f"durable {durable!r} must be one token of letters, digits, '-' or '_'")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.nc = nc
        self.handlers = handlers
        self.stream = stream
        self.durable = durable
        self.name = name or durable
        self.max_in_flight = max_in_flight
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.reply_timeout = reply_timeout
        self.on_handled = on_handled
        self.reply_prefix = reply_prefix
        self.check_mailboxes = check_mailboxes
        self.handled: collections.deque[Handled] = collections.deque(maxlen=10_000)
        self._tasks: set[asyncio.Task] = set()
        self._running_handlers: dict[int, tuple[Msg, float]] = {}  # id(msg) -> (msg, when its work started)
        self._keep_alive_task: asyncio.Task | None = None
        self._capacity = asyncio.Event()
        self._round_end: asyncio.Future | None = None
        self._round_left = 0
        self._deliver_sub: Any = None
        self._gave_up = GaveUpWatch(nc, stream, durable, self._answer_gave_up)
        self._advisory_sub: Any = None
        self._pull_task: asyncio.Task | None = None
        self._stopping = False
        self._leaderless = False  # the last pull got a 503: the consumer had no leader
        self._settler = Settler(nc, stream, durable, ack_wait, working=lambda: set(self._tasks))
        self._leader_subs: list[Any] = []
        # Discovery and stats ($SRV.PING, INFO, STATS): who is serving, how fast, and what fails.
        self.service = ResponderService(
            nc,
            name=durable,
            instance=self.name,
            stream=stream,
            handlers=handlers,
            in_flight=lambda: [msg.subject for msg, _ in self._running_handlers.values()],
        )

    @property
    def running(self) -> bool:
        """True between start() and stop()."""
        return self._pull_task is not None and not self._stopping

    async def start(self) -> Responder:
        """Create or bind the durable consumer and start pulling requests."""
        if self._pull_task is not None:
            return self
        await self._ensure_consumer()
        self._stopping = False
        self._deliver = self.nc.new_inbox()
        self._deliver_sub = await self.nc.subscribe(self._deliver, cb=self._on_delivery)
        # One responder of the group answers each request the server gave up on (see gave_up.py).
        self._advisory_sub = await self._gave_up.start()
        # Every responder of the group confirms its recent acks to a new consumer leader; one resets it.
        elected = f"$JS.EVENT.ADVISORY.CONSUMER.LEADER_ELECTED.{self.stream}.{self.durable}"
        self._leader_subs = [
            await self.nc.subscribe(elected, cb=self._on_leader_elected),
            await self.nc.subscribe(
                elected, queue=f"jrr-{self.stream}-{self.durable}", cb=self._on_leader_elected_reclaim
            ),
        ]
        await self._check_subscriptions()
        await self.service.start()
        self._pull_task = asyncio.create_task(self._pull_loop(), name=f"responder-{self.name}")
        self._keep_alive_task = asyncio.create_task(self._keep_alive_loop(), name=f"keep-alive-{self.name}")
        return self

    async def _check_subscriptions(self) -> None:
        """Raise PermissionDenied if the server refused one of the subscriptions just made.

        The server answers a denied subscription only with an -ERR, reported before anything the
        server processes after it.
        """
        subs = [self._deliver_sub, self._advisory_sub, *self._leader_subs]
        denials = denials_for(self.nc)
        denied = denials.watch(*(sub.subject for sub in subs))
        try:
            await processed(self.nc, denied)
            if denied.done():
                error = denied.exception()
                await self._gave_up.stop()
                for sub in subs:
                    with contextlib.suppress(nats.errors.Error):
                        await sub.unsubscribe()
                self._deliver_sub = self._advisory_sub = None
                self._leader_subs = []
                raise error
        finally:
            denials.unwatch(denied)

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop taking requests, finish the ones in flight (up to `timeout` s), then unsubscribe.

        Requests delivered after stop() began are nak'd, so another responder takes them at once.
        The last pull request stays open on the server until it expires (PULL_EXPIRY), and the
        server keeps handing it requests while anyone listens on its inbox (a `nats sub '>'`, a
        Wiretap). So stop() keeps naking until that pull has ended, rather than leaving requests
        with an inbox nobody reads for a whole ack_wait.
        """
        if self._pull_task is None:
            return
        self._stopping = True
        self._pull_task.cancel()
        await asyncio.gather(self._pull_task, return_exceptions=True)
        closed = self.nc.is_closed  # a closed connection has no pull left open and nothing to unsubscribe
        if self._round_end is not None and not closed:
            await asyncio.wait({self._round_end}, timeout=PULL_EXPIRY + 0.5)
        if self._tasks or self._settler.tasks:
            await asyncio.wait(self._tasks | self._settler.tasks, timeout=timeout)
        if self._keep_alive_task is not None:
            self._keep_alive_task.cancel()
            await asyncio.gather(self._keep_alive_task, return_exceptions=True)
        await self._gave_up.stop()
        await self.service.stop()
        for sub in (self._deliver_sub, *self._leader_subs):
            if sub is not None and not closed:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()
        self._deliver_sub = self._advisory_sub = self._pull_task = None
        self._leader_subs = []

    async def __aenter__(self) -> Responder:
        return await self.start()

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Responder {self.name!r} on {self.stream}/{self.durable} {state}>"

    # -- the consumer and the pull loop -------------------------------------------------------------

    async def _ensure_consumer(self) -> None:
        config = ConsumerConfig(
            name=self.durable,  # with a name, nats-py uses CONSUMER.CREATE.<stream>.<name>, the subject access.py allows
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait,
            max_deliver=self.max_deliver,
        )
        js = self.nc.jetstream()
        api = f"$JS.API.CONSUMER.%s.{self.stream}.{self.durable}"
        try:
            async with asyncio.timeout(START_TIMEOUT):
                existing = await self._existing_consumer(api % "INFO")
                if existing is not None:
                    # A durable made with a filter keeps it: the server stops feeding a waiting pull
                    # when an update takes a consumer's filter away.
                    config.filter_subject = existing.config.filter_subject
                    config.filter_subjects = existing.config.filter_subjects
                create = api % "CREATE" + (f".{config.filter_subject}" if config.filter_subject else "")
                await while_electing(lambda: denied_at_once(self.nc, js.add_consumer(self.stream, config), create))
        except TimeoutError:
            raise NoLeader(
                f"durable {self.durable!r} on {self.stream!r} could not be created or bound within "
                f"{START_TIMEOUT:g}s: JetStream did not answer (a cluster with no meta or stream leader?)"
            ) from None
        except NotFoundError:
            raise StreamNotFound(
                f"stream {self.stream!r} does not exist; create it with ensure_request_stream(js)"
            ) from None
        except APIError as exc:
            if exc.err_code in (p.JS_ERR_CONSUMER_OVERLAP, p.JS_ERR_CONSUMER_WQ_UNFILTERED):
                raise StreamConflict(
                    f"durable {self.durable!r} cannot read {self.stream!r}: work-queue streams refuse "
                    f"overlapping consumers (error {exc.err_code}), and another consumer already reads "
                    "these subjects. Give every Responder the same durable to share the work."
                ) from None
            raise StreamConflict(
                f"durable {self.durable!r} on {self.stream!r} could not be created: {exc.description}"
            ) from None

    async def _existing_consumer(self, info_subject: str) -> Any:
        """The durable's info if it exists already, else None (a missing stream raises NotFoundError)."""
        js = self.nc.jetstream()
        try:
            return await while_electing(
                lambda: denied_at_once(self.nc, js.consumer_info(self.stream, self.durable), info_subject)
            )
        except NotFoundError as missing:
            if missing.err_code == p.JS_ERR_STREAM_NOT_FOUND:
                raise
            return None

    async def _pull_loop(self) -> None:
        """Keep one pull request open, asking for as many requests as there is room for."""
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}"
        loop = asyncio.get_running_loop()
        backoff = Backoff()
        while True:
            if self._leaderless:  # pulling again at once would only spin until a leader is elected
                self._leaderless = False
                await backoff.wait()
            else:
                backoff = Backoff()
            free = self.max_in_flight - len(self._tasks)
            if free <= 0:
                self._capacity.clear()
                await self._capacity.wait()
                continue
            self._settler.check_connection()
            self._round_left = free
            self._round_end = loop.create_future()
            pull = {"batch": free, "expires": int(PULL_EXPIRY * 1e9)}
            await self.nc.publish(subject, json.dumps(pull).encode(), reply=self._deliver)
            # The server ends a round with a status message or by filling the batch. A pull lost to a
            # server restart ends nowhere, so the deadline re-issues it. (asyncio.wait, unlike await,
            # leaves the future alone when this task is cancelled: stop() still needs it.)
            await asyncio.wait({self._round_end}, timeout=PULL_EXPIRY + 1)

    def _end_round(self) -> None:
        if self._round_end is not None and not self._round_end.done():
            self._round_end.set_result(None)

    async def _on_delivery(self, msg: Msg) -> None:
        status = (msg.headers or {}).get(p.STATUS_HEADER) if not msg.data else None
        if status:
            if status == p.NO_RESPONDERS_STATUS:
                self._leaderless = True  # nobody took the pull: the consumer is electing a leader
                self._settler.disrupted()
            if status != STATUS_HEARTBEAT:
                self._end_round()  # 408 expired, 409 ended by the server, 404 nothing waiting, 503
            return
        self._round_left -= 1
        if self._round_left <= 0:
            self._end_round()
        self._settler.delivered(msg)
        if self._stopping:
            await msg.nak()
            return
        task = asyncio.create_task(self._handle(msg))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._capacity.set()

    # -- one request --------------------------------------------------------------------------------

    async def _handle(self, msg: Msg) -> None:
        headers = msg.headers or {}
        reply_to = headers.get(p.REPLY_HEADER, "")
        delivery = _delivery_count(msg)
        if not p.is_valid_publish_subject(reply_to):
            present = p.REPLY_HEADER in headers  # an empty header is there, but still names no subject
            why = f"Nats-Reply {reply_to!r} is not a valid subject" if present else "no Nats-Reply header"
            await self._settler.settle(msg, term_verdict(f"{p.BAD_REQUEST} {why}"))
            self._record(msg, "", "terminated", why, delivery)
            return
        refusal = await self._not_from_mailbox_owner(msg, reply_to)
        if refusal is None:  # the ledger could not be read: try again later, maybe on another responder
            await self._settler.settle(msg, NAK_LATER)
            self._record(msg, p.request_id_of(reply_to), "retried", "could not check who sent it", delivery)
            return
        if refusal:
            await self._settler.settle(msg, term_verdict(f"{p.NOT_YOUR_MAILBOX} {refusal}"))
            self._record(msg, p.request_id_of(reply_to), "refused", refusal, delivery)
            return
        # Kept alive with in-progress acks until settled: the handler, and storing its reply while a
        # mailbox stream elects a leader, may each outlast the ack_wait.
        self._running_handlers[id(msg)] = (msg, time.monotonic())
        try:
            await self._answer(msg, reply_to, delivery)
        finally:
            del self._running_handlers[id(msg)]

    async def _answer(self, msg: Msg, reply_to: str, delivery: int) -> None:
        """Run the handler for `msg` (unless it is past its deadline), reply, then ack or terminate."""
        started = time.perf_counter_ns()
        try:
            await self._run_and_reply(msg, reply_to, delivery)
        finally:
            self.service.add_time(msg.subject, time.perf_counter_ns() - started)

    async def _run_and_reply(self, msg: Msg, reply_to: str, delivery: int) -> None:
        request_id = p.request_id_of(reply_to)
        late = p.seconds_past_deadline(msg.headers)
        if late is not None:
            why = f"expired: the requester's deadline passed {late:.1f} s before a responder took it"
            await self._reject(msg, reply_to, request_id, p.EXPIRED, why, delivery)
            return
        try:
            # A span linked to the requester's by the traceparent header, when OpenTelemetry is installed.
            with process_span(msg.subject, msg.headers, self.durable):
                data = await self._call_handler(msg)
        except Reject as reject:
            await self._reject(msg, reply_to, request_id, reject.code, reject.description, delivery)
            return
        except Exception as exc:  # a failing handler must not take the responder down
            detail = f"handler failed: {type(exc).__name__}: {exc}"
            await self._reject(msg, reply_to, request_id, p.HANDLER_FAILED, detail, delivery)
            return
        if await self._send_reply(msg, reply_to, request_id, data, {}, delivery):
            await self._settler.settle(msg, ACK)
            self._record(msg, request_id, "replied", "", delivery)

    async def _not_from_mailbox_owner(self, msg: Msg, reply_to: str) -> str | None:
        """Why a reply to `msg` must not be stored in the mailbox its Nats-Reply names ("" when it may;
        None when the ledger could not be read).

        Only a mailbox's owner may write its ledger entries (see access.py), and a requester notes
        each request there before publishing it. So an entry for this request id, for this subject,
        proves the request came from the mailbox's owner. The lookup goes to the ledger's leader,
        not to a replica that may not have the entry yet.
        """
        headers = msg.headers or {}
        if not self.check_mailboxes or not reply_to.startswith(self.reply_prefix + "."):
            return ""
        reply_stream = headers.get(p.REPLY_STREAM_HEADER, "")
        if not reply_stream:
            return f"Nats-Reply {reply_to!r} names a mailbox, but the request has no {p.REPLY_STREAM_HEADER} header"
        mailbox, request_id = p.mailbox_of(reply_to, self.reply_prefix), p.request_id_of(reply_to)
        if not mailbox:
            return f"Nats-Reply {reply_to!r} is not a mailbox subject, {self.reply_prefix}.<mailbox>.<request id>"
        bucket = p.ledger_bucket(reply_stream)
        stream, key = f"KV_{bucket}", f"$KV.{bucket}.{mailbox}.{request_id}"
        js, entry = self.nc.jetstream(), None
        try:
            async with asyncio.timeout(self.reply_timeout):
                # Any copy of the ledger answers a direct get, at once. Only its leader is sure to have
                # an entry written a moment ago: a miss is asked again of the leader, a slower API call.
                with contextlib.suppress(PermissionDenied):  # allowed only the leader's get (an older access config)
                    entry = await self._ledger_entry(
                        lambda: js.get_msg(stream, subject=key, direct=True), f"$JS.API.DIRECT.GET.{stream}.{key}"
                    )
                if not _is_noted(entry):
                    entry = await self._ledger_entry(
                        lambda: js.get_msg(stream, subject=key), f"$JS.API.STREAM.MSG.GET.{stream}"
                    )
        except (TimeoutError, APIError, PermissionDenied):
            return None
        if not _is_noted(entry):
            return f"mailbox {mailbox!r} did not send this request (no entry {mailbox}.{request_id} in {bucket!r})"
        subject, token = _noted(entry.data)
        if subject not in (msg.subject, None) or token not in (headers.get(p.MAILBOX_TOKEN_HEADER), None):
            return f"mailbox {mailbox!r} did not send this request (its entry {mailbox}.{request_id} is another's)"
        return ""

    async def _ledger_entry(self, get: Callable[[], Awaitable[Any]], subject: str) -> Any:
        """The ledger message `get()` reads (retried while the ledger elects a leader), or None."""
        try:
            return await while_electing(lambda: denied_at_once(self.nc, get(), subject))
        except NotFoundError:
            return None

    async def _on_leader_elected(self, advisory: Msg) -> None:
        """The consumer has a new leader: acks sent to the old one may be lost."""
        self._settler.disrupted()

    async def _on_leader_elected_reclaim(self, advisory: Msg) -> None:
        """One responder of the group: what the old leader delivered and nobody settled is delivered again."""
        self._settler.disrupted(reclaim=True)

    async def _keep_alive_loop(self) -> None:
        """Every third of ack_wait, send in-progress acks for handlers running longer than that.

        One sweeper for all requests, rather than a timer each: most handlers finish long before.
        """
        interval = self.ack_wait / 3
        while True:
            await asyncio.sleep(interval)  # periodic work: there is no event to wait for
            now = time.monotonic()
            for msg, started in list(self._running_handlers.values()):
                if now - started >= interval:
                    with contextlib.suppress(nats.errors.Error):
                        await msg.in_progress()

    async def _call_handler(self, msg: Msg) -> bytes:
        handler = self._handler_for(msg.subject)
        if handler is None:
            raise Reject(p.NO_HANDLER, f"no handler for subject {msg.subject!r}")
        result = handler(msg)
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, str):
            result = result.encode()
        if not isinstance(result, bytes | bytearray):
            returned = "None" if result is None else type(result).__name__
            raise TypeError(f"handler returned {returned}, expected bytes or str")
        # Refused here, as a 500, rather than by nats-py (an exception nobody sees, the request left
        # unanswered) or by the server (which closes the connection on a reply with its headers over max_payload).
        limit = self.nc.max_payload - HEADER_ALLOWANCE
        if len(result) > limit:
            raise PayloadTooLarge(
                f"reply of {len(result)} bytes is over the limit of {limit} bytes "
                f"(the server's max_payload of {self.nc.max_payload} less room for headers)"
            )
        return bytes(result)

    def _handler_for(self, subject: str) -> Handler | None:
        if not isinstance(self.handlers, Mapping):
            return self.handlers
        if subject in self.handlers:
            return self.handlers[subject]
        for pattern, handler in self.handlers.items():
            if p.subject_matches(pattern, subject):
                return handler
        return None

    async def _reject(self, msg, reply_to, request_id, code: int, description: str, delivery: int) -> None:
        """Send an error reply, then terminate the request so it leaves the work queue."""
        description = p.fit_description(description)
        headers = {p.SERVICE_ERROR_HEADER: description, p.SERVICE_ERROR_CODE_HEADER: str(code)}
        if await self._send_reply(msg, reply_to, request_id, b"", headers, delivery):
            await self._settler.settle(msg, term_verdict(f"{code} {description}"))
            self._record(msg, request_id, "rejected", f"{code} {description}", delivery)

    async def _send_reply(self, msg, reply_to, request_id, data: bytes, headers: dict, delivery: int) -> bool:
        """Publish the reply; False means it could not be stored, and the request was nak'd to retry."""
        problem = await self._publish_reply(msg.subject, msg.headers, reply_to, request_id, data, headers)
        if problem is None:
            return True
        # The request stays queued and is answered when the mailbox can take it.
        await self._settler.settle(msg, NAK_LATER)
        self._record(msg, request_id, "retried", problem, delivery)
        return False

    async def _publish_reply(self, subject, request_headers, reply_to, request_id, data, headers) -> str | None:
        """Publish a reply to `reply_to`; stored replies wait for their PubAck. Returns what went wrong, if anything."""
        reply_stream = (request_headers or {}).get(p.REPLY_STREAM_HEADER)
        traceparent = (request_headers or {}).get(TRACEPARENT_HEADER)
        if traceparent:  # the reply belongs to the request's trace: every reply, errors and stored ones too
            headers = {**headers, TRACEPARENT_HEADER: traceparent}
        if not reply_stream:
            await self.nc.publish(reply_to, data, headers=headers or None)
            return None
        # The request id as Nats-Msg-Id: a redelivered request's second reply is dropped by the stream.
        headers = {
            **headers,
            p.REQUEST_SUBJECT_HEADER: subject,
            p.MSG_ID_HEADER: request_id,
            "Nats-Expected-Stream": reply_stream,
        }
        token = (request_headers or {}).get(p.MAILBOX_TOKEN_HEADER)
        if token:
            headers[p.MAILBOX_TOKEN_HEADER] = token  # how the mailbox knows the reply answers its request
        try:
            async with asyncio.timeout(self.reply_timeout):
                body = await self._store_reply(reply_to, data, headers)
        except TimeoutError:
            body = {"error": {"description": f"no PubAck within {self.reply_timeout:g}s"}}
        except Exception as exc:
            body = {"error": {"description": f"{type(exc).__name__} {exc}".strip()}}
        if "error" not in body:
            return None
        return f"reply not stored in {reply_stream}: {body['error'].get('description', 'unknown error')}"

    async def _store_reply(self, reply_to: str, data: bytes, headers: dict) -> dict:
        """Publish a reply to the stream that stores it and return its PubAck, retrying while that stream has no leader.

        A publish with no PubAck within a second went to a leader that died: it is published again,
        and the request id as Nats-Msg-Id makes the stream store the reply once.
        """
        backoff, leaderless = Backoff(), False
        each = min(self.reply_timeout, REPUBLISH_AFTER)
        while True:
            try:
                return json.loads((await self.nc.request(reply_to, data, timeout=each, headers=headers)).data)
            except nats.errors.NoRespondersError:
                if not (leaderless or await is_leaderless(self.nc, reply_to)):
                    return {"error": {"description": f"no stream captures {reply_to!r}"}}
                leaderless = True  # its stream is electing a leader: store the reply once it has one
            except nats.errors.TimeoutError:
                continue  # no PubAck: publish it again at once
            await backoff.wait()

    async def _answer_gave_up(self, seq: int, deliveries: int) -> None:
        """The server gave up redelivering the request at `seq`: tell its requester, then remove the request.

        Raises AnswerLater when the request stream or the ledger cannot be read, or the reply cannot
        be stored, so that the advisory is answered later rather than the request removed unanswered.
        """
        js = self.nc.jetstream()
        try:
            stored = await js.get_msg(self.stream, seq)
        except NotFoundError:
            return  # already gone: acked, terminated, expired or answered meanwhile
        headers = stored.headers or {}
        reply_to = headers.get(p.REPLY_HEADER, "")
        request_id = p.request_id_of(reply_to)
        why = f"gave up after {deliveries} deliveries"
        refusal = await self._not_from_mailbox_owner(stored, reply_to) if p.is_valid_publish_subject(reply_to) else "-"
        if refusal is None:
            raise AnswerLater(f"could not check who sent request #{seq}")
        if not refusal:
            error = {p.SERVICE_ERROR_HEADER: why, p.SERVICE_ERROR_CODE_HEADER: str(p.GAVE_UP)}
            problem = await self._publish_reply(stored.subject, headers, reply_to, request_id, b"", error)
            if problem is not None:
                raise AnswerLater(problem)
        with contextlib.suppress(NotFoundError, APIError, TimeoutError):
            await js.delete_msg(self.stream, seq)
        self._remember(Handled(self.name, stored.subject or "", request_id, "gave up", why, deliveries))

    def _record(self, msg: Msg, request_id: str, outcome: str, detail: str, delivery: int) -> None:
        self._remember(Handled(self.name, msg.subject, request_id, outcome, detail, delivery))

    def _remember(self, handled: Handled) -> None:
        self.handled.append(handled)
        self.service.record(handled)
        if self.on_handled is not None:
            self.on_handled(handled)


def _is_noted(entry: Any) -> bool:
    """True for a ledger message that is an entry, not missing or a delete marker."""
    return entry is not None and (entry.headers or {}).get("KV-Operation") not in ("DEL", "PURGE")


def _noted(entry: bytes) -> tuple[str | None, str | None]:
    """The request subject and token a ledger entry noted (None for what it does not name)."""
    try:
        noted = json.loads(entry)
        subject, token = noted.get("subject"), noted.get("token")
    except (ValueError, AttributeError):
        return None, None
    return (subject if isinstance(subject, str) else None), (token if isinstance(token, str) else None)


def _delivery_count(msg: Msg) -> int:
    """The delivery count from the ack subject, without parsing all of nats-py's metadata (hot path)."""
    # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>, or the form with
    # <domain>.<account hash> after ACK and a random token at the end (12 tokens).
    tokens = (msg.reply or "").split(".")
    token = tokens[4] if len(tokens) == 9 else tokens[6] if len(tokens) >= 11 else ""
    return int(token) if token.isdigit() else 1


async def terminate(msg: Msg, reason: str) -> None:
    """Terminate a JetStream message with a reason (nats-py's `Msg.term()` sends none)."""
    await msg._client.publish(msg.reply, term_verdict(reason))


def request_id(msg: Msg) -> str:
    """The id of the request `msg` carries: the last token of its `Nats-Reply` subject.

    It is the same on every redelivery, so a handler can key an effect on it to apply it once.
    """
    return p.request_id_of((msg.headers or {}).get(p.REPLY_HEADER, ""))
