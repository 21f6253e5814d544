"""Who may do what: per-user permissions that keep each mailbox readable by its owner alone.

Three roles. Each named user owns the mailbox of the same name: it may send requests and read
that mailbox and its ledger entries, nothing else. The `responder` user serves the request stream
and stores replies, and reads no mailbox. The `admin` user manages streams. `access_config()`
writes these as a nats-server `authorization` block; `EmbeddedServer(users=[...])` starts with it.
docs/security.md explains every subject.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from . import protocol as p

ADMIN = "admin"
RESPONDER = "responder"
ROLES = (ADMIN, RESPONDER)
_SAFE_PASSWORD = re.compile(r"[A-Za-z0-9._~-]+")  # nats-py does not unquote a URL's password


@dataclass(frozen=True)
class Permissions:
    """The subjects one user may publish to and subscribe to (NATS wildcards allowed)."""

    user: str
    role: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def inbox_prefix(user: str) -> str:
    """The inbox prefix of `user`'s connections: `_INBOX.<user>`, so a user reads only its own inboxes."""
    return f"_INBOX.{user}"


def ledger_consumer(mailbox: str) -> str:
    """The name of the short-lived consumer that lists a mailbox's ledger entries."""
    return f"ledger-{mailbox}"


def mailbox_consumer(mailbox: str) -> str:
    """The name of a mailbox's durable consumer on the reply stream."""
    return f"mailbox-{mailbox}"


def requester_permissions(
    user: str,
    *,
    request_subjects: tuple[str, ...] = p.DEFAULT_REQUEST_SUBJECTS,
    reply_stream: str = p.DEFAULT_REPLY_STREAM,
    reply_prefix: str = p.DEFAULT_REPLY_PREFIX,
) -> Permissions:
    """What the owner of mailbox `user` needs: send requests, read its own mailbox and ledger entries."""
    check_user(user)
    mailbox, ledger = mailbox_consumer(user), f"KV_{p.ledger_bucket(reply_stream)}"
    keys = f"$KV.{p.ledger_bucket(reply_stream)}.{user}"
    publish = (
        *request_subjects,
        "$JS.API.STREAM.NAMES",  # after a 503: does a stream capture the subject? (names only)
        f"$JS.API.CONSUMER.INFO.{reply_stream}.{mailbox}",
        f"$JS.API.CONSUMER.CREATE.{reply_stream}.{mailbox}.{reply_prefix}.{user}.>",
        f"$JS.API.CONSUMER.MSG.NEXT.{reply_stream}.{mailbox}",
        f"$JS.ACK.{reply_stream}.{mailbox}.>",
        f"{keys}.>",
        f"$JS.API.DIRECT.GET.{ledger}.{keys}.>",
        f"$JS.API.CONSUMER.CREATE.{ledger}.{ledger_consumer(user)}.{keys}.*",
        f"$JS.API.CONSUMER.MSG.NEXT.{ledger}.{ledger_consumer(user)}",
        f"$JS.API.CONSUMER.DELETE.{ledger}.{ledger_consumer(user)}",
    )
    return Permissions(user, "requester", publish, (f"{inbox_prefix(user)}.>",))


def responder_permissions(
    *,
    request_stream: str = p.DEFAULT_REQUEST_STREAM,
    reply_stream: str = p.DEFAULT_REPLY_STREAM,
    reply_prefix: str = p.DEFAULT_REPLY_PREFIX,
) -> Permissions:
    """What a Responder needs: serve `request_stream`, store replies, check who owns a mailbox."""
    api, gave_up = "$JS.API", p.gave_up_stream(request_stream)
    publish = (
        f"{api}.CONSUMER.CREATE.{request_stream}.*",
        f"{api}.CONSUMER.CREATE.{request_stream}.*.>",  # a durable that was made with a filter keeps it
        f"{api}.CONSUMER.INFO.{request_stream}.*",
        f"{api}.CONSUMER.MSG.NEXT.{request_stream}.*",
        f"{api}.CONSUMER.RESET.{request_stream}.*",  # in a cluster, after a failover
        f"$JS.ACK.{request_stream}.>",
        f"{api}.STREAM.MSG.GET.{request_stream}",  # a request the server gave up on, to answer it
        f"{api}.STREAM.MSG.DELETE.{request_stream}",  # ... and then remove it
        f"{api}.CONSUMER.CREATE.{gave_up}.*.{p.max_deliveries_subject(request_stream)}",  # kept advisories of it
        f"{api}.CONSUMER.MSG.NEXT.{gave_up}.*",
        f"$JS.ACK.{gave_up}.>",
        f"{api}.STREAM.NAMES",
        f"{api}.DIRECT.GET.KV_{p.ledger_bucket(reply_stream)}.>",  # did this mailbox send this request?
        f"{api}.STREAM.MSG.GET.KV_{p.ledger_bucket(reply_stream)}",  # ... asked of the leader, if a copy lags
        f"{reply_prefix}.>",  # stored replies
        "_INBOX.>",  # direct replies, to any requester's inbox
    )
    advisories = "$JS.EVENT.ADVISORY.CONSUMER"
    subscribe = (
        f"{inbox_prefix(RESPONDER)}.>",
        f"{advisories}.MAX_DELIVERIES.{request_stream}.*",
        f"{advisories}.LEADER_ELECTED.{request_stream}.*",
        "$SRV.>",  # discovery and stats requests (ADR-32), answered to the asker's inbox, under _INBOX.>
    )
    return Permissions(RESPONDER, RESPONDER, publish, subscribe)


def admin_permissions() -> Permissions:
    """The admin creates and deletes streams: everything is allowed."""
    return Permissions(ADMIN, ADMIN, (">",), (">",))


def permissions_for(
    user: str,
    *,
    request_stream: str = p.DEFAULT_REQUEST_STREAM,
    request_subjects: tuple[str, ...] = p.DEFAULT_REQUEST_SUBJECTS,
    reply_stream: str = p.DEFAULT_REPLY_STREAM,
    reply_prefix: str = p.DEFAULT_REPLY_PREFIX,
) -> Permissions:
    """The permissions of `user`: admin, responder, or the owner of the mailbox `user`."""
    if user == ADMIN:
        return admin_permissions()
    if user == RESPONDER:
        return responder_permissions(
            request_stream=request_stream, reply_stream=reply_stream, reply_prefix=reply_prefix
        )
    return requester_permissions(
        user, request_subjects=tuple(request_subjects), reply_stream=reply_stream, reply_prefix=reply_prefix
    )


def check_user(user: str) -> str:
    """Return `user` if it can own a mailbox: one subject token, not a reserved role name."""
    if not isinstance(user, str) or not p.is_valid_token(user):
        raise ValueError(
            f"user {user!r} must be one subject token of letters, digits, '-' or '_', since it names a mailbox"
        )
    return user


def check_users(users: list[str] | tuple[str, ...]) -> list[str]:
    """The mailbox owners in `users`, checked: valid, distinct, and not the role names admin or responder."""
    if isinstance(users, str):
        raise TypeError(f"users must be a list of names, like ['alice', 'bob'], not the string {users!r}")
    users = [check_user(user) for user in list(users)]
    reserved = sorted(set(users) & set(ROLES))
    if reserved:
        raise ValueError(f"{', '.join(reserved)} is a role, not a mailbox owner: it is always created")
    duplicated = sorted({user for user in users if users.count(user) > 1})
    if duplicated:
        raise ValueError(f"users named more than once: {', '.join(duplicated)}")
    return users


def passwords_for(users: list[str], given: dict[str, str] | None = None) -> dict[str, str]:
    """A password for each of `users` and both roles: the given ones, checked, else generated."""
    given = dict(given or {})
    unknown = sorted(set(given) - {*users, *ROLES})
    if unknown:
        raise ValueError(f"passwords given for unknown users: {', '.join(unknown)}")
    for user, password in given.items():
        if not isinstance(password, str) or not _SAFE_PASSWORD.fullmatch(password):
            raise ValueError(
                f"the password of {user!r} may hold only letters, digits and . _ ~ - "
                "(it travels in a URL, nats://user:password@host)"
            )
    return {user: given.get(user) or secrets.token_urlsafe(12) for user in (*ROLES, *users)}


def all_permissions(users: list[str] | tuple[str, ...], **names: Any) -> list[Permissions]:
    """The permissions of admin, responder, and every mailbox owner in `users`, in that order."""
    return [permissions_for(user, **names) for user in (*ROLES, *check_users(users))]


def access_config(users: list[str] | tuple[str, ...], passwords: dict[str, str] | None = None, **names: Any) -> str:
    """The nats-server `authorization` block for admin, responder and the mailbox owners `users`.

    Include it in any server's configuration (or pass it to `nats-server -c`, with `-js`) for the
    same isolation `EmbeddedServer(users=...)` gives. Passwords are generated unless given.
    `names` may rename the streams and subjects: request_stream, request_subjects, reply_stream,
    reply_prefix.
    """
    users = check_users(users)
    secrets_ = passwords_for(users, passwords)
    lines = ["authorization {", "  users = ["]
    for perms in all_permissions(users, **names):
        entry = {
            "user": perms.user,
            "password": secrets_[perms.user],
            "permissions": {"publish": {"allow": list(perms.publish)}, "subscribe": {"allow": list(perms.subscribe)}},
        }
        lines.append(f"    # {_role_comment(perms)}")
        lines += [f"    {line}" for line in json.dumps(entry, indent=2).splitlines()]
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def _role_comment(perms: Permissions) -> str:
    if perms.role == ADMIN:
        return "admin: creates and deletes streams"
    if perms.role == RESPONDER:
        return "responder: serves the request stream and stores replies; reads no mailbox"
    return f"{perms.user}: sends requests; reads mailbox {perms.user!r} and nothing else"
