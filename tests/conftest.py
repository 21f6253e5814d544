"""Fixtures on the run's server (set up in the root conftest.py), and servers of a test's own."""

from __future__ import annotations

import os

import pytest

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
