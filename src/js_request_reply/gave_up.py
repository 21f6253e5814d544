"""Requests the server gave up redelivering: finding each one, even when no responder was running.

When a request's deliveries run out (`max_deliver`), the server emits the advisory
`$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<durable>` once, then leaves the request in
the stream, delivered to nobody. An advisory is a plain message: if no responder is subscribed at
that moment, it is gone, and so is the request's answer. So `ensure_request_stream()` keeps the
advisories in the stream `<stream>-gave-up`, and every Responder of a durable reads them there
through one shared consumer. A Responder that starts, or reconnects, first answers what waited,
and each advisory goes to one responder of the group.

On a request stream created without that stream, a Responder falls back to a queue subscription
to the advisory: one responder of the group answers each, and one given up while none runs is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, NotFoundError

from . import protocol as p
from .denials import denied_at_once
from .errors import PermissionDenied
from .failover import UNAVAILABLE, Backoff, while_electing

Answer = Callable[[int, int], Awaitable[None]]  # (stream sequence, deliveries) -> the request answered

FETCH_BATCH = 1  # nats-py hands back a larger batch only when it is full or the pull expires: one is answered at once
FETCH_WAIT = 5.0  # seconds one pull for advisories waits on the server before it is renewed
ANSWER_WAIT = 30.0  # seconds an advisory is in hand before the server hands it to another responder
STOP_WAIT = 10.0  # seconds stop() lets an advisory being answered finish


class AnswerLater(Exception):
    """The request given up on could not be answered now: its advisory is to be answered again later."""


def parse_advisory(data: bytes) -> tuple[int, int] | None:
    """The stream sequence of the request given up on and how often it was delivered, or None."""
    try:
        event = json.loads(data)
        return int(event["stream_seq"]), int(event["deliveries"])
    except (ValueError, KeyError, TypeError):
        return None


class GaveUpWatch:
    """Feeds `answer` every request that `durable` on `stream` gave up on, once across the group."""

    def __init__(self, nc: Client, stream: str, durable: str, answer: Answer):
        self.nc = nc
        self.stream = stream
        self.durable = durable
        self.answer = answer
        self.kept = False  # True: advisories come from the gave-up stream; False: from a queue subscription
        self.subscription: Any = None
        self._task: asyncio.Task | None = None
        self._answering: asyncio.Task | None = None

    async def start(self) -> Subscription:
        """Bind to the gave-up stream, or subscribe to the advisory without one.

        Returns the core subscription that receives them (the pull's inbox, or the advisory's subject).
        """
        self.kept = await self._ensure_consumer()
        if self.kept:
            js = self.nc.jetstream()
            self.subscription = await js.pull_subscribe_bind(self.durable, p.gave_up_stream(self.stream))
            self._task = asyncio.create_task(self._read_kept(), name=f"gave-up-{self.stream}-{self.durable}")
            return self.subscription._sub  # nats-py keeps the pull's inbox subscription there
        self.subscription = await self.nc.subscribe(
            p.max_deliveries_subject(self.stream, self.durable),
            queue=f"jrr-{self.stream}-{self.durable}",
            cb=self._on_advisory,
        )
        return self.subscription

    async def stop(self) -> None:
        """Stop reading advisories, after letting one being answered finish (an advisory left unacked
        is answered again by the next responder: better than half an answer)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._answering is not None:
            await asyncio.wait({self._answering}, timeout=STOP_WAIT)
        sub, self.subscription = self.subscription, None
        if sub is not None and not self.nc.is_closed:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def _ensure_consumer(self) -> bool:
        """Create or bind the group's consumer on the gave-up stream; False when there is none to read."""
        stream = p.gave_up_stream(self.stream)
        filter_subject = p.max_deliveries_subject(self.stream, self.durable)
        config = ConsumerConfig(
            name=self.durable,
            durable_name=self.durable,
            filter_subject=filter_subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ANSWER_WAIT,
        )
        create = f"$JS.API.CONSUMER.CREATE.{stream}.{self.durable}.{filter_subject}"
        js = self.nc.jetstream()
        try:
            await while_electing(lambda: denied_at_once(self.nc, js.add_consumer(stream, config), create))
        except (NotFoundError, PermissionDenied):
            return False  # a request stream made before the gave-up stream, or a responder not allowed to read it
        except APIError as exc:
            if exc.err_code == p.JS_ERR_STREAM_NOT_FOUND:
                return False
            raise
        return True

    async def _read_kept(self) -> None:
        """Keep a pull open on the gave-up stream and answer each advisory before acking it."""
        backoff = Backoff()
        while True:
            try:
                msgs = await self.subscription.fetch(FETCH_BATCH, timeout=FETCH_WAIT)
            except (TimeoutError, nats.errors.TimeoutError):
                continue  # nothing given up meanwhile
            except nats.errors.ConnectionClosedError:
                return
            except (*UNAVAILABLE, nats.errors.Error):
                await backoff.wait()  # the consumer is electing a leader, or was deleted with its stream
                continue
            backoff = Backoff()
            for msg in msgs:
                self._answering = asyncio.create_task(self._answer_and_ack(msg))
                await asyncio.shield(self._answering)

    async def _answer_and_ack(self, msg: Msg) -> None:
        event = parse_advisory(msg.data)
        try:
            if event is not None:
                await self.answer(*event)
        except Exception:  # the stream could not be read or written: answered later, here or by another responder
            with contextlib.suppress(nats.errors.Error):
                await msg.nak(delay=1)
            return
        with contextlib.suppress(nats.errors.Error):
            await msg.ack()

    async def _on_advisory(self, msg: Msg) -> None:
        event = parse_advisory(msg.data)
        # Without the gave-up stream there is no later: a request that cannot be answered now stays unanswered.
        with contextlib.suppress(Exception):
            if event is not None:
                await self.answer(*event)
