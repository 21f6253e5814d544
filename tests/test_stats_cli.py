"""`python -m js_request_reply stats`: a table of every responder on the server, from $SRV.STATS.

The responders run in the test's own event loop, so each command runs as an asyncio subprocess:
the loop keeps serving $SRV.STATS while the command waits for the answers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest
from support import SETTLE, Outcomes, unique

import js_request_reply as jrr


def env_for(url: str) -> dict[str, str]:
    return {**os.environ, "NATS_URL": url, "PYTHONIOENCODING": "utf-8"}


async def stats_command(url: str, *args: str) -> tuple[int, str, str]:
    """Run `python -m js_request_reply stats ARGS` to completion: (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "js_request_reply",
        "stats",
        *args,
        env=env_for(url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    return process.returncode, out.decode(), err.decode()


def refusing(msg):
    raise jrr.Reject(409, "sold out")


async def test_stats_prints_a_line_per_endpoint_of_every_responder(nats_url, nc, other_nc, queue):
    durable = unique("kitchen")
    handlers = {queue.subject("sandwich"): lambda msg: "🥪", queue.subject("soup"): refusing}
    outcomes = Outcomes()
    first = jrr.Responder(nc, handlers, stream=queue.stream, durable=durable, name="first", on_handled=outcomes)
    second = jrr.Responder(other_nc, handlers, stream=queue.stream, durable=durable, name="second", on_handled=outcomes)
    async with first, second:
        for _ in range(3):
            await jrr.request(nc, queue.subject("sandwich"), timeout=5)
        with pytest.raises(jrr.RequestRejected):
            await jrr.request(nc, queue.subject("soup"), timeout=5)
        await outcomes.wait_until(lambda records: len(records) == 4)  # each is counted once it is settled
        code, out, err = await stats_command(nats_url, "--name", durable)

    assert (code, err) == (0, "")
    header, *rows = out.splitlines()
    assert header.split() == ["service", "id", "endpoint", "requests", "errors", "average"]
    cells = [row.split() for row in rows]
    assert sorted(cell[1] for cell in cells) == sorted([first.service.id] * 2 + [second.service.id] * 2)
    assert {cell[0] for cell in cells} == {durable}
    by_endpoint = {"sandwich": [0, 0], "soup": [0, 0]}
    for cell in cells:
        assert cell[-1] == "ms", f"the average is in milliseconds: {cell}"
        by_endpoint[cell[2]][0] += int(cell[3])
        by_endpoint[cell[2]][1] += int(cell[4])
    assert by_endpoint == {"sandwich": [3, 0], "soup": [1, 1]}


async def test_stats_says_so_when_no_responder_answers(nats_url):
    nobody = unique("nobody")

    code, out, _ = await stats_command(nats_url, "--name", nobody)

    assert code == 0
    assert out.strip() == f"no responder answered $SRV.STATS.{nobody} within 1s"


async def test_stats_watch_prints_the_table_again_until_interrupted(nats_url, nc, queue):
    durable = unique("kitchen")
    async with jrr.Responder(nc, {queue.subject("bagel"): lambda msg: "🥯"}, stream=queue.stream, durable=durable):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "js_request_reply",
            "stats",
            "--name",
            durable,
            "--watch",
            "--interval",
            "0.2",
            env=env_for(nats_url),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        tables = 0
        try:
            async with asyncio.timeout(SETTLE * 3):
                while tables < 2:  # the first table, then one refreshed
                    line = (await process.stdout.readline()).decode()
                    assert line, "the command ended before printing two tables"
                    tables += line.split()[:2] == ["service", "id"]
            process.send_signal(signal.SIGINT)
            async with asyncio.timeout(SETTLE * 3):
                await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    assert process.returncode == 0


@pytest.mark.parametrize("option", ["--interval", "--timeout"])
async def test_stats_refuses_an_interval_or_timeout_of_zero(nats_url, option):
    code, _, err = await stats_command(nats_url, option, "0")

    assert code == 2
    assert err.strip() == "error: --interval and --timeout must be more than 0 seconds"
