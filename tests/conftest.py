"""Fixtures on the run's server (set up in the root conftest.py), and servers of a test's own."""

from __future__ import annotations

import os

import pytest
from support import make_mailboxes, make_queue

import js_request_reply as jrr


@pytest.fixture(scope="session")
def nats_url() -> str:
    """The URL of the session's server."""
    return os.environ["NATS_URL"]


@pytest.fixture
async def nc(nats_url):
    """A connection to the session's server, drained after the test."""
    client = await jrr.connect(nats_url)
    yield client
    await client.drain()


@pytest.fixture
async def js(nc):
    return nc.jetstream()


@pytest.fixture
def fresh_server(tmp_path):
    """A server of the test's own, for tests that restart it or need it empty."""
    with jrr.EmbeddedServer(store_dir=tmp_path / "store") as server:
        yield server


@pytest.fixture
async def queue(js):
    """A request stream of the test's own."""
    queue = await make_queue(js)
    yield queue
    await jrr.delete_streams(js, queue.stream)


@pytest.fixture
async def mailboxes(js):
    """A reply stream (and ledger) of the test's own, with its own subject prefix."""
    boxes = await make_mailboxes(js)
    yield boxes
    await jrr.delete_streams(js, boxes.stream)


@pytest.fixture
async def other_nc(nats_url):
    """A second connection, as a second responder process would have."""
    client = await jrr.connect(nats_url)
    yield client
    await client.drain()
