"""The benchmark: JetStream request-reply against core request-reply, in one run on one server.

`python -m js_request_reply bench` prints a table of latency (p50, p99) and throughput at several
numbers of requests in flight, each also as a ratio to core request-reply measured in the same run.
The responders run in a separate process, as they would in production. Figures are ratios on this
machine, not promises.
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

from nats.aio.client import Client

from .connection import connect
from .requester import Requester
from .responder import Responder
from .server import EmbeddedServer
from .streams import delete_streams, ensure_reply_stream, ensure_request_stream

STREAM = "BENCH"
REPLY_STREAM = "BENCH_REPLIES"
REPLY_PREFIX = "bench-replies"
CORE_SUBJECT = "bench.core"
JS_SUBJECT = "bench.js.echo"
PAYLOAD = b"x" * 64
READY = "bench responders ready"
REQUEST_TIMEOUT = 10.0

# name, what it measures
VARIANTS = {
    "core": "core nc.request to a core responder (the baseline)",
    "js-publish": "a JetStream publish and its PubAck alone: the cost of storing, no responder",
    "jetstream": "request() / Requester.request to a Responder: store, PubAck, deliver, reply, ack",
    "naive": "the same, with a fresh inbox subscribed and unsubscribed per request (reference only)",
    "mailbox": "Requester(mailbox=...).request: the reply stored in a stream and fetched from it",
}


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
class Report:
    """Everything one run measured."""

    machine: dict[str, str]
    requests: int
    concurrency: list[int]
    rows: list[Row]
    memory: Memory | None


# -- the responder process ---------------------------------------------------------------------------


async def serve(url: str) -> None:
    """The responders, in their own process: a core one and a Responder on the BENCH stream."""
    nc = await connect(url)

    async def core_echo(msg) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(CORE_SUBJECT, cb=core_echo)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # The benchmark holds this process's stdin open; end of input means it is gone, so stop too.
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not os.read(sys.stdin.fileno(), 1) else None)
    async with Responder(nc, {JS_SUBJECT: lambda msg: msg.data}, stream=STREAM, durable="bench", max_in_flight=256):
        await nc.flush()
        print(READY, flush=True)
        await stop.wait()
    await nc.drain()


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


def _variants(nc: Client) -> dict[str, Callable[[], Awaitable[object]]]:
    js = nc.jetstream()
    requester = Requester(nc)
    mailbox = Requester(nc, mailbox="bench", reply_stream=REPLY_STREAM, reply_prefix=REPLY_PREFIX)

    async def core() -> object:
        return await nc.request(CORE_SUBJECT, PAYLOAD, timeout=REQUEST_TIMEOUT)

    async def js_publish() -> object:
        return await js.publish("bench.stored", PAYLOAD, timeout=REQUEST_TIMEOUT)

    async def jetstream() -> object:
        return await requester.request(JS_SUBJECT, PAYLOAD, timeout=REQUEST_TIMEOUT)

    async def naive() -> object:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, max_msgs=1)
        try:
            await js.publish(JS_SUBJECT, PAYLOAD, headers={"Nats-Reply": inbox}, timeout=REQUEST_TIMEOUT)
            return await sub.next_msg(timeout=REQUEST_TIMEOUT)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def mailboxed() -> object:
        return await mailbox.request(JS_SUBJECT, PAYLOAD, timeout=REQUEST_TIMEOUT)

    return {"core": core, "js-publish": js_publish, "jetstream": jetstream, "naive": naive, "mailbox": mailboxed}


async def _prepare(nc: Client) -> None:
    js = nc.jetstream()
    await delete_streams(js, STREAM, REPLY_STREAM)
    # A separate stream captures bench.stored, so js-publish stores without waking the Responder.
    await ensure_request_stream(js, STREAM, [JS_SUBJECT, "bench.stored"])
    await ensure_reply_stream(js, REPLY_STREAM, [f"{REPLY_PREFIX}.>"], max_age=600)


async def _trim(nc: Client) -> None:
    """Empty the store between variants, so each starts from the same state."""
    with contextlib.suppress(Exception):
        await nc.jetstream().purge_stream(STREAM, subject="bench.stored")


async def run_bench(
    url: str,
    *,
    requests: int = 2000,
    warmup: int = 200,
    concurrency: tuple[int, ...] = (1, 10, 100),
    memory_in_flight: int = 10_000,
    variants: tuple[str, ...] = tuple(VARIANTS),
    progress: Callable[[str], None] = lambda line: None,
) -> Report:
    """Measure every variant against the server at `url`, with responders in a separate process."""
    nc = await connect(url, pending_size=64 * 1024 * 1024)
    responders = None
    try:
        await _prepare(nc)
        responders = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "js_request_reply.bench", "--serve", url,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        await _wait_ready(responders)
        rows = []
        calls = _variants(nc)
        for name in variants:
            one = calls[name]
            progress(f"{name}: latency")
            samples = await latency(one, requests, warmup)
            p50, p99 = statistics.median(samples), _percentile(samples, 0.99)
            rates = {}
            for in_flight in concurrency:
                progress(f"{name}: {in_flight} in flight")
                rates[in_flight] = await throughput(one, in_flight, max(requests, in_flight * 20))
            rates = {k: round(v, 1) for k, v in rates.items()}
            rows.append(Row(name, round(p50, 3), round(p99, 3), rates, samples_ms=[round(x, 4) for x in samples]))
            await _trim(nc)
        _add_ratios(rows)
        progress(f"memory: {memory_in_flight} in flight")
        mem = await memory(nc, memory_in_flight) if memory_in_flight else None
        return Report(_machine(), requests, list(concurrency), rows, mem)
    finally:
        if responders is not None:
            await _stop(responders)
        with contextlib.suppress(Exception):
            await delete_streams(nc.jetstream(), STREAM, REPLY_STREAM)
        await nc.drain()


async def _wait_ready(process: asyncio.subprocess.Process, timeout: float = 20.0) -> None:
    """Wait for the responders' ready line, then keep reading their output so a full pipe never stalls them."""
    line = (await asyncio.wait_for(process.stdout.readline(), timeout)).decode(errors="replace")
    if READY not in line:
        raise RuntimeError(f"the bench responders did not start: {line.strip() or 'no output'}")
    process.drain_task = asyncio.create_task(process.stdout.read())  # type: ignore[attr-defined]


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
    core = next((row for row in rows if row.variant == "core"), None)
    if core is None:
        return
    for row in rows:
        row.p50_ratio = round(row.p50_ms / core.p50_ms, 2) if core.p50_ms else 0.0
        row.throughput_ratio = {k: round(v / core.throughput[k], 2) for k, v in row.throughput.items()}


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
    """The rows as a pandas DataFrame: latency, throughput at each number in flight, and ratios to core."""
    import pandas as pd  # only the notebook needs it

    rows = []
    for row in report.rows:
        line = {"variant": row.variant, "p50 (ms)": row.p50_ms, "p99 (ms)": row.p99_ms, "p50 × core": row.p50_ratio}
        for n in report.concurrency:
            line[f"{n} in flight (req/s)"] = round(row.throughput[n])
            line[f"{n} in flight × core"] = row.throughput_ratio[n]
        rows.append(line)
    return pd.DataFrame(rows)


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
    """The report as a plain-text table, ratios to core beside each figure."""
    flights = report.concurrency
    head = ["variant", "p50 ms", "(x core)", "p99 ms"] + [f"{c} in flight/s (x core)" for c in flights]
    lines = []
    for row in report.rows:
        cells = [row.variant, f"{row.p50_ms:.3f}", f"{row.p50_ratio:.2f}x", f"{row.p99_ms:.3f}"]
        cells += [f"{row.throughput[c]:.0f} ({row.throughput_ratio.get(c, 0):.2f}x)" for c in flights]
        lines.append(cells)
    widths = [max(len(str(x)) for x in column) for column in zip(head, *lines, strict=True)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    out += ["  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in lines]
    out.append("")
    out += [f"{name:<11} {VARIANTS[name]}" for name in (row.variant for row in report.rows)]
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
    """The report as JSON (without the raw latency samples)."""
    data = asdict(report)
    for row in data["rows"]:
        row.pop("samples_ms", None)
    return json.dumps(data, indent=2, ensure_ascii=False)


async def bench_main(url: str | None, *, quick: bool, emit_json: bool, requests: int | None) -> int:
    """What `python -m js_request_reply bench` runs: on a fresh embedded server unless `url` is given."""
    server = None
    if url is None:
        server = EmbeddedServer().start()
        url = server.url
    try:
        if quick:
            options = dict(requests=requests or 50, warmup=10, concurrency=(1, 10), memory_in_flight=200)
        else:
            options = dict(requests=requests or 2000)
        report = await run_bench(
            url, progress=lambda line: print(f"... {line}", file=sys.stderr, flush=True), **options
        )
        print(as_json(report) if emit_json else format_report(report), flush=True)
        return 0
    finally:
        if server is not None:
            server.close()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        asyncio.run(serve(sys.argv[2]))
