"""Wiretap, SequenceDiagram and stream_table, against the real server."""

from __future__ import annotations

import asyncio
import uuid
import warnings

import nats.errors
import pytest

import js_request_reply as jrr
from js_request_reply import display
from js_request_reply.display import TappedMessage, classify, drawable, replica_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
R, N, S = "Requester", "NATS", "Responder"


def names() -> tuple[str, str]:
    """A stream name and subject prefix no other test uses."""
    uid = uuid.uuid4().hex[:8]
    return f"DISP{uid.upper()}", f"disp{uid}"


def arrows(tap: jrr.Wiretap) -> list[tuple[str, str, str]]:
    return [(a.sender, a.receiver, a.label) for a in tap.events()]


async def test_a_reply_and_a_rejection_are_drawn_as_they_happened(nc, js):
    stream, prefix = names()
    await jrr.ensure_request_stream(js, name=stream, subjects=[f"{prefix}.*"])
    try:
        async with jrr.Wiretap() as tap:
            responder = await jrr.Responder(nc, {f"{prefix}.sandwich": lambda msg: "🥪"}, stream=stream).start()
            await jrr.request(nc, f"{prefix}.sandwich", "one please")
            with pytest.raises(jrr.RequestRejected):
                await jrr.request(nc, f"{prefix}.pizza", "one please")
            await responder.stop()
            await tap.stop(nc)
    finally:
        await js.delete_stream(stream)

    no_handler = f"404 no handler for subject '{prefix}.pizza'"
    assert arrows(tap) == [
        (R, stream, f"publish {prefix}.sandwich"),
        (stream, R, "PubAck #1"),
        (stream, S, f"deliver {prefix}.sandwich"),
        (S, R, "reply 🥪"),
        (S, stream, "ack"),
        (R, stream, f"publish {prefix}.pizza"),
        (stream, R, "PubAck #2"),
        (stream, S, f"deliver {prefix}.pizza"),
        (S, R, f"error {no_handler}"),
        (S, stream, f"term: {no_handler}"),
    ]
    table = tap.table()
    assert list(table.columns) == ["step", "from", "to", "message"]
    assert table["step"].tolist() == list(range(1, 11))
    assert table["message"][3] == "reply 🥪"
    diagram = tap.diagram(title="A reply and a rejection")
    assert repr(diagram) == f"SequenceDiagram(10 steps: Requester, {stream}, Responder)"
    assert diagram.png().startswith(PNG_SIGNATURE)


async def test_a_timed_out_request_is_drawn_with_its_delete_and_a_resend_as_a_duplicate_left_alone(nc, js):
    stream, prefix = names()
    await jrr.ensure_request_stream(js, name=stream, subjects=[f"{prefix}.*"])
    try:
        async with jrr.Wiretap() as tap:
            for _ in range(2):  # the same msg_id twice: the server remembers it, though the request is deleted
                with pytest.raises(jrr.RequestTimeout):
                    await jrr.request(nc, f"{prefix}.bagel", msg_id="order-1", timeout=0.2)
            await tap.stop(nc)
    finally:
        await js.delete_stream(stream)

    assert arrows(tap) == [
        (R, stream, f"publish {prefix}.bagel"),
        (stream, R, "PubAck #1"),
        (R, stream, "delete #1"),
        (R, stream, f"publish {prefix}.bagel"),
        (stream, R, "PubAck (duplicate)"),  # the copy it duplicates may be another's: no delete
    ]


async def test_copies_of_a_request_nobody_answered_are_drawn_once_before_the_copy_that_is_stored(nc, js):
    # What a requester in a cluster does while its stream elects a leader: publish the same request
    # again, same reply subject and Nats-Msg-Id, until a stream stores it. Here no stream captures
    # the subject at first, and the tap, being a subscriber, keeps the server from answering 503.
    stream, prefix = names()
    inbox = nc.new_inbox()
    copy = {"Nats-Reply": f"{inbox}.reply", "Nats-Msg-Id": "order-7"}
    sub = await nc.subscribe(inbox)
    try:
        async with jrr.Wiretap() as tap:
            for _ in range(3):
                await nc.publish(f"{prefix}.bagel", b"", reply=inbox, headers=copy)
            await jrr.ensure_request_stream(js, name=stream, subjects=[f"{prefix}.*"])
            await nc.publish(f"{prefix}.bagel", b"", reply=inbox, headers=copy)
            pub_ack = await sub.next_msg(timeout=5)
            await tap.stop(nc)
    finally:
        await sub.unsubscribe()
        await jrr.delete_streams(js, stream)

    assert b'"seq":1' in pub_ack.data
    assert arrows(tap) == [
        (R, N, f"publish {prefix}.bagel: no answer, sent again"),
        (R, stream, f"publish {prefix}.bagel"),
        (stream, R, "PubAck #1"),
    ]
    assert repr(tap.diagram()) == f"SequenceDiagram(3 steps: Requester, NATS, {stream})"


async def test_a_mailbox_reply_is_stored_then_collected(nc, js):
    stream, prefix = names()
    replies, reply_prefix = f"R{stream}", f"r{prefix}"
    await jrr.ensure_request_stream(js, name=stream, subjects=[f"{prefix}.*"])
    await jrr.ensure_reply_stream(js, name=replies, subjects=[f"{reply_prefix}.>"])
    handled = asyncio.Event()
    responder = jrr.Responder(
        nc, {f"{prefix}.bagel": lambda msg: "🥯"}, stream=stream, on_handled=lambda _: handled.set()
    )
    requester = jrr.Requester(nc, mailbox="alice", reply_stream=replies, reply_prefix=reply_prefix)
    try:
        async with jrr.Wiretap(connections=[nc]) as tap:
            await responder.start()
            await requester.send(f"{prefix}.bagel")
            async with asyncio.timeout(5):
                await handled.wait()
            [reply] = await requester.collect()
            await responder.stop()
    finally:
        await requester.close()
        await responder.stop()
        await jrr.delete_streams(js, stream, replies)

    assert reply.text == "🥯"
    assert arrows(tap) == [
        (R, stream, f"publish {prefix}.bagel"),
        (stream, R, "PubAck #1"),
        (stream, S, f"deliver {prefix}.bagel"),
        (S, replies, "store reply 🥯"),
        (replies, S, "PubAck #1"),
        (S, stream, "ack"),
        (replies, R, "deliver reply"),
        (R, replies, "ack"),
    ]
    assert tap.diagram().participants == [R, stream, S, replies]


async def test_the_ledger_table_shows_what_a_mailbox_sent_and_what_it_handed_over(nc, js):
    stream, prefix = names()
    replies, reply_prefix = f"R{stream}", f"r{prefix}"
    await jrr.ensure_request_stream(js, name=stream, subjects=[f"{prefix}.*"])
    await jrr.ensure_reply_stream(js, name=replies, subjects=[f"{reply_prefix}.>"])
    alice = jrr.Requester(nc, mailbox="alice", reply_stream=replies, reply_prefix=reply_prefix)
    bob = jrr.Requester(nc, mailbox="bob", reply_stream=replies, reply_prefix=reply_prefix)
    try:
        assert display.HIDDEN == "…"
        assert (await display.ledger_table(js, replies)).empty
        first = await alice.send(f"{prefix}.bagel")
        second = await bob.send(f"{prefix}.flatbread", ttl=30)
        sent = await display.ledger_table(js, replies)
        async with jrr.Responder(nc, {f"{prefix}.bagel": lambda msg: "🥯"}, stream=stream):
            await jrr.wait_for_messages(js, replies, 1)
        [reply] = await alice.collect()
        collected = await display.ledger_table(js, replies, mailbox="alice")
    finally:
        for requester in (alice, bob):
            await requester.close()
        await jrr.delete_streams(js, stream, replies)

    assert list(sent.columns) == ["key", "value"]
    assert sent["key"].tolist() == [f"alice.{first}", f"bob.{second}"]
    assert sent["value"][0] == f'{{"subject": "{prefix}.bagel", "ttl": null, "expires": null, "token": "…"}}'
    assert f'"subject": "{prefix}.flatbread", "ttl": 30, "expires": ' in sent["value"][1]
    assert reply.text == "🥯"
    assert collected.to_dict("list") == {"key": [f"alice.done.{first}"], "value": ['{"seq": 1}']}
    with pytest.raises(jrr.NoReplyStream, match=f"the mailbox ledger '{replies}-ledger' does not exist"):
        await display.ledger_table(js, replies)


async def test_a_core_request_to_a_stream_gets_a_pub_ack_not_a_reply(nc, js):
    stream, prefix = names()
    await jrr.ensure_request_stream(js, name=stream, subjects=[f"{prefix}.*"])
    try:
        async with jrr.Wiretap() as tap:
            answer = await nc.request(f"{prefix}.flatbread", b"one please", timeout=2)
            await tap.stop(nc)
    finally:
        await js.delete_stream(stream)

    assert b'"seq":1' in answer.data
    assert arrows(tap) == [(R, stream, f"request {prefix}.flatbread"), (stream, R, "PubAck #1 (not a reply!)")]


async def test_the_server_s_no_responders_status_is_drawn_as_503(nc):
    # A tap is a subscriber too, so with one listening the server sends no 503: the status is
    # captured here on the requester's own inbox instead, and the real messages are classified.
    _, prefix = names()
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(f"{prefix}.nobody", b"anyone?", reply=inbox)
    status = await sub.next_msg(timeout=5)
    await sub.unsubscribe()

    recorded = [
        TappedMessage(f"{prefix}.nobody", inbox, {}, b"anyone?"),
        TappedMessage(status.subject, status.reply, dict(status.headers or {}), status.data),
    ]
    assert [(a.sender, a.receiver, a.label) for a in classify(recorded)] == [
        (R, N, f"request {prefix}.nobody"),
        (N, R, "503 no responders"),
    ]


async def test_a_tap_is_a_subscriber_so_it_hides_no_responders(nc):
    _, prefix = names()
    async with jrr.Wiretap() as tap:
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request(f"{prefix}.nobody", b"anyone?", timeout=0.3)
        await tap.stop(nc)

    assert arrows(tap) == [(R, N, f"request {prefix}.nobody")]


def test_a_diagram_with_emoji_renders_a_png_without_font_warnings(capfd):
    diagram = jrr.SequenceDiagram(
        [
            jrr.Arrow(R, "REQUESTS", "publish requests.order-sandwich"),
            jrr.Arrow("REQUESTS", R, "PubAck #1"),
            jrr.Arrow("REQUESTS", S, "deliver requests.order-sandwich"),
            jrr.Arrow(S, R, "reply 🥪 🥯 🥙 ❤️"),
        ],
        title="Order a 🥪",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        png = diagram._repr_png_()
    assert caught == []
    assert capfd.readouterr().err == ""
    assert png.startswith(PNG_SIGNATURE)
    assert png == jrr.SequenceDiagram(diagram.arrows, title="Order a 🥪").png()  # deterministic
    assert repr(diagram) == "SequenceDiagram(4 steps: Requester, REQUESTS, Responder)"
    for emoji, name in (("🥪", "sandwich"), ("🥯", "bagel"), ("🥙", "stuffed flatbread")):
        assert drawable(f"reply {emoji}") in (f"reply {emoji}", f"reply {name}")  # as this machine's fonts allow

    mermaid = diagram.mermaid()
    assert "sequenceDiagram" in mermaid
    assert "    Responder-->>Requester: reply 🥪 🥯 🥙 ❤️" in mermaid
    assert "    Requester->>REQUESTS: publish requests.order-sandwich" in mermaid


@pytest.fixture
def fallback_fonts(monkeypatch):
    """Choose the fonts that drawable() may use besides the diagram font, whatever this machine has installed."""

    def use(fonts):
        display._font_for.cache_clear()
        monkeypatch.setattr(display, "_fallback_fonts", lambda: tuple(fonts))

    yield use
    display._font_for.cache_clear()


def matplotlib_fonts():
    """The fallback fonts that ship with matplotlib, so are on every machine that draws a diagram."""
    return [(family, path) for family, path in display._fallback_fonts() if "mpl-data" in path]


def test_an_emoji_no_font_has_is_spelled_as_a_word(fallback_fonts):
    fallback_fonts([])

    assert drawable("reply 🥪 ❤️") == "reply sandwich ❤"  # the diagram font has a heart, and no sandwich
    assert drawable("🥪🥯") == "sandwich bagel"
    assert drawable("x🥯y (🥙)") == "x bagel y (stuffed flatbread)"
    assert drawable("👍🏽 ok") == "thumbs up sign ok"  # the skin tone is part of the emoji
    assert drawable("👩‍🍳") == "woman cooking"
    assert drawable("⌚") == "watch"
    assert ":" not in drawable("🥪 🥯 🥙 ⌚")


def test_an_emoji_another_font_has_is_drawn_with_that_font(fallback_fonts, capfd):
    fallback_fonts(matplotlib_fonts())  # STIXGeneral has a watch; none of them has a bagel

    assert drawable("reply ⌚ 🥯") == "reply ⌚ bagel"
    assert display._fonts_for(["reply ⌚ bagel"]).get_family() == [display.FONT_FAMILY, "STIXGeneral"]
    assert display._fonts_for(["reply bagel"]).get_family() == [display.FONT_FAMILY]
    diagram = jrr.SequenceDiagram([jrr.Arrow(R, S, "reply ⌚ 🥯")], title="Order a ⌚")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        png = diagram.png()
    assert caught == []
    assert capfd.readouterr().err == ""
    assert png.startswith(PNG_SIGNATURE)
    assert "reply ⌚ 🥯" in diagram.mermaid()


def test_a_font_that_only_marks_missing_characters_is_never_used():
    families = [family for family, _ in display._fallback_fonts()]
    assert families, "matplotlib ships fonts of its own, so there is always a fallback"
    assert not [family for family in families if family.startswith("Last Resort")]
    assert display.FONT_FAMILY not in families


def test_a_diagram_names_participants_it_does_not_know():
    with pytest.raises(ValueError, match="'Bob', which is not among the participants"):
        jrr.SequenceDiagram([jrr.Arrow(R, "Bob", "hello")], participants=[R, S])


def test_a_diagram_can_be_saved(tmp_path):
    diagram = jrr.SequenceDiagram(
        [jrr.Arrow(R, N, "request requests.order-pizza"), jrr.Arrow(N, R, "503 no responders")]
    )
    assert diagram.participants == [R, N]
    assert diagram.save(tmp_path / "d.png").read_bytes() == diagram.png()
    assert diagram.save(tmp_path / "d.svg").read_text().lstrip().startswith("<?xml")


async def test_stream_table_lists_stored_requests_with_their_reply_subject(js):
    stream, prefix = names()
    await jrr.ensure_request_stream(js, name=stream, subjects=[f"{prefix}.*"])
    try:
        empty = await jrr.stream_table(js, stream)
        for item, reply in (("sandwich", "_INBOX.a.1"), ("bagel", "_INBOX.a.2"), ("flatbread", "_INBOX.a.3")):
            await js.publish(f"{prefix}.{item}", item.encode(), headers={"Nats-Reply": reply})
        await js.delete_msg(stream, 2)
        table = await jrr.stream_table(js, stream)
        first = await jrr.stream_table(js, stream, limit=1)
    finally:
        await js.delete_stream(stream)

    assert list(empty.columns) == ["seq", "subject", "Nats-Reply", "data"] and empty.empty
    assert table.to_dict("records") == [
        {"seq": 1, "subject": f"{prefix}.sandwich", "Nats-Reply": "_INBOX.a.1", "data": "sandwich"},
        {"seq": 3, "subject": f"{prefix}.flatbread", "Nats-Reply": "_INBOX.a.3", "data": "flatbread"},
    ]
    assert first["seq"].tolist() == [1]
    with pytest.raises(jrr.StreamNotFound, match=f"stream '{stream}' does not exist"):
        await jrr.stream_table(js, stream)


async def test_replica_table_shows_each_copy_and_where_it_is():
    with jrr.EmbeddedCluster() as cluster:
        nc = await jrr.connect(cluster.urls)
        try:
            js = nc.jetstream()
            stream, prefix = names()
            await jrr.ensure_request_stream(js, name=stream, subjects=[f"{prefix}.*"], replicas=3)
            await js.publish(f"{prefix}.one", b"kept")
            settled = await replica_table(js, stream, cluster=cluster)
            with pytest.raises(jrr.StreamNotFound, match="stream 'NONE' does not exist; create it first"):
                await replica_table(js, "NONE", cluster=cluster)
            leader = settled.loc[settled["leader"], "node"].item()
            meta_leader = cluster.meta_leader()
            follower = next(name for name in cluster.names if name not in (leader, meta_leader))
            cluster.kill(follower)  # the stream and the cluster keep their leaders, so stream info answers at once
            after_kill = await replica_table(js, stream, cluster=cluster)
        finally:
            await nc.close()

    assert list(settled.columns) == ["stream", "node", "running", "leader", "current", "lag"]
    assert settled.to_dict("records") == [
        {"stream": stream, "node": name, "running": True, "leader": name == leader, "current": True, "lag": 0}
        for name in ["n1", "n2", "n3"]
    ]
    assert after_kill.set_index("node")["running"].to_dict() == {name: name != follower for name in cluster.names}
    assert after_kill.set_index("node")["current"].to_dict() == {name: name != follower for name in cluster.names}
    assert after_kill.loc[after_kill["leader"], "node"].item() == leader


async def test_replica_table_of_a_stream_on_one_server_shows_its_one_copy(js):
    stream, prefix = names()
    await jrr.ensure_request_stream(js, name=stream, subjects=[f"{prefix}.*"])
    try:
        table = await replica_table(js, stream)
    finally:
        await js.delete_stream(stream)

    assert list(table.columns) == ["stream", "node", "leader", "current", "lag"]
    assert len(table) == 1
    assert table.loc[0, ["stream", "leader", "current", "lag"]].tolist() == [stream, True, True, 0]
