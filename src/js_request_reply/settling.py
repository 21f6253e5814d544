"""Settling requests so that a server's death cannot strand them: acks that survive a consumer's change of leader.

A Responder acks, terminates or naks each request it took. Acks are fire-and-forget: one that
reaches a consumer while it elects a new leader (the server of its old leader died) is lost, and
so is a delivery still in a dead server's buffers. Either way the request would wait a whole
ack_wait before anyone took it again. `Settler` closes both gaps for one Responder:

- after a disruption (a pull answered 503, a reconnect, a new consumer leader) it settles every
  request delivered before it with a confirmed ack, and sends again, confirmed, the acks it sent in
  the RECENT_WINDOW seconds before it;
- in a cluster, after its connection moved to another server or the consumer got a new leader, it
  resets the consumer to its ack floor (`$JS.API.CONSUMER.RESET`, nats-server 2.14 and newer), so
  every request delivered but not settled is delivered again at once. A request a responder is
  still working on may then run twice: handlers run at least once, never exactly once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from .failover import Backoff, in_cluster

ACK = b"+ACK"
NAK_LATER = b'-NAK {"delay": 1000000000}'  # deliver again in a second
CONFIRM_TIMEOUT = 1.0  # seconds to wait for the server to confirm an ack sent after a disruption
RECENT_WINDOW = 15.0  # acks this recent are sent again after a disruption (an election takes 4-9 s)
# At most this many of them (a busy responder acks thousands a second): an older ack lost in an election
# leaves its request pending, to be delivered again (by the reset in a cluster, else after ack_wait) and
# run twice, never lost.
RECENT_MOST = 10_000
CONFIRMING_AT_ONCE = 64  # acks sent again concurrently after a disruption
RECLAIM_WAIT = 5.0  # seconds a reset waits for the requests in hand; one still running then may run twice


def term_verdict(reason: str) -> bytes:
    """The verdict that terminates a message with a reason: `+TERM <reason>`."""
    return b"+TERM " + reason.encode()


class Settler:
    """Acks, terms and naks for one Responder's consumer, confirmed where a disruption could lose them."""

    def __init__(
        self, nc: Client, stream: str, durable: str, ack_wait: float, working: Callable[[], set[asyncio.Task]]
    ):
        self.nc = nc
        self.working = working  # the Responder's requests in hand: settled before a reset, not delivered again
        self.reset_subject = f"$JS.API.CONSUMER.RESET.{stream}.{durable}"
        self.ack_wait = ack_wait
        self.tasks: set[asyncio.Task] = set()  # confirmations and resets under way; stop() waits for them
        self._disruptions = 0
        self._reconnects_seen = nc.stats.get("reconnects", 0)
        self._recent: collections.deque[tuple[float, str, bytes]] = collections.deque(maxlen=RECENT_MOST)

    def delivered(self, msg: Msg) -> None:
        """Note when `msg` arrived: before or after the latest disruption."""
        msg._jrr_disruptions = self._disruptions  # type: ignore[attr-defined]

    async def settle(self, msg: Msg, verdict: bytes) -> None:
        """Send `verdict` (ACK, NAK_LATER, or `+TERM <reason>`) for `msg`: at once, or confirmed after a disruption."""
        self.check_connection()
        if self._disruptions != getattr(msg, "_jrr_disruptions", self._disruptions):
            await self._confirm(msg.reply, verdict)
            return
        if verdict == ACK:
            await msg.ack()
        elif verdict == NAK_LATER:
            await msg.nak(delay=1)
        else:
            await self.nc.publish(msg.reply, verdict)
        if verdict != NAK_LATER:  # an ack or a term is safe to repeat; a second nak would count twice
            now = time.monotonic()
            self._recent.append((now, msg.reply, verdict))
            while self._recent and now - self._recent[0][0] > RECENT_WINDOW:
                self._recent.popleft()

    def check_connection(self) -> None:
        """Notice a reconnect since the last look: the connection's server may have died with deliveries in it."""
        reconnects = self.nc.stats.get("reconnects", 0)
        if reconnects != self._reconnects_seen:
            self._reconnects_seen = reconnects
            self.disrupted(reclaim=True)

    def disrupted(self, *, reclaim: bool = False) -> None:
        """The consumer or the connection was disrupted: confirm what was settled just before it.

        With `reclaim`, in a cluster, also reset the consumer so what it delivered and nobody
        settled is delivered again now.
        """
        self._disruptions += 1
        recent, self._recent = self._recent, collections.deque(maxlen=RECENT_MOST)
        reclaim = reclaim and in_cluster(self.nc)
        if recent or reclaim:
            self._start(self._recover(recent, reclaim))

    async def _recover(self, recent: collections.deque, reclaim: bool) -> None:
        room = asyncio.Semaphore(CONFIRMING_AT_ONCE)

        async def confirm(ack_subject: str, verdict: bytes) -> None:
            async with room:
                await self._confirm(ack_subject, verdict)

        await asyncio.gather(*(confirm(ack_subject, verdict) for _, ack_subject, verdict in recent))
        if reclaim:
            # After the acks above and the requests in hand are settled, so what was answered is not delivered again.
            working = self.working()
            if working:
                await asyncio.wait(working, timeout=min(self.ack_wait, RECLAIM_WAIT))
            await self._confirm(self.reset_subject, b"")

    async def _confirm(self, subject: str, payload: bytes) -> None:
        """Send `payload` as a request and wait for the server's answer, while the consumer has no leader too.

        Bounded by ack_wait. A leader that does not answer at all ignored it: a consumer leader
        says nothing to an ack for a delivery it never heard of, and delivers that request again
        anyway. So a timeout is tried once more (the first may have gone to a dying leader), then
        given up.
        """
        backoff, timeouts = Backoff(), 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.ack_wait):
                while timeouts < 2:
                    try:
                        await self.nc.request(subject, payload, timeout=CONFIRM_TIMEOUT)
                        return
                    except nats.errors.NoRespondersError:
                        await backoff.wait()  # no leader yet
                    except nats.errors.TimeoutError:
                        timeouts += 1

    def _start(self, work) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
