"""ADR-32 discovery and stats: every Responder answers $SRV.PING, $SRV.INFO and $SRV.STATS as nats.micro does.

The questions are asked with a raw nats-py client on the ADR-32 subjects, as `nats micro ls` and
`nats micro stats` ask them, and the answers are read with nats.micro's own types.
"""

from __future__ import annotations

import asyncio
import json

import nats
import nats.errors
import pytest
from nats.micro.service import ServiceInfo, ServicePing, ServiceStats
from support import SETTLE, Outcomes, unique

import js_request_reply as jrr
from js_request_reply.service import EndpointCounts

PING_TYPE = "io.nats.micro.v1.ping_response"
INFO_TYPE = "io.nats.micro.v1.info_response"
STATS_TYPE = "io.nats.micro.v1.stats_response"


@pytest.fixture
async def raw(nats_url):
    """A plain nats-py client, as any ADR-32 tool would be."""
    client = await nats.connect(nats_url)
    yield client
    await client.drain()


async def answers(raw, subject: str, count: int) -> list[dict]:
    """The JSON answers to one request on `subject`, once `count` came (at most SETTLE seconds)."""
    inbox, got, enough = raw.new_inbox(), [], asyncio.Event()

    async def keep(msg) -> None:
        got.append(json.loads(msg.data))
        if len(got) >= count:
            enough.set()

    sub = await raw.subscribe(inbox, cb=keep)
    try:
        await raw.publish(subject, b"", reply=inbox)
        async with asyncio.timeout(SETTLE):
            await enough.wait()
    finally:
        await sub.unsubscribe()
    return got


async def ask(raw, subject: str) -> dict:
    """The one answer to a request on `subject`."""
    return json.loads((await raw.request(subject, b"", timeout=SETTLE)).data)


def rejecting(code: int, description: str):
    def handler(msg):
        raise jrr.Reject(code, description)

    return handler


# -- discovery ------------------------------------------------------------------------------------


async def test_every_running_responder_answers_ping_once_with_an_id_of_its_own(nc, other_nc, raw, queue):
    durable = unique("kitchen")
    menu = {queue.subject("sandwich"): lambda msg: "🥪"}
    first = jrr.Responder(nc, menu, stream=queue.stream, durable=durable, name="first")
    second = jrr.Responder(other_nc, menu, stream=queue.stream, durable=durable, name="second")
    async with first, second:
        everyone = await answers(raw, "$SRV.PING", 1)  # every service on the server answers this one
        ours = await answers(raw, f"$SRV.PING.{durable}", 2)
        one = await ask(raw, f"$SRV.PING.{durable}.{second.service.id}")

    assert {a["id"] for a in ours} == {first.service.id, second.service.id}
    assert len({a["id"] for a in ours}) == 2, "each instance has an id of its own"
    assert all(a["type"] == PING_TYPE and a["name"] == durable for a in ours)
    assert {a["metadata"]["responder"] for a in ours} == {"first", "second"}
    assert all(a["version"] == jrr.service.package_version() for a in ours)
    assert everyone and all(a["type"] == PING_TYPE for a in everyone)
    assert (one["id"], one["metadata"]["responder"]) == (second.service.id, "second")
    assert ServicePing.from_dict(one).name == durable  # nats.micro reads it


async def test_a_stopped_responder_stops_answering(nc, other_nc, raw, queue):
    durable = unique("kitchen")
    menu = {queue.subject("bagel"): lambda msg: "🥯"}
    staying = await jrr.Responder(nc, menu, stream=queue.stream, durable=durable).start()
    leaving = await jrr.Responder(other_nc, menu, stream=queue.stream, durable=durable).start()
    try:
        await leaving.stop()
        left = await ask(raw, f"$SRV.PING.{durable}")
        with pytest.raises(nats.errors.NoRespondersError):
            await raw.request(f"$SRV.PING.{durable}.{leaving.service.id}", b"", timeout=SETTLE)
    finally:
        await staying.stop()
    with pytest.raises(nats.errors.NoRespondersError):
        await raw.request(f"$SRV.STATS.{durable}", b"", timeout=SETTLE)

    assert left["id"] == staying.service.id


async def test_info_lists_the_handler_subjects_as_endpoints(nc, raw, queue):
    durable = unique("kitchen")
    handlers = {queue.subject("sandwich"): lambda msg: "🥪", f"{queue.prefix}.drink-*": lambda msg: "🥤"}
    async with jrr.Responder(nc, handlers, stream=queue.stream, durable=durable):
        info = await ask(raw, f"$SRV.INFO.{durable}")

    assert info["type"] == INFO_TYPE
    assert [(e["name"], e["subject"]) for e in info["endpoints"]] == [
        ("sandwich", queue.subject("sandwich")),
        ("drink-any", f"{queue.prefix}.drink-*"),
    ]
    assert info["metadata"]["stream"] == queue.stream
    assert ServiceInfo.from_dict(info).endpoints[0].subject == queue.subject("sandwich")


async def test_info_endpoint_names_are_valid_adr32_names(nc, raw, queue):
    durable = unique("kitchen")
    handlers = {queue.subject("sandwich"): lambda msg: "🥪", queue.subject("bagel"): lambda msg: "🥯"}
    async with jrr.Responder(nc, handlers, stream=queue.stream, durable=durable):
        info = await ask(raw, f"$SRV.INFO.{durable}")

    assert [(e["name"], e["subject"]) for e in info["endpoints"]] == [
        ("sandwich", queue.subject("sandwich")),
        ("bagel", queue.subject("bagel")),
    ]
    assert all(e["queue_group"] == durable for e in info["endpoints"])


# -- stats ----------------------------------------------------------------------------------------


async def test_stats_count_10_served_and_2_rejected_requests(nc, raw, queue):
    durable = unique("kitchen")
    handlers = {queue.subject("order"): lambda msg: "🥪", queue.subject("refuse"): rejecting(409, "sold out")}
    outcomes = Outcomes()
    async with jrr.Responder(nc, handlers, stream=queue.stream, durable=durable, on_handled=outcomes):
        for _ in range(10):
            await jrr.request(nc, queue.subject("order"), timeout=5)
        for _ in range(2):
            with pytest.raises(jrr.RequestRejected):
                await jrr.request(nc, queue.subject("refuse"), timeout=5)
        await outcomes.wait_until(lambda records: len(records) == 12)  # each is counted once it is settled
        stats = await ask(raw, f"$SRV.STATS.{durable}")

    endpoints = {e["name"]: e for e in stats["endpoints"]}
    assert stats["type"] == STATS_TYPE and stats["name"] == durable
    assert sum(e["num_requests"] for e in stats["endpoints"]) == 12
    assert sum(e["num_errors"] for e in stats["endpoints"]) == 2
    assert (endpoints["order"]["num_requests"], endpoints["order"]["num_errors"]) == (10, 0)
    assert (endpoints["refuse"]["num_requests"], endpoints["refuse"]["num_errors"]) == (2, 2)
    assert endpoints["refuse"]["last_error"] == "409 sold out"
    assert endpoints["order"]["last_error"] == ""
    for endpoint in endpoints.values():
        assert isinstance(endpoint["processing_time"], int), "nanoseconds, as nats.micro counts them"
        assert endpoint["average_processing_time"] == endpoint["processing_time"] // endpoint["num_requests"]
        assert endpoint["data"] == {"redeliveries": 0, "terminated": 0, "expired": 0, "gave_up": 0, "in_flight": 0}
    parsed = ServiceStats.from_dict(stats)  # nats.micro reads it, `started` included
    assert [e.num_requests for e in parsed.endpoints] == [10, 2]


async def test_requests_no_handler_serves_are_counted_on_an_unhandled_endpoint(nc, raw, queue):
    durable = unique("kitchen")
    outcomes = Outcomes()
    menu = {queue.subject("order"): lambda msg: "🥪"}
    async with jrr.Responder(nc, menu, stream=queue.stream, durable=durable, on_handled=outcomes):
        before = await ask(raw, f"$SRV.INFO.{durable}")
        with pytest.raises(jrr.RequestRejected):
            await jrr.request(nc, queue.subject("drink"), timeout=5)
        await outcomes.wait_until(lambda records: len(records) == 1)
        stats = await ask(raw, f"$SRV.STATS.{durable}")

    assert [e["name"] for e in before["endpoints"]] == ["order"], "no unhandled endpoint before such a request"
    unhandled = stats["endpoints"][-1]
    assert (unhandled["name"], unhandled["subject"], unhandled["num_requests"], unhandled["num_errors"]) == (
        "unhandled",
        ">",
        1,
        1,
    )
    assert unhandled["last_error"] == f"404 no handler for subject {queue.subject('drink')!r}"


async def test_expired_and_terminated_requests_are_counted_in_the_endpoint_data(nc, js, raw, queue):
    durable = unique("kitchen")
    outcomes = Outcomes()
    subject = queue.subject("order")
    handlers = {subject: lambda msg: "🥪"}
    async with jrr.Responder(nc, handlers, stream=queue.stream, durable=durable, on_handled=outcomes):
        inbox = nc.new_inbox()
        await js.publish(subject, b"", headers={"Nats-Reply": inbox, "Nats-Deadline": "1000"})  # in 1970
        await js.publish(subject, b"")  # no Nats-Reply: nobody can be answered
        await outcomes.wait_until(lambda records: len(records) == 2)
        stats = await ask(raw, f"$SRV.STATS.{durable}")

    order = stats["endpoints"][0]
    assert (order["num_requests"], order["num_errors"]) == (2, 2)
    assert (order["data"]["expired"], order["data"]["terminated"]) == (1, 1)


async def test_a_request_in_a_handler_is_in_flight(nc, raw, queue):
    durable = unique("kitchen")
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(msg):
        started.set()
        await release.wait()
        return "🥙"

    outcomes = Outcomes()
    serving = jrr.Responder(
        nc, {queue.subject("flatbread"): slow}, stream=queue.stream, durable=durable, on_handled=outcomes
    )
    async with serving:
        pending = asyncio.ensure_future(jrr.request(nc, queue.subject("flatbread"), timeout=SETTLE))
        async with asyncio.timeout(SETTLE):
            await started.wait()
        during = await ask(raw, f"$SRV.STATS.{durable}")
        release.set()
        await pending
        await outcomes.wait_until(lambda records: len(records) == 1)
        after = await ask(raw, f"$SRV.STATS.{durable}")

    assert during["endpoints"][0]["data"]["in_flight"] == 1
    assert (after["endpoints"][0]["data"]["in_flight"], after["endpoints"][0]["num_requests"]) == (0, 1)


async def test_a_single_handler_is_one_endpoint_for_every_subject(nc, raw, queue):
    durable = unique("kitchen")
    outcomes = Outcomes()
    async with jrr.Responder(nc, lambda msg: msg.subject, stream=queue.stream, durable=durable, on_handled=outcomes):
        await jrr.request(nc, queue.subject("one"), timeout=5)
        await jrr.request(nc, queue.subject("two"), timeout=5)
        await outcomes.wait_until(lambda records: len(records) == 2)
        stats = await ask(raw, f"$SRV.STATS.{durable}")

    assert [(e["name"], e["subject"], e["num_requests"]) for e in stats["endpoints"]] == [("all", ">", 2)]


def test_endpoint_counts_follow_each_outcome():
    counts = EndpointCounts("order", "requests.order")
    for outcome, detail, delivery in [
        ("replied", "", 1),
        ("replied", "", 2),  # a redelivery, answered
        ("retried", "reply not stored", 1),  # not over yet: counted when it ends
        ("rejected", "408 expired: the requester's deadline passed 2.0 s before a responder took it", 1),
        ("refused", "mailbox 'bob' did not send this request", 1),
        ("gave up", "gave up after 5 deliveries", 5),
    ]:
        counts.record(jrr.Handled("r", "requests.order", "id", outcome, detail, delivery))

    stats = counts.stats("kitchen", in_flight=3)

    assert (stats.num_requests, stats.num_errors) == (5, 3)
    assert stats.last_error == "500 gave up after 5 deliveries"
    assert stats.data == {"redeliveries": 1, "terminated": 1, "expired": 1, "gave_up": 1, "in_flight": 3}


# -- the package's side of the question -----------------------------------------------------------


async def test_ping_services_and_service_stats_read_the_answers(nc, other_nc, queue):
    durable = unique("kitchen")
    menu = {queue.subject("sandwich"): lambda msg: "🥪"}
    outcomes = Outcomes()
    async with (
        jrr.Responder(nc, menu, stream=queue.stream, durable=durable, name="b", on_handled=outcomes),
        jrr.Responder(other_nc, menu, stream=queue.stream, durable=durable, name="a", on_handled=outcomes),
    ):
        await jrr.request(nc, queue.subject("sandwich"), timeout=5)
        await outcomes.wait_until(lambda records: len(records) == 1)
        pings = await jrr.ping_services(nc, durable, count=2)
        infos = await jrr.service_info(nc, durable, count=2)
        stats = await jrr.service_stats(nc, durable, count=2)

    assert [(ping.name, ping.metadata["responder"]) for ping in pings] == [(durable, "a"), (durable, "b")]
    assert [info.endpoints[0].subject for info in infos] == [queue.subject("sandwich")] * 2
    rows = jrr.stats_rows(stats)
    assert [(row["responder"], row["endpoint"]) for row in rows] == [("a", "sandwich"), ("b", "sandwich")]
    assert sum(row["requests"] for row in rows) == 1


async def test_asking_a_name_nobody_has_returns_nothing(nc):
    assert await jrr.ping_services(nc, unique("nobody"), timeout=SETTLE) == []


@pytest.mark.parametrize(
    ("name", "service_id", "said"),
    [
        (None, "abc", "needs the service's name"),
        ("two words", None, "is not a service name"),
        ("a.b", None, "is not a service name"),
    ],
)
async def test_a_malformed_name_or_id_is_a_clear_error(nc, name, service_id, said):
    with pytest.raises(ValueError, match=said):
        await jrr.ping_services(nc, name, service_id)


# -- under the responder user's permissions -------------------------------------------------------


async def test_a_least_privilege_responder_can_be_discovered(tmp_path):
    with jrr.EmbeddedServer(store_dir=tmp_path / "store", users=["alice"]) as server:
        admin = await jrr.connect(server.url_for("admin"))
        responder_nc = await jrr.connect(server.url_for("responder"))
        try:
            await jrr.ensure_request_stream(admin)
            serving = jrr.Responder(responder_nc, jrr.menu_handlers())
            async with serving:
                pings = await jrr.ping_services(admin, "responder", count=1, timeout=SETTLE)
        finally:
            for client in (responder_nc, admin):
                await client.drain()

    assert serving.service.denied is None
    assert [ping.id for ping in pings] == [serving.service.id]
