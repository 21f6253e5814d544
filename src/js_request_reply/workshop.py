"""A shared server for a class: one nats-server, one JetStream account per learner.

An account is a namespace of its own: its subjects, streams and consumers are invisible to every
other account, so each learner runs every notebook unchanged, REQUESTS and all, with NATS_URL set
to the URL of their account. `python -m js_request_reply workshop --learners 12` starts the server
and prints each learner's URL; `workshop_config()` is its configuration, for any nats-server.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections.abc import Mapping, Sequence

from . import protocol as p
from .server import WILDCARD_HOSTS, EmbeddedServer

SYSTEM_ACCOUNT = "SYS"  # the server's own account, for its events; nobody logs in to it
LEARNER_PREFIX = "learner"


def learner_names(learners: int | None = None, users: Sequence[str] | None = None) -> list[str]:
    """The learners' names: `users` checked, else learner01..learnerNN (zero-padded to at least two digits)."""
    if users is None:
        if learners is None:
            raise ValueError("say how many learners: --learners N, or name them: --users alice bob ...")
        if learners < 1:
            raise ValueError(f"a workshop needs at least 1 learner, not {learners}")
        width = max(2, len(str(learners)))
        return [f"{LEARNER_PREFIX}{number:0{width}d}" for number in range(1, learners + 1)]
    if isinstance(users, str):
        raise TypeError(f"users must be a list of names, like ['alice', 'bob'], not the string {users!r}")
    names = list(users)
    if not names:
        raise ValueError("--users needs at least one name")
    if learners is not None and learners != len(names):
        raise ValueError(f"--learners {learners} but {len(names)} names after --users; give one or the other")
    for name in names:
        if not isinstance(name, str) or not p.is_valid_token(name):
            raise ValueError(f"learner name {name!r} must be letters, digits, '-' or '_' (it goes in a URL)")
        if name.upper() == SYSTEM_ACCOUNT:
            raise ValueError(f"{name!r} is the name of the server's system account; choose another name")
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"learners named more than once: {', '.join(duplicated)}")
    return names


def generate_passwords(names: Sequence[str]) -> dict[str, str]:
    """A fresh URL-safe password for each learner, by name."""
    return {name: secrets.token_urlsafe(12) for name in names}


def workshop_config(learners: Sequence[str], passwords: Mapping[str, str]) -> str:
    """The nats-server `accounts` block: one JetStream account and user per learner, plus the system account.

    Each learner's account has the learner's name, and one user of the same name with its password
    from `passwords`. Start the server with JetStream enabled (`-js`), as EmbeddedServer does.
    """
    names = learner_names(users=learners)
    missing = [name for name in names if not passwords.get(name)]
    if missing:
        raise ValueError(f"no password for {', '.join(missing)}")
    lines = [
        "# One account per learner: each sees only its own subjects, streams and consumers.",
        f"system_account: {json.dumps(SYSTEM_ACCOUNT)}",
        "accounts {",
        f"  {json.dumps(SYSTEM_ACCOUNT)}: {{}}",
    ]
    for name in names:
        user = json.dumps({"user": name, "password": passwords[name]})
        lines += [f"  {json.dumps(name)}: {{", "    jetstream: enabled", f"    users: [{user}]", "  }"]
    lines += ["}", ""]
    return "\n".join(lines)


def learner_urls(passwords: Mapping[str, str], host: str, port: int) -> dict[str, str]:
    """Each learner's NATS_URL, `nats://name:password@host:port`, by name, in the order of `passwords`."""
    return {name: f"nats://{name}:{password}@{host}:{port}" for name, password in passwords.items()}


def url_host(listen_host: str) -> str:
    """The host to put in learners' URLs: `listen_host`, or this machine's address when it listens everywhere."""
    return machine_address() if listen_host in WILDCARD_HOSTS else listen_host


def machine_address() -> str:
    """This machine's IPv4 address on its default route, which others on its network can reach.

    Connecting a UDP socket only chooses a route; nothing is sent. Without a route, the address
    the host name resolves to, else loopback.
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # a documentation address (TEST-NET-1): never reached
            address = probe.getsockname()[0]
        if address and not address.startswith("0."):
            return address
    except OSError:
        pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def workshop_server(
    passwords: Mapping[str, str],
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    store_dir: str | os.PathLike | None = None,
) -> EmbeddedServer:
    """An EmbeddedServer (not yet started) with one account per learner in `passwords`."""
    return EmbeddedServer(
        port=port,
        host=host,
        store_dir=store_dir,
        config_text=workshop_config(list(passwords), passwords),
    )
