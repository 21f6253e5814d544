"""The mailbox ledger: a key-value bucket beside the reply stream, where each mailbox notes what it sent.

A mailbox `m` writes two kinds of key:
- `m.<request id>`: a request it sent and has not settled yet (its subject, deadline and TTL),
  written *before* the request is published, so that a reply can never arrive unannounced;
- `m.done.<request id>`: how the request's outcome was handed over, `{"seq": n}` for the reply at
  stream sequence n or `{"expired": true}`. It is created once, so an outcome is handed over once.

Only the owner of a mailbox may write its keys (see access.py). That is what makes the ledger a
proof of who sent a request: a responder checks it before storing a reply in a mailbox.

The ledger is read without STREAM.INFO, which would list every mailbox's keys: single keys with
direct gets by subject, and a mailbox's own entries through a short-lived consumer named
`ledger-<mailbox>`, filtered to its keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats.errors
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue

from . import protocol as p
from .access import ledger_consumer
from .denials import denied_at_once
from .errors import NoReplyStream
from .failover import UNAVAILABLE, Backoff, is_leaderless
from .pulls import held_now

T = TypeVar("T")
LISTING_IDLE_LIMIT = 60.0  # seconds: the server removes a listing consumer left behind by a crash
LISTING_BATCH = 256
LISTING_DELETE_TIMEOUT = 2.0  # seconds: removing the listing consumer is worth a try, not a wait
FORGOTTEN_FOR = 1  # seconds a settled entry's delete marker stays (whole seconds: the server's TTL clock)


class Ledger:
    """One mailbox's entries in the ledger of `reply_stream`."""

    def __init__(self, nc: Client, reply_stream: str, mailbox: str):
        self.nc = nc
        self.mailbox = mailbox
        self.bucket = p.ledger_bucket(reply_stream)
        self.stream = f"KV_{self.bucket}"
        self.keys = f"$KV.{self.bucket}.{mailbox}"  # the subjects of this mailbox's keys
        self._kv = KeyValue(
            name=self.bucket, stream=self.stream, pre=f"$KV.{self.bucket}.", js=nc.jetstream(), direct=True
        )
        self._listing = _listing_lock(nc, self.stream, mailbox)

    # -- what was sent ------------------------------------------------------------------------------

    async def note_sent(self, request_id: str, entry: dict[str, Any]) -> None:
        """Write down a request about to be sent: what it is, and when it expires (if it does)."""
        key = f"{self.mailbox}.{request_id}"
        await self._call(lambda: self._kv.put(key, json.dumps(entry).encode()), f"{self.keys}.{request_id}")

    async def sent(self, request_id: str) -> dict[str, Any] | None:
        """The entry of a request sent and not settled, or None."""
        return await self._get(f"{self.mailbox}.{request_id}")

    async def forget(self, request_id: str) -> None:
        """Remove a settled request's entry, so that listing the outstanding ones never reads it again.

        A delete marker replaces the entry (the ledger keeps one revision a key). A marker would be
        read by every later listing, so listings would grow with history: it is published with a
        TTL, and a second later the key is gone altogether. (A purge would do it at once, but the
        ledger's stream refuses rollups.) On a ledger made without per-message TTLs, the marker stays.
        """
        subject = f"{self.keys}.{request_id}"
        js = self.nc.jetstream()
        try:
            await self._call(lambda: js.publish(subject, headers={KV_OP: KV_DEL}, msg_ttl=FORGOTTEN_FOR), subject)
        except APIError as exc:
            if exc.err_code != p.JS_ERR_MSG_TTL_DISABLED:
                raise
            await self._call(lambda: self._kv.delete(f"{self.mailbox}.{request_id}"), subject)

    async def outstanding(self) -> dict[str, dict[str, Any]]:
        """Every request this mailbox sent and has not settled: request id -> entry.

        Read through a consumer of this mailbox's keys only, made for the listing and deleted after
        it: the one way to list keys that does not show other mailboxes' keys too.
        """
        js = self.nc.jetstream()
        config = self.listing_config()
        name = config.name
        api = f"$JS.API.CONSUMER.%s.{self.stream}.{name}"
        create = f"{api % 'CREATE'}.{config.filter_subject}"
        async with self._listing:
            try:
                info = await self._call(lambda: js.add_consumer(self.stream, config), create)
                if info.delivered is not None and info.delivered.consumer_seq:
                    # One left behind by a listing that crashed would go on from where that one stopped.
                    await self._delete_listing(api % "DELETE")
                    info = await self._call(lambda: js.add_consumer(self.stream, config), create)
                return await self._read_listing(name, info.num_pending)
            finally:
                # Also when the listing was cut short: one left on a server that died would block the next.
                await asyncio.shield(self._delete_listing(api % "DELETE"))

    def listing_config(self) -> ConsumerConfig:
        """The consumer outstanding() lists this mailbox's entries through: its keys, the last of each, in memory."""
        return ConsumerConfig(
            name=ledger_consumer(self.mailbox),
            filter_subject=f"{self.keys}.*",
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=LISTING_IDLE_LIMIT,
            mem_storage=True,
            num_replicas=1,
        )

    async def _read_listing(self, name: str, pending: int) -> dict[str, dict[str, Any]]:
        """Read the listing consumer to its end: what it holds now, without waiting for more.

        `pending` (counted when the consumer was made) only says whether to read at all: entries
        forgotten a second ago vanish meanwhile (their markers expire), so the count may never be reached.
        """
        entries: dict[str, dict[str, Any]] = {}
        if pending == 0:
            return entries
        async for msg in held_now(self.nc, self.stream, name, batch=LISTING_BATCH):
            if (msg.headers or {}).get(KV_OP) in (KV_DEL, KV_PURGE):
                continue  # settled: only its delete marker is left, until it expires
            with contextlib.suppress(ValueError, TypeError):
                entries[msg.subject.rsplit(".", 1)[1]] = json.loads(msg.data)
        return entries

    async def _delete_listing(self, subject: str) -> None:
        with contextlib.suppress(NotFoundError, *UNAVAILABLE, nats.errors.TimeoutError, TimeoutError):
            async with asyncio.timeout(LISTING_DELETE_TIMEOUT):
                await denied_at_once(
                    self.nc, self.nc.jetstream().delete_consumer(self.stream, ledger_consumer(self.mailbox)), subject
                )

    # -- what was handed over -----------------------------------------------------------------------

    async def claim(self, request_id: str, how: dict[str, Any]) -> dict[str, Any] | None:
        """Record how a request's outcome is handed over, if nobody did before: None when this call did.

        Returns the earlier record otherwise. The key is created, never overwritten, so two
        collectors racing for one reply cannot both hand it over.
        """
        key = f"{self.mailbox}.done.{request_id}"
        try:
            await self._call(lambda: self._kv.create(key, json.dumps(how).encode()), f"{self.keys}.done.{request_id}")
            return None
        except KeyWrongLastSequenceError:
            return await self.done(request_id) or {}

    async def done(self, request_id: str) -> dict[str, Any] | None:
        """How a request's outcome was handed over ({"seq": n} or {"expired": true}), or None."""
        return await self._get(f"{self.mailbox}.done.{request_id}")

    # -- plumbing -----------------------------------------------------------------------------------

    async def _get(self, key: str) -> dict[str, Any] | None:
        subject = f"$JS.API.DIRECT.GET.{self.stream}.$KV.{self.bucket}.{key}"
        try:
            entry = await self._call(lambda: self._kv.get(key), subject)
        except KeyNotFoundError:
            return None
        try:
            return json.loads(entry.value)
        except (ValueError, TypeError):
            return None

    async def _call(self, call: Callable[[], Awaitable[T]], subject: str) -> T:
        """`call()`, failing at once if `subject` is denied, and retrying while the ledger has no leader.

        A 503 with no stream behind the ledger's subjects means the ledger does not exist.
        """
        backoff, checked = Backoff(), False
        while True:
            try:
                return await denied_at_once(self.nc, call(), subject)
            except NotFoundError as missing:
                if getattr(missing, "err_code", None) == p.JS_ERR_STREAM_NOT_FOUND:
                    raise self._missing() from None
                raise
            except UNAVAILABLE:
                if not checked and not await is_leaderless(self.nc, f"$KV.{self.bucket}.{self.mailbox}.x"):
                    raise self._missing() from None
                checked = True
            except nats.errors.TimeoutError:
                pass  # went to a leader that died before answering: every call here is safe to repeat
            await backoff.wait()

    def _missing(self) -> NoReplyStream:
        return NoReplyStream(
            f"the mailbox ledger {self.bucket!r} does not exist; create it with ensure_reply_stream(js)"
        )


def _listing_lock(nc: Client, stream: str, mailbox: str) -> asyncio.Lock:
    """One lock per connection and mailbox: two listings would share the one consumer name."""
    locks = getattr(nc, "_jrr_listing_locks", None)
    if locks is None:
        locks = nc._jrr_listing_locks = {}
    return locks.setdefault((stream, mailbox), asyncio.Lock())
