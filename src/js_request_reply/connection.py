"""Connecting: fail fast on the first connect, reconnect on their own afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from asyncio import FIRST_COMPLETED
from typing import Any
from urllib.parse import unquote, urlsplit

import nats
from nats.aio.client import Client

from .access import inbox_prefix
from .denials import denials_for
from .errors import PermissionDenied, ServerUnreachable
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
        raise ServerUnreachable(f"NATS_URL {redacted(url)!r} names no server; {example} (several: separated by commas)")
    for part in server_list(url):
        # nats-py reads a bare host:port as nats://host:port, and so does the nats CLI.
        parts = urlsplit(part if "//" in part else f"nats://{part}")
        try:
            parts.port  # noqa: B018 - parsing the port is the check
        except ValueError:
            raise ServerUnreachable(
                f"NATS_URL {redacted(url)!r} has a port that is not a number from 0 to 65535; {example}"
            ) from None
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise ServerUnreachable(f"NATS_URL {redacted(url)!r} is not a NATS URL; {example}")
    return url


def redacted(url: str) -> str:
    """`url` with any password replaced by ***, for messages a notebook or a log may show."""
    return ",".join(_PASSWORD.sub(r"\1***@", part) for part in url.split(","))


_PASSWORD = re.compile(r"(//[^:/@]+:)[^@/]*@")


def user_in(url: str | list[str] | tuple[str, ...], options: dict[str, Any]) -> str | None:
    """The user a connection will authenticate as: `user=`, else the first URL's user name."""
    if options.get("user"):
        return str(options["user"])
    for part in server_list(url):
        name = urlsplit(part if "//" in part else f"nats://{part}").username
        if name:
            return unquote(name)
    return None


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

    A connection made as a user (in the URL, `nats://alice:secret@host`, or `user=`) gets the
    inbox prefix `_INBOX.<user>`, the one inbox a user of `access_config()` may read. A wrong user
    or password raises PermissionDenied at once. A permission the server later denies is raised,
    at once, by the package call that was waiting on it (see `denials`).
    """
    url = check_url(url or server_url())
    servers = server_list(url)
    errors: list[Exception] = []
    refusals = 0
    refused = asyncio.Event()
    user_error_cb = options.pop("error_cb", _log_error)
    user = user_in(url, options)
    if user:
        options.setdefault("inbox_prefix", inbox_prefix(user))

    async def error_cb(exc: Exception) -> None:
        nonlocal refusals
        errors.append(exc)
        if _is_refusal(exc) and not nc.is_connected:
            refused.set()  # a wrong user or password: retrying cannot fix it
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
        denials_for(nc)
        return nc
    connecting.cancel()
    failure = connecting.exception() if connecting.done() and not connecting.cancelled() else None
    await _abandon(nc)
    last = failure or (errors[-1] if errors else None)
    where = redacted(url) if len(servers) == 1 else "any of " + ", ".join(map(redacted, servers))
    if any(_is_refusal(error) for error in errors):
        who = f"user {user!r}" if user else "a connection without a user"
        refusal = f"permission denied: the server at {where} refused {who}; check the user name and password"
        raise PermissionDenied("", user, "connect", message=refusal)
    reason = f"{type(last).__name__}: {last}".strip().rstrip(":") if last else "no answer"
    when = "" if refused.is_set() else f" within {first_connect_timeout:g}s"
    raise ServerUnreachable(f"no NATS server answered at {where}{when} ({reason}); {START_HINT}")


def _is_refusal(error: BaseException) -> bool:
    """True for the server's answer to a wrong user or password (nats-py reports it as a plain Error)."""
    return isinstance(error, nats.errors.AuthorizationError) or "authorization violation" in str(error).lower()


async def _abandon(nc: Client) -> None:
    """Close a client whose first connect failed, without waiting on a server that is not there."""
    with contextlib.suppress(TimeoutError, nats.errors.Error, OSError, AttributeError):
        await asyncio.wait_for(nc.close(), 1)
