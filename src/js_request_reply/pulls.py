"""Reading what a pull consumer holds right now, without waiting for more: a mailbox's replies, a ledger listing."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from . import protocol as p
from .denials import denied_at_once

BATCH = 256  # messages asked for by one pull
READ_TIMEOUT = 5.0  # seconds for the next message of a pull, which the server answers at once


async def held_now(nc: Client, stream: str, consumer: str, *, batch: int = BATCH) -> AsyncIterator[Msg]:
    """Every message `consumer` on `stream` can deliver now, in order, and then no more.

    Each pull asks with no_wait, and the server ends it with a 404 once nothing is left: no wait
    for messages that may never come (a count taken before may be out of date by then). Raises
    NoRespondersError when the consumer has no leader (a 503), and PermissionDenied at once when
    the pull is denied.
    """
    next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    pull = json.dumps({"batch": batch, "no_wait": True}).encode()
    try:
        while True:
            await nc.publish(next_subject, pull, reply=inbox)
            for _ in range(batch):
                msg = await denied_at_once(nc, sub.next_msg(timeout=READ_TIMEOUT), next_subject)
                headers = msg.headers or {}
                if not msg.data and p.STATUS_HEADER in headers:
                    if headers[p.STATUS_HEADER] == p.NO_RESPONDERS_STATUS:
                        raise nats.errors.NoRespondersError
                    return  # 404: nothing left (408, 409: the pull ended)
                yield msg
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
