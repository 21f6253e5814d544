"""One real nats-server for the whole run: the embedded one, or the server at NATS_URL.

It is started in pytest_configure, before any notebook kernel, so nbval's kernels inherit NATS_URL too.
"""

from __future__ import annotations

import os

import pytest

import js_request_reply as jrr


def pytest_configure(config: pytest.Config) -> None:
    os.environ["NATS_URL"] = jrr.server_url()


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
