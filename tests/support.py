"""What several test files share: streams of a test's own, with names no other test uses."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest

import js_request_reply as jrr

SETTLE = 10.0  # seconds, at most, for something the server or a responder does on its own
POLL = 0.02  # seconds between two looks at a condition that announces no event
DENIED_WITHIN = 1.5  # seconds: a denial is an error at once, not after the call's timeout


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@dataclass
class Queue:
    """A request stream and the subject prefix it captures (`<prefix>.*`)."""

    stream: str
    prefix: str

    def subject(self, name: str) -> str:
        return f"{self.prefix}.{name}"


@dataclass
class Mailboxes:
    """A reply stream (with its ledger) and the subject prefix it stores (`<prefix>.>`)."""

    stream: str
    prefix: str

    def requester(self, nc, mailbox: str) -> jrr.Requester:
        return jrr.Requester(nc, mailbox=mailbox, reply_stream=self.stream, reply_prefix=self.prefix)


async def messages_in(js, stream: str) -> int:
    return (await js.stream_info(stream)).state.messages


async def holds(js, stream: str, count: int) -> bool:
    """True when `stream` holds `count` messages: a condition for eventually()."""
    return await messages_in(js, stream) == count


async def make_queue(js) -> Queue:
    suffix = uuid.uuid4().hex[:10]
    queue = Queue(f"Q_{suffix}", f"q{suffix}")
    await jrr.ensure_request_stream(js, queue.stream, [f"{queue.prefix}.*"])
    return queue


async def make_mailboxes(js) -> Mailboxes:
    suffix = uuid.uuid4().hex[:10]
    boxes = Mailboxes(f"R_{suffix}", f"r{suffix}")
    await jrr.ensure_reply_stream(js, boxes.stream, [f"{boxes.prefix}.>"])
    return boxes


class Outcomes:
    """An `on_handled` callback that lets a test wait, bounded, for the Handled records it expects."""

    def __init__(self, timeout: float = 20.0) -> None:
        self.records: list[jrr.Handled] = []
        self.timeout = timeout
        self._changed = asyncio.Event()

    def __call__(self, handled: jrr.Handled) -> None:
        self.records.append(handled)
        self._changed.set()

    async def wait_until(self, condition) -> None:
        """Until `condition(records)` holds, at most `timeout` seconds."""
        async with asyncio.timeout(self.timeout):
            while not condition(self.records):
                self._changed.clear()
                await self._changed.wait()

    async def wait_for(self, condition) -> jrr.Handled:
        """The first record for which `condition(record)` holds, once there is one."""
        await self.wait_until(lambda records: any(condition(h) for h in records))
        return next(h for h in self.records if condition(h))


async def eventually(check: Callable[[], Awaitable], timeout: float = SETTLE):
    """Poll `check()` until it returns something truthy, at most `timeout` seconds, and return that."""
    async with asyncio.timeout(timeout):
        while True:
            result = await check()
            if result:
                return result
            await asyncio.sleep(POLL)  # the server announces none of these changes: look again


async def denied_quickly(call: Awaitable) -> jrr.PermissionDenied:
    """The PermissionDenied that `call` raises, which must come at once rather than after its timeout."""
    started = time.monotonic()
    with pytest.raises(jrr.PermissionDenied) as raised:
        await call
    took = time.monotonic() - started
    assert took < DENIED_WITHIN, f"PermissionDenied came after {took:.2f} s, as if it had waited for a timeout"
    return raised.value


class ErrorLog:
    """An error callback that keeps what the server reported to one connection.

    A violation is waited for, not looked up after a flush: nats-py writes a flush's PING straight
    to the socket, ahead of a SUB still in its pending buffer, so the PONG can come before the -ERR.
    """

    def __init__(self) -> None:
        self.errors: list[Exception] = []
        self._changed = asyncio.Event()

    async def __call__(self, error: Exception) -> None:
        self.errors.append(error)
        self._changed.set()

    def mark(self) -> int:
        return len(self.errors)

    def reported(self, action: str, subject: str, since: int) -> bool:
        """True when the server reported a permissions violation for `subject` after `since`."""
        verb = "publish" if action == "publish" else "subscription"
        said = f'permissions violation for {verb} to "{subject.lower()}"'
        return any(said in str(error).lower() for error in self.errors[since:])

    async def wait_for(self, action: str, subject: str, since: int) -> bool:
        """Whether the server reports a violation for `subject` (after `since`) within SETTLE seconds."""
        try:
            async with asyncio.timeout(SETTLE):
                while not self.reported(action, subject, since):
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True

    async def wait_for_count(self, count: int) -> list[Exception]:
        """The errors, once there are at least `count` (at most SETTLE seconds)."""
        async with asyncio.timeout(SETTLE):
            while len(self.errors) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.errors
