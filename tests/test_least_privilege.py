"""The responder's rarer paths under the `responder` user's permissions, and nothing more.

A request whose deliveries run out is answered and removed by a responder that may read and delete
requests but not mailboxes; the command-line responder serves streams an admin created.
"""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
from support import Outcomes
from test_faults import hanging_responder

import js_request_reply as jrr


@pytest.fixture
def secure_server(tmp_path):
    with jrr.EmbeddedServer(store_dir=tmp_path / "store", users=["alice"]) as server:
        yield server


async def test_a_request_given_up_on_is_answered_into_its_mailbox_by_a_least_privilege_responder(secure_server):
    admin = await jrr.connect(secure_server.url_for("admin"))
    alice_nc = await jrr.connect(secure_server.url_for("alice"))
    responder_nc = await jrr.connect(secure_server.url_for("responder"))
    await jrr.ensure_request_stream(admin)
    await jrr.ensure_reply_stream(admin)
    options = dict(ack_wait=1, max_deliver=1)
    alice = jrr.Requester(alice_nc, mailbox="alice")
    try:
        request_id = await alice.send("requests.poison", b"crashes everyone")
        async with hanging_responder(secure_server.url_for("responder"), "REQUESTS", "kitchen", **options) as doomed:
            assert (await doomed.handling()) == (request_id, 1)
            await doomed.kill()

        outcomes = Outcomes()
        async with jrr.Responder(responder_nc, lambda msg: b"", durable="kitchen", on_handled=outcomes, **options):
            gave_up = await outcomes.wait_for(lambda h: h.outcome == "gave up")
        replies = []
        async with asyncio.timeout(20):
            while not replies:
                replies = await alice.collect(timeout=2)
    finally:
        await alice.close()
        for nc in (alice_nc, responder_nc):
            await nc.drain()

    assert (gave_up.request_id, gave_up.detail) == (request_id, "gave up after 1 deliveries")
    assert [(reply.request_id, reply.error.code, reply.error.description) for reply in replies] == [
        (request_id, 500, "gave up after 1 deliveries")
    ]
    assert await jrr.wait_for_messages(admin, "REQUESTS", 0) == 0, "the responder deleted the request"
    await admin.drain()


async def test_the_command_line_responder_serves_streams_the_admin_made(secure_server):
    admin = await jrr.connect(secure_server.url_for("admin"))
    await jrr.ensure_request_stream(admin)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "js_request_reply",
        "responder",
        env={**os.environ, "NATS_URL": secure_server.url_for("responder")},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    lines: list[str] = []
    try:
        async with asyncio.timeout(20):
            while not any(line.startswith("serving the menu") for line in lines):
                line = (await process.stdout.readline()).decode()
                assert line, "the responder ended early:\n" + "".join(lines)
                lines.append(line)
        alice_nc = await jrr.connect(secure_server.url_for("alice"))
        reply = await jrr.request(alice_nc, "requests.order-sandwich", timeout=10)
        await alice_nc.drain()
    finally:
        process.terminate()
        async with asyncio.timeout(10):
            await process.wait()
        await admin.drain()

    assert lines[0] == "this user may not create streams: serving REQUESTS as the admin made it.\n"
    assert reply.data.decode() == "🥪"
    assert all(secure_server.passwords["responder"] not in line for line in lines), "no password is printed"
