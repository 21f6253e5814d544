"""The workshop server: one nats-server, one JetStream account per learner, each account a world of its own."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import cli, interrupt, running

import js_request_reply as jrr
from js_request_reply.server import LAB_URL_VARIABLE, find_binary
from js_request_reply.workshop import (
    generate_passwords,
    learner_names,
    learner_urls,
    machine_address,
    workshop_config,
    workshop_server,
)

ROOT = Path(__file__).resolve().parent.parent
LEARNER_LINE = re.compile(r"(\S+) {2,}(nats://(\S+):([A-Za-z0-9_-]+)@(\S+):(\d+))")
NOTEBOOK_RUN_TIMEOUT = 900  # seconds for nbval to run two notebooks on a busy machine


def server_accepts(config: str, path: Path) -> subprocess.CompletedProcess:
    """`nats-server -t` on `config`, with JetStream on as the workshop server runs it."""
    path.write_text(config)
    return subprocess.run([find_binary(), "-js", "-t", "-c", str(path)], capture_output=True, text=True, timeout=30)


@pytest.fixture
def workshop():
    """A workshop server for two learners, started as `workshop_server()` builds it; yields it and the URLs."""
    passwords = generate_passwords(learner_names(2))
    with workshop_server(passwords) as server:
        yield server, learner_urls(passwords, "127.0.0.1", server.port)


# -- the configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize("names", [learner_names(12), ["alice", "bob-2", "carol_c"]])
def test_generated_config_is_accepted_by_nats_server(names, tmp_path):
    config = workshop_config(names, generate_passwords(names))

    checked = server_accepts(config, tmp_path / "workshop.conf")

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "system_account" in config
    assert config.count("jetstream: enabled") == len(names)


def test_learner_names_are_numbered_from_01_and_padded_to_the_widest():
    assert learner_names(3) == ["learner01", "learner02", "learner03"]
    assert learner_names(100)[0] == "learner001"
    assert learner_names(100)[-1] == "learner100"
    assert learner_names(users=["alice", "bob"]) == ["alice", "bob"]


@pytest.mark.parametrize(
    "learners, users, message",
    [
        (None, None, "say how many learners: --learners N"),
        (0, None, "a workshop needs at least 1 learner, not 0"),
        (3, ["alice", "bob"], "--learners 3 but 2 names after --users"),
        (None, ["alice", "alice"], "learners named more than once: alice"),
        (None, ["alice.smith"], "learner name 'alice.smith' must be letters, digits"),
        (None, ["sys"], "'sys' is the name of the server's system account"),
    ],
)
def test_bad_learners_are_refused_saying_what_to_give(learners, users, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        learner_names(learners, users)


# -- the command ----------------------------------------------------------------------------------


async def _account_streams(url: str) -> list[str]:
    nc = await jrr.connect(url, first_connect_timeout=5)
    try:
        return sorted(info.config.name for info in await nc.jetstream().streams_info())
    finally:
        await nc.drain()


def test_command_prints_one_line_per_learner_before_serving_and_stops_on_ctrl_c():
    command = ("workshop", "--learners", "3", "--port", "0", "--host", "127.0.0.1")
    with running(*command, env=dict(os.environ)) as (process, output):
        header = output.wait_for("workshop nats-server with JetStream on 127.0.0.1:")
        lines = [output.wait_for("nats://") for _ in range(3)]
        output.wait_for("Ctrl-C to stop.")
        port = re.search(r"on 127\.0\.0\.1:(\d+) ", header).group(1)
        matches = [LEARNER_LINE.fullmatch(line) for line in lines]

        assert all(matches), lines
        assert lines[0].startswith("learner01  nats://learner01:"), lines[0]
        assert [m.group(1) for m in matches] == ["learner01", "learner02", "learner03"]
        assert [m.group(3) for m in matches] == ["learner01", "learner02", "learner03"], "the user is the learner"
        assert len({m.group(4) for m in matches}) == 3, "every learner has a password of their own"
        assert {(m.group(5), m.group(6)) for m in matches} == {("127.0.0.1", port)}
        for match in matches:
            assert asyncio.run(_account_streams(match.group(2))) == [], "each account has JetStream, empty"
        with pytest.raises(jrr.PermissionDenied):
            asyncio.run(jrr.connect(f"nats://127.0.0.1:{port}", first_connect_timeout=5))

        assert interrupt(process) == 0
        output.wait_for("stopped.")


def test_command_with_users_names_the_accounts_and_listens_on_every_interface():
    with running("workshop", "--users", "alice", "bob", "--port", "0", env=dict(os.environ)) as (process, output):
        output.wait_for("workshop nats-server with JetStream on 0.0.0.0:")
        lines = [output.wait_for("nats://") for _ in range(2)]
        output.wait_for("Ctrl-C to stop.")
        matches = [LEARNER_LINE.fullmatch(line) for line in lines]

        assert lines[1].startswith("bob    nats://bob:"), "names are padded so the URLs line up"
        assert [m.group(1) for m in matches] == ["alice", "bob"]
        assert {m.group(5) for m in matches} == {machine_address()}, "URLs name this machine, not 0.0.0.0"
        for match in matches:
            assert asyncio.run(_account_streams(match.group(2))) == []

        assert interrupt(process) == 0


def test_command_with_url_host_puts_that_name_in_the_urls():
    command = ("workshop", "--learners", "1", "--port", "0", "--host", "127.0.0.1", "--url-host", "localhost")
    with running(*command, env=dict(os.environ)) as (process, output):
        match = LEARNER_LINE.fullmatch(output.wait_for("nats://"))

        assert match.group(5) == "localhost"
        assert asyncio.run(_account_streams(match.group(2))) == []
        assert interrupt(process) == 0


def test_command_with_neither_learners_nor_users_is_refused():
    result = cli("workshop", "--port", "0", env=dict(os.environ))

    assert result.returncode == 2
    assert result.stderr.strip() == "error: say how many learners: --learners N, or name them: --users alice bob ..."


# -- isolation ------------------------------------------------------------------------------------


async def test_each_learner_sees_only_their_own_streams(workshop):
    _, urls = workshop
    one = await jrr.connect(urls["learner01"])
    two = await jrr.connect(urls["learner02"])
    try:
        js_one, js_two = one.jetstream(), two.jetstream()
        await jrr.ensure_request_stream(js_one)
        await js_one.publish("requests.order-sandwich", b"one")

        assert await js_two.streams_info() == [], "learner02 does not see learner01's REQUESTS"

        await jrr.ensure_request_stream(js_two)  # the same name, in learner02's own account
        for payload in (b"two", b"three"):
            await js_two.publish("requests.order-bagel", payload)
        await jrr.delete_streams(js_one, "REQUESTS")

        assert await js_one.streams_info() == []
        assert (await js_two.stream_info("REQUESTS")).state.messages == 2, "learner01's delete left it alone"
    finally:
        await one.drain()
        await two.drain()


async def test_a_subscription_to_everything_sees_nothing_of_another_learner(workshop):
    _, urls = workshop
    one = await jrr.connect(urls["learner01"])
    two = await jrr.connect(urls["learner02"])
    seen: list[str] = []
    sentinel = asyncio.Event()

    async def record(msg) -> None:
        seen.append(msg.subject)
        if msg.subject == "sentinel.two":
            sentinel.set()

    try:
        await two.subscribe(">", cb=record)
        await two.flush()
        await jrr.ensure_request_stream(one.jetstream())
        await one.jetstream().publish("requests.order-sandwich", b"one")
        await one.publish("anything.at.all", b"one")
        await one.flush()  # the server has routed all of learner01's messages before learner02's sentinel
        await two.publish("sentinel.two", b"")
        async with asyncio.timeout(10):
            await sentinel.wait()

        assert seen == ["sentinel.two"], f"learner02 saw learner01's traffic: {seen}"
    finally:
        await one.drain()
        await two.drain()


# -- the acceptance: two learners run notebooks at the same time --------------------------


def test_two_learners_run_notebooks_02_and_03_at_the_same_time_and_both_pass(tmp_path):
    notebooks = ["notebooks/02-work-queue-stream.ipynb", "notebooks/03-responder.ipynb"]
    command = ("workshop", "--learners", "2", "--port", "0", "--host", "127.0.0.1")
    with running(*command, env=dict(os.environ)) as (_, output):
        urls = [LEARNER_LINE.fullmatch(output.wait_for("nats://")).group(2) for _ in range(2)]
        output.wait_for("Ctrl-C to stop.")
        runs: list[subprocess.Popen] = []
        try:
            for number, url in enumerate(urls, start=1):
                env = {**os.environ, "NATS_URL": url}
                env.pop(LAB_URL_VARIABLE, None)
                # tests/sanitize.cfg masks the learner's name in inbox subjects (see there)
                pytest_command = [sys.executable, "-m", "pytest", *notebooks, "-q", "-p", "no:cacheprovider"]
                with (tmp_path / f"learner{number:02d}.log").open("w") as log:
                    runs.append(subprocess.Popen(pytest_command, cwd=ROOT, env=env, stdout=log, stderr=log))
            codes = [run.wait(NOTEBOOK_RUN_TIMEOUT) for run in runs]
        finally:
            for run in runs:
                if run.poll() is None:
                    run.kill()
                    run.wait(15)

    reports = [(tmp_path / f"learner{number:02d}.log").read_text() for number in (1, 2)]
    for number, (code, report) in enumerate(zip(codes, reports, strict=True), start=1):
        assert code == 0, f"learner{number:02d}'s notebooks failed:\n{report[-4000:]}"
        assert " passed" in report
