"""A fault-injection run that counts: `python -m js_request_reply chaos --requests N [--cluster]`.

It sends N mailbox-mode requests to responder processes, kills responders with SIGKILL at random
points, restarts its server while requests are in flight, keeps every responder down while a batch
of short-lived requests expires, then collects until every request is accounted for. Each request
ends answered, rejected or expired; whatever is left is lost.

With `--cluster` it runs on a three-node cluster of its own, every stream with three replicas,
and instead of restarting the one server it kills nodes with SIGKILL (the first one the leader of
REQUESTS), each restarted once the others have elected new leaders, before the next is killed.

The handlers have a side effect: each publishes one message to `effects.<request-id>` in the
EFFECTS stream, with the request id as `Nats-Msg-Id`, before returning its reply. A responder killed
between the effect and the ack makes the request run again elsewhere; the stream's duplicate window
stores the effect once. EFFECTS holding more messages than request ids would be a duplicate effect.
Every handler run is recorded too, as `runs.<request-id>.<delivery>` in RUNS, to count redeliveries.

The run always owns its server or cluster (temporary file stores, loopback only), whatever NATS_URL says.
`run_chaos()` does it in-process; `python -m js_request_reply.chaos responder` is one responder process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from . import protocol as p
from .cluster import EmbeddedCluster
from .connection import connect
from .errors import JsRequestReplyError, ServerUnreachable
from .menu import MENU
from .requester import Reply, Requester
from .responder import Responder, request_id
from .server import EmbeddedServer
from .streams import ensure_reply_stream, ensure_request_stream

MAILBOX = "chaos"
UNKNOWN_SUBJECT = "requests.order-drink"  # no handler: every request to it is rejected (404)
EFFECTS_STREAM = "EFFECTS"  # one message per side effect: effects.<request-id>
RUNS_STREAM = "RUNS"  # one message per handler run: runs.<request-id>.<delivery>
TTL = 1  # seconds a short-lived request may wait; they are sent while every responder is down
OUTAGE_MARGIN = 1.0  # the outage lasts this much longer than TTL, so each of them is past its deadline
MAX_HANDLER_PAUSE = 0.01  # seconds of simulated work, before and after the effect: kills land mid-handler
SEND_TIMEOUT = 5.0  # one send() attempt; a send lost to a restart or an election is retried with the same msg_id
PATIENCE = 60.0  # how long a send, or a handler's publish, keeps retrying: several elections (4-9 s each)
CLUSTER_SIZE = 3
ELECTION_TIMEOUT = 30.0  # a stream elects a new leader within this after its leader's node is killed
COLLECT_TIMEOUT = 30.0
POLL = 0.2  # seconds between collect() calls that found nothing
READY_TIMEOUT = 30.0  # a responder process connects and starts within this
SHOWN_PROBLEMS = 10  # lines of problems the table shows; --json has them all
RETRYABLE = (JsRequestReplyError, nats.errors.Error, TimeoutError, OSError)


@dataclass
class ChaosReport:
    """What a chaos run counted. `lost` is sent - answered - rejected - expired; `ok` means nothing went wrong."""

    sent: int = 0
    answered: int = 0
    rejected: int = 0
    expired: int = 0
    lost: int = 0
    duplicate_side_effects: int = 0
    duplicate_replies: int = 0  # a second outcome handed over for one request
    mismatched: int = 0  # an outcome the request could not have had (wrong payload, an answer to an expired one)
    kills: int = 0  # responders killed with SIGKILL at random points
    outage_kills: int = 0  # responders killed so that the short-lived requests expire
    server_restarts: int = 0
    cluster_nodes: int = 0  # 0: one server; else the run's cluster, whose streams have 3 replicas
    node_kills: int = 0  # cluster nodes killed with SIGKILL
    leader_kills: int = 0  # of them, the ones that led REQUESTS when killed
    node_restarts: int = 0
    nodes_killed: list[str] = field(default_factory=list)  # each kill: the node and the streams it led
    redeliveries: int = 0  # handler runs on a delivery after the first
    handler_runs: int = 0
    repeated_handler_runs: int = 0  # runs of a request some responder had run before: the dedupe's work
    rejected_codes: dict[str, int] = field(default_factory=dict)
    responders: int = 0
    seed: int = 0
    seconds: float = 0.0
    timed_out: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the run finished in time and nothing was lost, duplicated or wrong."""
        problems = self.lost or self.duplicate_side_effects or self.duplicate_replies or self.mismatched
        return not (problems or self.timed_out)

    def counts(self) -> dict[str, int]:
        """The table's columns: sent, answered, rejected, expired, lost, duplicate side effects (a DataFrame row)."""
        return {
            "sent": self.sent,
            "answered": self.answered,
            "rejected": self.rejected,
            "expired": self.expired,
            "lost": self.lost,
            "duplicate side effects": self.duplicate_side_effects,
        }

    def table(self) -> str:
        """The counts as a small aligned table, then a line each on the faults, what absorbed them, and the checks."""
        columns = self.counts()
        widths = {name: max(len(name), len(str(value))) for name, value in columns.items()}
        stored = (
            f"{EFFECTS_STREAM} stored each effect once"
            if not self.duplicate_side_effects
            else f"{EFFECTS_STREAM} stored {self.duplicate_side_effects} effects twice"
        )
        lines = [
            "  ".join(f"{name:>{widths[name]}}" for name in columns),
            "  ".join(f"{value:>{widths[name]}}" for name, value in columns.items()),
            "",
            f"faults:   {self.kills} responders killed with SIGKILL at random points, "
            f"{self.outage_kills} more for a {TTL + OUTAGE_MARGIN:g} s outage, {self._server_faults()}",
            f"absorbed: {self.redeliveries} redeliveries; {self.repeated_handler_runs} of {self.handler_runs} "
            f"handler runs repeated a request, and {stored}",
            f"checks:   {self.duplicate_replies} replies handed over twice, "
            f"{self.mismatched} outcomes a request could not have had",
            f"run:      {self.sent} requests, {self.responders} responder processes, {self._where()}seed {self.seed}, "
            f"{self.seconds:.1f} s",
        ]
        if self.nodes_killed:
            lines.insert(4, f"killed:   {'; '.join(self.nodes_killed)}")
        lines += [f"PROBLEM:  {problem}" for problem in self.problems[:SHOWN_PROBLEMS]]
        if len(self.problems) > SHOWN_PROBLEMS:
            lines.append(f"PROBLEM:  ... and {len(self.problems) - SHOWN_PROBLEMS} more (--json lists them all)")
        return "\n".join(lines)

    def to_json(self) -> str:
        """The counts as JSON, with `ok`."""
        return json.dumps({**asdict(self), "ok": self.ok}, indent=2)

    def _server_faults(self) -> str:
        if not self.cluster_nodes:
            return f"{self.server_restarts} server {'restart' if self.server_restarts == 1 else 'restarts'}"
        nodes = "node" if self.node_kills == 1 else "nodes"
        leaders = "leader" if self.leader_kills == 1 else "leaders"
        restarted = "restarted" if self.node_restarts == self.node_kills else f"{self.node_restarts} restarted"
        return f"{self.node_kills} {nodes} killed with SIGKILL ({self.leader_kills} {p.DEFAULT_REQUEST_STREAM} {leaders}), {restarted}"

    def _where(self) -> str:
        return f"a {self.cluster_nodes}-node cluster with R{self.cluster_nodes} streams, " if self.cluster_nodes else ""


@dataclass(frozen=True)
class Planned:
    """One request of the run: its id, subject, and the outcome it must have."""

    request_id: str
    subject: str
    kind: str  # "menu" (answered with `item`), "unknown" (rejected) or "short-lived" (expired)
    item: str = ""

    @property
    def ttl(self) -> float | None:
        return TTL if self.kind == "short-lived" else None


def plan_requests(count: int, rng: random.Random) -> list[Planned]:
    """About 85% menu orders, 10% to a subject nobody serves, 5% short-lived; ids chaos-00000, chaos-00001, ..."""
    short_lived = max(1, round(count * 0.05)) if count >= 3 else 0
    unknown = max(1, round(count * 0.10)) if count >= 2 else 0
    kinds = ["short-lived"] * short_lived + ["unknown"] * unknown
    kinds += ["menu"] * (count - len(kinds))
    rng.shuffle(kinds)
    width = max(5, len(str(count - 1)))
    subjects = sorted(MENU)
    planned = []
    for i, kind in enumerate(kinds):
        rid = f"chaos-{i:0{width}d}"
        if kind == "unknown":
            planned.append(Planned(rid, UNKNOWN_SUBJECT, kind))
        else:
            subject = rng.choice(subjects)
            planned.append(Planned(rid, subject, kind, MENU[subject]))
    return planned


# -- the responder processes ------------------------------------------------------------------------


class _Responders:
    """Responder processes: started, killed with SIGKILL, replaced, and never left behind."""

    def __init__(self, url: str, logs: Path, ack_wait: float, max_deliver: int, seed: int):
        self.url, self.ack_wait, self.max_deliver, self.seed = url, ack_wait, max_deliver, seed
        self.log_path = logs / "responders.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - every responder's stderr, closed by close()
        self.ready: list[asyncio.subprocess.Process] = []
        self._all: list[asyncio.subprocess.Process] = []
        self._starting: set[asyncio.Task] = set()
        self._started = 0

    async def start(self, count: int = 1) -> None:
        """Start `count` responder processes and wait until each serves."""
        await asyncio.gather(*(self._start_one() for _ in range(count)))

    def start_soon(self) -> None:
        """Start a replacement in the background; settle() waits for it."""
        task = asyncio.create_task(self._start_one())
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def settle(self) -> None:
        """Wait for the replacements being started (a failed start raises here)."""
        await asyncio.gather(*self._starting)

    async def _start_one(self) -> None:
        self._started += 1
        number = self._started
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "js_request_reply.chaos", "responder",
            "--url", self.url, "--ack-wait", str(self.ack_wait), "--max-deliver", str(self.max_deliver),
            "--seed", str(self.seed * 1000 + number),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=self._log,
        )  # fmt: skip
        self._all.append(process)
        try:
            line = await asyncio.wait_for(process.stdout.readline(), READY_TIMEOUT)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            log_text = self.log_path.read_text(errors="replace")[-2000:]
            raise JsRequestReplyError(
                f"responder process {number} did not start within {READY_TIMEOUT:g}s:\n{log_text}"
            )
        self.ready.append(process)

    def kill(self, process: asyncio.subprocess.Process) -> None:
        """SIGKILL one responder: no stop(), no nak, its requests in flight wait out their ack_wait."""
        self.ready.remove(process)
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGKILL)

    async def stop(self, timeout: float = 15.0) -> None:
        """Stop every responder gracefully (SIGTERM: in-flight requests finish), killing stragglers."""
        for task in self._starting:
            task.cancel()
        await asyncio.gather(*self._starting, return_exceptions=True)
        running = [process for process in self._all if process.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        if running:
            await asyncio.wait([asyncio.ensure_future(process.wait()) for process in running], timeout=timeout)
        self.close()

    def close(self) -> None:
        """Kill whatever still runs (the last resort of cleanup)."""
        for process in self._all:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        self.ready.clear()
        self._log.close()


# -- the server faults: the one server restarted, or a cluster node killed ---------------------------


async def _start(server: EmbeddedServer) -> None:
    """Start `server` and wait in a thread until it is ready.

    The process is launched from this (the main) thread, so it still dies with this process.
    """
    server.launch()
    await asyncio.to_thread(server.wait_ready)


class _OneServer:
    """The run's one server; its fault is a restart (same port, same store) with requests in flight."""

    fault = "server restart"
    coming_back = "the server to restart"
    replicas = 1

    def __init__(self, workdir: Path, report: ChaosReport):
        self.server = EmbeddedServer(store_dir=workdir / "store")
        self.report = report
        self._back: asyncio.Task | None = None

    @property
    def url(self) -> str:
        return self.server.url

    async def start(self) -> None:
        await _start(self.server)

    async def inject(self, rng: random.Random) -> None:
        """Stop the server (sends waiting for PubAcks, handlers mid-publish), and start it again in the background."""
        await self.back()
        await asyncio.to_thread(self.server.stop)
        self._back = asyncio.create_task(_start(self.server))

    async def back(self) -> None:
        """Wait until the server stopped last is running again."""
        if self._back is not None:
            back, self._back = self._back, None
            await back
            self.report.server_restarts += 1

    def close(self) -> None:
        if self._back is not None:
            self._back.cancel()
        self.server.close()


class _NodeKills:
    """The run's cluster, every stream with a replica on each node; its fault is a node killed with SIGKILL.

    The first node killed is the leader of REQUESTS; each later one leads a stream the seeded rng
    picks. A killed node is restarted (same ports, same store) once the others have elected new
    leaders for every stream, and before the next kill, so a majority is always up.
    """

    fault = "node kill"
    coming_back = "the killed node to restart"
    replicas = CLUSTER_SIZE

    def __init__(self, workdir: Path, report: ChaosReport):
        self.cluster = EmbeddedCluster(size=CLUSTER_SIZE, store_dir=workdir / "cluster")
        self.report = report
        self.streams = [
            p.DEFAULT_REQUEST_STREAM,
            p.DEFAULT_REPLY_STREAM,
            f"KV_{p.ledger_bucket(p.DEFAULT_REPLY_STREAM)}",
            EFFECTS_STREAM,
            RUNS_STREAM,
        ]
        self._back: asyncio.Task | None = None
        report.cluster_nodes = CLUSTER_SIZE

    @property
    def url(self) -> str:
        return self.cluster.urls

    async def start(self) -> None:
        # On this (the main) thread, so the nodes die with this process; nothing else runs yet.
        self.cluster.start()

    async def inject(self, rng: random.Random) -> None:
        """SIGKILL the node that leads REQUESTS (the first time) or a stream `rng` picks; restart it later."""
        await self.back()
        stream = p.DEFAULT_REQUEST_STREAM if not self.report.node_kills else rng.choice(self.streams)
        await asyncio.sleep(rng.uniform(0, 2 * MAX_HANDLER_PAUSE))  # land anywhere in a handler
        leaders = await asyncio.to_thread(self._leaders)
        node = leaders[stream]
        self.cluster.kill(node)
        led = [name for name, leader in leaders.items() if leader == node]
        self.report.node_kills += 1
        self.report.leader_kills += p.DEFAULT_REQUEST_STREAM in led
        self.report.nodes_killed.append(f"{node}, leader of {', '.join(led)}" if led else f"{node}, leader of none")
        self._back = asyncio.create_task(self._restart(node))

    async def back(self) -> None:
        """Wait until the node killed last is running again."""
        if self._back is not None:
            back, self._back = self._back, None
            await back
            self.report.node_restarts += 1

    def _leaders(self) -> dict[str, str]:
        """Each stream's leader now (waiting, within ELECTION_TIMEOUT, for any that is electing one)."""
        return {stream: self.cluster.leader(stream, ELECTION_TIMEOUT) for stream in self.streams}

    async def _restart(self, node: str) -> None:
        await asyncio.to_thread(self._leaders)  # the survivors have taken over every stream
        await _start(self.cluster.server(node))  # back with its store; ready once it is current

    def close(self) -> None:
        if self._back is not None:
            self._back.cancel()
        self.cluster.close()


# -- the run ----------------------------------------------------------------------------------------


class _Run:
    """One chaos run on its own server or cluster: send with faults, an outage, collect, count."""

    def __init__(
        self, server: _OneServer | _NodeKills, responders: _Responders, rng: random.Random, report: ChaosReport
    ):
        self.server, self.responders, self.rng, self.report = server, responders, rng, report
        self.outcomes: dict[str, list[Reply]] = {}
        self.sending_done = asyncio.Event()
        self.doing = "starting"  # what the run is busy with, for the report of a run that timed out

    async def send(self, requester: Requester, planned: list[Planned], faults: dict[int, list[str]]) -> None:
        """Send each request in turn, injecting the faults planned before it."""
        for index, request in enumerate(planned):
            for fault in faults.get(index, []):
                what = self.server.fault if fault == "server" else fault
                self.doing = f"injecting a {what} before sending {request.request_id}"
                await self.inject(fault)
            self.doing = f"sending {request.request_id}"
            await self.send_one(requester, request)

    async def send_one(self, requester: Requester, request: Planned) -> None:
        """send(), retried with the same msg_id until the server confirms it: stored once, whatever happened."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + PATIENCE
        while True:
            try:
                await requester.send(
                    request.subject,
                    request.request_id,
                    msg_id=request.request_id,
                    ttl=request.ttl,
                    timeout=SEND_TIMEOUT,
                )
                return
            except RETRYABLE as exc:
                if loop.time() > give_up:
                    self.report.problems.append(f"{request.request_id} could not be sent: {type(exc).__name__}: {exc}")
                    return
            await asyncio.sleep(0.25)  # a pause between retries while the server comes back

    async def inject(self, fault: str) -> None:
        if fault == "kill":
            await asyncio.sleep(self.rng.uniform(0, 2 * MAX_HANDLER_PAUSE))  # land anywhere in a handler
            if not self.responders.ready:
                await self.responders.settle()  # every one was killed: wait for a replacement
            self.responders.kill(self.rng.choice(self.responders.ready))
            self.report.kills += 1
            self.responders.start_soon()
        elif fault == "server":
            await self.server.inject(self.rng)

    async def server_is_back(self) -> None:
        self.doing = f"waiting for {self.server.coming_back}"
        await self.server.back()

    async def outage(self, requester: Requester, short_lived: list[Planned], count: int) -> None:
        """Kill every responder, send the short-lived requests, let them expire, then start `count` responders."""
        self.doing = "starting the outage"
        await self.responders.settle()
        for process in list(self.responders.ready):
            self.responders.kill(process)
            self.report.outage_kills += 1
        for request in short_lived:
            await self.send_one(requester, request)
        await asyncio.sleep(TTL + OUTAGE_MARGIN)  # the outage itself: nobody serves while the TTLs run out
        self.doing = "starting responders after the outage"
        await self.responders.start(count)
        self.doing = "collecting"

    async def collect(self, requester: Requester, planned: list[Planned]) -> None:
        """collect() until every request has an outcome (and all were sent)."""
        waiting = {request.request_id for request in planned}
        while True:
            try:
                replies = await requester.collect(timeout=COLLECT_TIMEOUT)
            except RETRYABLE:
                replies = []  # the server is restarting: ask again
            for reply in replies:
                self.outcomes.setdefault(reply.request_id, []).append(reply)
                waiting.discard(reply.request_id)
            if not waiting and self.sending_done.is_set():
                return
            if not replies:
                await asyncio.sleep(POLL)

    def count_outcomes(self, planned: list[Planned]) -> None:
        report = self.report
        report.sent = len(planned)
        codes: Counter[str] = Counter()
        for request in planned:
            replies = self.outcomes.get(request.request_id, [])
            if not replies:
                continue
            first = replies[0]
            report.duplicate_replies += len(replies) - 1
            if len(replies) > 1:
                seen = ", ".join(_outcome(reply) for reply in replies)
                report.problems.append(f"{request.request_id} was handed over {len(replies)} times: {seen}")
            if first.error is None:
                report.answered += 1
            elif first.error.code == p.EXPIRED:
                report.expired += 1
            else:
                report.rejected += 1
                codes[str(first.error.code)] += 1
            wrong = _mismatch(request, first)
            if wrong:
                report.mismatched += 1
                report.problems.append(f"{request.request_id} ({request.kind}, {request.subject}): {wrong}")
        report.rejected_codes = dict(sorted(codes.items()))
        report.lost = report.sent - report.answered - report.rejected - report.expired
        lost = [request.request_id for request in planned if request.request_id not in self.outcomes]
        if lost:
            shown = ", ".join(lost[:10]) + (", ..." if len(lost) > 10 else "")
            report.problems.append(f"{len(lost)} lost: {shown}")

    async def count_effects(self, js: JetStreamContext, planned: list[Planned]) -> None:
        """Duplicate effects from EFFECTS' per-subject counts; handler runs and redeliveries from RUNS'."""
        report = self.report
        effects = (await js.stream_info(EFFECTS_STREAM, subjects_filter="effects.>")).state
        per_effect = effects.subjects or {}
        report.duplicate_side_effects = effects.messages - len(per_effect)
        for subject, count in per_effect.items():
            if count > 1:
                report.problems.append(f"{subject} happened {count} times")
        runs = (await js.stream_info(RUNS_STREAM, subjects_filter="runs.>")).state.subjects or {}
        report.handler_runs = sum(runs.values())
        report.redeliveries = sum(count for subject, count in runs.items() if int(subject.rsplit(".", 1)[1]) > 1)
        report.repeated_handler_runs = report.handler_runs - len({subject.rsplit(".", 1)[0] for subject in runs})
        for request in planned:
            replies = self.outcomes.get(request.request_id)
            if replies and replies[0].error is None and f"effects.{request.request_id}" not in per_effect:
                report.mismatched += 1
                report.problems.append(f"{request.request_id} was answered without its effect")

    async def trace_lost(self, js: JetStreamContext, planned: list[Planned]) -> None:
        """Say where the lost requests are: a reply stored but never handed over, or no reply at all."""
        lost = {request.request_id for request in planned if request.request_id not in self.outcomes}
        if not lost:
            return
        stored = await js.stream_info(p.DEFAULT_REPLY_STREAM, subjects_filter=f"{p.DEFAULT_REPLY_PREFIX}.{MAILBOX}.>")
        with_reply = lost & {p.request_id_of(subject) for subject in stored.state.subjects or {}}
        mailbox = await js.consumer_info(p.DEFAULT_REPLY_STREAM, f"mailbox-{MAILBOX}")
        self.report.problems.append(
            f"of the {len(lost)} lost, {len(with_reply)} have a reply stored in {p.DEFAULT_REPLY_STREAM} "
            f"(mailbox consumer: {mailbox.num_pending} pending, {mailbox.num_ack_pending} awaiting ack); "
            f"the other {len(lost) - len(with_reply)} have none"
        )


def _outcome(reply: Reply) -> str:
    return "answered" if reply.error is None else f"{reply.error.code} {reply.error.description}"


def _mismatch(request: Planned, reply: Reply) -> str:
    """Why `reply` cannot be the outcome of `request`, or '' when it can."""
    if request.kind == "short-lived":
        # Every responder was down until its deadline had passed: only an expiry is possible.
        return "" if reply.error is not None and reply.error.code == p.EXPIRED else f"{_outcome(reply)}, not expired"
    if reply.error is None:
        if request.kind == "unknown":
            return "answered, though nobody serves the subject"
        return "" if reply.text == request.item else f"answered {reply.text!r}, not {request.item!r}"
    if reply.error.code == p.EXPIRED:
        return f"expired, though it had no deadline: {reply.error.description}"
    return ""  # a rejection is a clear outcome (404 no handler; 500 gave up after max_deliver)


def plan_faults(sends: int, kills: int, server_faults: int, rng: random.Random) -> dict[int, list[str]]:
    """Before which send each fault happens: "kill" (a responder) anywhere, "server" in the middle half of the sends."""
    faults: dict[int, list[str]] = {}
    if sends < 2:
        return faults
    for _ in range(server_faults):
        faults.setdefault(rng.randrange(sends // 4, max(sends // 4 + 1, 3 * sends // 4)), []).append("server")
    for _ in range(kills):
        faults.setdefault(rng.randrange(1, sends), []).append("kill")
    return faults


async def _ensure_streams(js: JetStreamContext, window: float, replicas: int) -> None:
    await ensure_request_stream(js, replicas=replicas)
    await ensure_reply_stream(js, replicas=replicas)
    for name, subjects in ((EFFECTS_STREAM, ["effects.*"]), (RUNS_STREAM, ["runs.*.*"])):
        await js.add_stream(
            StreamConfig(
                name=name,
                subjects=subjects,
                storage=StorageType.FILE,
                duplicate_window=window,
                num_replicas=replicas,
            )
        )


async def run_chaos(
    requests: int = 200,
    *,
    responders: int = 3,
    kills: int | None = None,
    server_restarts: int = 1,
    seed: int = 1,
    timeout: float = 300.0,
    ack_wait: float = 2.0,
    max_deliver: int = 10,
    cluster: bool = False,
    node_kills: int | None = None,
) -> ChaosReport:
    """Run `requests` mailbox-mode requests through killed responders and server restarts, and count the outcomes.

    Starts its own server and `responders` responder processes, and leaves none of them behind.
    `kills` defaults to max(2, requests // 100). Requests still unaccounted for after `timeout`
    seconds count as lost.

    With `cluster=True` the run has a three-node cluster of its own, with three replicas of every
    stream, and the server fault is a node killed with SIGKILL rather than a server restart:
    `node_kills` of them (default max(1, requests // 500); `server_restarts` is not used), the
    first of the leader of REQUESTS, each restarted before the next.
    """
    if requests < 1 or responders < 1:
        raise ValueError("a chaos run needs at least one request and one responder")
    if node_kills is not None and not cluster:
        raise ValueError("node_kills needs a cluster: run_chaos(..., cluster=True) (--cluster)")
    kills = max(2, requests // 100) if kills is None else kills
    if cluster and node_kills is None:
        node_kills = max(1, requests // 500)
    server_faults = node_kills if cluster else server_restarts
    rng = random.Random(seed)
    planned = plan_requests(requests, rng)
    main = [request for request in planned if request.kind != "short-lived"]
    short_lived = [request for request in planned if request.kind == "short-lived"]
    faults = plan_faults(len(main), kills, server_faults, rng)
    report = ChaosReport(responders=responders, seed=seed)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="jrr-chaos-") as workdir:
        server = _NodeKills(Path(workdir), report) if cluster else _OneServer(Path(workdir), report)
        pool: _Responders | None = None
        nc = requester = None
        tasks: list[asyncio.Task] = []
        try:
            await server.start()
            nc = await connect(server.url)
            js = nc.jetstream()
            await _ensure_streams(js, window=max(600.0, timeout + 60), replicas=server.replicas)
            pool = _Responders(server.url, Path(workdir), ack_wait, max_deliver, seed)
            await pool.start(responders)
            requester = Requester(nc, mailbox=MAILBOX)
            run = _Run(server, pool, rng, report)
            try:
                async with asyncio.timeout(timeout) as budget:
                    collecting = asyncio.create_task(run.collect(requester, planned))
                    tasks.append(collecting)
                    await run.send(requester, main, faults)
                    await run.server_is_back()
                    await run.outage(requester, short_lived, responders)
                    run.sending_done.set()
                    await collecting
            except TimeoutError:
                if not budget.expired():
                    raise
                report.timed_out = True
                report.problems.append(
                    f"gave up after {timeout:g} s, while {run.doing}; "
                    f"{len(planned) - len(run.outcomes)} requests had no outcome yet"
                )
            await run.server_is_back()
            await pool.stop()  # let handlers in flight finish before counting their effects
            run.count_outcomes(planned)
            await run.count_effects(js, planned)
            await run.trace_lost(js, planned)
        finally:
            for task in tasks:
                task.cancel()
            if pool is not None:
                pool.close()
            if requester is not None:
                with contextlib.suppress(*RETRYABLE):
                    await asyncio.wait_for(requester.close(), 2)
            if nc is not None:
                with contextlib.suppress(*RETRYABLE):
                    await asyncio.wait_for(nc.close(), 2)
            server.close()
    report.seconds = time.monotonic() - started
    return report


# -- the command line -------------------------------------------------------------------------------


def command(args: argparse.Namespace) -> int:
    """Run `python -m js_request_reply chaos`: print the table (or JSON); exit 1 if anything was lost or doubled."""
    if args.cluster and args.server_restarts is not None:
        raise ValueError(
            "--server-restarts restarts the one server; with --cluster, nodes are killed: use --node-kills"
        )
    if args.node_kills is not None and not args.cluster:
        raise ValueError("--node-kills needs --cluster: a single server has no nodes to kill (see --server-restarts)")
    report = asyncio.run(
        _cancel_on_sigterm(
            run_chaos(
                args.requests,
                responders=args.responders,
                kills=args.kills,
                server_restarts=1 if args.server_restarts is None else args.server_restarts,
                seed=args.seed,
                timeout=args.timeout,
                ack_wait=args.ack_wait,
                max_deliver=args.max_deliver,
                cluster=args.cluster,
                node_kills=args.node_kills,
            )
        )
    )
    print(report.to_json() if args.json else report.table(), flush=True)
    return 0 if report.ok else 1


async def _cancel_on_sigterm(coro):
    """Run `coro`, cancelling it on SIGTERM as Ctrl-C does, so its cleanup runs either way."""
    task = asyncio.ensure_future(coro)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await task


# -- one responder process --------------------------------------------------------------------------


async def _publish_until_stored(js: JetStreamContext, subject: str, data: bytes, msg_id: str) -> None:
    """Publish with JetStream until a PubAck confirms it, for up to PATIENCE s; Nats-Msg-Id makes retries safe."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + PATIENCE
    while True:
        try:
            await js.publish(subject, data, timeout=2, headers={p.MSG_ID_HEADER: msg_id})
            return
        except (nats.errors.Error, TimeoutError):
            if loop.time() > give_up:
                raise
        await asyncio.sleep(0.25)  # the server is restarting


def chaos_handlers(js: JetStreamContext, rng: random.Random) -> dict:
    """The menu, with a side effect per request (effects.<request-id>) and a record of every run (runs.<id>.<delivery>)."""

    def serve(item: str):
        async def handler(msg: Msg) -> str:
            rid, delivery = request_id(msg), msg.metadata.num_delivered
            await _publish_until_stored(js, f"runs.{rid}.{delivery}", b"", f"{rid}-run-{delivery}")
            await asyncio.sleep(rng.uniform(0, MAX_HANDLER_PAUSE))  # work before the effect
            await _publish_until_stored(js, f"effects.{rid}", item.encode(), rid)
            await asyncio.sleep(rng.uniform(0, MAX_HANDLER_PAUSE))  # a kill now leaves an effect without a reply
            return item

        return handler

    return {subject: serve(item) for subject, item in MENU.items()}


async def _connect_until(url: str, timeout: float):
    """Connect, retrying while the server is down (a replacement may start during a restart)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while True:
        try:
            return await connect(url, first_connect_timeout=2)
        except ServerUnreachable:
            if loop.time() > give_up:
                raise
        await asyncio.sleep(0.25)


async def serve(url: str, ack_wait: float, max_deliver: int, seed: int) -> None:
    """One responder process: serve the chaos handlers until SIGTERM, SIGINT, or the parent's pipe closes."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Standard input is the chaos run's pipe: when that process is gone, so is this one.
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    parent_gone = asyncio.ensure_future(stdin.read())
    parent_gone.add_done_callback(lambda _: stop.set())
    nc = await _connect_until(url, READY_TIMEOUT)
    responder = Responder(
        nc, chaos_handlers(nc.jetstream(), random.Random(seed)), ack_wait=ack_wait, max_deliver=max_deliver
    )
    give_up = loop.time() + READY_TIMEOUT
    while True:
        try:
            await responder.start()  # binding the consumer times out while the server restarts
            break
        except (nats.errors.Error, TimeoutError):
            if loop.time() > give_up:
                raise
        await asyncio.sleep(0.25)
    print("ready", flush=True)
    await stop.wait()
    await responder.stop()
    parent_gone.cancel()
    await nc.drain()


def main(argv: list[str] | None = None) -> int:
    """`python -m js_request_reply.chaos responder --url URL ...`: one responder process of a chaos run."""
    top = argparse.ArgumentParser(prog="python -m js_request_reply.chaos", description=main.__doc__)
    commands = top.add_subparsers(dest="command", required=True)
    responder = commands.add_parser("responder", help="serve the chaos handlers until SIGTERM or stdin closes")
    responder.add_argument("--url", required=True)
    responder.add_argument("--ack-wait", type=float, default=2.0)
    responder.add_argument("--max-deliver", type=int, default=10)
    responder.add_argument("--seed", type=int, default=1)
    args = top.parse_args(argv)
    asyncio.run(serve(args.url, args.ack_wait, args.max_deliver, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
