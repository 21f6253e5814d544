"""The benchmark in smoke mode: it runs end to end and its JSON has the fields. No timing is asserted.

With --replicas 3 it runs on a three-node cluster of its own and adds R3 rows.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from js_request_reply import Responder, bench, delete_streams
from js_request_reply.bench import FLOORS, VARIANTS

R3_ROWS = ["js-publish R3", "jetstream R3", "mailbox R3"]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "NATS_URL"}  # a fresh server of its own
    command = [sys.executable, "-m", "js_request_reply", "bench", "--quick", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)


@pytest.fixture(scope="module")
def report() -> dict:
    """One quick run's JSON, shared by the tests that read it."""
    done = run_bench("--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_bench_json_has_every_variant_with_ratios_to_core(report):
    assert [row["variant"] for row in report["rows"]] == list(VARIANTS)
    for row in report["rows"]:
        assert set(row) >= {"p50_ms", "p99_ms", "p50_ratio", "throughput", "throughput_ratio"}
        assert row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"]
        assert set(row["throughput"]) == set(row["throughput_ratio"]) == {str(c) for c in report["concurrency"]}
    core = report["rows"][0]
    assert core["p50_ratio"] == 1.0 and set(core["throughput_ratio"].values()) == {1.0}
    assert report["machine"]["cpus"]


def test_same_process_is_a_ratio_to_core_on_one_loop_and_each_stored_row_to_its_floor(report):
    rows = {row["variant"]: row for row in report["rows"]}
    same, baseline = rows["same-process"], rows["core-in-process"]

    assert same["p50_ratio"] == round(same["p50_ms"] / baseline["p50_ms"], 2)
    for name, floor in FLOORS.items():
        row = rows[name]
        assert row["floor"] == floor
        assert row["floor_p50_ratio"] == round(row["p50_ms"] / rows[floor]["p50_ms"], 2)
        assert set(row["floor_throughput_ratio"]) == {str(c) for c in report["concurrency"]}
    assert rows["core"]["floor"] is None and rows["js-publish"]["floor"] is None


async def test_the_bench_responders_take_only_their_own_subjects(nc, js):
    """js-publish stores messages in the responders' stream: their durables must not be handed them."""
    await bench._prepare(nc, [bench.R1])
    try:
        async with Responder(nc, lambda msg: msg.data, stream=bench.STREAM, durable="bench"):
            await js.publish(bench.R1.stored, b"stored, not a request")
            info = await js.consumer_info(bench.STREAM, "bench")
        local = await js.consumer_info(bench.STREAM, bench.LOCAL_DURABLE)
    finally:
        await delete_streams(js, bench.STREAM, bench.REPLY_STREAM)

    assert info.config.filter_subject == bench.JS_SUBJECT
    assert info.num_pending == 0 and info.delivered.stream_seq == 0, "the stored message was not the responder's"
    assert local.config.filter_subject == bench.LOCAL_SUBJECT


def test_bench_memory_burst_leaves_no_reply_awaited_and_no_subscription_behind(report):
    memory = report["memory"]
    assert memory["in_flight"] > 0
    assert memory["pending_after"] == 0
    assert memory["subscriptions_after"] == memory["subscriptions_before"]


def test_bench_prints_a_table_by_default():
    done = run_bench()

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["variant", "p50", "ms"]
    assert [line.split()[0] for line in lines[1 : 1 + len(VARIANTS)]] == list(VARIANTS)
    assert "Traceback" not in done.stderr


def test_bench_on_a_cluster_adds_r3_rows_with_ratios_to_core_and_to_r1():
    done = run_bench("--replicas", "3")

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert re.split(r"\s{2,}", lines[0].strip())[:5] == ["variant", "p50 ms", "(x core)", "(x R1)", "p99 ms"]
    rows = {line.split("  ")[0].strip(): line for line in lines[1 : 1 + len(VARIANTS) + len(R3_ROWS)]}
    assert list(rows) == [*VARIANTS, *R3_ROWS]
    for name in R3_ROWS:
        ratios = re.findall(r"\d+\.\d\dx", rows[name])
        assert len(ratios) == 2 + 2 * 2, rows[name]  # p50 x core and x R1, then both at 1 and 10 in flight
    assert re.findall(r"\d+\.\d\dx", rows["core"]) == ["1.00x", "1.00x", "1.00x"]
    assert "cluster: requester and responders connected to n" in done.stdout
    assert "Traceback" not in done.stderr


def test_bench_json_on_a_cluster_gives_each_r3_row_its_ratio_to_r1():
    done = run_bench("--replicas", "3", "--json")

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    rows = {row["variant"]: row for row in report["rows"]}
    assert list(rows) == [*VARIANTS, *R3_ROWS]
    for name in R3_ROWS:
        row, r1 = rows[name], rows[name.removesuffix(" R3")]
        assert (row["replicas"], r1["replicas"]) == (3, 1)
        assert row["r1_ratio"] > 0 and r1["r1_ratio"] is None
        assert set(row["r1_throughput_ratio"]) == {str(c) for c in report["concurrency"]}
    assert rows["core"]["replicas"] is None
    placement = report["placement"]
    assert placement["requester"] == placement["responders"]
    assert {"BENCH_R3", "BENCH_R3/bench", "BENCH_REPLIES_R3/mailbox-bench-r3"} <= set(placement["leaders"])
