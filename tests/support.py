"""What several test files share: streams of a test's own, with names no other test uses."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import js_request_reply as jrr


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
