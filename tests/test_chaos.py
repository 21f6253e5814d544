"""The fault-injection run: `python -m js_request_reply chaos` kills responders, restarts its server, and counts.

Each run starts a server (or, with --cluster, a three-node cluster) of its own and responder
processes of its own, whatever NATS_URL says.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import js_request_reply.protocol as p
from js_request_reply.chaos import ChaosReport, plan_requests, run_chaos

COLUMNS = ["sent", "answered", "rejected", "expired", "lost", "duplicate side effects"]


def chaos(*args: str) -> subprocess.CompletedProcess:
    """Run the chaos command to completion, with NATS_URL pointing nowhere: it must not need it.

    It runs in a session of its own, and must leave no process of that session behind.
    """
    env = {**os.environ, "NATS_URL": "nats://127.0.0.1:1", "PYTHONIOENCODING": "utf-8"}
    command = [sys.executable, "-m", "js_request_reply", "chaos", *args]
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
        start_new_session=True,
    ) as process:  # fmt: skip
        stdout, stderr = process.communicate(timeout=240)
    assert processes(lambda stat: stat["session"] == process.pid) == set(), "the chaos run left processes behind"
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def processes(match) -> set[int]:
    """Pids of the live (not zombie) processes whose /proc/<pid>/stat fields `match` accepts."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        stat = {"state": fields[0], "parent": int(fields[1]), "session": int(fields[3])}
        if stat["state"] != "Z" and match(stat):
            found.add(int(entry.name))
    return found


def nothing_lost(result: subprocess.CompletedProcess, sent: int) -> list[str]:
    """Check the table says `sent` requests, each with an outcome, none lost or doubled; the lines below it."""
    assert result.returncode == 0, result.stdout + result.stderr
    header, row, *rest = result.stdout.splitlines()
    assert re.split(r"\s{2,}", header.strip()) == COLUMNS
    counts = dict(zip(COLUMNS, map(int, row.split()), strict=True))
    assert counts["sent"] == sent
    assert counts["lost"] == 0
    assert counts["duplicate side effects"] == 0
    assert counts["answered"] + counts["rejected"] + counts["expired"] == sent
    return rest


def test_chaos_prints_one_table_and_exits_0_when_nothing_was_lost():
    result = chaos("--requests", "40", "--responders", "2", "--kills", "2", "--server-restarts", "1")

    rest = nothing_lost(result, 40)
    assert any(line.startswith("faults:   2 responders killed with SIGKILL") for line in rest), result.stdout
    assert not any(line.startswith("PROBLEM") for line in rest), result.stdout
    assert "Traceback" not in result.stderr


def test_chaos_json_counts_every_request_after_kills_and_a_server_restart():
    result = chaos("--requests", "50", "--responders", "2", "--kills", "2", "--server-restarts", "1", "--json")

    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True, report["problems"]
    assert report["sent"] == 50
    assert report["lost"] == 0
    assert report["duplicate_side_effects"] == 0
    assert report["duplicate_replies"] == 0
    assert report["mismatched"] == 0
    assert report["answered"] + report["rejected"] + report["expired"] == report["sent"]
    # The plan for 50: 2 short-lived (they expire), 5 to a subject nobody serves (404), 43 orders.
    assert (report["answered"], report["rejected"], report["expired"]) == (43, 5, 2)
    assert report["rejected_codes"] == {str(p.NO_HANDLER): 5}
    assert report["kills"] == 2
    assert report["outage_kills"] == 2
    assert report["server_restarts"] == 1
    assert report["handler_runs"] >= report["answered"]
    assert report["handler_runs"] - report["repeated_handler_runs"] == report["answered"]


def test_chaos_on_a_cluster_loses_nothing_when_the_requests_leader_is_killed():
    result = chaos("--cluster", "--requests", "40", "--responders", "2", "--node-kills", "1")

    rest = nothing_lost(result, 40)
    faults = next(line for line in rest if line.startswith("faults:"))
    assert faults.endswith("1 node killed with SIGKILL (1 REQUESTS leader), restarted"), result.stdout
    assert re.search(r"^killed:   n[123], leader of REQUESTS\b", result.stdout, re.MULTILINE), result.stdout
    assert "a 3-node cluster with R3 streams" in result.stdout
    assert not any(line.startswith("PROBLEM") for line in rest), result.stdout
    assert "Traceback" not in result.stderr


def test_chaos_refuses_node_kills_without_a_cluster_and_server_restarts_with_one():
    without = chaos("--node-kills", "1")
    mixed = chaos("--cluster", "--server-restarts", "1")

    assert without.returncode == 2
    assert "error: --node-kills needs --cluster" in without.stderr
    assert mixed.returncode == 2
    assert "error: --server-restarts restarts the one server; with --cluster, nodes are killed" in mixed.stderr


async def test_run_chaos_in_process_returns_a_report_and_leaves_no_process_behind():
    children_before = processes(lambda stat: stat["parent"] == os.getpid())

    report = await run_chaos(20, responders=1, kills=1, server_restarts=0, seed=7)

    assert processes(lambda stat: stat["parent"] == os.getpid()) <= children_before

    assert isinstance(report, ChaosReport)
    assert report.ok, report.problems
    assert (report.sent, report.lost, report.duplicate_side_effects) == (20, 0, 0)
    assert report.answered + report.rejected + report.expired == 20
    assert (report.kills, report.server_restarts) == (1, 0)
    assert list(report.counts()) == COLUMNS
    assert report.table().splitlines()[1].split() == [str(count) for count in report.counts().values()]


def test_chaos_refuses_a_run_of_nothing():
    result = chaos("--requests", "0")

    assert result.returncode == 2
    assert "error: a chaos run needs at least one request and one responder" in result.stderr


def test_the_plan_mixes_orders_unknown_subjects_and_short_lived_requests_with_unique_ids():
    planned = plan_requests(1000, random.Random(1))

    kinds = [request.kind for request in planned]
    assert (kinds.count("menu"), kinds.count("unknown"), kinds.count("short-lived")) == (850, 100, 50)
    ids = [request.request_id for request in planned]
    assert len(set(ids)) == 1000
    assert all(p.is_valid_token(rid) for rid in ids)
    assert plan_requests(1000, random.Random(1)) == planned, "the same seed makes the same run"
