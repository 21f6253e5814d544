"""Exceptions with messages that say what happened and what to do next."""

from __future__ import annotations

import nats.errors


class JsRequestReplyError(Exception):
    """Base class of every error this package raises on purpose."""


class ServerNotInstalled(JsRequestReplyError):
    """The `nats-server` binary cannot be found."""


class ServerTooOld(JsRequestReplyError):
    """The server predates 2.11, so per-message TTL would be silently ignored."""


class ServerStartFailed(JsRequestReplyError):
    """The server process exited or did not become ready in time."""


class ServerUnreachable(JsRequestReplyError, ConnectionError):
    """No NATS server answered at the URL, or the URL is malformed."""


class StreamConflict(JsRequestReplyError):
    """A stream with this name exists with a configuration that cannot serve this purpose."""


class NotClustered(StreamConflict):
    """A stream asked for more than one replica on a server that is not part of a JetStream cluster."""


class NoRequestStream(JsRequestReplyError):
    """No stream captures the request subject, so the request could not be stored."""

    def __init__(self, subject: str):
        self.subject = subject
        super().__init__(
            f"no stream captures subject {subject!r}; create one with "
            f"ensure_request_stream(js, subjects=[...]) whose subjects include it"
        )


class RequestTimeout(JsRequestReplyError, nats.errors.TimeoutError):
    """No reply arrived in time. Subclasses nats.errors.TimeoutError, so existing handlers still catch it."""

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        return self.message


class RequestRejected(JsRequestReplyError):
    """The responder answered with an error (ADR-32 service error headers)."""

    def __init__(self, code: int, description: str, subject: str = ""):
        self.code = code
        self.description = description
        self.subject = subject
        where = f" to {subject!r}" if subject else ""
        super().__init__(f"request{where} rejected: {code} {description}")


class Reject(Exception):
    """Raise from a handler to send an error reply and terminate the request."""

    def __init__(self, code: int, description: str):
        self.code = code
        self.description = description
        super().__init__(f"{code} {description}")


class RequestNotStored(JsRequestReplyError):
    """The server refused to store the request (for example: over a limit, or a duplicate-window clash)."""

    def __init__(self, subject: str, description: str, code: int | None = None):
        self.subject = subject
        self.description = description
        self.code = code
        suffix = f" (error {code})" if code else ""
        super().__init__(f"the server refused to store the request to {subject!r}: {description}{suffix}")


class NoReplyStream(JsRequestReplyError):
    """A mailbox was asked for, but no stream stores its replies."""


class RequesterClosed(JsRequestReplyError):
    """The Requester was closed while a request() waited: its reply, when it comes, waits in the mailbox."""


class PayloadTooLarge(JsRequestReplyError, ValueError):
    """The payload is over the server's max_payload, so it was not sent."""


class StreamNotFound(JsRequestReplyError):
    """The stream a Responder should read does not exist."""


class NoLeader(JsRequestReplyError):
    """The cluster, or a stream in it, has no leader on a running node within the time allowed."""


class PermissionDenied(JsRequestReplyError):
    """The server denied this user a subject: a publish (or JetStream API call) or a subscription.

    Raised as soon as the server reports the violation, instead of waiting out a timeout.
    """

    def __init__(
        self, subject: str, user: str | None = None, action: str = "publish", hint: str = "", *, message: str = ""
    ):
        self.subject = subject
        self.user = user
        self.action = action  # "publish", "subscribe" or "connect"
        who = f"user {user!r}" if user else "this connection"
        verb = "publish to" if action == "publish" else "subscribe to"
        hint = hint or _denial_hint(subject, action)
        super().__init__(message or f"permission denied: {who} may not {verb} {subject!r}{hint}")


def _denial_hint(subject: str, action: str) -> str:
    if action == "subscribe" and subject.upper().startswith("_INBOX."):
        return "; connect as a user with js_request_reply.connect(), which gives its inboxes the prefix _INBOX.<user>"
    if subject.upper().startswith(("$JS.", "$KV.")):
        return " (a JetStream call: it reads or changes something this user does not own)"
    return ""
