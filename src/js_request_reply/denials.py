"""Permission denials reported at once: a denied call fails within milliseconds, not after its timeout.

A server that denies a publish drops it and tells the client only through an asynchronous -ERR,
which nats-py hands to its error callback (lower-cased). A JetStream API call that was denied is
otherwise just a request nobody answers, and waits out its whole timeout. The watcher here sees
each violation and fails, at once, every call that is waiting on the denied subject.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from nats.aio.client import Client

from . import protocol as p
from .errors import PermissionDenied

T = TypeVar("T")

# nats-py reports: nats: permissions violation for publish to "$js.api.stream.info.replies"
# (or: for subscription to "replies.bob.>", with ' using queue "q"' after a queue subscription).
_VIOLATION = re.compile(r'permissions violation for (publish|subscription) to "([^"]*)"', re.IGNORECASE)


def user_of(nc: Client) -> str | None:
    """The user name `nc` connected as (from its URL or its `user=` option), or None."""
    server = getattr(nc, "_current_server", None)
    name = getattr(getattr(server, "uri", None), "username", None)
    return name or (nc.options or {}).get("user") or None


def parse_violation(error: BaseException) -> tuple[str, str] | None:
    """("publish" or "subscribe", subject as the server reported it) for a permissions violation, else None."""
    match = _VIOLATION.search(str(error))
    if match is None:
        return None
    return ("publish" if match.group(1).lower() == "publish" else "subscribe"), match.group(2)


class Denials:
    """The permission violations of one connection, and the calls waiting on subjects that may be denied."""

    def __init__(self, nc: Client):
        self.nc = nc
        self.seen: list[tuple[str, str]] = []  # every violation reported, oldest first (kept short)
        self._watches: dict[asyncio.Future, tuple[str, ...]] = {}
        self._calls: dict[_Call, tuple[str, ...]] = {}  # calls of denied_at_once() under way

    def watch(self, *subjects: str) -> asyncio.Future:
        """A future that fails with PermissionDenied when the server denies one of `subjects` (wildcards allowed)."""
        future = asyncio.get_running_loop().create_future()
        self._watches[future] = subjects
        return future

    def unwatch(self, future: asyncio.Future) -> None:
        """Stop watching: the call that waited on `future` is over."""
        self._watches.pop(future, None)
        if future.done() and not future.cancelled():
            future.exception()  # retrieved: asyncio would otherwise log it as never retrieved
        future.cancel()

    def report(self, error: BaseException) -> bool:
        """Fail the calls waiting on the subject `error` names; True when it was a permissions violation."""
        violation = parse_violation(error)
        if violation is None:
            return False
        action, subject = violation
        self.seen = [*self.seen[-99:], violation]
        for future, patterns in list(self._watches.items()):
            if not future.done() and _covers(patterns, subject):
                future.set_exception(self.error(action, subject, patterns))
        for call, patterns in list(self._calls.items()):
            if call.error is None and _covers(patterns, subject):
                call.error = self.error(action, subject, patterns)
                call.task.cancel()  # wakes the call where it waits; denied_at_once() turns it into the error
        return True

    def error(self, action: str, subject: str, patterns: tuple[str, ...] = ()) -> PermissionDenied:
        """The PermissionDenied for a violation, naming the subject as the watching call wrote it."""
        # The server lower-cases the subject; ours says it as the caller wrote it, when it was exact.
        cased = [_cased(pattern, subject) for pattern in patterns if _covers((pattern,), subject)]
        return PermissionDenied(cased[0] if cased else subject, user_of(self.nc), action)


def _cased(pattern: str, subject: str) -> str:
    """`subject` (lower-cased by the server) with the case of `pattern`'s literal tokens put back."""
    pattern_tokens, subject_tokens = pattern.split("."), subject.split(".")
    if pattern_tokens[-1] == ">":
        pattern_tokens = pattern_tokens[:-1] + [">"] * (len(subject_tokens) - len(pattern_tokens) + 1)
    return ".".join(
        mine if mine not in ("*", ">") else theirs for mine, theirs in zip(pattern_tokens, subject_tokens, strict=False)
    )


def _covers(patterns: tuple[str, ...], subject: str) -> bool:
    subject = subject.lower()  # the server's report is lower-cased
    return any(pattern.lower() == subject or p.subject_matches(pattern.lower(), subject) for pattern in patterns)


async def processed(nc: Client, denied: asyncio.Future, timeout: float = 5.0) -> None:
    """Return once the server has processed what `nc` sent before this call, or `denied` is done.

    A flush does not do it: nats-py writes its PING ahead of commands still buffered. A message to
    an inbox of our own is queued behind them, so its arrival means every earlier command was
    processed, and any violation it caused has been reported (the server answers in order).
    """
    probe = nc.new_inbox()
    sub = await nc.subscribe(probe, max_msgs=1)
    try:
        await nc.publish(probe)
        arrival = asyncio.ensure_future(sub.next_msg(timeout=timeout))
        try:
            await asyncio.wait({arrival, denied}, timeout=timeout, return_when=FIRST_COMPLETED)
        finally:
            arrival.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await arrival
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


def denials_for(nc: Client) -> Denials:
    """The connection's watcher, installed on first use in front of its error callback."""
    denials = getattr(nc, "_jrr_denials", None)
    if denials is None:
        denials = nc._jrr_denials = Denials(nc)
        user_error_cb = nc._error_cb

        async def error_cb(error: Exception) -> None:
            denials.report(error)
            if user_error_cb is not None:
                await user_error_cb(error)

        nc._error_cb = error_cb
    return denials


@dataclass(eq=False)
class _Call:
    """One denied_at_once() under way: the task awaiting it, and the denial that cut it short."""

    task: asyncio.Task
    error: PermissionDenied | None = None


async def denied_at_once(nc: Client, awaitable: Awaitable[T], *subjects: str) -> T:
    """Await `awaitable`; if the server denies one of `subjects` first, cancel it and raise PermissionDenied.

    It is awaited in the caller's task, which a denial cancels, as asyncio.timeout() does: no task
    of its own, since this wraps every call on the hot path.
    """
    denials = denials_for(nc)
    task = asyncio.current_task()
    call = _Call(task)
    cancelling = task.cancelling()
    denials._calls[call] = subjects
    try:
        result = await awaitable
    except asyncio.CancelledError:
        if call.error is not None and task.uncancel() <= cancelling:
            raise call.error from None
        raise
    finally:
        del denials._calls[call]
    if call.error is not None:  # a denial beats a result that came with it: the subject was refused
        task.uncancel()
        raise call.error
    return result
