"""Riding out a leader election: telling "no stream" from "a stream with no leader yet", and retrying meanwhile.

A JetStream publish answered with a 503 (no responders) means nobody took the message. On one
server that means no stream captures the subject. In a cluster it can also mean that the stream
exists but is electing a new leader, after the node that led it died: for a few seconds nobody
stores its messages. Only the JetStream API can tell the two apart, by looking the stream up by
subject. A stream with no leader is waited for, with short doubling pauses, within the caller's
deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
from nats.aio.client import Client
from nats.js.errors import NoStreamResponseError, NotFoundError, ServiceUnavailableError

T = TypeVar("T")

# What a call to a stream with no leader raises: a core request gets no responders, a JetStream
# publish NoStreamResponseError, an API call or a fetch a 503.
UNAVAILABLE = (nats.errors.NoRespondersError, NoStreamResponseError, ServiceUnavailableError)
FIRST_PAUSE = 0.05  # seconds before the first retry; each later pause doubles, up to LONGEST_PAUSE
LONGEST_PAUSE = 0.5  # an election takes seconds, so a retry every half second costs little
LOOKUP_TIMEOUT = 1.0  # the stream lookup itself; the meta leader may be electing too


class Backoff:
    """Pauses that double from FIRST_PAUSE up to LONGEST_PAUSE, between attempts to reach a stream."""

    def __init__(self, first: float = FIRST_PAUSE, longest: float = LONGEST_PAUSE):
        self.pause = first
        self.longest = longest

    async def wait(self) -> None:
        """Pause before the next attempt (a retry after a 503: the server announces no new leader)."""
        await asyncio.sleep(self.pause)
        self.pause = min(self.pause * 2, self.longest)


async def stream_capturing(nc: Client, subject: str, timeout: float = LOOKUP_TIMEOUT) -> str | None:
    """The name of the stream that captures `subject`, or None when none does.

    Raises TimeoutError when JetStream cannot say within `timeout` seconds (its meta leader may be
    electing too): the stream may well exist.
    """
    try:
        async with asyncio.timeout(timeout):
            return await nc.jetstream().find_stream_name_by_subject(subject)
    except NotFoundError:
        return None
    except UNAVAILABLE:
        raise TimeoutError(f"JetStream could not say which stream captures {subject!r}") from None


async def is_leaderless(nc: Client, subject: str) -> bool:
    """After a 503 on publishing to `subject`: True when a stream captures it (or JetStream cannot tell yet).

    False only when JetStream says that no stream captures the subject.
    """
    with contextlib.suppress(TimeoutError):
        return await stream_capturing(nc, subject) is not None
    return True


async def while_electing(call: Callable[[], Awaitable[T]]) -> T:
    """Await `call()`, retrying while its stream has no leader; the caller's timeout bounds the retries.

    For calls that are safe to repeat (a key-value get or put, creating a consumer with the same
    configuration) on a stream known to exist: a 503 there can only mean that a leader is being
    elected, and a call that timed out went to a leader that died before answering.
    """
    backoff = Backoff()
    while True:
        with contextlib.suppress(*UNAVAILABLE, nats.errors.TimeoutError):
            return await call()
        await backoff.wait()


def in_cluster(nc: Client) -> bool:
    """True when `nc` is connected to a server that is part of a cluster (its INFO names one)."""
    return bool(getattr(nc, "_server_info", {}).get("cluster"))
