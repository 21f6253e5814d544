"""The command line, run as a learner runs it: `python -m js_request_reply ...` in separate processes.

Each test that needs a server has a fresh one of its own, since the commands use the default
REQUESTS and REPLIES streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import nats
import pytest
from nats.js.api import StreamConfig

import js_request_reply as jrr
from js_request_reply.cli import lab_environment
from js_request_reply.errors import PermissionDenied
from js_request_reply.server import LAB_URL_VARIABLE, find_binary, free_port


def cli_env(url: str) -> dict[str, str]:
    return {**os.environ, "NATS_URL": url, "PYTHONIOENCODING": "utf-8"}


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run one command to completion."""
    return subprocess.run(
        [sys.executable, "-m", "js_request_reply", *args],
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
    )


class Output:
    """The lines a long-running command prints, read in the background so every wait can be bounded."""

    def __init__(self, stream):
        self.seen: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def wait_for(self, text: str, timeout: float = 20.0) -> str:
        """The next line containing `text`; fails the test if none comes within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                pytest.fail(f"no line with {text!r} within {timeout}s; output so far:\n" + "\n".join(self.seen))
            if line is None:
                pytest.fail(f"the command ended without printing {text!r}; its output:\n" + "\n".join(self.seen))
            self.seen.append(line)
            if text in line:
                return line


@contextlib.contextmanager
def running(*args: str, env: dict[str, str]) -> Iterator[tuple[subprocess.Popen, Output]]:
    """Start a long-running command; interrupt it (and, failing that, kill it) on the way out."""
    process = subprocess.Popen(
        [sys.executable, "-m", "js_request_reply", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
    )
    try:
        yield process, Output(process.stdout)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(15)
        process.stdout.close()


def interrupt(process: subprocess.Popen) -> int:
    """Ctrl-C, and the exit code."""
    process.send_signal(signal.SIGINT)
    return process.wait(15)


async def _stream_count(url: str, stream: str, create: bool = False) -> int:
    nc = await jrr.connect(url)
    try:
        if create:
            await jrr.ensure_request_stream(nc, stream)
        return (await nc.jetstream().stream_info(stream)).state.messages
    finally:
        await nc.drain()


def stream_count(url: str, stream: str = "REQUESTS", create: bool = False) -> int:
    return asyncio.run(_stream_count(url, stream, create))


@pytest.fixture
def env(fresh_server) -> dict[str, str]:
    return cli_env(fresh_server.url)


@pytest.fixture
def menu_responder(env):
    """The menu's responder, running in a process of its own."""
    with running("responder", env=env) as (process, output):
        output.wait_for("serving the menu on REQUESTS")
        yield process, output


# -- request and responder ------------------------------------------------------------------------


def test_request_prints_the_reply_of_a_responder_process_which_stops_on_ctrl_c(env):
    with running("responder", env=env) as (responder, output):
        output.wait_for("serving the menu on REQUESTS")

        result = cli("request", "requests.order-sandwich", "--timeout", "10", env=env)

        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "🥪"
        assert output.wait_for("requests.order-sandwich") == "requests.order-sandwich -> replied"
        assert interrupt(responder) == 0
        output.wait_for("stopped.")


def test_responder_options_set_its_consumer(fresh_server, env):
    with running("responder", "--ack-wait", "7", "--max-deliver", "3", "--max-in-flight", "2", env=env) as (
        responder,
        output,
    ):
        output.wait_for("serving the menu on REQUESTS")
        result = cli("request", "requests.order-bagel", "--timeout", "10", env=env)
        config = asyncio.run(_consumer_config(fresh_server.url))
        assert interrupt(responder) == 0

    assert result.stdout.strip() == "🥯"
    assert (config.ack_wait, config.max_deliver) == (7.0, 3)


def test_responder_refuses_max_in_flight_under_one_in_one_line(env):
    result = cli("responder", "--max-in-flight", "0", env=env)

    assert result.returncode == 2
    assert result.stderr.strip() == "error: max_in_flight must be at least 1"


async def _consumer_config(url: str):
    nc = await jrr.connect(url)
    try:
        return (await nc.jetstream().consumer_info("REQUESTS", "responder")).config
    finally:
        await nc.drain()


def test_request_off_the_menu_is_a_rejection_on_stderr(env, menu_responder):
    result = cli("request", "requests.order-drink", "--timeout", "10", env=env)

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip() == "rejected: 404 no handler for subject 'requests.order-drink'"
    _, output = menu_responder
    assert "requests.order-drink -> rejected (404 no handler" in output.wait_for("requests.order-drink")


def test_request_with_no_responder_times_out_and_leaves_nothing_behind(fresh_server, env):
    assert stream_count(fresh_server.url, create=True) == 0

    result = cli("request", "requests.order-sandwich", "--timeout", "0.5", env=env)

    assert result.returncode == 1
    assert "timeout: no reply to 'requests.order-sandwich' within 0.5s" in result.stderr
    assert "the stored request (REQUESTS #1) was deleted" in result.stderr
    assert "Traceback" not in result.stderr
    assert stream_count(fresh_server.url) == 0


def test_request_with_no_stream_says_how_to_create_one(env):
    result = cli("request", "requests.order-sandwich", env=env)

    assert result.returncode == 2
    assert "error: no stream captures subject 'requests.order-sandwich'" in result.stderr
    assert "ensure_request_stream" in result.stderr
    assert "Traceback" not in result.stderr


def test_request_to_a_closed_port_names_the_url_without_a_traceback():
    url = f"nats://127.0.0.1:{free_port()}"

    result = cli("request", "requests.order-sandwich", env=cli_env(url))

    assert result.returncode == 2
    assert f"error: no NATS server answered at {url}" in result.stderr
    assert "python -m js_request_reply server" in result.stderr
    assert "Traceback" not in result.stderr


def test_request_with_a_malformed_url_says_so_without_a_traceback():
    result = cli("request", "requests.order-sandwich", "--url", "nats//nope", env=cli_env("nats://127.0.0.1:1"))

    assert result.returncode == 2
    assert "error: NATS_URL 'nats//nope' is not a NATS URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_wait_without_a_mailbox_is_refused():
    result = cli("request", "requests.order-sandwich", "--no-wait", env=cli_env("nats://127.0.0.1:1"))

    assert result.returncode == 2
    assert "--no-wait needs --mailbox NAME" in result.stderr


# -- mailbox --------------------------------------------------------------------------------------


def test_no_wait_then_collect_prints_the_reply_once(env):
    with running("responder", "--mailbox-stream", env=env) as (_, output):
        output.wait_for("serving the menu on REQUESTS and REPLIES")

        sent = cli("request", "requests.order-bagel", "--mailbox", "alice", "--no-wait", env=env)

        assert sent.returncode == 0, sent.stderr
        match = re.fullmatch(
            r"sent (\S+); collect the reply with: python -m js_request_reply collect --mailbox alice",
            sent.stdout.strip(),
        )
        assert match, sent.stdout
        request_id = match.group(1)
        assert output.wait_for("requests.order-bagel") == "requests.order-bagel -> replied"

    collected = cli("collect", "--mailbox", "alice", env=env)
    again = cli("collect", "--mailbox", "alice", "--timeout", "1", env=env)

    assert collected.returncode == 0, collected.stderr
    assert collected.stdout.splitlines() == [
        f"{request_id}  requests.order-bagel  🥯",
        "1 replies collected for mailbox 'alice'.",
    ]
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == ["0 replies collected for mailbox 'alice'."]


# -- server ---------------------------------------------------------------------------------------


async def _serves_jetstream(url: str) -> bool:
    nc = await jrr.connect(url)
    try:
        return (await nc.jetstream().account_info()) is not None
    finally:
        await nc.drain()


def test_server_prints_its_url_serves_jetstream_and_stops_on_ctrl_c(tmp_path):
    store = tmp_path / "store"
    with running("server", "--port", "0", "--store", str(store), env=dict(os.environ)) as (server, output):
        first = output.wait_for("nats-server with JetStream at")
        match = re.search(r"at (nats://127\.0\.0\.1:(\d+)) \(store: (.+)\)$", first)
        assert match, first
        url = match.group(1)
        assert int(match.group(2)) > 0
        assert match.group(3) == str(store)
        assert output.wait_for("export NATS_URL=").startswith(f"export NATS_URL={url}")
        output.wait_for("Ctrl-C to stop.")
        assert asyncio.run(_serves_jetstream(url))

        assert interrupt(server) == 0
        output.wait_for("stopped.")

    with pytest.raises(jrr.ServerUnreachable):
        asyncio.run(jrr.connect(url, first_connect_timeout=1))


async def _connects(url: str) -> bool:
    nc = await jrr.connect(url, first_connect_timeout=5)
    await nc.drain()
    return True


def test_server_with_users_prints_each_users_url_and_admits_only_them(tmp_path):
    command = ("server", "--port", "0", "--store", str(tmp_path / "store"), "--users", "alice", "bob")
    with running(*command, env=dict(os.environ)) as (server, output):
        first = output.wait_for("nats-server with JetStream at")
        url = re.search(r"at (nats://127\.0\.0\.1:\d+) ", first).group(1)
        exports = [output.wait_for("export NATS_URL=") for _ in range(4)]
        output.wait_for("Ctrl-C to stop.")
        urls = [re.search(r"export NATS_URL=(\S+)", line).group(1) for line in exports]
        users = [urlsplit(user_url).username for user_url in urls]

        assert users == ["admin", "responder", "alice", "bob"], exports
        for user_url in urls:
            parts = urlsplit(user_url)
            assert parts.password and f"nats://{parts.hostname}:{parts.port}" == url, user_url
            assert asyncio.run(_connects(user_url))
        assert asyncio.run(_serves_jetstream(urls[0]))
        with pytest.raises(PermissionDenied):
            asyncio.run(jrr.connect(url))

        assert interrupt(server) == 0
        output.wait_for("stopped.")


def test_server_with_a_role_as_a_user_is_refused():
    result = cli("server", "--port", "0", "--users", "alice", "admin", env=dict(os.environ))

    assert result.returncode == 2
    assert result.stderr.strip() == "error: admin is a role, not a mailbox owner: it is always created"


# -- access-config --------------------------------------------------------------------------------


def test_access_config_prints_a_config_nats_server_accepts(tmp_path):
    result = cli("access-config", "alice", "bob", "--password", "alice=alice-s3cret", env=dict(os.environ))
    config = tmp_path / "access.conf"
    config.write_text(result.stdout)

    checked = subprocess.run([find_binary(), "-t", "-c", str(config)], capture_output=True, text=True, timeout=30)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert re.findall(r'"user": "([^"]+)"', result.stdout) == ["admin", "responder", "alice", "bob"]
    assert '"password": "alice-s3cret"' in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--password", "alice=x y", "alice"], "error: the password of 'alice' may hold only letters, digits"),
        (["--password", "alice", "alice"], "error: --password 'alice' is not USER=SECRET"),
        (["--password", "alice=a", "--password", "alice=b", "alice"], "error: --password given twice for 'alice'"),
        (["--password", "carol=abc", "alice"], "error: passwords given for unknown users: carol"),
        (["alice.smith"], "error: user 'alice.smith' must be one subject token"),
        (["alice", "responder"], "error: responder is a role, not a mailbox owner"),
    ],
)
def test_access_config_refuses_bad_users_and_passwords_in_one_line(args, message):
    result = cli("access-config", *args, env=dict(os.environ))

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


# -- cluster --------------------------------------------------------------------------------------


async def _serves_replicated_jetstream(urls: list[str]) -> int:
    """The replica count of a stream created over a connection to `urls`: a list, as nats-py takes it."""
    nc = await nats.connect(urls)
    try:
        info = await nc.jetstream().add_stream(StreamConfig(name="CLUSTER_CHECK", subjects=["check.>"], num_replicas=3))
        return info.config.num_replicas
    finally:
        await nc.close()


def test_cluster_prints_a_nats_url_of_three_nodes_serves_r3_streams_and_stops_on_ctrl_c():
    with running("cluster", "--size", "3", env=dict(os.environ)) as (cluster, output):
        nodes = output.wait_for("JetStream cluster 'jrr' of 3 nodes")
        line = output.wait_for("NATS_URL=")
        output.wait_for("Ctrl-C to stop.")
        assert line.startswith("NATS_URL=")
        urls = line.removeprefix("NATS_URL=").split(",")
        assert len(set(urls)) == 3
        for name, url in zip(("n1", "n2", "n3"), urls, strict=True):
            match = re.fullmatch(r"nats://127\.0\.0\.1:(\d+)", url)
            assert match, url
            assert f"{name} at port {match.group(1)} " in nodes
        assert asyncio.run(_serves_replicated_jetstream(urls)) == 3

        assert interrupt(cluster) == 0
        output.wait_for("stopped.")

    for url in urls:
        with pytest.raises(jrr.ServerUnreachable):
            asyncio.run(jrr.connect(url, first_connect_timeout=1))


def test_cluster_of_one_is_refused_saying_what_to_use_instead():
    result = cli("cluster", "--size", "1", env=dict(os.environ))

    assert result.returncode == 2
    assert "error: a cluster needs at least 2 nodes, not 1" in result.stderr
    assert "`server` command" in result.stderr
    assert "Traceback" not in result.stderr


# -- lab ------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
NOTIFICATION_SETTINGS = "@jupyterlab/apputils-extension:notification"
LAB_START_TIMEOUT = 120.0  # seconds for JupyterLab to answer on a busy machine


def test_lab_environment_marks_the_labs_own_server_for_kernels_to_leave_to_terminals(tmp_path):
    base = {"PATH": "/usr/bin", "JUPYTER_CONFIG_PATH": "/etc/elsewhere"}

    env = lab_environment(base, "nats://127.0.0.1:4333", tmp_path)

    assert env["NATS_URL"] == env[LAB_URL_VARIABLE] == "nats://127.0.0.1:4333"
    assert env["PATH"].split(os.pathsep) == [str(Path(sys.executable).parent), "/usr/bin"]
    assert env["JUPYTER_CONFIG_PATH"].split(os.pathsep) == [str(tmp_path), "/etc/elsewhere"]
    assert base == {"PATH": "/usr/bin", "JUPYTER_CONFIG_PATH": "/etc/elsewhere"}, "the caller's is left alone"


def test_lab_environment_keeps_a_nats_url_the_learner_set_unmarked(tmp_path):
    env = lab_environment({"NATS_URL": "nats://learner01:pw@example.org:4222"}, None, tmp_path)

    assert env["NATS_URL"] == "nats://learner01:pw@example.org:4222"
    assert LAB_URL_VARIABLE not in env, "every kernel uses the learner's URL"
    assert env["JUPYTER_CONFIG_PATH"] == str(tmp_path)


def fetch_news(port: int, token: str, process: subprocess.Popen) -> str:
    """JupyterLab's fetchNews as its page will see it: the learner's value, else the served default."""
    served = lab_settings(port, token, process)
    return served["settings"].get("fetchNews", served["schema"]["properties"]["fetchNews"]["default"])


def lab_settings(port: int, token: str, process: subprocess.Popen) -> dict:
    """The notification settings JupyterLab serves, once it answers (at most LAB_START_TIMEOUT seconds)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/lab/api/settings/{NOTIFICATION_SETTINGS}",
        headers={"Authorization": f"token {token}"},
    )
    deadline = time.monotonic() + LAB_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the lab exited with {process.returncode} before it served its settings")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return json.load(response)
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)  # polling a web server that announces no readiness
    pytest.fail(f"JupyterLab did not serve its settings within {LAB_START_TIMEOUT}s")


def test_lab_opens_jupyterlab_with_news_off_unless_the_learner_turned_it_on_and_stops_on_ctrl_c(tmp_path):
    port, token = free_port(), "lab-test-token"
    user_settings = tmp_path / "user-settings"
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", LAB_URL_VARIABLE)}
    env |= {
        "JUPYTERLAB_SETTINGS_DIR": str(user_settings),  # the learner's settings: none yet
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),  # nor any configuration of their own
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
    }
    command = [
        *(sys.executable, "-m", "js_request_reply", "lab", "--no-browser"),
        *(f"--port={port}", f"--IdentityProvider.token={token}", "--ServerApp.port_retries=0"),
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True
    )
    try:
        output = Output(process.stdout)
        first = output.wait_for("NATS_URL=")
        match = re.fullmatch(r"NATS_URL=(nats://127\.0\.0\.1:\d+) \(the lab's server, for its terminals; .+\)", first)
        assert match, first
        lab_url = match.group(1)

        assert fetch_news(port, token, process) == "false", "no question about news over the first notebook"

        chosen = user_settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        chosen.parent.mkdir(parents=True)
        chosen.write_text(json.dumps({"fetchNews": "true"}))
        assert fetch_news(port, token, process) == "true", "the learner's own choice wins"

        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the lab and the JupyterLab it started
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(15)
        process.stdout.close()

    with pytest.raises(jrr.ServerUnreachable):
        asyncio.run(jrr.connect(lab_url, first_connect_timeout=1))
