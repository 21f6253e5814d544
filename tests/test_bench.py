"""The benchmark in smoke mode: it runs end to end and its JSON has the fields. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from js_request_reply.bench import VARIANTS


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
