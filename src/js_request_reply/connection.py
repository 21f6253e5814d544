"""Connecting: fail fast on the first connect, reconnect on their own afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from asyncio import FIRST_COMPLETED
from typing import Any
from urllib.parse import urlsplit

import nats
from nats.aio.client import Client

from .errors import ServerUnreachable
from .server import server_url

log = logging.getLogger(__name__)

SCHEMES = ("nats", "tls", "ws", "wss")
START_HINT = "start one with `make lab`, `python -m js_request_reply server`, or `docker compose up -d`"


def server_list(url: str | list[str] | tuple[str, ...]) -> list[str]:
    """The servers in `url`: a comma-separated list (as NATS_URL may hold) or a Python list of URLs."""
    parts = url.split(",") if isinstance(url, str) else list(url)
    return [part.strip() for part in parts if part and part.strip()]


def check_url(url: str | list[str] | tuple[str, ...]) -> str:
    """Return `url` (a list joined with commas) if every server in it looks like a NATS URL, else raise ServerUnreachable."""
    example = "expected something like nats://127.0.0.1:4222"
    if not isinstance(url, str):
        url = ",".join(server_list(url))
    if not server_list(url):
        raise ServerUnreachable(f"NATS_URL {url!r} names no server; {example} (several: separated by commas)")
    for part in server_list(url):
        # nats-py reads a bare host:port as nats://host:port, and so does the nats CLI.
        parts = urlsplit(part if "//" in part else f"nats://{part}")
        try:
            parts.port  # noqa: B018 - parsing the port is the check
        except ValueError:
            raise ServerUnreachable(
                f"NATS_URL {url!r} has a port that is not a number from 0 to 65535; {example}"
            ) from None
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise ServerUnreachable(f"NATS_URL {url!r} is not a NATS URL; {example}")
    return url


async def _log_error(exc: Exception) -> None:
    # nats-py's default error callback logs at ERROR level, which lands in a random notebook cell.
    log.debug("nats connection error: %s", exc)


async def connect(url: str | list[str] | None = None, *, first_connect_timeout: float = 5.0, **options: Any) -> Client:
    """A connected nats-py client for `url or server_url()`: one server, or a cluster's comma-separated list.

    A list is passed to nats-py as a list of servers: the client connects to any of them, and
    moves to another when its server goes away. The first connect fails at once when every
    server refuses the connection, and gives up after `first_connect_timeout` seconds otherwise,
    with a ServerUnreachable that names every URL and the reason. Once connected, the client
    reconnects on its own, without limit, when its server restarts or dies. Other keyword
    options go to `nats.connect`.
    """
    url = check_url(url or server_url())
    servers = server_list(url)
    errors: list[Exception] = []
    refusals = 0
    refused = asyncio.Event()
    user_error_cb = options.pop("error_cb", _log_error)

    async def error_cb(exc: Exception) -> None:
        nonlocal refusals
        errors.append(exc)
        if isinstance(exc, ConnectionRefusedError) and not nc.is_connected:
            refusals += 1  # nats-py tries the servers in turn, so this many refusals means each refused
            if refusals >= len(servers):
                refused.set()  # nothing listens on any port: retrying for seconds would only hide it
        await user_error_cb(exc)

    options.setdefault("connect_timeout", 2)
    options.setdefault("reconnect_time_wait", 0.25)
    options.setdefault("max_reconnect_attempts", -1)
    nc = Client()
    target = servers if len(servers) > 1 else url  # nats-py reads a comma-joined string as one URL
    connecting = asyncio.ensure_future(nc.connect(target, error_cb=error_cb, **options))
    refusal = asyncio.ensure_future(refused.wait())
    try:
        await asyncio.wait({connecting, refusal}, timeout=first_connect_timeout, return_when=FIRST_COMPLETED)
    finally:
        refusal.cancel()
    if connecting.done() and not connecting.cancelled() and connecting.exception() is None:
        return nc
    connecting.cancel()
    failure = connecting.exception() if connecting.done() and not connecting.cancelled() else None
    await _abandon(nc)
    last = failure or (errors[-1] if errors else None)
    reason = f"{type(last).__name__}: {last}".strip().rstrip(":") if last else "no answer"
    when = "" if refused.is_set() else f" within {first_connect_timeout:g}s"
    where = url if len(servers) == 1 else "any of " + ", ".join(servers)
    raise ServerUnreachable(f"no NATS server answered at {where}{when} ({reason}); {START_HINT}")


async def _abandon(nc: Client) -> None:
    """Close a client whose first connect failed, without waiting on a server that is not there."""
    with contextlib.suppress(TimeoutError, nats.errors.Error, OSError, AttributeError):
        await asyncio.wait_for(nc.close(), 1)
