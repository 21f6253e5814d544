"""An embedded JetStream cluster: `nats-server` nodes (three by default) on loopback, from the same pinned binary."""

from __future__ import annotations

import atexit
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from .errors import NoLeader, ServerStartFailed, StreamNotFound
from .server import EmbeddedServer, _tail, check_version, find_binary, free_port

DEFAULT_ACCOUNT = "$G"  # the account clients use when the server configures none
CLUSTER_HEALTH_CHECK = "/healthz"  # unlike ?js-enabled-only, 200 only once the node is current with a meta leader
POLL_INTERVAL = 0.05


class EmbeddedCluster:
    """A JetStream cluster of `size` embedded servers, named n1, n2, n3, with routes between them on loopback.

    `start()` returns once every node is healthy and the cluster has a JetStream meta leader, so a
    replicated stream can be created at once. Every port is chosen at the first start and kept, so
    `kill(name)` then `restart(name)` brings a node back at the same URL, with its store.
    Without `store_dir`, each node keeps its store in a temporary folder that `close()` removes.
    """

    def __init__(
        self,
        size: int = 3,
        store_dir: str | os.PathLike | None = None,
        *,
        host: str = "127.0.0.1",
        binary: str | None = None,
        ready_timeout: float = 30.0,
        name: str = "jrr",
    ):
        if size < 2:
            raise ValueError(
                f"a cluster needs at least 2 nodes, not {size}: nats-server refuses JetStream clustering "
                "without routes to other nodes. For one server, use EmbeddedServer (or the `server` command)."
            )
        self.size = size
        self.host = host
        self.name = name
        self.ready_timeout = ready_timeout
        self._binary = binary
        self._route_ports: dict[str, int] = {}
        self._nodes: dict[str, EmbeddedServer] = {}
        for number in range(1, size + 1):
            node = f"n{number}"
            self._nodes[node] = EmbeddedServer(
                store_dir=Path(store_dir) / node if store_dir is not None else None,
                host=host,
                binary=binary,
                ready_timeout=ready_timeout,
                name=node,
                health_check=CLUSTER_HEALTH_CHECK,
            )

    @property
    def servers(self) -> list[EmbeddedServer]:
        """The nodes, in order n1, n2, ..."""
        return list(self._nodes.values())

    @property
    def names(self) -> list[str]:
        """The node names, in order: n1, n2, ..."""
        return list(self._nodes)

    @property
    def url_list(self) -> list[str]:
        """Every node's client URL, running or not: what `nats.connect(servers=...)` takes."""
        return [node.url for node in self._nodes.values()]

    @property
    def urls(self) -> str:
        """Every node's client URL joined with commas, as NATS_URL holds a cluster."""
        return ",".join(self.url_list)

    @property
    def running(self) -> bool:
        """True while every node's process is alive."""
        return all(node.running for node in self._nodes.values())

    def server(self, name: str) -> EmbeddedServer:
        """The node called `name`."""
        try:
            return self._nodes[name]
        except KeyError:
            raise ValueError(f"this cluster has no node {name!r}; its nodes are {', '.join(self._nodes)}") from None

    def start(self) -> EmbeddedCluster:
        """Start every node that is not running, and wait until all are healthy and a meta leader is elected.

        Raises ServerStartFailed, with the end of the failing node's log, if that takes longer than
        `ready_timeout`; the nodes are stopped then.
        """
        if self.running:
            return self
        check_version(self._binary or find_binary())
        self._choose_ports()
        atexit.unregister(self.close)
        atexit.register(self.close)  # a forgotten cluster never outlives this process
        deadline = time.monotonic() + self.ready_timeout
        try:
            for node in self._nodes.values():
                node.launch()  # every node first: none is healthy before it has met the others
            for node in self._nodes.values():
                node.wait_ready(max(deadline - time.monotonic(), POLL_INTERVAL))
            self.meta_leader(timeout=max(deadline - time.monotonic(), POLL_INTERVAL))
        except NoLeader as exc:
            self.stop()
            logs = "\n".join(f"--- {node.name}:\n{_tail(node.log_path, 5)}" for node in self._nodes.values())
            raise ServerStartFailed(f"{exc}\n{logs}") from exc
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Shut every node down gracefully; their stores stay, so `start()` brings the streams back."""
        for node in self._nodes.values():
            node.stop()

    def close(self) -> None:
        """Stop every node and remove the temporary folders (a given store_dir is kept)."""
        atexit.unregister(self.close)
        self.stop()
        for node in self._nodes.values():
            node.close()

    def kill(self, name: str) -> None:
        """Crash one node (SIGKILL), as a power cut would; its store stays for `restart(name)`."""
        self.server(name).kill()

    def stop_node(self, name: str) -> None:
        """Shut one node down gracefully; `restart(name)` brings it back."""
        self.server(name).stop()

    def restart(self, name: str) -> EmbeddedServer:
        """Start one node again on the same ports and store, and wait until it is healthy and current.

        Waits at most `ready_timeout`; a running node is stopped first.
        """
        return self.server(name).restart()

    def meta_leader(self, timeout: float = 10.0) -> str:
        """The name of the node that leads the JetStream meta group, waiting up to `timeout` for one."""
        deadline = time.monotonic() + timeout
        while True:
            views = self._views("/jsz")
            claims = {node: (view.get("meta_cluster") or {}).get("leader") for node, view in views.items()}
            leader = _confirmed(claims)
            if leader:
                return leader
            if time.monotonic() >= deadline:
                raise NoLeader(
                    f"cluster {self.name!r} has no JetStream meta leader on a running node after {timeout}s "
                    f"({_describe(claims, self._nodes)}); a majority of its {self.size} nodes must be running"
                )
            time.sleep(POLL_INTERVAL)  # polling the monitoring endpoint: the server offers no event for it

    def leader(self, stream: str, timeout: float = 10.0) -> str:
        """The name of the node that leads `stream` (in the default account) now.

        While the stream has no leader, or the node named is not running (just after a kill, the
        others still name it until they elect a new one), this waits, up to `timeout` seconds, and
        then raises NoLeader. Raises StreamNotFound if no running node has the stream.
        """
        deadline = time.monotonic() + timeout
        while True:
            views = self._views("/jsz?streams=true")
            claims: dict[str, str | None] = {}
            for node, view in views.items():
                detail = _stream_detail(view, stream)
                if detail is not None:
                    claims[node] = (detail.get("cluster") or {}).get("leader")
            leader = _confirmed(claims)
            if leader:
                return leader
            running = [node for node, server in self._nodes.items() if server.running]
            if not claims and views and len(views) == len(running):
                raise StreamNotFound(
                    f"no running node of cluster {self.name!r} ({', '.join(running)}) has a stream {stream!r} "
                    "in the default account; create it first, or restart the node that holds it"
                )
            if time.monotonic() >= deadline:
                raise NoLeader(
                    f"stream {stream!r} has no leader on a running node after {timeout}s "
                    f"({_describe(claims, self._nodes)}); a majority of its replicas must be running"
                )
            time.sleep(POLL_INTERVAL)  # polling the monitoring endpoint: the server offers no event for it

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        if not self._route_ports:
            return f"<EmbeddedCluster {self.name!r} {self.size} nodes (no ports) stopped>"
        nodes = ", ".join(
            f"{name} {node.url} {'running' if node.running else 'stopped'}" for name, node in self._nodes.items()
        )
        return f"<EmbeddedCluster {self.name!r} {nodes}>"

    def _choose_ports(self) -> None:
        """Client, monitoring and route ports for every node, chosen once and kept for restarts."""
        if self._route_ports:
            return
        taken: set[int] = set()

        def port() -> int:
            while (chosen := free_port(self.host)) in taken:
                pass
            taken.add(chosen)
            return chosen

        for name, node in self._nodes.items():
            node.port, node.monitor_port, self._route_ports[name] = port(), port(), port()
        for name, node in self._nodes.items():
            others = [f"nats://{self.host}:{route}" for other, route in self._route_ports.items() if other != name]
            node.extra_args = (
                "--cluster_name", self.name,
                "--cluster", f"nats://{self.host}:{self._route_ports[name]}",
                "--routes", ",".join(others),
            )  # fmt: skip

    def _views(self, path: str) -> dict[str, dict]:
        """What each running node's monitoring endpoint answers at `path`, for the nodes that answered."""
        views = {}
        for name, node in self._nodes.items():
            if not node.running:
                continue
            try:
                with urllib.request.urlopen(f"http://{self.host}:{node.monitor_port}{path}", timeout=1) as response:
                    views[name] = json.load(response)
            except (urllib.error.URLError, OSError, ValueError):
                pass  # starting or stopping: it counts as having no view
        return views


def _stream_detail(view: dict, stream: str) -> dict | None:
    for account in view.get("account_details") or []:
        if account.get("name") == DEFAULT_ACCOUNT:
            for detail in account.get("stream_detail") or []:
                if detail.get("name") == stream:
                    return detail
    return None


def _confirmed(claims: dict[str, str | None]) -> str | None:
    """The leader some node names, provided that node is running and names itself: a dead leader answers nothing."""
    for node, leader in claims.items():
        if leader and leader == node:
            return node
    return None


def _describe(claims: dict[str, str | None], nodes: dict[str, EmbeddedServer]) -> str:
    if not claims:
        return "no running node answered"
    said = []
    for node, leader in claims.items():
        if not leader:
            said.append(f"{node} knows of none")
        else:
            state = "" if leader in nodes and nodes[leader].running else " (not running)"
            said.append(f"{node} names {leader}{state}")
    return "; ".join(said)
