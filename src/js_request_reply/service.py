"""Who is serving, how fast, and what fails: every Responder answers ADR-32 discovery and stats requests.

nats.micro services answer `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS`, each with no name, with the
service's name, and with its name and instance id; `nats micro ls` and `nats micro stats` ask them.
A Responder answers the same requests, in the same types (nats-py's `nats.micro` dataclasses), so
those tools list it beside core services. The service's name is the Responder's durable, and each
handler subject is an endpoint.

Only the control subjects are subscribed to. A nats.micro endpoint would subscribe to its subject
on core NATS, beside the stream that captures it, and answer requests itself.

`ping_services()`, `service_info()` and `service_stats()` ask from the other side, and
`stats_rows()` flattens the answers, one row per endpoint, for a table.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import importlib.metadata
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.micro.service import (
    DEFAULT_PREFIX,
    EndpointInfo,
    EndpointStats,
    ServiceInfo,
    ServicePing,
    ServiceStats,
    ServiceVerb,
    control_subject,
)
from nats.nuid import NUID

from . import protocol as p
from .denials import denials_for, denied_at_once, processed

if TYPE_CHECKING:
    from .responder import Handled

log = logging.getLogger(__name__)

VERBS = (ServiceVerb.PING, ServiceVerb.INFO, ServiceVerb.STATS)
CATCH_ALL = ">"  # the endpoint subject of a Responder with one handler for every subject
UNHANDLED = "unhandled"  # the endpoint of requests whose subject no handler serves (404)
REMEMBERED_SUBJECTS = 1024  # request subjects whose endpoint is remembered, at most
ASK_TIMEOUT = 1.0  # seconds ping_services() and the others wait for answers
# Outcomes (Handled.outcome) that end a request in an error, and what each counts in the endpoint's data.
ERROR_OUTCOMES = {"rejected": None, "terminated": "terminated", "refused": "terminated", "gave up": "gave_up"}
NOT_FINISHED = ("retried",)  # nak'd to try again later: the request is counted when it ends
_NAME = re.compile(r"[A-Za-z0-9_-]+")

T = TypeVar("T")


def package_version() -> str:
    """The installed version of js-request-reply, as the version of every Responder's service."""
    try:
        return importlib.metadata.version("js-request-reply")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


@dataclass
class EndpointCounts:
    """What one endpoint of one Responder has done since it started."""

    name: str
    subject: str
    num_requests: int = 0
    num_errors: int = 0
    last_error: str = ""
    processing_time: int = 0  # nanoseconds, as nats.micro counts it
    redeliveries: int = 0
    terminated: int = 0
    expired: int = 0
    gave_up: int = 0

    def record(self, handled: Handled) -> None:
        """Count one request the Responder finished (a delivery it nak'd counts once it ends)."""
        if handled.delivery > 1 and handled.outcome != "gave up":  # a gave-up record counts deliveries, not one
            self.redeliveries += 1
        if handled.outcome in NOT_FINISHED:
            return
        self.num_requests += 1
        if handled.outcome not in ERROR_OUTCOMES:
            return
        self.num_errors += 1
        self.last_error = _error_text(handled)
        extra = ERROR_OUTCOMES[handled.outcome]
        if extra is not None:
            setattr(self, extra, getattr(self, extra) + 1)
        elif handled.detail.startswith(f"{p.EXPIRED} expired"):
            self.expired += 1

    def stats(self, queue_group: str, in_flight: int) -> EndpointStats:
        """These counts as nats.micro's EndpointStats, with our extras in `data`."""
        average = self.processing_time // self.num_requests if self.num_requests else 0
        extras = {
            "redeliveries": self.redeliveries,
            "terminated": self.terminated,
            "expired": self.expired,
            "gave_up": self.gave_up,
            "in_flight": in_flight,
        }
        return EndpointStats(
            name=self.name,
            subject=self.subject,
            queue_group=queue_group,
            num_requests=self.num_requests,
            num_errors=self.num_errors,
            processing_time=self.processing_time,
            average_processing_time=average,
            last_error=self.last_error,
            data=extras,
        )


def _error_text(handled: Handled) -> str:
    """The error a request ended in, as '<code> <description>'."""
    if handled.outcome == "rejected":
        return handled.detail  # already '<code> <description>'
    code = {"terminated": p.BAD_REQUEST, "refused": p.NOT_YOUR_MAILBOX, "gave up": p.GAVE_UP}[handled.outcome]
    return f"{code} {handled.detail}"


def endpoint_names(subjects: Iterable[str]) -> dict[str, str]:
    """An ADR-32 endpoint name for each handler subject: its last token when those are distinct, else the
    whole subject, tokens joined by '_'. A `*` is written `any`, a `>` `all`, anything else invalid `_`."""
    subjects = list(subjects)
    last = [_name_of(subject.rsplit(".", 1)[-1]) for subject in subjects]
    if len(set(last)) == len(last):
        return dict(zip(subjects, last, strict=True))
    return {subject: "_".join(_name_of(token) for token in subject.split(".")) for subject in subjects}


def _name_of(token: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", token.replace("*", "any").replace(">", "all")) or "_"


class ResponderService:
    """One Responder seen as an ADR-32 service: it answers `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS`.

    The Responder feeds it each request it finishes (`record`) and the time each took (`add_time`).
    `in_flight` lists the subjects of the requests its handlers are working on right now.
    A server whose permissions deny the `$SRV` subjects leaves the Responder serving, undiscoverable:
    `denied` then says why.
    """

    def __init__(
        self,
        nc: Client,
        *,
        name: str,
        instance: str,
        stream: str,
        handlers: Any,
        in_flight: Callable[[], Iterable[str]] = tuple,
    ):
        self.nc = nc
        self.name = name
        self.id = NUID().next().decode()
        self.version = package_version()
        self.metadata = {"stream": stream, "consumer": name, "responder": instance}
        self.started = datetime.now(UTC)
        self.denied: Exception | None = None
        self._handlers = handlers
        self._in_flight = in_flight
        self._counts: dict[str | None, EndpointCounts] = {}  # handler subject (None: no handler) -> counts
        self._by_subject: dict[str, EndpointCounts] = {}  # request subject -> the counts of its endpoint
        self._subs: list[Any] = []

    @property
    def running(self) -> bool:
        """True while it answers the $SRV subjects."""
        return bool(self._subs)

    # -- what the Responder tells it ------------------------------------------------------------------

    def record(self, handled: Handled) -> None:
        """Count a request the Responder finished, on the endpoint of its subject."""
        self._endpoint_for(handled.subject).record(handled)

    def add_time(self, subject: str, nanoseconds: int) -> None:
        """Add the time the Responder spent answering a request on `subject`."""
        self._endpoint_for(subject).processing_time += nanoseconds

    def _handler_subjects(self) -> list[str]:
        if not isinstance(self._handlers, Mapping):
            return [CATCH_ALL]
        return list(self._handlers)

    def _endpoint_for(self, subject: str) -> EndpointCounts:
        """The counts of the handler subject that serves `subject` (remembered: this is on every request's path)."""
        counts = self._by_subject.get(subject)
        if counts is None:
            counts = self._match(subject)
            if len(self._by_subject) < REMEMBERED_SUBJECTS:
                self._by_subject[subject] = counts
        return counts

    def _match(self, subject: str) -> EndpointCounts:
        """The counts of the handler subject that serves `subject`, matched as the Responder matches handlers."""
        subjects = self._handler_subjects()
        served_by = (
            subject if subject in subjects else next((s for s in subjects if p.subject_matches(s, subject)), None)
        )
        if served_by not in self._counts:
            name = UNHANDLED if served_by is None else endpoint_names(subjects)[served_by]
            self._counts[served_by] = EndpointCounts(name, CATCH_ALL if served_by is None else served_by)
        return self._counts[served_by]

    def _endpoints(self) -> list[EndpointCounts]:
        """One per handler subject, in the handlers' order, then requests no handler served (once there were some)."""
        endpoints = [self._endpoint_for(subject) for subject in self._handler_subjects()]
        if None in self._counts:
            endpoints.append(self._counts[None])
        return endpoints

    # -- the answers ----------------------------------------------------------------------------------

    def ping(self) -> ServicePing:
        """The answer to $SRV.PING."""
        return ServicePing(id=self.id, name=self.name, version=self.version, metadata=dict(self.metadata))

    def info(self) -> ServiceInfo:
        """The answer to $SRV.INFO: the handler subjects as endpoints."""
        stream = self.metadata["stream"]
        return ServiceInfo(
            name=self.name,
            id=self.id,
            version=self.version,
            description=f"request-reply over JetStream: serves stream {stream} through the durable consumer {self.name}",
            endpoints=[
                EndpointInfo(name=e.name, subject=e.subject, queue_group=self.name, metadata={"stream": stream})
                for e in self._endpoints()
            ],
            metadata=dict(self.metadata),
        )

    def stats(self) -> ServiceStats:
        """The answer to $SRV.STATS: each endpoint's counts, with redeliveries, terminated, expired,
        gave_up and in_flight in its `data`."""
        busy = collections.Counter(self._endpoint_for(subject).subject for subject in self._in_flight())
        return ServiceStats(
            id=self.id,
            name=self.name,
            version=self.version,
            started=self.started,
            endpoints=[e.stats(self.name, busy[e.subject]) for e in self._endpoints()],
            metadata=dict(self.metadata),
        )

    # -- answering ------------------------------------------------------------------------------------

    def control_subjects(self) -> list[str]:
        """The nine subjects it answers: each verb with no name, with the name, and with the name and id."""
        forms = ((None, None), (self.name, None), (self.name, self.id))
        return [control_subject(verb, name, id_, DEFAULT_PREFIX) for verb in VERBS for name, id_ in forms]

    async def start(self) -> None:
        """Subscribe to the control subjects (a denied subscription leaves it undiscoverable, and says so)."""
        if self._subs:
            return
        self.started = datetime.now(UTC)
        self.denied = None
        subjects = self.control_subjects()
        answers = {ServiceVerb.PING: self.ping, ServiceVerb.INFO: self.info, ServiceVerb.STATS: self.stats}
        denials = denials_for(self.nc)
        denied = denials.watch(*subjects)
        try:
            for subject in subjects:
                verb = ServiceVerb(subject.split(".")[1])
                callback = functools.partial(self._answer, answers[verb])
                self._subs.append(await self.nc.subscribe(subject, cb=callback))
            await processed(self.nc, denied)
            if denied.done():
                self.denied = denied.exception()
                log.warning("responder %r cannot be discovered: %s", self.metadata["responder"], self.denied)
                await self.stop()
        finally:
            denials.unwatch(denied)

    async def stop(self) -> None:
        """Stop answering: unsubscribe from the control subjects, and return once the server knows.

        Until the server has processed the unsubscriptions it would still route $SRV requests
        here, where nobody answers them: the asker would wait out its timeout, not hear "no responders".
        """
        subs, self._subs = self._subs, []
        if self.nc.is_closed or not subs:
            return
        with contextlib.suppress(nats.errors.Error):
            for sub in subs:
                await sub.unsubscribe()
            await processed(self.nc, asyncio.get_running_loop().create_future())

    async def _answer(self, make: Callable[[], Any], msg: Msg) -> None:
        if not msg.reply:
            return
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(msg.reply, json.dumps(make().to_dict()).encode())


# -- asking -------------------------------------------------------------------------------------------


async def ping_services(
    nc: Client,
    name: str | None = None,
    service_id: str | None = None,
    *,
    timeout: float = ASK_TIMEOUT,
    count: int | None = None,
) -> list[ServicePing]:
    """Every service that answers $SRV.PING (or only those named `name`, or one instance) within `timeout` s.

    With `count`, returns as soon as that many answered. Sorted by name, responder and id.
    """
    answers = await _ask(nc, ServiceVerb.PING, name, service_id, timeout, count)
    return _sorted(_parsed(answers, ServicePing.from_dict))


async def service_info(
    nc: Client,
    name: str | None = None,
    service_id: str | None = None,
    *,
    timeout: float = ASK_TIMEOUT,
    count: int | None = None,
) -> list[ServiceInfo]:
    """Every service's answer to $SRV.INFO (its endpoints), as `ping_services()` gathers them."""
    answers = await _ask(nc, ServiceVerb.INFO, name, service_id, timeout, count)
    return _sorted(_parsed(answers, ServiceInfo.from_dict))


async def service_stats(
    nc: Client,
    name: str | None = None,
    service_id: str | None = None,
    *,
    timeout: float = ASK_TIMEOUT,
    count: int | None = None,
) -> list[ServiceStats]:
    """Every service's answer to $SRV.STATS (its endpoints' counts), as `ping_services()` gathers them."""
    answers = await _ask(nc, ServiceVerb.STATS, name, service_id, timeout, count)
    return _sorted(_parsed(answers, _stats_from_dict))


def stats_rows(stats: Iterable[ServiceStats]) -> list[dict[str, Any]]:
    """One row per endpoint of every service: who, which endpoint, its counts, its times in ms, and its extras."""
    rows = []
    for service in stats:
        for endpoint in service.endpoints:
            rows.append(
                {
                    "service": service.name,
                    "responder": (service.metadata or {}).get("responder", ""),
                    "id": service.id,
                    "endpoint": endpoint.name,
                    "subject": endpoint.subject,
                    "requests": endpoint.num_requests,
                    "errors": endpoint.num_errors,
                    "average_ms": endpoint.average_processing_time / 1e6,
                    "processing_ms": endpoint.processing_time / 1e6,
                    "last_error": endpoint.last_error or "",
                    **(endpoint.data if isinstance(endpoint.data, dict) else {}),
                }
            )
    return rows


async def _ask(nc: Client, verb: ServiceVerb, name, service_id, timeout: float, count: int | None) -> list[dict]:
    """The JSON answers to one control request, gathered for `timeout` seconds or until `count` came."""
    if service_id is not None and name is None:
        raise ValueError("a service id needs the service's name too: $SRV.<verb>.<name>.<id>")
    for token in filter(None, (name, service_id)):
        if not _NAME.fullmatch(token):
            raise ValueError(f"{token!r} is not a service name or id: letters, digits, '-' and '_' only")
    subject = control_subject(verb, name, service_id, DEFAULT_PREFIX)
    answers: list[dict] = []
    enough = asyncio.Event()

    async def gather(msg: Msg) -> None:
        if not msg.data:  # a status: 503 means nobody listens on the subject
            if (msg.headers or {}).get(p.STATUS_HEADER) == p.NO_RESPONDERS_STATUS:
                enough.set()
            return
        with contextlib.suppress(ValueError):
            answer = json.loads(msg.data)
            if isinstance(answer, dict):
                answers.append(answer)
        if count is not None and len(answers) >= count:
            enough.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=gather)
    try:
        await nc.publish(subject, b"", reply=inbox)
        with contextlib.suppress(TimeoutError):
            await denied_at_once(nc, asyncio.wait_for(enough.wait(), timeout), subject)
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    return list(answers)


def _parsed(answers: Iterable[dict], parse: Callable[[dict], T]) -> list[T]:
    """The answers that have the ADR-32 shape; any other is left out."""
    parsed = []
    for answer in answers:
        with contextlib.suppress(KeyError, ValueError, TypeError):
            parsed.append(parse(answer))
    return parsed


def _stats_from_dict(answer: dict) -> ServiceStats:
    """nats.micro's ServiceStats.from_dict, also for services (nats.go's) that give `started` in nanoseconds."""
    started = str(answer.get("started", ""))
    whole, dot, fraction = started.rstrip("Z").partition(".")
    answer = {**answer, "started": f"{whole}.{(fraction if dot else '0')[:6]}Z"}
    answer["endpoints"] = answer.get("endpoints") or []
    for endpoint in answer["endpoints"]:
        endpoint.setdefault("last_error", "")
        endpoint.setdefault("data", None)
    return ServiceStats.from_dict(answer)


def _sorted(services: list[T]) -> list[T]:
    return sorted(services, key=lambda s: (s.name, (s.metadata or {}).get("responder", ""), s.id))
