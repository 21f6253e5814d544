"""Bad input always gets a clear error, and nothing else is disturbed: the responder answers the next request.

Each test sends one kind of bad input, asserts the error's type and message, and then asks the same
responder a good question.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from support import Outcomes, Queue, make_mailboxes, make_queue, messages_in, unique

import js_request_reply as jrr
from js_request_reply.server import free_port


@pytest.fixture
def small_server(tmp_path):
    """A server of the test's own whose max_payload is 4096 bytes (nats-server reads it from a config file)."""
    config = tmp_path / "small.conf"
    config.write_text("max_payload: 4096\n")
    with jrr.EmbeddedServer(store_dir=tmp_path / "store", extra_args=("-c", str(config))) as server:
        yield server


@pytest.fixture
async def small(small_server):
    """A connection to the small server, with a request and a reply stream on it."""
    client = await jrr.connect(small_server.url)
    js = client.jetstream()
    queue, boxes = await make_queue(js), await make_mailboxes(js)
    yield client, queue, boxes
    await jrr.delete_streams(js, queue.stream, boxes.stream)
    await client.drain()


def serving(nc, queue: Queue, handlers: dict, **options) -> jrr.Responder:
    """A responder for `handlers`, plus `<prefix>.ok`, which always answers: the good request after the bad."""
    return jrr.Responder(nc, {queue.subject("ok"): lambda msg: b"ok", **handlers}, stream=queue.stream, **options)


async def still_answers(nc, queue: Queue) -> None:
    """The good request after the bad: it gets its reply."""
    assert (await jrr.request(nc, queue.subject("ok"), timeout=5)).data == b"ok"


async def terminated_advisories(nc, queue: Queue, durable: str = "responder"):
    return await nc.subscribe(f"$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{queue.stream}.{durable}")


async def next_reason(advisories) -> str:
    return json.loads((await advisories.next_msg(timeout=10)).data)["reason"]


async def run_cli(*args: str, url: str) -> tuple[int, str, str]:
    """Run `python -m js_request_reply ARGS` without blocking this loop (a responder runs on it); bounded."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "js_request_reply",
        *args,
        env={**os.environ, "NATS_URL": url, "PYTHONIOENCODING": "utf-8"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(60):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"`python -m js_request_reply {' '.join(args)}` did not finish within 60s")
    return process.returncode, out.decode(), err.decode()


# -- requests nobody can answer -------------------------------------------------------------------


async def test_request_without_nats_reply_is_terminated_saying_so(nc, js, queue):
    advisories = await terminated_advisories(nc, queue)
    outcomes = Outcomes(timeout=10)
    async with serving(nc, queue, {}, on_handled=outcomes):
        await js.publish(queue.subject("raw"), b"who do I answer?")  # plain JetStream publish: no Nats-Reply
        handled = await outcomes.wait_for(lambda h: h.subject == queue.subject("raw"))
        await still_answers(nc, queue)

    assert (handled.outcome, handled.detail) == ("terminated", "no Nats-Reply header")
    assert await next_reason(advisories) == "400 no Nats-Reply header"
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0


@pytest.mark.parametrize("reply_to", ["*", "replies.>", "replies.*.x", "has space", "a..b", "trailing.", ""])
async def test_nats_reply_that_is_not_a_publish_subject_is_terminated_naming_it(nc, js, queue, reply_to):
    advisories = await terminated_advisories(nc, queue)
    outcomes = Outcomes(timeout=10)
    async with serving(nc, queue, {}, on_handled=outcomes):
        await js.publish(queue.subject("raw"), b"answer where?", headers={"Nats-Reply": reply_to})
        handled = await outcomes.wait_for(lambda h: h.subject == queue.subject("raw"))
        await still_answers(nc, queue)

    why = f"Nats-Reply {reply_to!r} is not a valid subject"
    assert (handled.outcome, handled.detail) == ("terminated", why)
    assert await next_reason(advisories) == f"400 {why}"
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0


@pytest.mark.parametrize("name", ["*", ">", "has space", "", "a..b", "trailing."])
async def test_request_and_send_refuse_a_subject_that_is_not_a_publish_subject(nc, js, queue, mailboxes, name):
    subject = f"{queue.prefix}.{name}" if name else ""
    says = f"subject {subject!r} is not a valid subject to publish to"

    with pytest.raises(ValueError) as by_request:
        await jrr.request(nc, subject, timeout=5)
    async with mailboxes.requester(nc, unique("ada")) as requester:
        with pytest.raises(ValueError) as by_send:
            await requester.send(subject)

    assert str(by_request.value) == says
    assert str(by_send.value) == says
    assert await messages_in(js, queue.stream) == 0


@pytest.mark.parametrize("msg_id", ["a.b", "*", ">", "has space", ""])
async def test_a_msg_id_that_is_not_one_token_is_refused(nc, js, queue, mailboxes, msg_id):
    # The msg_id becomes the request id, the last token of the reply subject: it must be one token.
    async with mailboxes.requester(nc, unique("bo")) as requester:
        with pytest.raises(ValueError) as caught:
            await requester.send(queue.subject("pay"), msg_id=msg_id)

    assert str(caught.value) == f"msg_id {msg_id!r} must be one subject token (letters, digits, '-' or '_')"
    assert await messages_in(js, queue.stream) == 0


# -- mailboxes ------------------------------------------------------------------------------------


async def test_a_mailbox_only_ever_reads_its_own_replies(nc, js, queue, mailboxes):
    # "alice-2" starts with "alice": a prefix must not be enough to read someone else's replies.
    names = {name: unique(name) for name in ("alice", "bob")}
    names["alice-2"] = names["alice"] + "-2"
    outcomes = Outcomes(timeout=10)
    sent = {}
    async with serving(nc, queue, {queue.subject("greet"): lambda msg: b"hi " + msg.data}, on_handled=outcomes):
        for name, mailbox in names.items():
            async with mailboxes.requester(nc, mailbox) as requester:
                sent[name] = await requester.send(queue.subject("greet"), name)
        await outcomes.wait_until(lambda records: len(records) == len(names))
        collected = {}
        for name, mailbox in names.items():
            async with mailboxes.requester(nc, mailbox) as requester:
                collected[name] = [(reply.request_id, reply.text) for reply in await requester.collect()]
        await still_answers(nc, queue)

    assert collected == {name: [(sent[name], f"hi {name}")] for name in names}
    assert await jrr.wait_for_messages(js, mailboxes.stream, 0) == 0


@pytest.mark.parametrize("mailbox", ["*", ">"])
async def test_cli_refuses_a_wildcard_mailbox_without_a_traceback(nats_url, queue, mailbox):
    code, out, err = await run_cli("request", queue.subject("greet"), "--mailbox", mailbox, "--no-wait", url=nats_url)

    assert code == 2
    assert out == ""
    assert f"error: mailbox {mailbox!r} must be one subject token" in err
    assert "Traceback" not in err


# -- payloads over max_payload --------------------------------------------------------------------


async def test_payload_over_a_small_max_payload_is_refused_stating_the_limit(small):
    nc, queue, boxes = small
    says = "payload of 4000 bytes is over the limit of 3584 bytes (the server's max_payload of 4096"
    async with serving(nc, queue, {queue.subject("size"): lambda msg: str(len(msg.data))}):
        with pytest.raises(jrr.PayloadTooLarge) as by_request:
            await jrr.request(nc, queue.subject("size"), b"x" * 4000, timeout=5)
        async with boxes.requester(nc, "cat") as requester:
            with pytest.raises(jrr.PayloadTooLarge) as by_send:
                await requester.send(queue.subject("size"), b"x" * 4000)
        largest = await jrr.request(nc, queue.subject("size"), b"x" * 3584, timeout=5)
        await still_answers(nc, queue)

    for caught in (by_request, by_send):
        assert str(caught.value) == f"{says} less room for headers); not sent"
    assert largest.data == b"3584", "the limit itself is allowed"
    assert await messages_in(nc.jetstream(), queue.stream) == 0


async def test_own_headers_count_against_max_payload_instead_of_dropping_the_connection(small):
    nc, queue, _ = small
    headers = {"X-Note": "n" * 1000}  # 1010 bytes on the wire
    async with serving(nc, queue, {queue.subject("size"): lambda msg: str(len(msg.data))}):
        with pytest.raises(jrr.PayloadTooLarge) as caught:
            await jrr.request(nc, queue.subject("size"), b"x" * 3000, headers=headers, timeout=5)
        fits = await jrr.request(nc, queue.subject("size"), b"x" * 2574, headers=headers, timeout=5)
        await still_answers(nc, queue)

    assert str(caught.value) == (
        "payload of 3000 bytes is over the limit of 2574 bytes (the server's max_payload of 4096 "
        "less room for headers, 1010 bytes of them your headers); not sent"
    )
    assert fits.data == b"2574"
    assert nc.is_connected, "the server closes a connection that sends more than max_payload"


@pytest.mark.parametrize("mode", ["inbox", "mailbox"])
async def test_a_reply_over_max_payload_is_a_500_and_the_responder_keeps_its_connection(small_server, small, mode):
    nc, queue, boxes = small
    responder_nc = await jrr.connect(small_server.url)
    requester = boxes.requester(nc, "dot") if mode == "mailbox" else jrr.Requester(nc)
    try:
        async with serving(responder_nc, queue, {queue.subject("big"): lambda msg: b"y" * 4000}):
            with pytest.raises(jrr.RequestRejected) as caught:
                await requester.request(queue.subject("big"), timeout=5)
            await still_answers(nc, queue)
        assert responder_nc.is_connected
    finally:
        await requester.close()
        await responder_nc.drain()

    assert caught.value.code == 500
    assert caught.value.description == (
        "handler failed: PayloadTooLarge: reply of 4000 bytes is over the limit of 3584 bytes "
        "(the server's max_payload of 4096 less room for headers)"
    )
    assert await jrr.wait_for_messages(nc.jetstream(), queue.stream, 0) == 0


async def test_a_very_long_error_is_cut_to_fit_a_header(small_server, small):
    nc, queue, _ = small
    responder_nc = await jrr.connect(small_server.url)

    def verbose(msg):
        raise ValueError("y" * 5000)

    try:
        async with serving(responder_nc, queue, {queue.subject("verbose"): verbose}):
            with pytest.raises(jrr.RequestRejected) as caught:
                await jrr.request(nc, queue.subject("verbose"), timeout=5)
            await still_answers(nc, queue)
        assert responder_nc.is_connected
    finally:
        await responder_nc.drain()

    description = caught.value.description
    assert caught.value.code == 500
    assert description.startswith("handler failed: ValueError: yyy")
    assert description.endswith("…")
    assert len(description.encode()) == 1024


# -- handlers that fail ---------------------------------------------------------------------------


async def none_later(msg):
    return None


@pytest.mark.parametrize(
    ("handler", "type_name"),
    [
        (lambda msg: None, "None"),
        (none_later, "None"),
        (lambda msg: {"answer": 42}, "dict"),
        (lambda msg: 42, "int"),
        (lambda msg: [b"a", b"b"], "list"),
    ],
)
async def test_a_handler_returning_neither_bytes_nor_str_is_a_500_and_the_responder_goes_on(
    nc, js, queue, handler, type_name
):
    async with serving(nc, queue, {queue.subject("odd"): handler}):
        with pytest.raises(jrr.RequestRejected) as caught:
            await jrr.request(nc, queue.subject("odd"), timeout=5)
        await still_answers(nc, queue)

    assert caught.value.code == 500
    assert caught.value.description == f"handler failed: TypeError: handler returned {type_name}, expected bytes or str"
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0


async def test_a_handler_raising_line_breaks_cannot_forge_headers(nc, js, queue):
    def broken(msg):
        raise ValueError("first line\r\nNats-Service-Error-Code: 200\nsecond line 🔥")

    async with serving(nc, queue, {queue.subject("broken"): broken}):
        with pytest.raises(jrr.RequestRejected) as caught:
            await jrr.request(nc, queue.subject("broken"), timeout=5)
        await still_answers(nc, queue)

    assert caught.value.code == 500, "the forged code stays inside the description"
    assert (
        caught.value.description
        == "handler failed: ValueError: first line  Nats-Service-Error-Code: 200 second line 🔥"
    )
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0


# -- payloads that are not UTF-8 ------------------------------------------------------------------

NOT_UTF8 = b"\xff\xfe"


async def test_a_bytes_handler_gets_non_utf8_bytes_exactly_and_reply_text_does_not_raise(nc, js, queue, mailboxes):
    async with serving(nc, queue, {queue.subject("echo"): lambda msg: msg.data}):
        echoed = await jrr.request(nc, queue.subject("echo"), NOT_UTF8, timeout=5)
        async with mailboxes.requester(nc, unique("eve")) as requester:
            stored = await requester.request(queue.subject("echo"), NOT_UTF8, timeout=5)

    assert echoed.data == NOT_UTF8
    assert stored.data == NOT_UTF8
    assert stored.text == "\ufffd\ufffd"
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0


async def test_a_handler_that_decodes_non_utf8_is_a_500_naming_the_decode_error(nc, js, queue):
    async with serving(nc, queue, {queue.subject("text"): lambda msg: msg.data.decode().upper()}):
        with pytest.raises(jrr.RequestRejected) as caught:
            await jrr.request(nc, queue.subject("text"), NOT_UTF8, timeout=5)
        await still_answers(nc, queue)

    assert caught.value.code == 500
    assert caught.value.description == (
        "handler failed: UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"
    )
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0


async def test_cli_request_prints_a_non_utf8_reply_without_a_traceback(nats_url, nc, queue):
    async with serving(nc, queue, {queue.subject("raw"): lambda msg: NOT_UTF8}):
        code, out, err = await run_cli("request", queue.subject("raw"), "--timeout", "10", url=nats_url)
        await still_answers(nc, queue)

    assert (code, out, err) == (0, "\ufffd\ufffd\n", "")


# -- NATS_URL -------------------------------------------------------------------------------------

BAD_URLS = [
    ("nats//nope", "is not a NATS URL"),
    ("http://127.0.0.1:4222", "is not a NATS URL"),
    ("nats://", "is not a NATS URL"),
    ("nats://127.0.0.1:notaport", "has a port that is not a number"),
    ("nats://127.0.0.1:99999", "has a port that is not a number from 0 to 65535"),
]


@pytest.mark.parametrize(("url", "says"), BAD_URLS)
async def test_connect_with_a_malformed_nats_url_says_what_is_wrong(monkeypatch, url, says):
    monkeypatch.setenv("NATS_URL", url)

    with pytest.raises(jrr.ServerUnreachable) as caught:
        async with asyncio.timeout(10):
            await jrr.connect()

    assert str(caught.value).startswith(f"NATS_URL {url!r} {says}")
    assert str(caught.value).endswith("; expected something like nats://127.0.0.1:4222")


async def test_connect_with_nats_url_at_a_closed_port_says_no_server_answered(monkeypatch):
    url = f"nats://127.0.0.1:{free_port()}"
    monkeypatch.setenv("NATS_URL", url)

    with pytest.raises(jrr.ServerUnreachable) as caught:
        async with asyncio.timeout(10):
            await jrr.connect()

    assert f"no NATS server answered at {url} (ConnectionRefusedError" in str(caught.value)


@pytest.mark.parametrize(("url", "says"), [*BAD_URLS, ("closed port", "no NATS server answered at")])
async def test_cli_with_a_bad_nats_url_exits_2_and_a_responder_elsewhere_is_undisturbed(nats_url, nc, queue, url, says):
    url = f"nats://127.0.0.1:{free_port()}" if url == "closed port" else url
    async with serving(nc, queue, {queue.subject("greet"): lambda msg: b"hello"}):
        code, out, err = await run_cli("request", queue.subject("greet"), url=url)
        good = await run_cli("request", queue.subject("greet"), "--timeout", "10", url=nats_url)

    assert (code, out) == (2, "")
    assert err.startswith("error: ")
    assert says in err
    assert "Traceback" not in err
    assert good == (0, "hello\n", "")


# -- streams that already exist, configured otherwise ---------------------------------------------


async def test_ensuring_a_live_request_stream_with_conflicting_storage_names_the_field(nc, js, queue):
    async with serving(nc, queue, {}):
        with pytest.raises(jrr.StreamConflict) as caught:
            await jrr.ensure_request_stream(js, queue.stream, [f"{queue.prefix}.*"], storage=StorageType.MEMORY)
        await still_answers(nc, queue)

    assert str(caught.value) == (
        f"stream {queue.stream!r} already exists and cannot hold requests: its storage is 'file', not 'memory'. "
        f"Delete it (await js.delete_stream({queue.stream!r})) or pass another name."
    )
    assert (await js.stream_info(queue.stream)).config.storage == StorageType.FILE, "left alone"


async def test_a_request_stream_that_denies_deletes_is_a_conflict_naming_deny_delete(js):
    # A requester deletes its request when it times out: with deny_delete, a responder would later
    # work on a request nobody waits for, and the requester would be told a responder had taken it.
    name, prefix = unique("DENY_"), unique("deny")
    await js.add_stream(
        StreamConfig(name=name, subjects=[f"{prefix}.*"], retention=RetentionPolicy.WORK_QUEUE, deny_delete=True)
    )
    try:
        with pytest.raises(jrr.StreamConflict) as caught:
            await jrr.ensure_request_stream(js, name, [f"{prefix}.*"])
    finally:
        await jrr.delete_streams(js, name)

    assert f"stream {name!r} already exists and cannot hold requests" in str(caught.value)
    assert "its deny_delete is True, not False" in str(caught.value)


# -- all of it, one after another -----------------------------------------------------------------


async def test_one_responder_survives_every_bad_input_in_a_row(nc, js, queue):
    def broken(msg):
        raise RuntimeError("oven on fire")

    handlers = {
        queue.subject("broken"): broken,
        queue.subject("none"): lambda msg: None,
        queue.subject("text"): lambda msg: msg.data.decode(),
        queue.subject("big"): lambda msg: b"z" * nc.max_payload,
    }
    outcomes = Outcomes(timeout=10)
    async with serving(nc, queue, handlers, on_handled=outcomes, name="till") as responder:
        await js.publish(queue.subject("no-reply"), b"")
        await js.publish(queue.subject("bad-reply"), b"", headers={"Nats-Reply": "replies.>"})
        for name, payload in [("broken", b""), ("none", b""), ("text", NOT_UTF8), ("big", b""), ("unknown", b"")]:
            with pytest.raises(jrr.RequestRejected):
                await jrr.request(nc, queue.subject(name), payload, timeout=5)
        await outcomes.wait_for(lambda h: h.subject == queue.subject("bad-reply"))
        await outcomes.wait_for(lambda h: h.subject == queue.subject("no-reply"))
        await still_answers(nc, queue)
        assert responder.running

    table = sorted((h.subject.rsplit(".", 1)[1], h.outcome, h.detail.split(":")[0]) for h in outcomes.records)
    assert table == [
        ("bad-reply", "terminated", "Nats-Reply 'replies.>' is not a valid subject"),
        ("big", "rejected", "500 handler failed"),
        ("broken", "rejected", "500 handler failed"),
        ("no-reply", "terminated", "no Nats-Reply header"),
        ("none", "rejected", "500 handler failed"),
        ("ok", "replied", ""),
        ("text", "rejected", "500 handler failed"),
        ("unknown", "rejected", "404 no handler for subject '" + queue.subject("unknown") + "'"),
    ]
    assert await jrr.wait_for_messages(js, queue.stream, 0) == 0
