"""Notebook display: record what a scenario really exchanged, and draw it as a sequence diagram.

`Wiretap` listens to every subject on its own connection, `SequenceDiagram` draws the arrows as a
PNG that renders on GitHub and nbviewer too, `stream_table` lists what a stream holds,
`ledger_table` what the mailbox ledger notes, and `replica_table` shows where a cluster keeps each
stream's copies.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import io
import json
import logging
import unicodedata
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
import pandas as pd
from matplotlib import font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.ft2font import FT2Font, LoadFlags
from matplotlib.patches import Circle, FancyBboxPatch
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import NoKeysError, NotFoundError
from nats.nuid import NUID

from . import protocol as p
from .access import all_permissions
from .connection import connect
from .errors import NoLeader, NoReplyStream, StreamNotFound
from .failover import UNAVAILABLE
from .requester import Reply
from .streams import jetstream

REQUESTER = "Requester"
RESPONDER = "Responder"
SERVER = "NATS"
MARKER_PREFIX = "_WIRETAP."
PLUMBING = ("$JS.EVENT.", "$KV.", "$O.", MARKER_PREFIX)  # subjects never drawn
STORE_STREAMS = ("KV_", "OBJ_")  # streams behind key-value buckets and object stores
PAYLOAD_CHARS = 24
NO_ANSWER = "no answer, sent again"  # the label of copies of a request that nobody answered
ASK_TIMEOUT = 1.0  # seconds replica_table waits for one answer to a stream info request

__all__ = [
    "Arrow",
    "SequenceDiagram",
    "TappedMessage",
    "Wiretap",
    "classify",
    "drawable",
    "ledger_table",
    "permissions_table",
    "replica_table",
    "replies_table",
    "stream_state",
    "stream_table",
]


@dataclass(frozen=True)
class Arrow:
    """One step of a sequence diagram: `sender` sends `label` to `receiver`."""

    sender: str
    receiver: str
    label: str


@dataclass(frozen=True)
class TappedMessage:
    """A message as the wiretap received it, in arrival order."""

    subject: str
    reply: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    data: bytes = b""

    @property
    def text(self) -> str:
        """The payload decoded as UTF-8 (undecodable bytes shown as U+FFFD)."""
        return self.data.decode("utf-8", errors="replace")


# -- recording ---------------------------------------------------------------------------------------


class Wiretap:
    """Records every message the server routes while a scenario runs, on a connection of its own.

    Use it as `async with Wiretap(connections=[nc]) as tap:` around the scenario, or call
    `start()` and `stop(nc)`. Stopping makes sure everything the scenario's connections published
    has reached the tap before it hangs up, so the recording is complete. Then `events()`,
    `table()` and `diagram()` show what happened.

    The tap is itself a subscriber to every subject, so while it listens a core request, or a
    request to a subject no stream captures, is delivered to the tap and the server sends no
    `503` no-responders status: the requester times out instead. Draw that scenario by hand with
    `SequenceDiagram`.
    """

    def __init__(self, url: str | None = None, *, connections: Iterable[Client] = ()) -> None:
        self.url = url
        self.connections = list(connections)
        self.messages: list[TappedMessage] = []
        self._nc: Client | None = None
        self._sub: Subscription | None = None
        self._prefix = MARKER_PREFIX + NUID().next().decode() + "."
        self._markers: dict[str, asyncio.Event] = {}
        self._count = 0

    @property
    def listening(self) -> bool:
        """True between start() and stop()."""
        return self._sub is not None

    async def start(self, timeout: float = 5.0) -> Wiretap:
        """Connect and subscribe to every subject; returns once the subscription is seen to work.

        Raises TimeoutError when the tap's own marker does not come back within `timeout` seconds.
        """
        if self._nc is not None:
            return self
        self._nc = await connect(self.url)
        self._sub = await self._nc.subscribe(">", cb=self._record)
        # nats-py's flush() can send its PING ahead of the SUB still waiting in its buffer, so a
        # message sent after the SUB, on the same path, is what proves the server has it.
        if not await self._wait_for_markers([self._nc], timeout):
            await self.stop(timeout=1)
            raise TimeoutError(f"the wiretap's subscription was not confirmed by the server within {timeout:g}s")
        return self

    async def stop(self, *connections: Client, timeout: float = 5.0) -> None:
        """Wait (at most `timeout` s) until the tap has what `connections` sent, then hang up.

        `connections` defaults to those given to the constructor. The tap and each connection send
        the tap a marker, and it waits for them all: the server keeps each connection's messages in
        order, so once a connection's marker is back, everything it published before is recorded.
        (A marker, not `flush()`: nats-py's flush can overtake what is still in its buffer.)
        """
        if self._nc is None:
            return
        nc, sub = self._nc, self._sub
        try:
            if sub is not None:
                await self._wait_for_markers([nc, *(connections or self.connections)], timeout)
        finally:
            self._nc = self._sub = None
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                async with asyncio.timeout(timeout):
                    if sub is not None:
                        await sub.unsubscribe()
                    await nc.close()

    async def _wait_for_markers(self, connections: Iterable[Client], timeout: float) -> bool:
        """Send a marker through each open connection; True once the tap has received them all in time."""
        waiting = []
        try:
            async with asyncio.timeout(timeout):
                for nc in connections:
                    if nc.is_closed:
                        continue
                    self._count += 1
                    marker = f"{self._prefix}{self._count}"
                    waiting.append(self._markers.setdefault(marker, asyncio.Event()))
                    await nc.publish(marker)
                for event in waiting:
                    await event.wait()
        except (TimeoutError, nats.errors.Error):
            return False
        return True

    async def __aenter__(self) -> Wiretap:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def __repr__(self) -> str:
        state = "listening" if self.listening else "stopped"
        return f"<Wiretap {state}, {len(self.messages)} messages>"

    async def _record(self, msg: Any) -> None:
        if msg.subject.startswith(MARKER_PREFIX):
            if msg.subject in self._markers:
                self._markers[msg.subject].set()
            return  # a marker, this tap's or another's
        self.messages.append(TappedMessage(msg.subject, msg.reply or "", dict(msg.headers or {}), bytes(msg.data)))

    # -- showing ------------------------------------------------------------------------------------

    def events(self) -> list[Arrow]:
        """The recorded messages as diagram arrows, with JetStream plumbing (pulls, API calls) left out."""
        return classify(self.messages)

    def table(self) -> pd.DataFrame:
        """The arrows as a table: step, from, to, message."""
        rows = [(step, a.sender, a.receiver, a.label) for step, a in enumerate(self.events(), 1)]
        return pd.DataFrame(rows, columns=["step", "from", "to", "message"])

    def diagram(self, title: str | None = None) -> SequenceDiagram:
        """A sequence diagram of what was recorded."""
        arrows = self.events()
        return SequenceDiagram(arrows, participants=_participants(arrows, _reply_streams(self.messages)), title=title)


# -- classifying -------------------------------------------------------------------------------------


def classify(messages: Sequence[TappedMessage]) -> list[Arrow]:
    """Turn recorded messages into arrows between Requester, NATS, the streams and Responder.

    Pull requests, JetStream API calls and their answers, advisories and pull status messages are
    left out. Each PubAck is placed right after the publish it answers: the server sends it and the
    delivery to a responder at about the same time, so their order on the wire varies.

    A request published again with the same reply subject and `Nats-Msg-Id` (in a cluster, a copy
    that got no answer is sent again) is drawn as one red arrow for the copies nobody answered,
    however many there were, then the copy that was answered.
    """
    return _Classifier(messages).arrows()


def _reply_streams(messages: Sequence[TappedMessage]) -> set[str]:
    return _Classifier(messages).reply_streams


class _Classifier:
    def __init__(self, messages: Sequence[TappedMessage]):
        self.messages = list(messages)
        self.answer: dict[int, int] = {}  # index of a question -> index of its answer
        self.question: dict[int, int] = {}  # index of an answer -> index of its question
        self.inboxes: set[str] = set()  # every reply subject asked with
        self.nats_replies: set[str] = set()
        self.reply_streams: set[str] = {p.DEFAULT_REPLY_STREAM}
        self.unanswered_copies: dict[int, int] = {}  # a copy nobody answered -> the first of its run
        waiting: dict[str, collections.deque[int]] = {}  # reply subject -> questions not yet answered
        runs: dict[str, int] = {}  # reply subject -> the first of the copies nobody answered, since the last answer
        for i, msg in enumerate(self.messages):
            if waiting.get(msg.subject):
                question = waiting[msg.subject].popleft()  # answers come in the order asked
                self.answer[question], self.question[i] = i, question
                runs.pop(msg.subject, None)
            if msg.reply and not msg.reply.startswith("$JS.ACK."):
                queue = waiting.setdefault(msg.reply, collections.deque())
                if queue and _same_request(self.messages[queue[-1]], msg):
                    # Sent again because nothing answered: the copies still waiting will get no answer.
                    first = runs.setdefault(msg.reply, queue[0])
                    self.unanswered_copies.update((copy, first) for copy in queue)
                    queue.clear()
                queue.append(i)
                self.inboxes.add(msg.reply)
            if p.REPLY_HEADER in msg.headers:
                self.nats_replies.add(msg.headers[p.REPLY_HEADER])
            if p.REPLY_STREAM_HEADER in msg.headers:
                self.reply_streams.add(msg.headers[p.REPLY_STREAM_HEADER])
        for i, msg in enumerate(self.messages):
            if msg.subject in self.nats_replies and not msg.reply.startswith("$JS.ACK."):
                stored = _pub_ack(self._answer_of(i))
                if stored and stored.get("stream"):
                    self.reply_streams.add(stored["stream"])

    def _answer_of(self, i: int) -> TappedMessage | None:
        j = self.answer.get(i)
        return None if j is None else self.messages[j]

    def arrows(self) -> list[Arrow]:
        keyed: list[tuple[int, int, Arrow]] = []
        for i, msg in enumerate(self.messages):
            for sub, (arrow, anchor) in enumerate(self._arrows_for(i, msg)):
                keyed.append((i if anchor is None else anchor, sub, arrow))
        keyed.sort(key=lambda item: (item[0], item[1]))
        return [arrow for _, _, arrow in keyed]

    def _arrows_for(self, i: int, msg: TappedMessage) -> list[tuple[Arrow, int | None]]:
        """The arrows message `i` stands for, each with the index it is ordered by (None: its own)."""
        subject, headers = msg.subject, msg.headers
        if subject.startswith(PLUMBING) or _ack_stream(msg.reply).startswith(STORE_STREAMS):
            return []  # advisories, key-value and object-store traffic (the mailbox ledger)
        if subject.startswith("$JS.API.STREAM.MSG.DELETE."):
            stream = subject.rsplit(".", 1)[-1]
            return [(Arrow(REQUESTER, stream, f"delete #{_json(msg.data).get('seq', '?')}"), None)]
        if subject.startswith("$JS.API."):
            return []
        if i in self.question:
            return []  # drawn with its question, or the answer to plumbing (an API call)
        if headers.get(p.STATUS_HEADER) and not msg.data:
            return []  # a pull status (100, 404, 408, 409)
        if subject.startswith("$JS.ACK."):
            stream = _ack_stream(subject)
            if stream.startswith(STORE_STREAMS):
                return []
            sender = REQUESTER if stream in self.reply_streams else RESPONDER
            return [(Arrow(sender, stream, _ack_label(msg.text)), None)]
        if msg.reply.startswith("$JS.ACK."):
            stream = _ack_stream(msg.reply)
            delivered = _ack_delivered(msg.reply)
            again = f" (delivery {delivered})" if delivered > 1 else ""
            if stream in self.reply_streams or subject.startswith(p.DEFAULT_REPLY_PREFIX + "."):
                return [(Arrow(stream, REQUESTER, f"deliver reply{again}"), None)]
            return [(Arrow(stream, RESPONDER, f"deliver {subject}{again}"), None)]
        if subject in self.nats_replies:
            return self._reply(i, msg)
        if subject in self.inboxes:
            return []  # more answers to one inbox than questions: plumbing
        if p.REPLY_HEADER in headers:
            return self._stored_request(i, msg)
        if msg.reply and not subject.startswith(("$JS.", "_INBOX.")):
            return self._core_request(i, msg)
        if subject.startswith(("$JS.", "_INBOX.", "$SYS.")):
            return []
        return [(Arrow(REQUESTER, SERVER, f"publish {subject}"), None)]

    def _reply(self, i: int, msg: TappedMessage) -> list[tuple[Arrow, int | None]]:
        """A responder answering a request's Nats-Reply subject: straight back, or stored in a mailbox."""
        what = _reply_label(msg)
        ack = self._answer_of(i) if msg.reply else None
        stored = _pub_ack(ack)
        if stored is None and not msg.subject.startswith(p.DEFAULT_REPLY_PREFIX + "."):
            return [(Arrow(RESPONDER, REQUESTER, what), None)]
        stream = (stored or {}).get("stream") or p.DEFAULT_REPLY_STREAM
        arrows: list[tuple[Arrow, int | None]] = [(Arrow(RESPONDER, stream, f"store {what}"), None)]
        if stored is not None:
            arrows.append((Arrow(stream, RESPONDER, _pub_ack_label(stored)), i))
        return arrows

    def _stored_request(self, i: int, msg: TappedMessage) -> list[tuple[Arrow, int | None]]:
        """A publish with Nats-Reply: a request stored in the stream that answers with a PubAck."""
        if i in self.unanswered_copies:
            if self.unanswered_copies[i] != i:
                return []  # drawn once, with the first copy nobody answered
            return [(Arrow(REQUESTER, SERVER, f"publish {msg.subject}: {NO_ANSWER}"), None)]
        answer = self._answer_of(i)
        stored = _pub_ack(answer)
        if stored is not None and stored.get("stream"):
            stream = stored["stream"]
            return [
                (Arrow(REQUESTER, stream, f"publish {msg.subject}"), None),
                (Arrow(stream, REQUESTER, _pub_ack_label(stored)), i),
            ]
        arrows: list[tuple[Arrow, int | None]] = [(Arrow(REQUESTER, SERVER, f"publish {msg.subject}"), None)]
        if stored is not None:
            arrows.append((Arrow(SERVER, REQUESTER, _pub_ack_label(stored)), i))
        elif answer is not None and _is_no_responders(answer):
            arrows.append((Arrow(SERVER, REQUESTER, "503 no responders"), i))
        return arrows

    def _core_request(self, i: int, msg: TappedMessage) -> list[tuple[Arrow, int | None]]:
        """A core request: who answered decides where the arrow goes."""
        j = self.answer.get(i)
        answer = None if j is None else self.messages[j]
        asked = f"request {msg.subject}"
        if answer is None:
            return [(Arrow(REQUESTER, SERVER, asked), None)]
        if _is_no_responders(answer):
            return [(Arrow(REQUESTER, SERVER, asked), None), (Arrow(SERVER, REQUESTER, "503 no responders"), i)]
        stored = _pub_ack(answer)
        if stored is not None:
            stream = stored.get("stream") or SERVER
            label = f"{_pub_ack_label(stored)} (not a reply!)"
            return [(Arrow(REQUESTER, stream, asked), None), (Arrow(stream, REQUESTER, label), i)]
        return [(Arrow(REQUESTER, RESPONDER, asked), None), (Arrow(RESPONDER, REQUESTER, _reply_label(answer)), j)]


def _same_request(earlier: TappedMessage, later: TappedMessage) -> bool:
    """True when `later` is `earlier` published again: same subject, reply subject and Nats-Msg-Id."""
    msg_id = earlier.headers.get(p.MSG_ID_HEADER)
    return (
        msg_id is not None
        and later.headers.get(p.MSG_ID_HEADER) == msg_id
        and (later.subject, later.reply) == (earlier.subject, earlier.reply)
    )


def _json(data: bytes) -> dict[str, Any]:
    if not data.startswith(b"{"):
        return {}
    try:
        body = json.loads(data)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _pub_ack(msg: TappedMessage | None) -> dict[str, Any] | None:
    """The PubAck JSON in `msg`, or None when `msg` is not a PubAck."""
    if msg is None:
        return None
    body = _json(msg.data)
    if "type" in body:
        return None  # a JetStream API response
    refused = isinstance(body.get("error"), dict) and "code" in body["error"]
    return body if refused or ("stream" in body and "seq" in body) else None


def _pub_ack_label(body: dict[str, Any]) -> str:
    if "error" in body:
        return f"not stored: {body['error'].get('description', 'error')}"
    if body.get("duplicate"):
        return "PubAck (duplicate)"
    return f"PubAck #{body['seq']}"


def _is_no_responders(msg: TappedMessage) -> bool:
    return msg.headers.get(p.STATUS_HEADER) == p.NO_RESPONDERS_STATUS and not msg.data


def _payload(msg: TappedMessage) -> str:
    text = msg.text
    if not text:
        return '""'
    return text if len(text) <= PAYLOAD_CHARS else text[: PAYLOAD_CHARS - 1] + "…"


def _reply_label(msg: TappedMessage) -> str:
    headers = msg.headers
    if p.SERVICE_ERROR_CODE_HEADER in headers or p.SERVICE_ERROR_HEADER in headers:
        code = headers.get(p.SERVICE_ERROR_CODE_HEADER, "")
        return " ".join(part for part in ("error", code, headers.get(p.SERVICE_ERROR_HEADER, "")) if part)
    return f"reply {_payload(msg)}"


def _ack_tokens(subject: str) -> list[str]:
    tokens = subject.split(".")
    # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>, or the newer form with
    # <domain>.<account hash> after ACK and a random token at the end.
    return tokens[2:] if len(tokens) < 12 else tokens[4:]


def _ack_stream(subject: str) -> str:
    """The stream named in a `$JS.ACK.` subject ("" for any other subject)."""
    return _ack_tokens(subject)[0] if subject.startswith("$JS.ACK.") else ""


def _ack_delivered(subject: str) -> int:
    tokens = _ack_tokens(subject)
    return int(tokens[2]) if len(tokens) > 2 and tokens[2].isdigit() else 1


def _ack_label(data: str) -> str:
    if not data or data.startswith("+ACK"):
        return "ack"
    if data.startswith("+TERM"):
        reason = data[len("+TERM") :].strip()
        return f"term: {reason}" if reason else "term"
    if data.startswith("-NAK"):
        return "nak"
    if data.startswith("+WPI"):
        return "in progress"
    if data.startswith("+NXT"):
        return "ack, next"
    return data


def _participants(arrows: Iterable[Arrow], reply_streams: Iterable[str] = (p.DEFAULT_REPLY_STREAM,)) -> list[str]:
    """The canonical order: Requester, NATS, request streams, Responder, reply streams; only those used."""
    used: list[str] = []
    for arrow in arrows:
        for name in (arrow.sender, arrow.receiver):
            if name not in used:
                used.append(name)
    replies = set(reply_streams)
    fixed = {REQUESTER, SERVER, RESPONDER}
    order = [REQUESTER, SERVER]
    order += [name for name in used if name not in fixed and name not in replies]
    order += [RESPONDER]
    order += [name for name in used if name not in fixed and name in replies]
    return [name for name in order if name in used]


# -- drawing -----------------------------------------------------------------------------------------

FONT_FAMILY = "DejaVu Sans"  # ships with matplotlib; only characters it lacks depend on the fonts installed
WIDTH = 9.0  # inches, the width of a notebook cell
DPI = 100
ROW = 0.5  # inches per step
BOX_H = 0.55
LABEL_CHARS = 60
MAX_STEPS = 80  # a longer diagram is too tall to read; the rest is counted, not drawn
INK = "#222222"
QUIET = "#777777"
ALARM = "#b03a2e"
BOX_COLORS = {  # kind: (fill, edge)
    "app": ("#dce9f5", "#2c5d8a"),
    "server": ("#ececec", "#666666"),
    "stream": ("#fbeccb", "#a86b12"),
}


# Fonts that are never used to draw a character: their glyphs only say that one is missing.
PLACEHOLDER_FONTS = ("Last Resort",)
# Outline emoji fonts, tried before any other font for a character the diagram font lacks. Colour
# emoji fonts made of bitmaps (Noto Color Emoji, Apple Color Emoji) cannot be drawn by matplotlib.
EMOJI_FAMILIES = ("Noto Emoji", "Symbola", "Segoe UI Emoji", "Segoe UI Symbol", "Twemoji Mozilla", "OpenMoji")
JOINERS = frozenset({0x200D, *range(0xFE00, 0xFE10)})  # zero-width joiner, variation selectors: no glyph
SKIN_TONES = range(0x1F3FB, 0x1F400)  # emoji modifiers, shown only as part of the emoji before them


def _open_font(path: str) -> FT2Font:
    """The font at `path`: a file, or a FontPath naming one face of a collection."""
    return FT2Font(path, face_index=getattr(path, "face_index", 0))


@functools.cache
def _charmap(path: str) -> frozenset[int]:
    """The code points the font at `path` maps to glyphs (none if it cannot be read)."""
    try:
        return frozenset(_open_font(path).get_charmap())
    except (OSError, RuntimeError, ValueError):
        return frozenset()


def _has_outline(path: str, code: int) -> bool:
    """True if the font at `path` draws `code` with an outline matplotlib can render (not a bitmap)."""
    try:
        font = _open_font(path)
        if not font.scalable:
            return False
        font.set_size(12, DPI)
        font.load_char(code, flags=LoadFlags.NO_BITMAP)
        vertices, _ = font.get_path()
    except (OSError, RuntimeError, ValueError):
        return False
    return len(vertices) > 0


@functools.cache
def _main_font() -> str:
    return font_manager.findfont(FontProperties(family=FONT_FAMILY))


@functools.cache
def _fallback_fonts() -> tuple[tuple[str, str], ...]:
    """(family, file) of every other font matplotlib knows on this machine: outline emoji fonts first, then by name."""
    emoji_first = sorted(
        font_manager.fontManager.ttflist,
        key=lambda entry: (
            EMOJI_FAMILIES.index(entry.name) if entry.name in EMOJI_FAMILIES else len(EMOJI_FAMILIES),
            entry.name,
        ),
    )
    fonts: dict[str, str] = {}
    for entry in emoji_first:
        if entry.name in fonts or entry.name == FONT_FAMILY or entry.name.startswith(PLACEHOLDER_FONTS):
            continue
        if entry.style != "normal" or entry.weight not in (400, "normal", "regular"):
            continue  # not the upright regular face matplotlib looks for first (it warns when it uses another)
        with _quiet_fonts(), contextlib.suppress(ValueError):
            # The file matplotlib picks for the family, as it will when it draws the text.
            fonts[entry.name] = font_manager.findfont(FontProperties(family=entry.name), fallback_to_default=False)
    return tuple(fonts.items())


@functools.cache
def _font_for(char: str) -> str | None:
    """The family that draws `char`: the diagram font if it can, else the first other font that can, else None."""
    code = ord(char)
    if code in _charmap(_main_font()):
        return FONT_FAMILY
    for family, path in _fallback_fonts():
        if code in _charmap(path) and _has_outline(path, code):
            return family
    return None


def drawable(text: str) -> str:
    """`text` as the diagram can draw it: characters no font on this machine has are spelled as words.

    An emoji is kept where a font has its glyph (🥪 stays 🥪), and otherwise written as its name,
    in lower case and set off from letters beside it: 🥪 becomes "sandwich". Variation selectors
    and joiners, which have no glyph of their own, are left out, as is a lone mark no font has.
    """
    out: list[str] = []
    spelled = False  # the last thing written is a name
    for char in text:
        code, category = ord(char), unicodedata.category(char)
        if code in JOINERS or (spelled and category in ("Mn", "Me")):
            continue  # part of the character before it, spelled with that
        if _font_for(char) is not None:
            if spelled and char.isalnum():
                out.append(" ")
            out.append(char)
            spelled = False
        elif category[0] in "MC" or code in SKIN_TONES:
            continue  # a mark, control character or skin tone no font has: left out
        else:
            if out and out[-1][-1:].isalnum():
                out.append(" ")
            out.append(unicodedata.name(char, f"U+{code:04X}").lower())
            spelled = True
    return "".join(out)


def _fonts_for(texts: Iterable[str]) -> FontProperties:
    """The diagram font, followed by the other fonts that the drawable `texts` need, in a fixed order."""
    needed = {_font_for(char) for text in texts for char in text} - {None, FONT_FAMILY}
    order = [family for family, _ in _fallback_fonts()]
    return FontProperties(family=[FONT_FAMILY, *sorted(needed, key=order.index)])


def _shorten(text: str, limit: int = LABEL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _style(label: str) -> tuple[str, str]:
    """(color, linestyle): answers are dashed, failures red, acknowledgements grey."""
    failed = label.startswith(("error", "503", "term", "nak", "not stored"))
    failed = failed or label.endswith(("(not a reply!)", NO_ANSWER))
    answer = label.startswith(("PubAck", "reply", "error", "503", "not stored"))
    color = ALARM if failed else QUIET if label.startswith(("PubAck", "ack", "in progress")) else INK
    return color, "--" if answer else "-"


def _kind(name: str) -> str:
    if name == SERVER:
        return "server"
    if name in (REQUESTER, RESPONDER) or not name.isupper():
        return "app"
    return "stream"


class SequenceDiagram:
    """A sequence diagram: participants side by side, one numbered arrow per step, top to bottom.

    Jupyter shows it as a PNG image, which renders on GitHub and nbviewer too; `mermaid()` gives
    the same diagram as Mermaid text. Participants default to the canonical order: Requester, NATS,
    request streams, Responder, REPLIES (only those used). Names in capitals are drawn as streams.
    """

    def __init__(
        self, arrows: Iterable[Arrow], participants: list[str] | None = None, title: str | None = None
    ) -> None:
        self.arrows = list(arrows)
        self.participants = list(participants) if participants is not None else _participants(self.arrows)
        self.title = title
        for step, arrow in enumerate(self.arrows, 1):
            for name in (arrow.sender, arrow.receiver):
                if name not in self.participants:
                    raise ValueError(
                        f"step {step} ({arrow.label!r}) involves {name!r}, which is not among the "
                        f"participants {self.participants}; add it to participants"
                    )
        self._png: bytes | None = None

    def __repr__(self) -> str:
        steps = f"{len(self.arrows)} step{'' if len(self.arrows) == 1 else 's'}"
        if not self.participants:
            return f"SequenceDiagram({steps})"
        return f"SequenceDiagram({steps}: {', '.join(self.participants)})"

    def _repr_png_(self) -> bytes:
        return self.png()

    def png(self) -> bytes:
        """The diagram as PNG bytes (the same bytes for the same diagram)."""
        if self._png is None:
            buffer = io.BytesIO()
            with _quiet_fonts():
                self.figure().savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
            self._png = buffer.getvalue()
        return self._png

    def save(self, path: str | Path) -> Path:
        """Write the diagram to `path`: SVG when it ends in .svg, PNG otherwise. Returns the path."""
        path = Path(path)
        if path.suffix.lower() == ".svg":
            with _quiet_fonts():
                self.figure().savefig(path, format="svg", metadata={"Date": None, "Creator": None})
        else:
            path.write_bytes(self.png())
        return path

    def mermaid(self) -> str:
        """The diagram as Mermaid `sequenceDiagram` text (renders in JupyterLab and Markdown viewers)."""
        lines = []
        if self.title:
            lines += ["---", f"title: {json.dumps(self.title, ensure_ascii=False)}", "---"]  # JSON is YAML
        lines += ["sequenceDiagram", "    autonumber"]
        ids = {name: _mermaid_id(name, i) for i, name in enumerate(self.participants)}
        for name in self.participants:
            alias = f" as {_mermaid_text(name)}" if ids[name] != name else ""
            lines.append(f"    participant {ids[name]}{alias}")
        for arrow in self.arrows:
            _, linestyle = _style(arrow.label)
            kind = "-->>" if linestyle == "--" else "->>"
            lines.append(f"    {ids[arrow.sender]}{kind}{ids[arrow.receiver]}: {_mermaid_text(arrow.label)}")
        return "\n".join(lines) + "\n"

    def figure(self) -> Figure:
        """The diagram as a matplotlib Figure (not attached to pyplot, so Jupyter does not show it twice)."""
        names = self.participants
        shown = self.arrows[:MAX_STEPS]
        more = len(self.arrows) - len(shown)
        top = 0.2 + (0.45 if self.title else 0.0)
        first = top + BOX_H + 0.5
        last = first + ROW * (max(len(shown) - 1, 0) + (1 if more else 0))
        bottom_box = last + 0.45
        height = bottom_box + BOX_H + 0.15
        fig = Figure(figsize=(WIDTH, height), dpi=DPI, facecolor="white")
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_xlim(0, WIDTH)
        ax.set_ylim(height, 0)  # y in inches from the top
        ax.set_axis_off()
        font = _fonts_for([drawable(self.title or ""), *map(drawable, names), *(drawable(a.label) for a in shown)])
        if self.title:
            ax.text(WIDTH / 2, 0.2, drawable(self.title), ha="center", va="top", fontproperties=font, size=13)
        if not names:
            ax.text(WIDTH / 2, first, "nothing was exchanged", ha="center", va="center", fontproperties=font)
            return fig
        spacing = WIDTH / len(names)
        x = {name: spacing * (i + 0.5) for i, name in enumerate(names)}
        box_w = min(1.7, spacing * 0.86)
        for name in names:
            ax.plot([x[name], x[name]], [top + BOX_H, bottom_box], color="#b5b5b5", lw=1, ls=(0, (4, 3)), zorder=1)
            for y in (top, bottom_box):
                self._box(ax, font, name, x[name], y, box_w)
        for step, arrow in enumerate(shown, 1):
            self._arrow(ax, font, step, arrow, x[arrow.sender], x[arrow.receiver], first + ROW * (step - 1))
        if more:
            note = f"… and {more} more step{'' if more == 1 else 's'}, not drawn"
            ax.text(WIDTH / 2, last, note, ha="center", va="center", fontproperties=font, size=10, color=QUIET,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 2}, zorder=5)  # fmt: skip
        return fig

    @staticmethod
    def _box(ax: Any, font: FontProperties, name: str, cx: float, y: float, width: float) -> None:
        kind = _kind(name)
        fill, edge = BOX_COLORS[kind]
        ax.add_patch(
            FancyBboxPatch(
                (cx - width / 2, y),
                width,
                BOX_H,
                boxstyle="round,pad=0,rounding_size=0.08",
                facecolor=fill,
                edgecolor=edge,
                lw=1.2,
                zorder=3,
            )
        )
        text = _shorten(drawable(name), 18)
        if kind == "stream":
            ax.text(cx, y + BOX_H * 0.42, text, ha="center", va="center", fontproperties=font, size=10.5, zorder=4)
            ax.text(cx, y + BOX_H * 0.78, "stream", ha="center", va="center", fontproperties=font, size=7.5,
                    color=edge, style="italic", zorder=4)  # fmt: skip
        else:
            ax.text(cx, y + BOX_H / 2, text, ha="center", va="center", fontproperties=font, size=10.5, zorder=4)

    @staticmethod
    def _arrow(ax: Any, font: FontProperties, step: int, arrow: Arrow, x0: float, x1: float, y: float) -> None:
        color, linestyle = _style(arrow.label)
        label = _shorten(drawable(arrow.label))
        head = {"arrowstyle": "-|>,head_length=0.55,head_width=0.25", "color": color, "lw": 1.4}
        if x0 == x1:  # a participant talking to itself: a small loop to the right
            loop = 0.4
            ax.plot([x0, x0 + loop, x0 + loop], [y - 0.08, y - 0.08, y + 0.1], color=color, lw=1.4, ls=linestyle)
            ax.annotate("", xy=(x0 + 0.02, y + 0.1), xytext=(x0 + loop, y + 0.1), arrowprops=head, zorder=2)
            ax.text(x0 + loop + 0.08, y, label, ha="left", va="center", fontproperties=font, size=9.5, color=color)
        else:
            direction = 1 if x1 > x0 else -1
            tip = x1 - direction * 0.02
            neck = tip - direction * 0.16
            ax.plot([x0, neck], [y, y], color=color, lw=1.4, ls=linestyle, zorder=2)
            ax.annotate("", xy=(tip, y), xytext=(neck, y), arrowprops=head, zorder=2)
            ax.text((x0 + x1) / 2, y - 0.1, label, ha="center", va="bottom", fontproperties=font, size=9.5,
                    color=color, zorder=5, bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.6})  # fmt: skip
        ax.add_patch(Circle((x0, y), 0.1, facecolor=color, edgecolor="white", lw=1, zorder=6))
        ax.text(x0, y, str(step), ha="center", va="center", fontproperties=font, size=7, color="white",
                weight="bold", zorder=7)  # fmt: skip


@contextlib.contextmanager
def _quiet_fonts():
    """Silence matplotlib's missing-glyph and font warnings and logs: they would land in a notebook's stderr."""
    log = logging.getLogger("matplotlib.font_manager")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"(?s).*[Gg]lyph.*")
            warnings.filterwarnings("ignore", message=r"(?s).*font.*")
            yield
    finally:
        log.setLevel(level)


def _mermaid_id(name: str, index: int) -> str:
    return name if name.replace("_", "").isalnum() and name.isascii() else f"P{index}"


def _mermaid_text(text: str) -> str:
    # ';' ends a statement in Mermaid, so it is written as the entity #59; (a '#' alone is fine).
    return text.replace(";", "#59;").replace("\n", " ")


# -- stream contents ---------------------------------------------------------------------------------


async def stream_table(js: JetStreamContext | Client, stream: str, *, limit: int = 100) -> pd.DataFrame:
    """The messages stored in `stream` right now, oldest first: seq, subject, Nats-Reply, data (at most `limit`)."""
    js = jetstream(js)
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        raise StreamNotFound(f"stream {stream!r} does not exist; create it with ensure_request_stream(js)") from None
    rows = []
    seq, last = info.state.first_seq, info.state.last_seq
    while len(rows) < limit and info.state.messages and seq <= last:
        try:
            msg = await js.get_msg(stream, seq=seq, subject=">", next=True)  # the first message from seq on
        except NotFoundError:
            break
        headers = msg.headers or {}
        data = (msg.data or b"").decode("utf-8", errors="replace")
        rows.append((msg.seq, msg.subject, headers.get(p.REPLY_HEADER, ""), data))
        seq = msg.seq + 1
    return pd.DataFrame(rows, columns=["seq", "subject", p.REPLY_HEADER, "data"])


async def stream_state(js: JetStreamContext | Client, stream: str) -> pd.DataFrame:
    """A stream's counters as a one-row table: messages stored, first and last sequence, consumers."""
    js = jetstream(js)
    try:
        state = (await js.stream_info(stream)).state
    except NotFoundError:
        raise StreamNotFound(f"stream {stream!r} does not exist; create it with ensure_request_stream(js)") from None
    row = {
        "stream": stream,
        "messages": state.messages,
        "first seq": state.first_seq,
        "last seq": state.last_seq,
        "consumers": state.consumer_count,
    }
    return pd.DataFrame([row])


HIDDEN = "…"  # what ledger_table shows in place of a mailbox token


async def ledger_table(
    js: JetStreamContext | Client, reply_stream: str = p.DEFAULT_REPLY_STREAM, *, mailbox: str | None = None
) -> pd.DataFrame:
    """The mailbox ledger beside `reply_stream` as it is now: one row a key, sorted, with its value as JSON.

    Keys are `<mailbox>.<request id>` for a request sent and not settled, and
    `<mailbox>.done.<request id>` once its outcome was handed over; a key deleted when its request
    was settled is left out. Each `token` is shown as "…": it is random, and it is what proves a
    reply answers the request. `mailbox` keeps only that mailbox's keys. Listing the keys reads
    every mailbox's, so this needs a connection that may (not a mailbox user's of access_config()).
    """
    bucket = p.ledger_bucket(reply_stream)
    try:
        kv = await jetstream(js).key_value(bucket)
    except NotFoundError:
        raise NoReplyStream(
            f"the mailbox ledger {bucket!r} does not exist; create it with ensure_reply_stream(js, {reply_stream!r})"
        ) from None
    try:
        keys = sorted(await kv.keys())
    except NoKeysError:
        keys = []
    rows = []
    for key in keys:
        if mailbox is not None and not key.startswith(f"{mailbox}."):
            continue
        try:
            value = json.loads((await kv.get(key)).value or b"null")
        except (NotFoundError, ValueError):
            continue  # deleted since it was listed, or not JSON: not a ledger entry
        if isinstance(value, dict) and value.get("token") is not None:
            value["token"] = HIDDEN
        rows.append((key, json.dumps(value, ensure_ascii=False)))
    return pd.DataFrame(rows, columns=["key", "value"])


def replies_table(replies: Iterable[Reply]) -> pd.DataFrame:
    """What `Requester.collect()` handed over, one row a reply, sorted by request subject.

    Columns: request (the subject it answers), reply, error code, error description.
    """
    rows = []
    for reply in replies:
        code, description = (reply.error.code, reply.error.description) if reply.error else ("", "")
        rows.append((reply.headers.get(p.REQUEST_SUBJECT_HEADER, ""), reply.text, code, description))
    table = pd.DataFrame(rows, columns=["request", "reply", "error code", "error description"])
    return table.sort_values(["request", "reply"], ignore_index=True, kind="stable")


def permissions_table(users: Iterable[str], **names: Any) -> pd.DataFrame:
    """What each user of `access_config(users)` may do: one row per allowed subject, admin first.

    Columns: user, role, action ('publish' or 'subscribe'), subject. `names` renames streams and
    subjects as in access_config().
    """
    rows = [
        (perms.user, perms.role, action, subject)
        for perms in all_permissions(list(users), **names)
        for action, subjects in (("publish", perms.publish), ("subscribe", perms.subscribe))
        for subject in subjects
    ]
    return pd.DataFrame(rows, columns=["user", "role", "action", "subject"])


async def replica_table(
    js: JetStreamContext | Client, *streams: str, cluster: Any = None, timeout: float = 5.0
) -> pd.DataFrame:
    """Where a cluster keeps each stream's copies: one row per copy, sorted by stream (in the order given), then node.

    Columns: stream, node, running (when `cluster`, an EmbeddedCluster, is given), leader (True for
    the copy that stores new messages and answers the stream's API requests), current (the copy has
    all the leader has) and lag (how many operations it is behind, as the leader last heard). With
    `cluster`, a copy on a node that is not running is never current (the leader may not have
    noticed yet), and this waits up to `timeout` seconds until the copies on running nodes are
    current, so a table taken just after a restart or a burst of requests shows the settled state;
    a copy still behind then is shown so. Raises NoLeader when a stream has had no leader for all
    of `timeout` (its cluster is electing one) and StreamNotFound when a stream does not exist.
    """
    js = jetstream(js)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        rows = [row for stream in streams for row in await _copies(js, stream, deadline)]
        if cluster is not None:
            running = {node.name: node.running for node in cluster.servers}
            for row in rows:
                row["running"] = running.get(row["node"], False)
                row["current"] = row["current"] and row["running"]
        settled = all(row["current"] for row in rows if row.get("running", True))
        if settled or cluster is None or loop.time() >= deadline:
            break
        await asyncio.sleep(0.05)  # polling: the server announces no change of a copy's state
    columns = ["stream", "node", *(["running"] if cluster is not None else []), "leader", "current", "lag"]
    order = {stream: i for i, stream in enumerate(streams)}
    rows.sort(key=lambda row: (order[row["stream"]], row["node"]))
    return pd.DataFrame(rows, columns=columns)


async def _copies(js: JetStreamContext, stream: str, deadline: float) -> list[dict[str, Any]]:
    """One row per copy of `stream`, from its stream info, asked again until `deadline` while it has no leader."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            async with asyncio.timeout(min(max(deadline - loop.time(), 0.2), ASK_TIMEOUT)):
                info = await js.stream_info(stream)  # a request lost with a dying server is asked again
            if info.cluster is None or info.cluster.leader:
                break  # one server (no cluster info), or a cluster's stream with a leader
        except NotFoundError:
            raise StreamNotFound(
                f"stream {stream!r} does not exist; create it first, with ensure_request_stream(js, ...) for example"
            ) from None
        except (*UNAVAILABLE, TimeoutError):
            pass  # no leader to answer: asked again below, until the deadline
        if loop.time() >= deadline:
            raise NoLeader(
                f"stream {stream!r} has no leader now: its cluster is electing one, or most of the servers "
                "holding its copies are down"
            )
        await asyncio.sleep(0.1)  # an election takes seconds and announces itself to nobody here
    group = info.cluster
    leader = {"stream": stream, "node": getattr(group, "leader", None) or "", "leader": True, "current": True, "lag": 0}
    rows = [leader]
    for peer in getattr(group, "replicas", None) or []:
        current, lag = bool(peer.current), peer.lag or 0
        rows.append({"stream": stream, "node": peer.name, "leader": False, "current": current, "lag": lag})
    return rows
