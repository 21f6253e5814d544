"""One real nats-server for the whole run, tests and notebooks alike: the server at NATS_URL, or an embedded one.

It is set up in pytest_configure, before any notebook kernel starts, so nbval's kernels inherit NATS_URL.
"""

from __future__ import annotations

import os

import pytest

import js_request_reply as jrr


def pytest_configure(config: pytest.Config) -> None:
    os.environ["NATS_URL"] = jrr.server_url()
