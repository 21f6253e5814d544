"""Creating the request and reply streams: the right kind of stream, idempotently, or a clear conflict."""

from __future__ import annotations

import uuid

import pytest
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

import js_request_reply as jrr


@pytest.fixture
async def names(js):
    """A unique stream name and subject prefix; the stream (and a reply stream's ledger) is deleted afterwards."""
    suffix = uuid.uuid4().hex[:10]
    name, prefix = f"ST_{suffix}", f"st{suffix}"
    yield name, prefix
    await jrr.delete_streams(js, name)  # some tests expect creation to fail: nothing to delete then


async def test_request_stream_is_a_work_queue_allowing_message_ttl(js, names):
    name, prefix = names

    info = await jrr.ensure_request_stream(js, name, [f"{prefix}.*"])

    assert info.config.name == name
    assert info.config.retention == RetentionPolicy.WORK_QUEUE
    assert info.config.allow_msg_ttl is True
    assert info.config.storage == StorageType.FILE
    assert info.config.subjects == [f"{prefix}.*"]
    assert (await js.stream_info(name)).config.retention == RetentionPolicy.WORK_QUEUE


async def test_request_stream_twice_is_harmless_and_keeps_messages(js, names):
    name, prefix = names
    first = await jrr.ensure_request_stream(js, name, [f"{prefix}.*"])
    await js.publish(f"{prefix}.waiting", b"still here")

    second = await jrr.ensure_request_stream(js, name, [f"{prefix}.*"])

    assert second.config.retention == first.config.retention
    assert second.config.subjects == first.config.subjects
    assert (await js.stream_info(name)).state.messages == 1


async def test_request_stream_accepts_a_connection_as_well_as_a_context(nc, js, names):
    name, prefix = names

    info = await jrr.ensure_request_stream(nc, name, [f"{prefix}.*"])

    assert info.config.retention == RetentionPolicy.WORK_QUEUE


async def test_request_stream_with_new_subjects_is_updated(js, names):
    name, prefix = names
    await jrr.ensure_request_stream(js, name, [f"{prefix}.a"])

    info = await jrr.ensure_request_stream(js, name, [f"{prefix}.a", f"{prefix}.b"])

    assert sorted(info.config.subjects) == [f"{prefix}.a", f"{prefix}.b"]
    assert sorted((await js.stream_info(name)).config.subjects) == [f"{prefix}.a", f"{prefix}.b"]


async def test_existing_work_queue_without_ttl_is_updated_to_allow_it(js, names):
    name, prefix = names
    await js.add_stream(StreamConfig(name=name, subjects=[f"{prefix}.*"], retention=RetentionPolicy.WORK_QUEUE))

    info = await jrr.ensure_request_stream(js, name, [f"{prefix}.*"])

    assert info.config.allow_msg_ttl is True


async def test_limits_stream_of_the_same_name_is_a_conflict_naming_retention(js, names):
    name, prefix = names
    await js.add_stream(StreamConfig(name=name, subjects=[f"{prefix}.*"], retention=RetentionPolicy.LIMITS))
    await js.publish(f"{prefix}.kept", b"untouched")

    with pytest.raises(jrr.StreamConflict) as caught:
        await jrr.ensure_request_stream(js, name, [f"{prefix}.*"])

    message = str(caught.value)
    assert repr(name) in message
    assert "retention is 'limits', not 'workqueue'" in message
    assert f"js.delete_stream({name!r})" in message
    info = await js.stream_info(name)
    assert info.config.retention == RetentionPolicy.LIMITS, "the existing stream is left alone"
    assert info.state.messages == 1


async def test_memory_stream_of_the_same_name_is_a_conflict_naming_storage(js, names):
    name, prefix = names
    await js.add_stream(
        StreamConfig(
            name=name, subjects=[f"{prefix}.*"], retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.MEMORY
        )
    )

    with pytest.raises(jrr.StreamConflict, match=r"storage is 'memory', not 'file'"):
        await jrr.ensure_request_stream(js, name, [f"{prefix}.*"])


async def test_subjects_taken_by_another_stream_is_a_conflict_with_the_servers_reason(js, names):
    name, prefix = names
    await jrr.ensure_request_stream(js, name, [f"{prefix}.*"])
    other = f"{name}_OTHER"

    try:
        with pytest.raises(jrr.StreamConflict) as caught:
            await jrr.ensure_request_stream(js, other, [f"{prefix}.*"])
    finally:
        await jrr.delete_streams(js, other)

    message = str(caught.value)
    assert repr(other) in message
    assert "could not be created or updated" in message
    assert "overlap" in message


async def test_reply_stream_is_a_work_queue_keeping_replies_a_day(js, names):
    name, prefix = names

    info = await jrr.ensure_reply_stream(js, name, [f"{prefix}.>"])

    assert info.config.retention == RetentionPolicy.WORK_QUEUE
    assert info.config.max_age == 24 * 3600
    assert info.config.subjects == [f"{prefix}.>"]
    assert info.config.storage == StorageType.FILE


async def test_reply_stream_comes_with_its_mailbox_ledger(js, names):
    name, prefix = names

    await jrr.ensure_reply_stream(js, name, [f"{prefix}.>"], max_age=3600)
    await jrr.ensure_reply_stream(js, name, [f"{prefix}.>"], max_age=3600)

    ledger = await js.key_value(f"{name}-ledger")
    assert (await ledger.status()).ttl == 3600


async def test_reply_stream_twice_with_a_shorter_max_age_is_updated(js, names):
    name, prefix = names
    await jrr.ensure_reply_stream(js, name, [f"{prefix}.>"])

    again = await jrr.ensure_reply_stream(js, name, [f"{prefix}.>"], max_age=60)

    assert again.config.max_age == 60
    assert (await js.stream_info(name)).config.max_age == 60


async def test_reply_stream_twice_with_a_longer_max_age_is_updated(js, names):
    name, prefix = names
    await jrr.ensure_reply_stream(js, name, [f"{prefix}.>"], max_age=600)

    again = await jrr.ensure_reply_stream(js, name, [f"{prefix}.>"], max_age=3600)

    assert again.config.max_age == 3600


async def test_limits_stream_named_for_replies_is_a_conflict(js, names):
    name, prefix = names
    await js.add_stream(StreamConfig(name=name, subjects=[f"{prefix}.>"], retention=RetentionPolicy.LIMITS))

    with pytest.raises(jrr.StreamConflict, match=r"cannot hold replies: its retention is 'limits'"):
        await jrr.ensure_reply_stream(js, name, [f"{prefix}.>"])


async def test_delete_streams_deletes_those_that_exist_with_their_ledgers(js, names):
    name, prefix = names
    requests = f"{name}_REQ"
    await jrr.ensure_reply_stream(js, name, [f"{prefix}.>"])
    await jrr.ensure_request_stream(js, requests, [f"{prefix}req.*"])

    deleted = await jrr.delete_streams(js, name, requests, f"{name}_NEVER")

    assert deleted == [name, requests]
    for gone in (name, requests, f"KV_{name}-ledger"):
        with pytest.raises(NotFoundError):
            await js.stream_info(gone)


async def test_delete_streams_twice_is_harmless(nc, names):
    name, prefix = names
    await jrr.ensure_request_stream(nc, name, [f"{prefix}.*"])

    assert await jrr.delete_streams(nc, name) == [name]
    assert await jrr.delete_streams(nc, name) == []


@pytest.mark.parametrize("ensure", [jrr.ensure_request_stream, jrr.ensure_reply_stream], ids=["requests", "replies"])
async def test_three_replicas_on_a_single_server_is_a_clear_error_saying_it_is_not_clustered(fresh_server, ensure):
    name, prefix = "ORDERS", "orders"
    nc = await jrr.connect(fresh_server.url)  # a single server, whatever NATS_URL names
    js = nc.jetstream()

    try:
        with pytest.raises(jrr.NotClustered) as caught:
            await ensure(js, name, [f"{prefix}.>"], replicas=3)
        with pytest.raises(NotFoundError):
            await js.stream_info(name)
    finally:
        await nc.close()

    message = str(caught.value)
    assert f"stream {name!r}" in message
    assert "cannot have 3 replicas: the server is not clustered" in message
    assert "EmbeddedCluster()" in message and "python -m js_request_reply cluster" in message
    assert isinstance(caught.value, jrr.StreamConflict), "existing handlers of StreamConflict still catch it"


async def test_one_replica_is_the_default_and_can_be_asked_for_either_way(js, names):
    name, prefix = names

    info = await jrr.ensure_request_stream(js, name, [f"{prefix}.*"], replicas=1)
    again = await jrr.ensure_request_stream(js, name, [f"{prefix}.*"], num_replicas=1)

    assert info.config.num_replicas == again.config.num_replicas == 1


@pytest.mark.parametrize("replicas", [0, 6, 2.5])
async def test_a_replica_count_jetstream_cannot_have_is_refused_before_asking_the_server(js, names, replicas):
    name, prefix = names

    with pytest.raises(ValueError, match=r"replicas must be a whole number from 1 to 5"):
        await jrr.ensure_request_stream(js, name, [f"{prefix}.*"], replicas=replicas)


async def test_replicas_and_num_replicas_that_disagree_are_refused(js, names):
    name, prefix = names

    with pytest.raises(ValueError, match=r"replicas=3 and num_replicas=1 disagree"):
        await jrr.ensure_request_stream(js, name, [f"{prefix}.*"], replicas=3, num_replicas=1)
