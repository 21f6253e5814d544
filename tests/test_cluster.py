"""The embedded cluster: three real nats-server nodes, a replicated stream, its leader killed and brought back.

Most tests share one cluster, since a leader election after a kill takes seconds; the tests that
close a cluster start one of their own.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig, StreamInfo
from support import unique

import js_request_reply as jrr


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def cluster(store):
    """One three-node cluster for this module, with its stores under `store`."""
    with jrr.EmbeddedCluster(store_dir=store) as cluster:
        yield cluster


async def add_r3_stream(urls: list[str], stream: str, payload: bytes | None = None) -> StreamInfo:
    """Create a stream with three replicas, and publish `payload` to it if given."""
    nc = await nats.connect(urls)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream}.>"], num_replicas=3))
        if payload is not None:
            await js.publish(f"{stream}.one", payload)
        return await js.stream_info(stream)
    finally:
        await nc.close()


async def first_message(urls: list[str], stream: str) -> tuple[bytes, int]:
    """The first message's data and the message count, read over a connection to `urls` only."""
    nc = await nats.connect(urls)
    try:
        js = nc.jetstream()
        return (await js.get_msg(stream, 1)).data, (await js.stream_info(stream)).state.messages
    finally:
        await nc.close()


def refuses(port: int) -> bool:
    """True when nothing listens on `port` any more."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_start_gives_three_named_nodes_and_an_r3_stream_can_be_created_at_once(cluster, store):
    assert cluster.running
    assert cluster.names == ["n1", "n2", "n3"]
    assert [node.name for node in cluster.servers] == ["n1", "n2", "n3"]
    assert all(node.running for node in cluster.servers)
    ports = [port for node in cluster.servers for port in (node.port, node.monitor_port)]
    assert len(set(ports)) == 6, "every node has client and monitoring ports of its own"
    assert cluster.url_list == [f"nats://127.0.0.1:{node.port}" for node in cluster.servers]
    assert cluster.urls == ",".join(cluster.url_list)
    assert [node.store_dir for node in cluster.servers] == [store / "n1", store / "n2", store / "n3"]
    assert "n1 nats://127.0.0.1:" in repr(cluster)
    assert "running" in repr(cluster)

    stream = unique("R3_")
    info = await add_r3_stream(cluster.url_list, stream)  # fails while the cluster has no meta leader
    leader = await asyncio.to_thread(cluster.leader, stream)

    assert leader in cluster.names
    assert leader == info.cluster.leader
    assert sorted(replica.name for replica in info.cluster.replicas) == sorted(set(cluster.names) - {leader})
    assert await asyncio.to_thread(cluster.meta_leader) in cluster.names


async def test_killing_the_stream_leader_elects_another_and_keeps_the_message(cluster):
    stream = unique("KILL_")
    await add_r3_stream(cluster.url_list, stream, b"kept")
    old = await asyncio.to_thread(cluster.leader, stream)
    old_port = cluster.server(old).port
    try:
        cluster.kill(old)
        assert not cluster.server(old).running
        assert not cluster.running

        new = await asyncio.to_thread(cluster.leader, stream, 20.0)  # an election takes seconds
        await asyncio.to_thread(cluster.meta_leader, 20.0)
        survivors = [node.url for node in cluster.servers if node.running]
        after_kill = await first_message(survivors, stream)

        cluster.restart(old)  # from the main thread, so the node still dies with this process
        after_restart = await first_message([cluster.server(old).url], stream)
    finally:
        if not cluster.server(old).running:
            cluster.restart(old)  # the other tests share this cluster

    assert new != old
    assert new in cluster.names
    assert after_kill == (b"kept", 1)
    assert cluster.server(old).running
    assert cluster.server(old).port == old_port
    assert cluster.running
    assert after_restart == (b"kept", 1)


def test_an_unknown_node_name_is_a_clear_error(cluster):
    for call in (cluster.server, cluster.kill, cluster.restart, cluster.stop_node):
        with pytest.raises(ValueError, match=r"this cluster has no node 'n9'; its nodes are n1, n2, n3"):
            call("n9")

    assert cluster.running


def test_leader_of_a_stream_no_node_has_says_so(cluster):
    with pytest.raises(
        jrr.StreamNotFound, match=r"no running node of cluster 'jrr' \(n1, n2, n3\) has a stream 'NONE'"
    ):
        cluster.leader("NONE", timeout=5)


def test_a_cluster_of_one_is_refused_saying_what_to_use_instead():
    with pytest.raises(ValueError, match=r"at least 2 nodes, not 1.*use EmbeddedServer"):
        jrr.EmbeddedCluster(size=1)


def test_close_stops_every_node_and_removes_the_temporary_folders():
    with jrr.EmbeddedCluster() as cluster:
        ports = [node.port for node in cluster.servers]
        folders = [node.store_dir.parent for node in cluster.servers]
        assert all(folder.is_dir() for folder in folders)

    assert not any(node.running for node in cluster.servers)
    assert "stopped" in repr(cluster)
    assert not any(folder.exists() for folder in folders)
    assert all(refuses(port) for port in ports)


def test_a_cluster_left_running_is_stopped_and_removed_when_the_interpreter_exits():
    script = (
        "import js_request_reply as jrr\n"
        "cluster = jrr.EmbeddedCluster().start()\n"
        "print(*[node.port for node in cluster.servers])\n"
        "print(*[node.store_dir.parent for node in cluster.servers])\n"
    )

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    ports, folders = done.stdout.splitlines()
    assert all(refuses(int(port)) for port in ports.split())
    assert not any(Path(folder).exists() for folder in folders.split())
