"""Request-reply over NATS JetStream: requests wait in a work-queue stream, replies find their way back.

Notebooks use it as `import js_request_reply as jrr`.
"""

from .access import access_config, permissions_for
from .cli import run_command
from .cluster import EmbeddedCluster
from .connection import connect
from .errors import (
    JsRequestReplyError,
    NoLeader,
    NoReplyStream,
    NoRequestStream,
    NotClustered,
    PayloadTooLarge,
    PermissionDenied,
    Reject,
    RequesterClosed,
    RequestNotStored,
    RequestRejected,
    RequestTimeout,
    ServerNotInstalled,
    ServerStartFailed,
    ServerTooOld,
    ServerUnreachable,
    StreamConflict,
    StreamNotFound,
)
from .menu import MENU, menu_handlers
from .requester import Reply, ReplyError, Requester, request
from .responder import Handled, Responder, request_id, terminate
from .server import EmbeddedServer, server_url
from .service import ResponderService, ping_services, service_info, service_stats, stats_rows
from .streams import delete_streams, ensure_reply_stream, ensure_request_stream, wait_for_messages
from .tracing import TRACEPARENT_HEADER, TraceParent, new_traceparent, parse_traceparent, trace_id_of

# The display helpers need pandas and matplotlib, which take a second to import: load them on first
# use, so the command line and responders start fast.
_DISPLAY = (
    "Arrow",
    "SequenceDiagram",
    "Wiretap",
    "ledger_table",
    "permissions_table",
    "replica_table",
    "replies_table",
    "stream_state",
    "stream_table",
)


def __getattr__(name: str):
    if name in _DISPLAY:
        from . import display

        return getattr(display, name)
    raise AttributeError(f"module 'js_request_reply' has no attribute {name!r}")


__all__ = [
    "MENU",
    "TRACEPARENT_HEADER",
    "Arrow",
    "EmbeddedCluster",
    "EmbeddedServer",
    "Handled",
    "JsRequestReplyError",
    "NoLeader",
    "NoReplyStream",
    "NoRequestStream",
    "NotClustered",
    "PayloadTooLarge",
    "PermissionDenied",
    "Reject",
    "Reply",
    "ReplyError",
    "RequestNotStored",
    "RequestRejected",
    "RequestTimeout",
    "Requester",
    "RequesterClosed",
    "Responder",
    "ResponderService",
    "SequenceDiagram",
    "ServerNotInstalled",
    "ServerStartFailed",
    "ServerTooOld",
    "ServerUnreachable",
    "StreamConflict",
    "StreamNotFound",
    "TraceParent",
    "Wiretap",
    "access_config",
    "connect",
    "delete_streams",
    "ensure_reply_stream",
    "ensure_request_stream",
    "ledger_table",
    "menu_handlers",
    "new_traceparent",
    "parse_traceparent",
    "permissions_for",
    "permissions_table",
    "ping_services",
    "replica_table",
    "replies_table",
    "request",
    "request_id",
    "run_command",
    "server_url",
    "service_info",
    "service_stats",
    "stats_rows",
    "stream_state",
    "stream_table",
    "terminate",
    "trace_id_of",
    "wait_for_messages",
]
