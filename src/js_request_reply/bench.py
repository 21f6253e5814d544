"""The benchmark: JetStream request-reply against core request-reply, in one run on one server.

`python -m js_request_reply bench` prints a table of latency (p50, p99) and throughput at several
numbers of requests in flight, each also as a ratio to core request-reply measured in the same run.
The responders run in a separate process, as they would in production. Figures are ratios on this
machine, not promises. Two more rows measure what a notebook does, requester and responders on one
event loop: `same-process`, as a ratio to core on one loop (`core-in-process`). Each stored
variant is also shown against its floor (FLOORS): what it cannot be faster than.

With `--replicas 3` it runs on a three-node cluster (its own, unless given a URL) and measures the
stored variants twice: on streams with one replica, and on streams with three ("R3" rows), each R3
row also as a ratio to the same variant on one replica. Every connection uses one node, and the
leaders of the streams and their consumers are moved to that node, so R3 rows pay for replication
and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import resource
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field

import nats.errors
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig

from . import protocol as p
from .cluster import EmbeddedCluster
from .connection import connect
from .requester import Requester
from .responder import Responder
from .server import EmbeddedServer
from .streams import delete_streams, ensure_reply_stream, ensure_request_stream

STREAM = "BENCH"
REPLY_STREAM = "BENCH_REPLIES"
REPLY_PREFIX = "bench-replies"
CORE_SUBJECT = "bench.core"
LOCAL_CORE_SUBJECT = "bench.core.local"
JS_SUBJECT = "bench.js.echo"
LOCAL_SUBJECT = "bench.local.echo"  # served by a Responder in the requester's own process
LOCAL_DURABLE = "bench-local"
PAYLOAD = b"x" * 64
READY = "bench responders ready"
REQUEST_TIMEOUT = 10.0
CLUSTER_SIZE = 3
LEADER_MOVE_TIMEOUT = 10.0  # seconds for a stream or consumer leader to move to the measuring node

# name, what it measures
VARIANTS = {
    "core": "core nc.request to a core responder (the baseline)",
    "js-publish": "a JetStream publish and its PubAck alone: the cost of storing, no responder",
    "jetstream": "request() / Requester.request to a Responder: store, PubAck, deliver, reply, ack",
    "naive": "the same, with a fresh inbox subscribed and unsubscribed per request (reference only)",
    "mailbox": "Requester(mailbox=...).request: the reply stored in a stream and fetched from it",
    "core-in-process": "core nc.request to a core responder on the requester's own event loop",
    "same-process": "request() to a Responder on the requester's own event loop (x core-in-process)",
}
REPLICATED = ("js-publish", "jetstream", "mailbox")  # also measured on R3 streams, with --replicas 3
IN_PROCESS = ("core-in-process", "same-process")  # measured on one replica only
BASELINE_ROWS = ("core", "core-in-process")
BASELINES = {"same-process": "core-in-process"}  # the row each row's "x core" ratio is to (core unless named)
# What bounds each stored variant: a JetStream publish and its PubAck. jetstream stores one message
# per request (the request), mailbox four (ledger entry, request, reply, hand-over record) and acks one.
FLOORS = {"jetstream": "js-publish", "naive": "js-publish", "mailbox": "js-publish", "same-process": "js-publish"}


@dataclass(frozen=True)
class Streams:
    """The streams, subjects and mailbox that one set of stored variants uses."""

    stream: str
    reply_stream: str
    reply_prefix: str
    subject: str  # what the Responder serves
    stored: str  # what js-publish stores, in `stream`, without waking the Responder
    mailbox: str
    replicas: int

    @property
    def suffix(self) -> str:
        """What the variants measured on these streams add to their names: '' on one replica, ' R3' on three."""
        return "" if self.replicas == 1 else f" R{self.replicas}"


R1 = Streams(STREAM, REPLY_STREAM, REPLY_PREFIX, JS_SUBJECT, "bench.stored", "bench", 1)
R3 = Streams("BENCH_R3", "BENCH_REPLIES_R3", "bench-replies-r3", "bench.r3.echo", "bench.r3.stored", "bench-r3", 3)


@dataclass
class Row:
    """One variant's figures: latency in ms, throughput in requests per second by requests in flight."""

    variant: str
    p50_ms: float
    p99_ms: float
    throughput: dict[int, float]
    p50_ratio: float = 0.0
    throughput_ratio: dict[int, float] = field(default_factory=dict)
    samples_ms: list[float] = field(default_factory=list, repr=False)  # every sequential latency
    replicas: int | None = None  # the stored variants' stream replicas, in a run that compares them
    r1_ratio: float | None = None  # an R3 row's p50 as a multiple of the same variant's on one replica
    r1_throughput_ratio: dict[int, float] | None = None  # and its throughput, likewise
    floor: str | None = None  # the variant this one is bounded by (FLOORS)
    floor_p50_ratio: float | None = None  # p50 as a multiple of the floor's
    floor_throughput_ratio: dict[int, float] | None = None  # throughput as a multiple of the floor's


@dataclass
class Memory:
    """The requester's memory for a burst of requests in flight at once."""

    in_flight: int
    rss_before_mb: float
    rss_peak_mb: float
    rss_after_mb: float
    rss_after_second_burst_mb: float
    per_request_kb: float
    pending_after: int
    subscriptions_before: int
    subscriptions_after: int


@dataclass
class Placement:
    """Where a run on a cluster measured: the node each side is connected to, and each leader's node."""

    requester: str  # the server name of the node the requester is connected to
    responders: str
    leaders: dict[str, str]  # stream, or stream/consumer -> the node that leads it


@dataclass
class Report:
    """Everything one run measured."""

    machine: dict[str, str]
    requests: int
    concurrency: list[int]
    rows: list[Row]
    memory: Memory | None
    placement: Placement | None = None  # a run with R3 rows, on a cluster


# -- the responder process ---------------------------------------------------------------------------


async def serve(url: str, replicas: int = 1) -> None:
    """The responders, in their own process: a core one and a Responder on BENCH (and on BENCH_R3, with replicas=3).

    Connected to the first server of `url`, as the requester is (dont_randomize).
    """
    nc = await connect(url, dont_randomize=True)

    async def core_echo(msg) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(CORE_SUBJECT, cb=core_echo)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # The benchmark holds this process's stdin open; end of input means it is gone, so stop too.
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not os.read(sys.stdin.fileno(), 1) else None)
    sets = [R1] if replicas == 1 else [R1, R3]
    responders = [
        Responder(
            nc, {streams.subject: lambda msg: msg.data}, stream=streams.stream, durable="bench", max_in_flight=256
        )
        for streams in sets
    ]
    for responder in responders:
        await responder.start()
    try:
        await nc.flush()
        print(READY if replicas == 1 else f"{READY} on {_node(nc)}", flush=True)
        await stop.wait()
    finally:
        for responder in responders:
            await responder.stop()
    await nc.drain()


def _node(nc: Client) -> str:
    """The server name of the node `nc` is connected to."""
    return str(nc._server_info.get("server_name") or nc.connected_url.netloc)


# -- measuring -----------------------------------------------------------------------------------------


def _percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest sample with at least q of all samples at or below it."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def latency(one: Callable[[], Awaitable[object]], count: int, warmup: int) -> list[float]:
    """The latencies in ms of `count` requests made one after another, after `warmup` unmeasured ones."""
    for _ in range(warmup):
        await one()
    samples = []
    clock = time.perf_counter
    for _ in range(count):
        started = clock()
        await one()
        samples.append((clock() - started) * 1000)
    return samples


async def throughput(one: Callable[[], Awaitable[object]], in_flight: int, total: int) -> float:
    """Requests per second with `in_flight` requests outstanding at all times, over `total` requests."""
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await one()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return total / (time.perf_counter() - started)


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def memory(nc: Client, in_flight: int) -> Memory:
    """RSS before, at peak, and after `in_flight` requests at once, twice: flat means nothing leaked."""
    requester = Requester(nc)
    subscriptions_before = len(nc._subs)
    before = _rss_mb()
    peak = before

    async def one() -> None:
        await requester.request(JS_SUBJECT, PAYLOAD, timeout=60)

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, _rss_mb())
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    try:
        await asyncio.gather(*(one() for _ in range(in_flight)))
        after = _rss_mb()
        await asyncio.gather(*(one() for _ in range(in_flight)))
        after_second = _rss_mb()
    finally:
        sampler.cancel()
    pending = len(requester._inbox._waiting)
    return Memory(
        in_flight=in_flight,
        rss_before_mb=round(before, 1),
        rss_peak_mb=round(max(peak, after), 1),
        rss_after_mb=round(after, 1),
        rss_after_second_burst_mb=round(after_second, 1),
        per_request_kb=round((max(peak, after) - before) * 1024 / in_flight, 2),
        pending_after=pending,
        subscriptions_before=subscriptions_before,
        subscriptions_after=len(nc._subs),
    )


def _variants(
    nc: Client, streams: Streams = R1, mailboxes: list[Requester] | None = None
) -> dict[str, Callable[[], Awaitable[object]]]:
    """Each variant as one request, on `streams` (core uses none); the mailbox's Requester goes into `mailboxes`."""
    js = nc.jetstream()
    requester = Requester(nc)
    mailbox = Requester(
        nc, mailbox=streams.mailbox, reply_stream=streams.reply_stream, reply_prefix=streams.reply_prefix
    )
    if mailboxes is not None:
        mailboxes.append(mailbox)

    async def core() -> object:
        return await nc.request(CORE_SUBJECT, PAYLOAD, timeout=REQUEST_TIMEOUT)

    async def js_publish() -> object:
        return await js.publish(streams.stored, PAYLOAD, timeout=REQUEST_TIMEOUT)

    async def jetstream() -> object:
        return await requester.request(streams.subject, PAYLOAD, timeout=REQUEST_TIMEOUT)

    async def naive() -> object:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, max_msgs=1)
        try:
            await js.publish(streams.subject, PAYLOAD, headers={"Nats-Reply": inbox}, timeout=REQUEST_TIMEOUT)
            return await sub.next_msg(timeout=REQUEST_TIMEOUT)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def mailboxed() -> object:
        return await mailbox.request(streams.subject, PAYLOAD, timeout=REQUEST_TIMEOUT)

    async def core_in_process() -> object:
        return await nc.request(LOCAL_CORE_SUBJECT, PAYLOAD, timeout=REQUEST_TIMEOUT)

    async def same_process() -> object:
        return await requester.request(LOCAL_SUBJECT, PAYLOAD, timeout=REQUEST_TIMEOUT)

    return {
        "core": core,
        "js-publish": js_publish,
        "jetstream": jetstream,
        "naive": naive,
        "mailbox": mailboxed,
        "core-in-process": core_in_process,
        "same-process": same_process,
    }


@contextlib.asynccontextmanager
async def _in_process(nc: Client):
    """The same-process responders, on the requester's connection and event loop, as in a notebook."""

    async def core_echo(msg) -> None:
        await msg.respond(msg.data)

    sub = await nc.subscribe(LOCAL_CORE_SUBJECT, cb=core_echo)
    try:
        responder = Responder(nc, {LOCAL_SUBJECT: lambda msg: msg.data}, stream=STREAM, durable=LOCAL_DURABLE)
        async with responder:
            yield
    finally:
        await sub.unsubscribe()


async def _prepare(nc: Client, sets: list[Streams]) -> None:
    js = nc.jetstream()
    await delete_streams(js, *(name for streams in sets for name in (streams.stream, streams.reply_stream)))
    for streams in sets:
        # The Responders take only their subjects: js-publish stores `stored` in the same stream
        # without waking them. Their durables are made filtered before they start, which they keep.
        subjects = [streams.subject, streams.stored] + ([LOCAL_SUBJECT] if streams is R1 else [])
        await ensure_request_stream(js, streams.stream, subjects, replicas=streams.replicas)
        await js.add_consumer(streams.stream, _durable("bench", streams.subject))
        if streams is R1:
            await js.add_consumer(streams.stream, _durable(LOCAL_DURABLE, LOCAL_SUBJECT))
        await ensure_reply_stream(
            js, streams.reply_stream, [f"{streams.reply_prefix}.>"], max_age=600, replicas=streams.replicas
        )


def _durable(name: str, subject: str) -> ConsumerConfig:
    return ConsumerConfig(name=name, durable_name=name, filter_subject=subject, ack_policy=AckPolicy.EXPLICIT)


async def _trim(nc: Client, streams: Streams = R1) -> None:
    """Empty the store between variants, so each starts from the same state."""
    with contextlib.suppress(Exception):
        await nc.jetstream().purge_stream(streams.stream, subject=streams.stored)


async def run_bench(
    url: str,
    *,
    requests: int = 2000,
    warmup: int = 200,
    concurrency: tuple[int, ...] = (1, 10, 100),
    memory_in_flight: int = 10_000,
    variants: tuple[str, ...] = tuple(VARIANTS),
    progress: Callable[[str], None] = lambda line: None,
    replicas: int = 1,
) -> Report:
    """Measure every variant against the server at `url`, with responders in a separate process.

    With `replicas=3`, `url` is a cluster (a comma-separated list: every connection uses its first
    server), and the stored variants among REPLICATED are measured again on streams with three
    replicas, as rows named "<variant> R3", after the others.
    """
    if replicas not in (1, CLUSTER_SIZE):
        raise ValueError(f"replicas must be 1 or {CLUSTER_SIZE} (R{CLUSTER_SIZE} rows beside R1 ones), not {replicas}")
    sets = [R1] if replicas == 1 else [R1, R3]
    options = {} if replicas == 1 else {"dont_randomize": True}  # the first server, as the responders
    nc = await connect(url, pending_size=64 * 1024 * 1024, **options)
    responders = None
    try:
        await _prepare(nc, sets)
        serve_args = () if replicas == 1 else (str(replicas),)
        responders = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "js_request_reply.bench", "--serve", url, *serve_args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        ready = await _wait_ready(responders)
        mailboxes: list[Requester] = []
        calls = {streams: _variants(nc, streams, mailboxes) for streams in sets}
        measured = {
            streams: variants if streams is R1 else [name for name in variants if name in REPLICATED]
            for streams in sets
        }
        placement = None
        if replicas > 1:
            for streams in sets:
                if "mailbox" in measured[streams]:
                    await calls[streams]["mailbox"]()  # its first request creates the mailbox's consumer
            progress("moving the leaders to the requester's node")
            placement = Placement(_node(nc), ready.rpartition(" on ")[2], await _lead_from(nc, _node(nc), sets))
        rows = []
        async with _in_process(nc):
            for streams in sets:
                for name in measured[streams]:
                    if streams is not R1 and name in IN_PROCESS:
                        continue
                    one = calls[streams][name]
                    row = await _measure(one, name + streams.suffix, requests, warmup, concurrency, progress)
                    row.replicas = None if name in BASELINE_ROWS or replicas == 1 else streams.replicas
                    rows.append(row)
                    await _trim(nc, streams)
        _add_ratios(rows)
        for mailbox in mailboxes:
            await mailbox.close()  # its pull ends: the memory burst counts the connection's subscriptions
        progress(f"memory: {memory_in_flight} in flight")
        mem = await memory(nc, memory_in_flight) if memory_in_flight else None
        return Report(_machine(), requests, list(concurrency), rows, mem, placement)
    finally:
        if responders is not None:
            await _stop(responders)
        with contextlib.suppress(Exception):
            names = [name for streams in sets for name in (streams.stream, streams.reply_stream)]
            await delete_streams(nc.jetstream(), *names)
        await nc.drain()


async def _measure(
    one: Callable[[], Awaitable[object]],
    name: str,
    requests: int,
    warmup: int,
    concurrency: tuple[int, ...],
    progress: Callable[[str], None],
) -> Row:
    """One row: latency one request at a time, then throughput at each number in flight."""
    progress(f"{name}: latency")
    samples = await latency(one, requests, warmup)
    p50, p99 = statistics.median(samples), _percentile(samples, 0.99)
    rates = {}
    for in_flight in concurrency:
        progress(f"{name}: {in_flight} in flight")
        rates[in_flight] = await throughput(one, in_flight, max(requests, in_flight * 20))
    rates = {k: round(v, 1) for k, v in rates.items()}
    return Row(name, round(p50, 3), round(p99, 3), rates, samples_ms=[round(x, 4) for x in samples])


async def _lead_from(nc: Client, node: str, sets: list[Streams]) -> dict[str, str]:
    """Move the leader of every stream of `sets` (ledgers too), and of their consumers, to `node`; say where each is.

    A leader stepdown that names `node` as preferred moves a leader there; R1 streams are already
    on the node of the connection that created them. Then every request is served by the node it
    reaches, as on one server. A leader that does not move within LEADER_MOVE_TIMEOUT stays put,
    and the placement says so.
    """
    js = nc.jetstream()
    leaders: dict[str, str] = {}
    for streams in sets:
        for stream in (streams.stream, streams.reply_stream, f"KV_{p.ledger_bucket(streams.reply_stream)}"):
            groups = [(stream, f"STREAM.{{}}.{stream}", await js.stream_info(stream))]
            groups += [
                (f"{stream}/{c.name}", f"CONSUMER.{{}}.{stream}.{c.name}", c) for c in await js.consumers_info(stream)
            ]
            for label, api, info in groups:
                leader = (info.cluster.leader if info.cluster else None) or "no leader"
                if leader != node and streams.replicas > 1:
                    leader = await _step_down(nc, api, node) or leader
                leaders[label] = leader
    return leaders


async def _step_down(nc: Client, api: str, node: str) -> str | None:
    """Ask a leader to step down in favour of `node`; the node its election advisory names, or None.

    `api` is "STREAM.{}.<stream>" or "CONSUMER.{}.<stream>.<consumer>", the {} for the verb.
    """
    advisories = await nc.subscribe(f"$JS.EVENT.ADVISORY.{api.format('LEADER_ELECTED')}")
    try:
        preferred = json.dumps({"placement": {"preferred": node}}).encode()
        stepdown = f"$JS.API.{api.format('LEADER.STEPDOWN')}"
        answer = json.loads((await nc.request(stepdown, preferred, timeout=LEADER_MOVE_TIMEOUT)).data)
        if "error" in answer:
            return None
        return json.loads((await advisories.next_msg(timeout=LEADER_MOVE_TIMEOUT)).data).get("leader")
    except (nats.errors.Error, TimeoutError, ValueError):
        return None
    finally:
        await advisories.unsubscribe()


async def _wait_ready(process: asyncio.subprocess.Process, timeout: float = 20.0) -> str:
    """Wait for the responders' ready line and return it; then keep reading their output so a full pipe never stalls them."""
    line = (await asyncio.wait_for(process.stdout.readline(), timeout)).decode(errors="replace")
    if READY not in line:
        raise RuntimeError(f"the bench responders did not start: {line.strip() or 'no output'}")
    process.drain_task = asyncio.create_task(process.stdout.read())  # type: ignore[attr-defined]
    return line.strip()


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), 10)
    except TimeoutError:
        process.kill()
        await process.wait()
    drain = getattr(process, "drain_task", None)
    if drain is not None:
        drain.cancel()
        await asyncio.gather(drain, return_exceptions=True)


def _add_ratios(rows: list[Row]) -> None:
    by_name = {row.variant: row for row in rows}
    for row in rows:
        core = by_name.get(BASELINES.get(row.variant, "core"))
        if core is not None:
            row.p50_ratio = round(row.p50_ms / core.p50_ms, 2) if core.p50_ms else 0.0
            row.throughput_ratio = {k: round(v / core.throughput[k], 2) for k, v in row.throughput.items()}
        name, _, replicated = row.variant.partition(" ")
        floor = by_name.get(f"{FLOORS[name]} {replicated}".strip()) if name in FLOORS else None
        if floor is not None:
            row.floor = floor.variant
            row.floor_p50_ratio = round(row.p50_ms / floor.p50_ms, 2) if floor.p50_ms else 0.0
            row.floor_throughput_ratio = {k: round(v / floor.throughput[k], 2) for k, v in row.throughput.items()}
    for row in rows:
        r1 = by_name.get(row.variant.rsplit(" ", 1)[0]) if (row.replicas or 1) > 1 else None
        if r1 is not None:
            row.r1_ratio = round(row.p50_ms / r1.p50_ms, 2) if r1.p50_ms else 0.0
            row.r1_throughput_ratio = {k: round(v / r1.throughput[k], 2) for k, v in row.throughput.items()}


def _machine() -> dict[str, str]:
    from nats.aio.client import __version__ as nats_py

    return {
        "python": platform.python_version(),
        "nats-py": nats_py,
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpus": str(os.cpu_count()),
        "max_rss_mb": str(round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)),
    }


def report_table(report: Report):
    """The rows as a pandas DataFrame: latency, throughput at each number in flight, and ratios to core.

    When the report has R3 rows, each ratio to core is followed by a ratio to R1 (empty on the other
    rows). Then the ratio to the row's floor (FLOORS; empty on rows that have none).
    """
    import pandas as pd  # only the notebook needs it

    with_r1 = _has_r1_ratios(report)
    rows = []
    for row in report.rows:
        line = {"variant": row.variant, "p50 (ms)": row.p50_ms, "p99 (ms)": row.p99_ms, "p50 × core": row.p50_ratio}
        if with_r1:
            line["p50 × R1"] = row.r1_ratio
        line["p50 × floor"] = row.floor_p50_ratio
        for n in report.concurrency:
            line[f"{n} in flight (req/s)"] = round(row.throughput[n])
            line[f"{n} in flight × core"] = row.throughput_ratio[n]
            if with_r1:
                line[f"{n} in flight × R1"] = row.r1_throughput_ratio[n] if row.r1_throughput_ratio else None
            line[f"{n} in flight × floor"] = row.floor_throughput_ratio[n] if row.floor_throughput_ratio else None
        rows.append(line)
    return pd.DataFrame(rows)


def _has_r1_ratios(report: Report) -> bool:
    return any(row.r1_ratio is not None for row in report.rows)


def memory_table(memory: Memory):
    """The memory figures as a one-row pandas DataFrame."""
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "in flight": memory.in_flight,
                "RSS before (MB)": memory.rss_before_mb,
                "RSS at peak (MB)": memory.rss_peak_mb,
                "RSS after (MB)": memory.rss_after_mb,
                "RSS after a second burst (MB)": memory.rss_after_second_burst_mb,
                "per request (KB)": memory.per_request_kb,
            }
        ]
    )


def format_report(report: Report) -> str:
    """The report as a plain-text table, ratios to core beside each figure (and to R1, when there are R3 rows)."""
    flights = report.concurrency
    with_r1 = _has_r1_ratios(report)
    head = ["variant", "p50 ms", "(x core)"] + (["(x R1)"] if with_r1 else []) + ["p99 ms"]
    head += [f"{c} in flight/s (x core{'; x R1' if with_r1 else ''})" for c in flights]
    lines = []
    for row in report.rows:
        cells = [row.variant, f"{row.p50_ms:.3f}", f"{row.p50_ratio:.2f}x"]
        if with_r1:
            cells.append("" if row.r1_ratio is None else f"{row.r1_ratio:.2f}x")
        cells.append(f"{row.p99_ms:.3f}")
        for c in flights:
            r1 = f"; {row.r1_throughput_ratio[c]:.2f}x" if row.r1_throughput_ratio else ""
            cells.append(f"{row.throughput[c]:.0f} ({row.throughput_ratio.get(c, 0):.2f}x{r1})")
        lines.append(cells)
    widths = [max(len(str(x)) for x in column) for column in zip(head, *lines, strict=True)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    out += ["  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in lines]
    out.append("")
    out += [f"{name:<15} {VARIANTS[name]}" for name in (row.variant for row in report.rows) if name in VARIANTS]
    replicated = sorted({row.replicas for row in report.rows if (row.replicas or 1) > 1})
    for replicas in replicated:
        out.append(
            f"{f'... R{replicas}':<15} the same on streams with {replicas} replicas (ledger and consumers too); "
            "x R1: a multiple of the same variant on 1 replica"
        )
    floored = [row for row in report.rows if row.floor]
    if floored:
        out += ["", "against its floor (what it cannot beat: JetStream storing one message and its PubAck):"]
        for row in floored:
            flights = ", ".join(f"{row.floor_throughput_ratio[c]:.2f}x at {c} in flight" for c in report.concurrency)
            out.append(f"  {row.variant:<15} p50 {row.floor_p50_ratio:.2f}x {row.floor}; throughput {flights}")
    if report.placement:
        where = report.placement
        elsewhere = {name: node for name, node in where.leaders.items() if node != where.requester}
        leaders = (
            f"every stream and consumer led from {where.requester}"
            if not elsewhere
            else "leaders not on it: " + ", ".join(f"{name} on {node}" for name, node in elsewhere.items())
        )
        connected = (
            f"requester and responders connected to {where.requester}"
            if where.responders == where.requester
            else f"requester connected to {where.requester}, responders to {where.responders}"
        )
        out += ["", f"cluster: {connected}; {leaders}"]
    if report.memory:
        m = report.memory
        out.append("")
        out.append(
            f"memory, {m.in_flight} requests in flight: RSS {m.rss_before_mb} MB before, {m.rss_peak_mb} MB at peak "
            f"({m.per_request_kb} KB a request), {m.rss_after_mb} MB after, {m.rss_after_second_burst_mb} MB after "
            f"a second burst; {m.pending_after} replies still awaited, subscriptions {m.subscriptions_before} -> "
            f"{m.subscriptions_after}"
        )
    out.append(
        f"requests per measurement: {report.requests}; {report.machine['platform']}, {report.machine['cpus']} CPUs"
    )
    return "\n".join(out)


def as_json(report: Report) -> str:
    """The report as JSON (without the raw latency samples; the replica fields only in a run with R3 rows)."""
    data = asdict(report)
    for row in data["rows"]:
        row.pop("samples_ms", None)
        for key in ("replicas", "r1_ratio", "r1_throughput_ratio"):
            if row[key] is None and report.placement is None:
                del row[key]
    if data["placement"] is None:
        del data["placement"]
    return json.dumps(data, indent=2, ensure_ascii=False)


async def bench_main(url: str | None, *, quick: bool, emit_json: bool, requests: int | None, replicas: int = 1) -> int:
    """What `python -m js_request_reply bench` runs: on a fresh embedded server unless `url` is given.

    With `replicas=3`, on a fresh embedded cluster of three nodes unless `url` is given.
    """
    server: EmbeddedServer | EmbeddedCluster | None = None
    if url is None:
        server = EmbeddedServer().start() if replicas == 1 else EmbeddedCluster(size=CLUSTER_SIZE).start()
        url = server.url if isinstance(server, EmbeddedServer) else server.urls
    try:
        if quick:
            options = dict(requests=requests or 50, warmup=10, concurrency=(1, 10), memory_in_flight=200)
        else:
            options = dict(requests=requests or 2000)
        report = await run_bench(
            url, progress=lambda line: print(f"... {line}", file=sys.stderr, flush=True), replicas=replicas, **options
        )
        print(as_json(report) if emit_json else format_report(report), flush=True)
        return 0
    finally:
        if server is not None:
            server.close()


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] == "--serve":
        asyncio.run(serve(sys.argv[2], int(sys.argv[3]) if len(sys.argv) == 4 else 1))
