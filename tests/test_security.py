"""Least privilege on one shared server: alice and bob each reach their own mailbox, and nothing of the other's.

One server with users serves the whole module: the admin creates the streams and the `responder`
user serves them. Each attack is made the way a user could make it: through the package where it
offers the call, otherwise as the raw JetStream API request or core subscription the call comes
down to. docs/security.md lists what must hold.
"""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats.errors
import pytest
import pytest_asyncio
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import KeyNotFoundError, NotFoundError
from support import SETTLE, ErrorLog, Outcomes, denied_quickly, eventually, unique

import js_request_reply as jrr

pytestmark = pytest.mark.asyncio(loop_scope="module")

NO_ANSWER = 0.3  # seconds a raw call waits for the answer that a denied request never gets

LEDGER = "REPLIES-ledger"
LEDGER_STREAM = f"KV_{LEDGER}"
ALICE_CREATES_HER_MAILBOX = "$JS.API.CONSUMER.CREATE.REPLIES.mailbox-alice.replies.alice.>"
ALICE_LISTS_HER_LEDGER = f"$JS.API.CONSUMER.CREATE.{LEDGER_STREAM}.ledger-alice.$KV.{LEDGER}.alice.*"
API_INFO_RESPONSE = "io.nats.jetstream.api.v1.consumer_info_response"


# -- the module's server, streams, responder and users ---------------------------------------------


class Gates:
    """Requests whose handler waits until a test lets it go: a request that stays queued while a test needs it."""

    def __init__(self) -> None:
        self.held: dict[bytes, Msg] = {}
        self._entered: dict[bytes, asyncio.Event] = {}
        self._open: dict[bytes, asyncio.Event] = {}
        self._closing = False

    async def hold(self, msg: Msg) -> bytes:
        self.held[msg.data] = msg
        self._entered.setdefault(msg.data, asyncio.Event()).set()
        if not self._closing:
            await self._open.setdefault(msg.data, asyncio.Event()).wait()
        return b"done " + msg.data

    async def entered(self, key: bytes) -> Msg:
        """The request with payload `key`, once its handler holds it."""
        async with asyncio.timeout(SETTLE):
            await self._entered.setdefault(key, asyncio.Event()).wait()
        return self.held[key]

    def release(self, key: bytes) -> None:
        self._open.setdefault(key, asyncio.Event()).set()

    def release_all(self) -> None:
        self._closing = True
        for gate in self._open.values():
            gate.set()


def handlers(gates: Gates) -> dict:
    """requests.hold holds payloads starting "hold:", requests.soldout rejects, any other says hello."""

    async def hold(msg: Msg) -> bytes:
        if msg.data.startswith(b"hold:"):
            return await gates.hold(msg)
        return b"hello " + msg.data

    def sold_out(msg: Msg) -> bytes:
        raise jrr.Reject(409, "sold out")

    def hello(msg: Msg) -> bytes:
        return b"hello " + msg.data

    return {"requests.hold": hold, "requests.soldout": sold_out, "requests.*": hello}


@dataclass
class World:
    admin: Client
    alice: Client
    bob: Client
    spy: Client  # a second connection of the responder user, which probes what that user may read
    logs: dict[str, ErrorLog]
    alice_box: jrr.Requester
    bob_box: jrr.Requester
    outcomes: Outcomes
    gates: Gates

    def connection(self, user: str) -> Client:
        return {"alice": self.alice, "bob": self.bob, "responder": self.spy}[user]

    def box(self, user: str) -> jrr.Requester:
        return {"alice": self.alice_box, "bob": self.bob_box}[user]


@pytest.fixture(scope="module")
def server():
    with jrr.EmbeddedServer(users=["alice", "bob"]) as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(server):
    admin = await jrr.connect(server.url_for("admin"))
    await jrr.ensure_request_stream(admin)
    await jrr.ensure_reply_stream(admin)
    gates, outcomes = Gates(), Outcomes()
    serving = await jrr.connect(server.url_for("responder"))
    responder = await jrr.Responder(serving, handlers(gates), on_handled=outcomes).start()
    logs = {user: ErrorLog() for user in ("alice", "bob", "responder")}
    alice = await jrr.connect(server.url_for("alice"), error_cb=logs["alice"])
    bob = await jrr.connect(server.url_for("bob"), error_cb=logs["bob"])
    spy = await jrr.connect(server.url_for("responder"), error_cb=logs["responder"])
    alice_box, bob_box = jrr.Requester(alice, mailbox="alice"), jrr.Requester(bob, mailbox="bob")
    for box in (alice_box, bob_box):
        assert await box.collect() == []  # opens the mailbox: its consumer exists from here on
    yield World(admin, alice, bob, spy, logs, alice_box, bob_box, outcomes, gates)
    gates.release_all()
    await responder.stop()
    for box in (alice_box, bob_box):
        await box.close()
    for nc in (alice, bob, spy, serving, admin):
        await nc.drain()


@dataclass
class Belongings:
    """What bob has on the server while an attack is made: a reply waiting, a request queued."""

    reply_id: str
    reply_seq: int
    queued_id: str
    queued_seq: int
    hold_key: bytes


@pytest_asyncio.fixture(loop_scope="module")
async def bobs(world):
    """A reply waiting in bob's mailbox, and a request of bob's queued in REQUESTS (its handler holds it).

    Afterwards bob collects both, so the next test starts with his mailbox empty.
    """
    reply_id = await world.bob_box.send("requests.x", b"bob's secret")
    reply = await eventually(lambda: stored(world.admin, "REPLIES", f"replies.bob.{reply_id}"))
    key = f"hold:{unique('bob-')}".encode()
    queued_id = await world.bob_box.send("requests.hold", key)
    queued = await world.gates.entered(key)
    yield Belongings(reply_id, reply.seq, queued_id, queued.metadata.sequence.stream, key)
    world.gates.release(key)
    await collect_until(world.bob_box, reply_id, queued_id)


# -- helpers ---------------------------------------------------------------------------------------


async def stored(admin: Client, stream: str, subject: str):
    """The last message `stream` holds under `subject`, or None."""
    try:
        return await admin.jetstream().get_msg(stream, subject=subject)
    except NotFoundError:
        return None


async def gone(admin: Client, stream: str, subject: str) -> bool:
    return await stored(admin, stream, subject) is None


def by_id(replies: list[jrr.Reply]) -> dict[str, jrr.Reply]:
    return {reply.request_id: reply for reply in replies}


async def collect_until(requester: jrr.Requester, *ids: str) -> dict[str, jrr.Reply]:
    """Collect until a reply to each of `ids` was handed over; returns every reply handed over, by id."""
    handed: dict[str, jrr.Reply] = {}

    async def all_in() -> bool:
        handed.update(by_id(await requester.collect()))
        return set(ids) <= handed.keys()

    await eventually(all_in)
    return handed


async def outcome_for(world: World, request_id: str, since: int) -> jrr.Handled:
    """The first thing the responder did, after record `since`, with a request whose id is `request_id`."""
    await world.outcomes.wait_until(lambda records: any(h.request_id == request_id for h in records[since:]))
    return next(h for h in world.outcomes.records[since:] if h.request_id == request_id)


async def assert_denied(world: World, user: str, subject: str, call: Awaitable) -> None:
    """The server drops `call`'s request to `subject` and says so: no answer, a violation in the error callback."""
    nc, log = world.connection(user), world.logs[user]
    since = log.mark()
    with pytest.raises(nats.errors.TimeoutError):
        await call
    assert await log.wait_for("publish", subject, since), f"no violation for {subject!r}: {log.errors[since:]}"
    assert nc.is_connected


async def assert_bob_intact(world: World, bobs: Belongings) -> None:
    """bob's waiting reply, his queued request and both their ledger entries are all still there."""
    js = world.admin.jetstream()
    reply = await js.get_msg("REPLIES", bobs.reply_seq)
    assert (reply.subject, reply.data) == (f"replies.bob.{bobs.reply_id}", b"hello bob's secret")
    queued = await js.get_msg("REQUESTS", bobs.queued_seq)
    assert (queued.data, queued.headers["Nats-Reply"]) == (bobs.hold_key, f"replies.bob.{bobs.queued_id}")
    ledger = await js.key_value(LEDGER)
    for request_id, subject in ((bobs.reply_id, "requests.x"), (bobs.queued_id, "requests.hold")):
        entry = await ledger.get(f"bob.{request_id}")
        assert json.loads(entry.value)["subject"] == subject


async def fetch_one(nc: Client, stream: str, consumer: str) -> list[Msg]:
    sub = await nc.jetstream().pull_subscribe_bind(consumer=consumer, stream=stream)
    try:
        return await sub.fetch(1, timeout=NO_ANSWER)
    finally:
        await sub.unsubscribe()


def spoofed(reply_to: str, stream: str | None = "REPLIES") -> dict[str, str]:
    """The headers of a request that names `reply_to` as where its reply goes."""
    headers = {"Nats-Reply": reply_to}
    if stream:
        headers["Nats-Reply-Stream"] = stream
    return headers


def assert_stored_request(ack: Msg) -> None:
    assert "seq" in json.loads(ack.data), f"the request was not stored: {ack.data!r}"


# -- 1. the happy path, under least privilege ------------------------------------------------------


async def test_alice_and_bob_each_collect_their_own_replies_and_nothing_else(world):
    alice_ids = [await world.alice_box.send("requests.x", f"from alice {n}") for n in range(3)]
    bob_ids = [await world.bob_box.send("requests.x", f"from bob {n}") for n in range(3)]

    alice_got = await collect_until(world.alice_box, *alice_ids)
    bob_got = await collect_until(world.bob_box, *bob_ids)

    assert [alice_got[i].text for i in alice_ids] == ["hello from alice 0", "hello from alice 1", "hello from alice 2"]
    assert [bob_got[i].text for i in bob_ids] == ["hello from bob 0", "hello from bob 1", "hello from bob 2"]
    assert all(reply.subject.startswith("replies.alice.") for reply in alice_got.values())
    assert all(reply.subject.startswith("replies.bob.") for reply in bob_got.values())
    # The responder records a request once it has acked it, which may be just after its reply was collected.
    await world.outcomes.wait_until(lambda records: {*alice_ids, *bob_ids} <= {h.request_id for h in records})
    served = {h.request_id: h.outcome for h in world.outcomes.records}
    assert [served[i] for i in alice_ids + bob_ids] == ["replied"] * 6


@pytest.mark.parametrize("user", ["alice", "bob"])
async def test_each_user_gets_replies_through_its_mailbox_and_directly(world, user):
    reply = await world.box(user).request("requests.x", f"{user} waits", timeout=SETTLE)
    direct = await jrr.request(world.connection(user), "requests.x", f"{user} direct", timeout=SETTLE)

    assert (reply.text, reply.subject) == (f"hello {user} waits", f"replies.{user}.{reply.request_id}")
    assert direct.data == f"hello {user} direct".encode()
    assert direct.subject.startswith(f"_INBOX.{user}."), direct.subject


async def test_a_rejection_reaches_the_requester_that_sent_it(world):
    alice_id = await world.alice_box.send("requests.soldout", b"one ticket")

    with pytest.raises(jrr.RequestRejected) as bob_rejected:
        await world.bob_box.request("requests.soldout", b"two tickets", timeout=SETTLE)
    with pytest.raises(jrr.RequestRejected) as direct_rejected:
        await jrr.request(world.bob, "requests.soldout", b"three tickets", timeout=SETTLE)
    alice_got = await collect_until(world.alice_box, alice_id)
    bob_got = by_id(await world.bob_box.collect())

    assert (bob_rejected.value.code, bob_rejected.value.description) == (409, "sold out")
    assert (direct_rejected.value.code, direct_rejected.value.description) == (409, "sold out")
    assert alice_got[alice_id].error == jrr.ReplyError(409, "sold out")
    assert alice_id not in bob_got


# -- 2. every attempt by alice on bob's mailbox fails ----------------------------------------------


def as_bob(world: World, call: str) -> Awaitable:
    impostor = jrr.Requester(world.alice, mailbox="bob")
    if call == "collect":
        return impostor.collect(timeout=5)
    if call == "send":
        return impostor.send("requests.x", b"in bob's name", timeout=5)
    return impostor.request("requests.x", b"in bob's name", timeout=5)


@pytest.mark.parametrize("call", ["collect", "send", "request"])
async def test_alice_using_bobs_mailbox_is_denied_at_once(world, bobs, call):
    denied = await denied_quickly(as_bob(world, call))

    message = str(denied)
    assert denied.user == "alice"
    assert "user 'alice'" in message, message
    assert "mailbox 'bob'" in message or denied.subject in message, message
    assert "bob" in denied.subject, denied.subject
    await assert_bob_intact(world, bobs)


async def test_request_in_bobs_name_says_which_mailbox_like_send_and_collect(world, bobs):
    denied = await denied_quickly(as_bob(world, "request"))

    assert "user 'alice' may not use mailbox 'bob'" in str(denied), str(denied)
    assert denied.subject == "$JS.API.CONSUMER.INFO.REPLIES.mailbox-bob", denied.subject


def _js(world: World, user: str = "alice"):
    return world.connection(user).jetstream(timeout=NO_ANSWER)


def _raw(world: World, subject: str, body: bytes = b"", user: str = "alice") -> Awaitable:
    return world.connection(user).request(subject, body, timeout=NO_ANSWER)


def _reply_subject(bobs: Belongings) -> str:
    return f"replies.bob.{bobs.reply_id}"


def _ledger_key(bobs: Belongings) -> str:
    return f"$KV.{LEDGER}.bob.{bobs.queued_id}"


def _ack_subject(bobs: Belongings) -> str:
    return f"$JS.ACK.REPLIES.mailbox-bob.1.{bobs.reply_seq}.1.0.0"


def _consumer(name: str, filter_subject: str) -> ConsumerConfig:
    return ConsumerConfig(name=name, durable_name=name, filter_subject=filter_subject, ack_policy=AckPolicy.EXPLICIT)


# Raw calls alice could make on bob's things: name -> (world, bob's things) -> (the subject the
# server must deny, the call).
ALICE_ATTACKS: dict[str, Callable[[World, Belongings], tuple[str, Awaitable]]] = {
    "info of mailbox-bob": lambda w, b: (
        "$JS.API.CONSUMER.INFO.REPLIES.mailbox-bob",
        _js(w).consumer_info("REPLIES", "mailbox-bob"),
    ),
    "create mailbox-bob": lambda w, b: (
        "$JS.API.CONSUMER.CREATE.REPLIES.mailbox-bob.replies.bob.>",
        _js(w).add_consumer("REPLIES", _consumer("mailbox-bob", "replies.bob.>")),
    ),
    "create a consumer of her own on bob's replies": lambda w, b: (
        "$JS.API.CONSUMER.CREATE.REPLIES.alice-reads-bob.replies.bob.>",
        _js(w).add_consumer("REPLIES", _consumer("alice-reads-bob", "replies.bob.>")),
    ),
    "fetch from mailbox-bob": lambda w, b: (
        "$JS.API.CONSUMER.MSG.NEXT.REPLIES.mailbox-bob",
        fetch_one(w.alice, "REPLIES", "mailbox-bob"),
    ),
    "ack bob's reply": lambda w, b: (_ack_subject(b), _raw(w, _ack_subject(b), b"+ACK")),
    "list the consumers of REPLIES": lambda w, b: (
        "$JS.API.CONSUMER.LIST.REPLIES",
        _raw(w, "$JS.API.CONSUMER.LIST.REPLIES", b"{}"),
    ),
    "get bob's reply by sequence": lambda w, b: (
        "$JS.API.STREAM.MSG.GET.REPLIES",
        _js(w).get_msg("REPLIES", b.reply_seq),
    ),
    "direct get of bob's reply by sequence": lambda w, b: (
        "$JS.API.DIRECT.GET.REPLIES",
        _js(w).get_msg("REPLIES", b.reply_seq, direct=True),
    ),
    "direct get of bob's reply by subject": lambda w, b: (
        f"$JS.API.DIRECT.GET.REPLIES.{_reply_subject(b)}",
        _js(w).get_msg("REPLIES", subject=_reply_subject(b), direct=True),
    ),
    "direct get of bob's ledger key": lambda w, b: (
        f"$JS.API.DIRECT.GET.{LEDGER_STREAM}.{_ledger_key(b)}",
        _js(w).get_msg(LEDGER_STREAM, subject=_ledger_key(b), direct=True),
    ),
    "get bob's ledger key from the ledger's stream": lambda w, b: (
        f"$JS.API.STREAM.MSG.GET.{LEDGER_STREAM}",
        _js(w).get_msg(LEDGER_STREAM, subject=_ledger_key(b)),
    ),
    "write a ledger key in bob's name": lambda w, b: (
        f"$KV.{LEDGER}.bob.forged",
        _raw(w, f"$KV.{LEDGER}.bob.forged", b'{"subject": "requests.x"}'),
    ),
    "info of REPLIES": lambda w, b: ("$JS.API.STREAM.INFO.REPLIES", _js(w).stream_info("REPLIES")),
    "info of the ledger's stream": lambda w, b: (
        f"$JS.API.STREAM.INFO.{LEDGER_STREAM}",
        _js(w).stream_info(LEDGER_STREAM),
    ),
    "open the ledger bucket": lambda w, b: (f"$JS.API.STREAM.INFO.{LEDGER_STREAM}", _js(w).key_value(LEDGER)),
    "read bob's queued request": lambda w, b: (
        "$JS.API.STREAM.MSG.GET.REQUESTS",
        _js(w).get_msg("REQUESTS", b.queued_seq),
    ),
    # (as raw requests: nats-py's delete_msg waits 5 s, whatever the context's timeout)
    "delete bob's queued request": lambda w, b: (
        "$JS.API.STREAM.MSG.DELETE.REQUESTS",
        _raw(w, "$JS.API.STREAM.MSG.DELETE.REQUESTS", json.dumps({"seq": b.queued_seq}).encode()),
    ),
    "delete bob's waiting reply": lambda w, b: (
        "$JS.API.STREAM.MSG.DELETE.REPLIES",
        _raw(w, "$JS.API.STREAM.MSG.DELETE.REPLIES", json.dumps({"seq": b.reply_seq}).encode()),
    ),
    "purge REPLIES": lambda w, b: ("$JS.API.STREAM.PURGE.REPLIES", _js(w).purge_stream("REPLIES")),
    "purge REQUESTS": lambda w, b: ("$JS.API.STREAM.PURGE.REQUESTS", _js(w).purge_stream("REQUESTS")),
    "purge the ledger": lambda w, b: (f"$JS.API.STREAM.PURGE.{LEDGER_STREAM}", _js(w).purge_stream(LEDGER_STREAM)),
    "delete REPLIES": lambda w, b: ("$JS.API.STREAM.DELETE.REPLIES", _js(w).delete_stream("REPLIES")),
    "delete REQUESTS": lambda w, b: ("$JS.API.STREAM.DELETE.REQUESTS", _js(w).delete_stream("REQUESTS")),
    "delete the ledger": lambda w, b: (f"$JS.API.STREAM.DELETE.{LEDGER_STREAM}", _js(w).delete_key_value(LEDGER)),
}


@pytest.mark.parametrize("attack", ALICE_ATTACKS)
async def test_the_server_denies_alice_every_raw_call_on_bobs_things(world, bobs, attack):
    subject, call = ALICE_ATTACKS[attack](world, bobs)

    await assert_denied(world, "alice", subject, call)

    await assert_bob_intact(world, bobs)
    with pytest.raises(KeyNotFoundError):
        await (await world.admin.jetstream().key_value(LEDGER)).get("bob.forged")


@pytest.mark.parametrize(
    "filters",
    [{"filter_subject": "replies.bob.>"}, {"filter_subjects": ["replies.alice.>", "replies.bob.>"]}],
    ids=["bob's filter", "her filter and bob's"],
)
async def test_alices_own_mailbox_subject_cannot_carry_a_filter_on_bobs_replies(world, bobs, filters):
    config = {"name": "mailbox-alice", "durable_name": "mailbox-alice", "ack_policy": "explicit", **filters}
    body = {"stream_name": "REPLIES", "config": config}

    answer = await world.alice.request(ALICE_CREATES_HER_MAILBOX, json.dumps(body).encode(), timeout=SETTLE)

    assert "error" in json.loads(answer.data), answer.data
    info = await world.admin.jetstream().consumer_info("REPLIES", "mailbox-alice")
    assert (info.config.filter_subject, info.config.filter_subjects) == ("replies.alice.>", None)
    await assert_bob_intact(world, bobs)


async def test_alices_own_ledger_listing_subject_cannot_carry_a_filter_on_bobs_keys(world, bobs):
    config = {
        "name": "ledger-alice",
        "filter_subject": f"$KV.{LEDGER}.bob.*",
        "ack_policy": "none",
        "deliver_policy": "last_per_subject",
        "mem_storage": True,
    }
    body = {"stream_name": LEDGER_STREAM, "config": config}

    answer = await world.alice.request(ALICE_LISTS_HER_LEDGER, json.dumps(body).encode(), timeout=SETTLE)

    assert "error" in json.loads(answer.data), answer.data
    with pytest.raises(NotFoundError):
        await world.admin.jetstream().consumer_info(LEDGER_STREAM, "ledger-alice")
    await assert_bob_intact(world, bobs)


@pytest.mark.parametrize("subject", ["replies.bob.>", "_INBOX.bob.>", f"$KV.{LEDGER}.bob.>"])
async def test_alice_cannot_subscribe_to_bobs_subjects(world, subject):
    probe = subject.replace(">", unique("probe-"))
    received: list[Msg] = []
    since = world.logs["alice"].mark()

    async def keep(msg: Msg) -> None:
        received.append(msg)

    sent = asyncio.Event()

    async def control_got(msg: Msg) -> None:
        sent.set()

    sub = await world.alice.subscribe(subject, cb=keep)
    denied = await world.logs["alice"].wait_for("subscribe", subject, since)
    control = await world.admin.subscribe(probe, cb=control_got)
    try:
        # The admin's own subscription shows the probe was delivered; alice's flush after that, that
        # nothing was on its way to her.
        await world.admin.publish(probe, b"for bob only")
        async with asyncio.timeout(SETTLE):
            await sent.wait()
        await world.alice.flush()
    finally:
        await control.unsubscribe()
        await sub.unsubscribe()
        await purge(world.admin, probe)

    assert denied, world.logs["alice"].errors[since:]
    assert received == []
    assert world.alice.is_connected


async def purge(admin: Client, subject: str) -> None:
    """Remove whatever a stream stored under `subject`."""
    js = admin.jetstream()
    try:
        stream = await js.find_stream_name_by_subject(subject)
    except NotFoundError:
        return
    await js.purge_stream(stream, subject=subject)


async def test_a_rollup_on_her_own_ledger_key_is_refused_and_bobs_entries_survive(world, bobs):
    key = f"$KV.{LEDGER}.alice.{unique('roll-')}"

    answer = await world.alice.request(key, b"{}", headers={"Nats-Rollup": "all"}, timeout=SETTLE)

    assert json.loads(answer.data)["error"]["description"] == "rollup not permitted"
    await assert_bob_intact(world, bobs)


async def test_a_rollup_on_a_request_is_refused_and_bobs_queued_request_survives(world, bobs):
    answer = await world.alice.request("requests.x", b"wipe", headers={"Nats-Rollup": "all"}, timeout=SETTLE)

    assert json.loads(answer.data)["error"]["description"] == "rollup not permitted"
    await assert_bob_intact(world, bobs)


# -- 3. a request naming bob's mailbox as its reply subject ----------------------------------------


@pytest.mark.parametrize(
    "case, refusal",
    [
        ("an id bob sent and collected", "mailbox 'bob' did not send this request"),
        ("an id bob never sent", "mailbox 'bob' did not send this request"),
        ("no Nats-Reply-Stream header", "the request has no Nats-Reply-Stream header"),
    ],
)
async def test_a_spoofed_reply_subject_is_refused_and_nothing_reaches_bob(world, case, refusal):
    if case == "an id bob sent and collected":
        request_id = (await world.bob_box.request("requests.x", b"bob's own", timeout=SETTLE)).request_id
    else:
        request_id = unique("guess")
    stream = None if case == "no Nats-Reply-Stream header" else "REPLIES"
    reply_to = f"replies.bob.{request_id}"
    dropped = collections.Counter(world.bob_box.dropped)
    since = len(world.outcomes.records)

    ack = await world.alice.request("requests.x", b"spoof", headers=spoofed(reply_to, stream), timeout=SETTLE)
    handled = await outcome_for(world, request_id, since)

    assert_stored_request(ack)
    assert handled.outcome == "refused", handled
    assert refusal in handled.detail, handled.detail
    assert await gone(world.admin, "REPLIES", reply_to), "a reply was stored in bob's mailbox"
    assert await eventually(lambda: gone_by_seq(world.admin, "REQUESTS", json.loads(ack.data)["seq"]))
    assert request_id not in by_id(await world.bob_box.collect())
    assert world.bob_box.dropped == dropped


async def gone_by_seq(admin: Client, stream: str, seq: int) -> bool:
    try:
        await admin.jetstream().get_msg(stream, seq)
    except NotFoundError:
        return True
    return False


async def settle_held(world: World, key: bytes, request_id: str, since: int, answers: int) -> dict[str, jrr.Reply]:
    """Let bob's held request go, wait until the responder has dealt with `answers` requests of its id,
    and collect until his mailbox holds nothing under that id; returns what was handed over."""
    world.gates.release(key)
    await world.outcomes.wait_until(lambda records: sum(h.request_id == request_id for h in records[since:]) >= answers)
    handed: dict[str, jrr.Reply] = {}

    async def emptied() -> bool:
        handed.update(by_id(await world.bob_box.collect()))
        return await gone(world.admin, "REPLIES", f"replies.bob.{request_id}")

    await eventually(emptied)
    return handed


async def bob_waits_for_an_order(world: World) -> tuple[str, bytes, int]:
    """Bob sends an order with a msg_id of his choosing, which the responder holds: (id, key, since)."""
    order = unique("order-")  # a msg_id bob chose: predictable, as business ids are
    key = f"hold:{order}".encode()
    since = len(world.outcomes.records)
    await world.bob_box.send("requests.hold", key, msg_id=order)
    await world.gates.entered(key)
    return order, key, since


async def test_a_spoof_naming_a_request_bob_still_waits_for_is_refused(world):
    order, key, since = await bob_waits_for_an_order(world)
    handed: dict[str, jrr.Reply] = {}
    try:
        headers = spoofed(f"replies.bob.{order}")
        await world.alice.request("requests.hold", b"alice's answer", headers=headers, timeout=SETTLE)
        handled = await outcome_for(world, order, since)
    finally:
        handed = await settle_held(world, key, order, since, answers=2)

    assert handled.outcome == "refused", handled
    assert handed[order].text == f"done {key.decode()}", f"bob was handed {handed[order].text!r}"


async def test_a_reply_subject_with_a_token_more_cannot_borrow_alices_own_ledger_entry(world):
    request_id = unique("borrowed")
    reply_to = f"replies.bob.alice.{request_id}"
    entry = json.dumps({"subject": "requests.x"}).encode()
    await world.alice.request(f"$KV.{LEDGER}.alice.{request_id}", entry, timeout=SETTLE)  # her own key
    since = len(world.outcomes.records)

    await world.alice.request("requests.x", b"junk for bob", headers=spoofed(reply_to), timeout=SETTLE)
    handled = await outcome_for(world, request_id, since)
    in_bobs_mailbox = await stored(world.admin, "REPLIES", reply_to)
    await purge(world.admin, reply_to)

    assert handled.outcome == "refused", handled
    assert in_bobs_mailbox is None, f"stored in bob's mailbox: {in_bobs_mailbox.data!r}"


# -- 4. a JetStream API answer sent to bob's mailbox -----------------------------------------------


async def test_an_api_answer_alice_directs_at_bobs_mailbox_is_stored_but_never_handed_to_bob(world):
    reply_to = f"replies.bob.{unique('inject')}"
    before = world.bob_box.dropped["not requested"]

    # Allowed: info of her own mailbox. Permissions cannot govern the reply subject she names.
    await world.alice.publish("$JS.API.CONSUMER.INFO.REPLIES.mailbox-alice", b"", reply=reply_to)
    injected = await eventually(lambda: stored(world.admin, "REPLIES", reply_to))
    handed: dict[str, jrr.Reply] = {}

    async def dropped() -> bool:
        handed.update(by_id(await world.bob_box.collect()))
        return world.bob_box.dropped["not requested"] > before

    await eventually(dropped)

    assert json.loads(injected.data)["type"] == API_INFO_RESPONSE, "the hole is real: the answer is stored"
    assert reply_to.rsplit(".", 1)[1] not in handed
    assert world.bob_box.dropped["not requested"] == before + 1
    assert await eventually(lambda: gone(world.admin, "REPLIES", reply_to))


async def test_an_api_answer_under_the_id_of_a_request_bob_still_waits_for_is_not_handed_over(world):
    order, key, since = await bob_waits_for_an_order(world)
    handed: dict[str, jrr.Reply] = {}
    try:
        await world.alice.publish("$JS.API.CONSUMER.INFO.REPLIES.mailbox-alice", b"", reply=f"replies.bob.{order}")
        await eventually(lambda: stored(world.admin, "REPLIES", f"replies.bob.{order}"))
        handed.update(by_id(await world.bob_box.collect()))
        early = handed.pop(order, None)
    finally:
        handed.update(await settle_held(world, key, order, since, answers=1))

    assert early is None, f"bob was handed alice's API answer as his reply: {early.text[:80]!r}"
    assert handed[order].text == f"done {key.decode()}"


# -- 5. a second reply to a request already handed over --------------------------------------------


async def test_a_second_reply_to_a_request_already_handed_over_is_dropped(world):
    reply = await world.bob_box.request("requests.x", b"once", timeout=SETTLE)
    before = world.bob_box.dropped["second reply"]
    handed: dict[str, jrr.Reply] = {}

    copy = {**reply.headers, "Nats-Msg-Id": unique("copy-")}
    await world.admin.jetstream().publish(reply.subject, reply.data, headers=copy)

    async def dropped() -> bool:
        handed.update(by_id(await world.bob_box.collect()))
        return world.bob_box.dropped["second reply"] > before

    await eventually(dropped)

    assert reply.request_id not in handed
    assert world.bob_box.dropped["second reply"] == before + 1
    assert await eventually(lambda: gone(world.admin, "REPLIES", reply.subject))


# -- 6. the responder user reads no mailbox --------------------------------------------------------


RESPONDER_ATTEMPTS: dict[str, Callable[[World, Belongings], tuple[str, Awaitable]]] = {
    "create a consumer on REPLIES": lambda w, b: (
        "$JS.API.CONSUMER.CREATE.REPLIES.responder-reads.replies.>",
        _js(w, "responder").add_consumer("REPLIES", _consumer("responder-reads", "replies.>")),
    ),
    "direct get on REPLIES": lambda w, b: (
        f"$JS.API.DIRECT.GET.REPLIES.{_reply_subject(b)}",
        _js(w, "responder").get_msg("REPLIES", subject=_reply_subject(b), direct=True),
    ),
    "get a reply by sequence": lambda w, b: (
        "$JS.API.STREAM.MSG.GET.REPLIES",
        _js(w, "responder").get_msg("REPLIES", b.reply_seq),
    ),
    "fetch from mailbox-bob": lambda w, b: (
        "$JS.API.CONSUMER.MSG.NEXT.REPLIES.mailbox-bob",
        fetch_one(w.spy, "REPLIES", "mailbox-bob"),
    ),
}


@pytest.mark.parametrize("attempt", RESPONDER_ATTEMPTS)
async def test_the_responder_user_cannot_read_a_mailbox(world, bobs, attempt):
    subject, call = RESPONDER_ATTEMPTS[attempt](world, bobs)

    await assert_denied(world, "responder", subject, call)

    await assert_bob_intact(world, bobs)


async def test_the_responder_user_cannot_subscribe_to_replies(world):
    log, since = world.logs["responder"], world.logs["responder"].mark()

    sub = await world.spy.subscribe("replies.>")
    denied = await log.wait_for("subscribe", "replies.>", since)
    await sub.unsubscribe()

    assert denied, log.errors[since:]


async def test_the_responder_user_asking_for_bobs_mailbox_is_denied_at_once(world, bobs):
    denied = await denied_quickly(jrr.Requester(world.spy, mailbox="bob").collect(timeout=5))

    assert "user 'responder' may not use mailbox 'bob'" in str(denied), str(denied)
    await assert_bob_intact(world, bobs)
