"""Creating the streams idempotently: REQUESTS (the work queue), REPLIES (the mailboxes) and the mailbox ledger."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, RetentionPolicy, StorageType, StreamConfig, StreamInfo
from nats.js.errors import APIError, NotFoundError

from .denials import denied_at_once
from .errors import NotClustered, StreamConflict
from .protocol import (
    DEFAULT_REPLY_STREAM,
    DEFAULT_REPLY_SUBJECTS,
    DEFAULT_REQUEST_STREAM,
    DEFAULT_REQUEST_SUBJECTS,
    JS_ERR_REPLICAS_NOT_CLUSTERED,
    gave_up_stream,
    ledger_bucket,
    max_deliveries_subject,
)

# Fields the server refuses to change on an existing stream (deny_delete cannot be turned off).
IMMUTABLE = ("retention", "storage", "deny_delete")
# Flags the server may leave out of a stream's config when false.
FLAGS = ("allow_msg_ttl", "deny_delete")
DEFAULT_REPLY_MAX_AGE = 24 * 3600.0  # a day: long enough for a requester to come back after lunch
GAVE_UP_MAX_AGE = 7 * 24 * 3600.0  # a week: advisories kept for a responder to come back to
MAX_REPLICAS = 5  # the most JetStream allows


def jetstream(js_or_nc: JetStreamContext | Client) -> JetStreamContext:
    """Accept a JetStream context or a plain connection."""
    return js_or_nc.jetstream() if isinstance(js_or_nc, Client) else js_or_nc


async def ensure_request_stream(
    js: JetStreamContext | Client,
    name: str = DEFAULT_REQUEST_STREAM,
    subjects: tuple[str, ...] | list[str] = DEFAULT_REQUEST_SUBJECTS,
    *,
    replicas: int = 1,
    **config: Any,
) -> StreamInfo:
    """Create or update the work-queue stream that stores requests, with per-message TTL allowed.

    Safe to call again: an equal stream is left alone, a compatible one is updated, and one whose
    retention or storage differs, or that denies deleting messages, raises StreamConflict saying
    what differs. (A requester deletes its stored request when it times out, and a responder one
    that ran out of deliveries; a stream with deny_delete would keep them for responders to work on.)
    `replicas=3` keeps a copy on three servers of a cluster, so losing one loses nothing; on a
    single server it raises NotClustered.

    The stream `<name>-gave-up` is created beside it, with the same replicas: it keeps the
    server's max-deliveries advisories for `name` until a responder answers the requests they name,
    so a request given up on while no responder was running is answered when one starts.
    """
    _set_replicas(config, replicas)
    config.setdefault("storage", StorageType.FILE)
    config.setdefault("deny_delete", False)
    wanted = dict(subjects=list(subjects), retention=RetentionPolicy.WORK_QUEUE, allow_msg_ttl=True, **config)
    info = await _ensure_stream(jetstream(js), name, wanted, purpose="requests")
    gave_up = dict(
        subjects=[max_deliveries_subject(name)],
        retention=RetentionPolicy.WORK_QUEUE,
        max_age=GAVE_UP_MAX_AGE,
        storage=config["storage"],
        num_replicas=config["num_replicas"],
    )
    await _ensure_stream(jetstream(js), gave_up_stream(name), gave_up, purpose="the requests given up on")
    return info


async def ensure_reply_stream(
    js: JetStreamContext | Client,
    name: str = DEFAULT_REPLY_STREAM,
    subjects: tuple[str, ...] | list[str] = DEFAULT_REPLY_SUBJECTS,
    max_age: float = DEFAULT_REPLY_MAX_AGE,
    *,
    replicas: int = 1,
    **config: Any,
) -> StreamInfo:
    """Create or update the mailbox stream: replies wait here, `max_age` seconds at most, until collected.

    It is a work-queue stream too, so a collected reply leaves it and is handed over once. The
    mailbox ledger (a key-value bucket of what each mailbox sent) is created beside it, with the
    same number of replicas: a mailbox whose ledger lived on one server would break with it.
    """
    _set_replicas(config, replicas)
    config.setdefault("storage", StorageType.FILE)
    wanted = dict(subjects=list(subjects), retention=RetentionPolicy.WORK_QUEUE, max_age=max_age, **config)
    info = await _ensure_stream(jetstream(js), name, wanted, purpose="replies")
    await _ensure_ledger(jetstream(js), ledger_bucket(name), max_age, config["num_replicas"])
    return info


def _set_replicas(config: dict[str, Any], replicas: int) -> None:
    """Put `replicas` into a stream config as num_replicas (also accepted as such), checking it."""
    wanted = config.setdefault("num_replicas", replicas)
    if replicas != 1 and wanted != replicas:
        raise ValueError(f"replicas={replicas} and num_replicas={wanted} disagree; pass one of them")
    if not isinstance(wanted, int) or not 1 <= wanted <= MAX_REPLICAS:
        raise ValueError(f"replicas must be a whole number from 1 to {MAX_REPLICAS}, not {wanted!r}")


async def _ensure_ledger(js: JetStreamContext, bucket: str, max_age: float, replicas: int) -> None:
    """Create or update the mailbox ledger: direct gets on, rollups off (see `_LEDGER_SETTINGS`)."""
    try:
        info = await denied_at_once(js._nc, js.stream_info(f"KV_{bucket}"), f"$JS.API.STREAM.INFO.KV_{bucket}")
    except NotFoundError:
        kv = KeyValueConfig(bucket=bucket, ttl=max_age, storage=StorageType.FILE, replicas=replicas, direct=True)
        await _call(js.create_key_value, kv, bucket, "the mailbox ledger")
        info = await js.stream_info(f"KV_{bucket}")
    wanted = {**_LEDGER_SETTINGS, "num_replicas": replicas}
    if any(getattr(info.config, name) != value for name, value in wanted.items()):
        updated = dataclasses.replace(info.config, **wanted)
        await _call(js.update_stream, updated, bucket, "the mailbox ledger")


# A mailbox's owner reads its ledger entries with direct gets, since the alternative (STREAM.INFO)
# would show every mailbox's keys. A rollup header ("Nats-Rollup: all") on a put to one's own key
# would purge every mailbox's entries, so the ledger refuses rollups: entries are deleted, not purged.
# Their delete markers carry a TTL instead, so settled entries vanish (see Ledger.forget()).
_LEDGER_SETTINGS = {"allow_direct": True, "allow_rollup_hdrs": False, "allow_msg_ttl": True}


async def wait_for_messages(js: JetStreamContext | Client, stream: str, count: int, *, timeout: float = 5.0) -> int:
    """Wait until `stream` holds `count` messages, at most `timeout` seconds; returns how many it holds then.

    The server removes acked, terminated and expired messages a moment after the fact and announces
    no change of a stream's count, so this polls (every 20 ms) within the bound.
    """
    js = jetstream(js)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    held = (await js.stream_info(stream)).state.messages
    while held != count and loop.time() < deadline:
        await asyncio.sleep(0.02)
        held = (await js.stream_info(stream)).state.messages
    return held


async def delete_streams(js: JetStreamContext | Client, *names: str) -> list[str]:
    """Delete the named streams that exist (a reply stream's ledger and a request stream's
    gave-up stream go with it); returns those deleted.

    Notebooks call it to start from a clean slate and in their cleanup cell.
    """
    js = jetstream(js)
    deleted = []
    for name in names:
        for stream in (name, f"KV_{ledger_bucket(name)}", gave_up_stream(name)):
            try:
                await js.delete_stream(stream)
            except NotFoundError:
                continue
            if stream == name:
                deleted.append(name)
    return deleted


async def _ensure_stream(js: JetStreamContext, name: str, wanted: dict[str, Any], purpose: str) -> StreamInfo:
    try:
        # A user who may not manage streams (see access.py) hears so at once, not after a timeout.
        info = await denied_at_once(js._nc, js.stream_info(name), f"$JS.API.STREAM.INFO.{name}")
    except NotFoundError:
        return await _call(js.add_stream, StreamConfig(name=name, **wanted), name, purpose)
    differences = _differences(info.config, wanted)
    if not differences:
        return info
    fixed = [(field, have, want) for field, have, want in differences if field in IMMUTABLE]
    if fixed:
        described = ", ".join(f"{field} is {_show(have)}, not {_show(want)}" for field, have, want in fixed)
        raise StreamConflict(
            f"stream {name!r} already exists and cannot hold {purpose}: its {described}. "
            f"Delete it (await js.delete_stream({name!r})) or pass another name."
        )
    updated = dataclasses.replace(info.config, **{field: want for field, _, want in differences})
    if updated.max_age and (updated.duplicate_window or 0) > updated.max_age:
        # The server refuses a duplicate window longer than max_age; shorten it with max_age.
        updated = dataclasses.replace(updated, duplicate_window=updated.max_age)
    return await _call(js.update_stream, updated, name, purpose)


async def _call(method, config, name: str, purpose: str):
    try:
        return await method(config)
    except APIError as exc:
        if exc.err_code == JS_ERR_REPLICAS_NOT_CLUSTERED:
            replicas = getattr(config, "num_replicas", None) or getattr(config, "replicas", None)
            raise NotClustered(
                f"stream {name!r} for {purpose} cannot have {replicas} replicas: the server is not clustered "
                f"({exc.description}). Replicas need a JetStream cluster of at least that many servers: "
                "start one with EmbeddedCluster() or `python -m js_request_reply cluster`, or pass replicas=1."
            ) from None
        raise StreamConflict(
            f"stream {name!r} for {purpose} could not be created or updated: {exc.description} (error {exc.err_code})"
        ) from None


def _differences(have: StreamConfig, wanted: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    out = []
    for field, want in wanted.items():
        current = getattr(have, field, None)
        if isinstance(want, list | tuple) and current is not None:
            same = sorted(current) == sorted(want)
        else:
            same = current == want or (field in FLAGS and bool(current) == bool(want))
        if not same:
            out.append((field, current, want))
    return out


def _show(value: Any) -> str:
    return repr(getattr(value, "value", value))
