"""Denials reported at once (denials.py), against a real server that denies alice what her permissions omit.

alice may publish to `requests.*` and a few JetStream subjects of her own mailbox, and subscribe
to `_INBOX.alice.>` only: anything else is a permissions violation the server reports to her
connection, lower-cased by nats-py.
"""

from __future__ import annotations

import asyncio

import nats.errors
import pytest
import pytest_asyncio
from nats.aio.msg import Msg
from support import SETTLE, ErrorLog, denied_quickly

import js_request_reply as jrr
from js_request_reply.denials import denials_for, denied_at_once, parse_violation

pytestmark = pytest.mark.asyncio(loop_scope="module")

ALICE_PASSWORD = "alice-pw"
SECRET = "$JS.API.STREAM.INFO.SECRET"  # alice may not ask about streams


@pytest.fixture(scope="module")
def server():
    with jrr.EmbeddedServer(users=["alice"], passwords={"alice": ALICE_PASSWORD}) as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def admin(server):
    nc = await jrr.connect(server.url_for("admin"))
    yield nc
    await nc.drain()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def echo(admin):
    """The admin answers requests.echo, each answer waiting until `echo.gate` is open (it is, unless a test closes it)."""

    class Echo:
        gate = asyncio.Event()
        arrived = asyncio.Event()

    async def answer(msg: Msg) -> None:
        Echo.arrived.set()
        await Echo.gate.wait()
        await msg.respond(b"echo " + msg.data)

    Echo.gate.set()
    sub = await admin.subscribe("requests.echo", cb=answer)
    await admin.flush()
    yield Echo
    Echo.gate.set()
    await sub.unsubscribe()


@pytest.fixture(scope="module")
def alice_log() -> ErrorLog:
    return ErrorLog()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def alice(server, alice_log):
    nc = await jrr.connect(server.url_for("alice"), error_cb=alice_log)
    yield nc
    await nc.drain()


@pytest.mark.parametrize(
    "pattern, reported",
    [
        (SECRET, SECRET),
        ("$js.api.Stream.Info.secret", "$js.api.Stream.Info.secret"),
        ("$JS.API.STREAM.INFO.*", "$JS.API.STREAM.INFO.secret"),
        ("$JS.API.>", "$JS.API.stream.info.secret"),
    ],
    ids=["exact", "exact in other case", "wildcard *", "wildcard >"],
)
async def test_a_call_waiting_on_a_denied_subject_raises_at_once(alice, alice_log, pattern, reported):
    # The server's report is lower-cased, and matched regardless of case. The error names the subject
    # with the case of the pattern's own tokens, and the tokens a wildcard stands for as reported.
    since = len(alice_log.errors)

    denied = await denied_quickly(denied_at_once(alice, alice.request(SECRET, b"", timeout=5), pattern))

    assert (denied.subject, denied.user, denied.action) == (reported, "alice", "publish")
    assert f"user 'alice' may not publish to '{reported}'" in str(denied), str(denied)
    assert denials_for(alice).seen[-1] == ("publish", SECRET.lower())
    assert any("permissions violation" in str(error) for error in alice_log.errors[since:]), "the caller's error_cb"


async def test_a_call_on_a_subject_not_denied_is_not_failed_by_another_calls_denial(alice, echo):
    echo.gate.clear()
    echo.arrived.clear()
    waiting = asyncio.ensure_future(
        denied_at_once(alice, alice.request("requests.echo", b"kept", timeout=SETTLE), "requests.echo")
    )
    try:
        async with asyncio.timeout(SETTLE):
            await echo.arrived.wait()  # the first request is with the admin, its answer held back

        # requests.* is one token: alice may not publish to requests.echo.deeper.
        denied = await denied_quickly(
            denied_at_once(alice, alice.request("requests.echo.deeper", b"", timeout=5), "requests.echo.deeper")
        )
        still_waiting = not waiting.done()
    finally:
        echo.gate.set()
    answer = await waiting

    assert denied.subject == "requests.echo.deeper"
    assert still_waiting, "the denial of requests.echo.deeper ended the call waiting on requests.echo"
    assert answer.data == b"echo kept"


async def test_the_connection_stays_usable_after_a_denial(alice, echo):
    await denied_quickly(denied_at_once(alice, alice.request(SECRET, b"", timeout=5), SECRET))

    answer = await denied_at_once(alice, alice.request("requests.echo", b"after", timeout=SETTLE), "requests.echo")
    again = await denied_quickly(denied_at_once(alice, alice.request(SECRET, b"", timeout=5), SECRET))

    assert alice.is_connected
    assert answer.data == b"echo after"
    assert again.subject == SECRET


async def test_a_package_call_on_a_denied_subject_raises_at_once_naming_user_and_subject(alice):
    denied = await denied_quickly(jrr.request(alice, "orders.x", b"not mine to send", timeout=5))

    assert (denied.subject, denied.user, denied.action) == ("orders.x", "alice", "publish")
    assert str(denied) == "permission denied: user 'alice' may not publish to 'orders.x'"


async def test_permission_denied_on_a_jetstream_subject_says_it_is_a_jetstream_call(alice):
    denied = await denied_quickly(denied_at_once(alice, alice.request(SECRET, b"", timeout=5), SECRET))

    assert str(denied) == (
        f"permission denied: user 'alice' may not publish to '{SECRET}' "
        "(a JetStream call: it reads or changes something this user does not own)"
    )


async def test_parse_violation_reads_the_servers_reports(alice, alice_log):
    since = len(alice_log.errors)

    with pytest.raises(nats.errors.TimeoutError):
        await alice.request(SECRET, b"", timeout=0.3)
    plain = await alice.subscribe("replies.>")
    queued = await alice.subscribe("replies.>", queue="q")
    reports = (await alice_log.wait_for_count(since + 3))[since:]
    await plain.unsubscribe()
    await queued.unsubscribe()

    assert [str(error) for error in reports] == [
        f'nats: permissions violation for publish to "{SECRET.lower()}"',
        'nats: permissions violation for subscription to "replies.>"',
        'nats: permissions violation for subscription to "replies.>" using queue "q"',
    ]
    assert [parse_violation(error) for error in reports] == [
        ("publish", SECRET.lower()),
        ("subscribe", "replies.>"),
        ("subscribe", "replies.>"),
    ]


@pytest.mark.parametrize(
    "error",
    [nats.errors.TimeoutError(), nats.errors.AuthorizationError(), nats.errors.Error("nats: permissions violation")],
    ids=["timeout", "authorization", "no subject"],
)
async def test_parse_violation_ignores_other_errors(error):
    assert parse_violation(error) is None


async def test_a_wrong_password_raises_permission_denied_at_once(server):
    wrong = server.url_for("alice").replace(ALICE_PASSWORD, "not-" + ALICE_PASSWORD)

    denied = await denied_quickly(jrr.connect(wrong))

    assert (denied.user, denied.action) == ("alice", "connect")
    assert "refused user 'alice'; check the user name and password" in str(denied), str(denied)
    assert ALICE_PASSWORD not in str(denied)
