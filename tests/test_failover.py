"""A three-node cluster with R3 streams loses a node mid-run: nothing is lost, nothing is misreported.

Each scenario runs once per module (a leader election after a SIGKILL takes seconds) and several
tests read what it recorded. The node killed is brought back before the next scenario.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field

import pytest
import pytest_asyncio
from support import unique

import js_request_reply as jrr

TOTAL, IN_FLIGHT, KILL_AFTER, TIMEOUT = 300, 10, 100, 5.0
# Seconds after the last request until the stream must be empty: well under the Responder's 30 s
# ack_wait, after which the server would deliver a stranded request again anyway.
SETTLED_WITHIN = 10.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with jrr.EmbeddedCluster(store_dir=tmp_path_factory.mktemp("failover")) as cluster:
        yield cluster


def urls_of(cluster: jrr.EmbeddedCluster, *names: str) -> list[str]:
    return [cluster.server(name).url for name in names]


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@dataclass
class Run:
    """What one scenario recorded."""

    killed: str = ""
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    messages: list[str] = field(default_factory=list)
    handled_after_kill: collections.Counter = field(default_factory=collections.Counter)
    responder_port_after: int = 0
    killed_port: int = 0
    left_in_stream: int = -1
    replies: dict[str, list[jrr.Reply]] = field(default_factory=dict)
    sent: list[str] = field(default_factory=list)
    left_in_mailbox: int = -1


async def connect_first_to(cluster: jrr.EmbeddedCluster, name: str):
    """A connection whose first server is `name`, moving to the others when it dies."""
    others = [other for other in cluster.names if other != name]
    return await jrr.connect(urls_of(cluster, name, *others), dont_randomize=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def leader_killed(cluster) -> Run:
    """300 requests, 10 in flight, 5 s timeout; the REQUESTS leader is SIGKILLed after the first 100.

    One responder is connected to the leader's node, another and the requester to the survivors.
    """
    run, stream, prefix = Run(), unique("FAIL_"), unique("fail")
    admin = await jrr.connect(cluster.urls)
    await jrr.ensure_request_stream(admin, stream, [f"{prefix}.*"], replicas=3)
    run.killed = cluster.leader(stream)
    survivors = [name for name in cluster.names if name != run.killed]
    run.killed_port = cluster.server(run.killed).port
    on_leader = await connect_first_to(cluster, run.killed)
    on_survivor = await jrr.connect(urls_of(cluster, survivors[0]))
    requester_nc = await jrr.connect(urls_of(cluster, survivors[1]))
    killed_at: float | None = None

    def count(name: str):
        def on_handled(handled: jrr.Handled) -> None:
            if killed_at is not None and handled.outcome == "replied":
                run.handled_after_kill[name] += 1

        return on_handled

    handlers = {f"{prefix}.order": lambda msg: b"done"}
    responders = [
        jrr.Responder(on_leader, handlers, stream=stream, name="on-leader", on_handled=count("on-leader")),
        jrr.Responder(on_survivor, handlers, stream=stream, name="on-survivor", on_handled=count("on-survivor")),
    ]
    sent = 0

    async def worker() -> None:
        nonlocal sent, killed_at
        while sent < TOTAL:
            sent += 1
            if sent == KILL_AFTER + 1:
                cluster.kill(run.killed)
                killed_at = time.monotonic()
            try:
                await jrr.request(requester_nc, f"{prefix}.order", b"x", timeout=TIMEOUT)
                run.outcomes["answered"] += 1
            except Exception as exc:  # every outcome is counted, whatever it is
                run.outcomes[type(exc).__name__] += 1
                run.messages.append(str(exc))

    try:
        for responder in responders:
            await responder.start()
        async with asyncio.timeout(120):
            await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        run.left_in_stream = await jrr.wait_for_messages(requester_nc, stream, 0, timeout=SETTLED_WITHIN)
        run.responder_port_after = on_leader.connected_url.port
    finally:
        for responder in responders:
            await responder.stop()
        cluster.restart(run.killed)
        await jrr.delete_streams(admin, stream)
        for nc in (on_leader, on_survivor, requester_nc, admin):
            await nc.close()
    return run


def test_a_request_during_the_election_is_never_reported_as_having_no_stream(leader_killed):
    assert leader_killed.outcomes["NoRequestStream"] == 0, leader_killed.messages


def test_every_request_is_answered_or_times_out_and_only_those_in_flight_at_the_kill_time_out(leader_killed):
    outcomes = leader_killed.outcomes

    assert set(outcomes) <= {"answered", "RequestTimeout"}, leader_killed.messages
    assert outcomes["answered"] + outcomes["RequestTimeout"] == TOTAL
    assert outcomes["RequestTimeout"] <= IN_FLIGHT, leader_killed.messages


def test_a_timeout_during_the_election_says_why(leader_killed):
    for message in leader_killed.messages:
        assert message.startswith("no reply to"), message
        assert "no stream captures" not in message


def test_a_responder_on_the_killed_node_carries_on_from_another_node(leader_killed):
    assert leader_killed.responder_port_after != leader_killed.killed_port
    assert leader_killed.handled_after_kill["on-leader"] > 0, "it answered requests after its node died"


def test_no_request_is_left_stranded_in_the_stream_until_ack_wait(leader_killed):
    assert leader_killed.left_in_stream == 0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mailbox_across_a_kill(cluster, leader_killed) -> Run:
    """60 mailbox sends, 3 at a time; the node leading REPLIES is SIGKILLed after 20; then collect all."""
    run = Run()
    queue, boxes = unique("MQ_"), unique("MR_")
    prefix, reply_prefix = unique("mq"), unique("mr")
    admin = await jrr.connect(cluster.urls)
    await jrr.ensure_request_stream(admin, queue, [f"{prefix}.*"], replicas=3)
    await jrr.ensure_reply_stream(admin, boxes, [f"{reply_prefix}.>"], replicas=3)
    run.killed = cluster.leader(boxes)
    survivor = next(name for name in cluster.names if name != run.killed)
    serving = await jrr.connect(cluster.urls)
    nc = await jrr.connect(urls_of(cluster, survivor))
    requester = jrr.Requester(nc, mailbox="alice", reply_stream=boxes, reply_prefix=reply_prefix)
    responder = jrr.Responder(serving, {f"{prefix}.order": lambda msg: msg.data}, stream=queue)
    ids = [f"order-{number:03d}" for number in range(60)]
    pending = collections.deque(ids)

    async def sender() -> None:
        while pending:
            request_id = pending.popleft()
            if request_id == ids[20]:
                cluster.kill(run.killed)
            await requester.send(f"{prefix}.order", request_id, msg_id=request_id, timeout=20)
            run.sent.append(request_id)

    try:
        await responder.start()
        async with asyncio.timeout(90):
            await asyncio.gather(*(sender() for _ in range(3)))
            while len(run.replies) < len(ids):
                for reply in await requester.collect(timeout=5):
                    run.replies.setdefault(reply.request_id, []).append(reply)
        for reply in await requester.collect(timeout=2):  # anything handed over twice would show here
            run.replies.setdefault(reply.request_id, []).append(reply)
        run.left_in_mailbox = await jrr.wait_for_messages(nc, boxes, 0, timeout=SETTLED_WITHIN)
    finally:
        await responder.stop()
        await requester.close()
        cluster.restart(run.killed)
        await jrr.delete_streams(admin, queue, boxes)
        for client in (serving, nc, admin):
            await client.close()
    return run


def test_mailbox_sends_across_a_node_kill_are_each_answered_once(mailbox_across_a_kill):
    run = mailbox_across_a_kill

    assert sorted(run.sent) == sorted(run.replies), "every request sent has its reply, none is lost"
    assert all(len(replies) == 1 for replies in run.replies.values()), "none is handed over twice"
    assert all(replies[0].text == request_id for request_id, replies in run.replies.items())
    assert run.left_in_mailbox == 0
