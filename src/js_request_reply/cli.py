"""The command line, `python -m js_request_reply COMMAND`: each process of a scenario in a shell of its own.

Commands: server, cluster, workshop, responder, request, collect, stats, chaos, bench, lab, access-config.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import nats.errors

from . import protocol as p
from .access import ADMIN, RESPONDER, access_config
from .cluster import EmbeddedCluster
from .connection import connect, redacted
from .errors import JsRequestReplyError, PermissionDenied, RequestRejected, RequestTimeout, ServerUnreachable
from .menu import menu_handlers
from .requester import Requester
from .responder import Handled, Responder
from .server import LAB_URL_VARIABLE, EmbeddedServer
from .service import service_stats, stats_rows
from .streams import ensure_reply_stream, ensure_request_stream
from .workshop import generate_passwords, learner_names, learner_urls, url_host, workshop_server

DEFAULT_PORT = 4222
DEFAULT_URL = f"nats://127.0.0.1:{DEFAULT_PORT}"


def cli_url(args: argparse.Namespace) -> str:
    """--url, else NATS_URL, else the conventional local server, so two shells find the same server."""
    return args.url or os.environ.get("NATS_URL", "").strip() or DEFAULT_URL


def say(*parts: object) -> None:
    print(*parts, flush=True)


def complain(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def _stop_on_signals() -> asyncio.Event:
    """An event that Ctrl-C (SIGINT) or SIGTERM sets; install it before telling anyone to press Ctrl-C."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def cmd_server(args: argparse.Namespace) -> int:
    server = EmbeddedServer(port=args.port, store_dir=args.store, users=args.users)
    server.start()
    try:
        asyncio.run(_serve_until_signalled(server))
    finally:
        server.close()
        say("stopped.")
    return 0


async def _serve_until_signalled(server: EmbeddedServer) -> None:
    stop = _stop_on_signals()
    say(f"nats-server with JetStream at {server.url} (store: {server.store_dir})")
    if server.users is None:
        say(f"export NATS_URL={server.url}   # then, in another shell: python -m js_request_reply responder")
    else:
        say("only these users may connect; in each shell, export the URL of the user it acts as:")
        exports = {user: f"export NATS_URL={server.url_for(user)}" for user in (ADMIN, RESPONDER, *server.users)}
        width = max(map(len, exports.values()))
        for user, export in exports.items():
            say(f"  {export:<{width}}   # {_role(user)}")
    say("Ctrl-C to stop.")
    await stop.wait()


def _role(user: str) -> str:
    """What `user` of a server with users may do, in a few words."""
    if user == ADMIN:
        return "admin: creates and deletes streams"
    if user == RESPONDER:
        return "responder: serves requests, reads no mailbox"
    return f"{user}: sends requests, reads mailbox {user!r} alone"


def cmd_cluster(args: argparse.Namespace) -> int:
    cluster = EmbeddedCluster(size=args.size, store_dir=args.store)
    cluster.start()
    try:
        asyncio.run(_cluster_until_signalled(cluster, args.store))
    finally:
        cluster.close()
        say("stopped.")
    return 0


async def _cluster_until_signalled(cluster: EmbeddedCluster, store: str | None) -> None:
    stop = _stop_on_signals()
    nodes = ", ".join(f"{node.name} at port {node.port} (monitoring {node.monitor_port})" for node in cluster.servers)
    where = f" (stores: {store}/<node>)" if store else ""
    say(f"JetStream cluster {cluster.name!r} of {cluster.size} nodes: {nodes}{where}")
    say(f"NATS_URL={cluster.urls}")
    say("Ctrl-C to stop.")
    await stop.wait()


def cmd_workshop(args: argparse.Namespace) -> int:
    passwords = generate_passwords(learner_names(args.learners, args.users))
    server = workshop_server(passwords, port=args.port, host=args.host, store_dir=args.store)
    host = args.url_host or url_host(args.host)
    server.start()
    try:
        asyncio.run(_workshop_until_signalled(server, learner_urls(passwords, host, server.port)))
    finally:
        server.close()
        say("stopped.")
    return 0


async def _workshop_until_signalled(server: EmbeddedServer, urls: dict[str, str]) -> None:
    stop = _stop_on_signals()
    say(
        f"workshop nats-server with JetStream on {server.host}:{server.port} (store: {server.store_dir}): "
        f"{len(urls)} accounts, one per learner, each seeing only its own streams and subjects"
    )
    width = max(map(len, urls))
    for name, url in urls.items():
        say(f"{name:<{width}}  {url}")
    say("Give each learner their line; they run: export NATS_URL=<their URL>, then make lab. Ctrl-C to stop.")
    await stop.wait()


async def _responder(args: argparse.Namespace) -> int:
    url, server = cli_url(args), None
    try:
        nc = await connect(url, first_connect_timeout=2)
    except ServerUnreachable:
        if args.url or os.environ.get("NATS_URL"):
            raise
        server = EmbeddedServer(port=DEFAULT_PORT).start()
        say(f"no server at {redacted(url)}: started an embedded nats-server there; it stops with this responder.")
        nc = await connect(server.url)
    try:
        try:
            await ensure_request_stream(nc.jetstream(), args.stream)
            if args.mailbox_stream:
                await ensure_reply_stream(nc.jetstream())
        except PermissionDenied:
            # The responder user of access-config serves streams; the admin user creates them.
            say(f"this user may not create streams: serving {args.stream} as the admin made it.")

        def show(handled: Handled) -> None:
            detail = f" ({handled.detail})" if handled.detail else ""
            say(f"{handled.subject} -> {handled.outcome}{detail}")

        responder = Responder(
            nc,
            menu_handlers(),
            stream=args.stream,
            durable=args.durable,
            on_handled=show,
            max_in_flight=args.max_in_flight,
            ack_wait=args.ack_wait,
            max_deliver=args.max_deliver,
        )
        stop = _stop_on_signals()
        async with responder:
            stores = " and REPLIES" if args.mailbox_stream else ""
            say(
                f"serving the menu on {args.stream}{stores} at {redacted(url)} (durable {args.durable!r}); Ctrl-C to stop."
            )
            await stop.wait()
        say("stopped.")
        return 0
    finally:
        await nc.drain()
        if server is not None:
            server.close()


async def _request(args: argparse.Namespace) -> int:
    if args.no_wait and not args.mailbox:
        complain("--no-wait needs --mailbox NAME, so the reply has somewhere to wait")
        return 2
    nc = await connect(cli_url(args))
    requester = Requester(nc, mailbox=args.mailbox)
    try:
        if args.no_wait:
            request_id = await requester.send(args.subject, args.payload, ttl=args.ttl)
            say(
                f"sent {request_id}; collect the reply with: python -m js_request_reply collect --mailbox {args.mailbox}"
            )
            return 0
        reply = await requester.request(args.subject, args.payload, timeout=args.timeout, ttl=args.ttl)
        say(reply.data.decode("utf-8", errors="replace"))
        return 0
    except RequestRejected as exc:
        complain(f"rejected: {exc.code} {exc.description}")
        return 1
    except RequestTimeout as exc:
        complain(f"timeout: {exc}")
        return 1
    finally:
        await requester.close()
        await nc.drain()


async def _collect(args: argparse.Namespace) -> int:
    nc = await connect(cli_url(args))
    requester = Requester(nc, mailbox=args.mailbox)
    try:
        replies = await requester.collect(timeout=args.timeout)
        for reply in replies:
            answered = reply.headers.get(p.REQUEST_SUBJECT_HEADER, "?")
            outcome = f"rejected: {reply.error.code} {reply.error.description}" if reply.error else reply.text
            say(f"{reply.request_id}  {answered}  {outcome}")
        say(f"{len(replies)} replies collected for mailbox {args.mailbox!r}.")
        return 0
    finally:
        await requester.close()
        await nc.drain()


STATS_COLUMNS = (  # (heading, row key, format) of the stats table
    ("service", "service", "{}"),
    ("id", "id", "{}"),
    ("endpoint", "endpoint", "{}"),
    ("requests", "requests", "{:d}"),
    ("errors", "errors", "{:d}"),
    ("average", "average_ms", "{:.2f} ms"),
)
CLEAR_SCREEN = "\033[H\033[J"


async def _stats(args: argparse.Namespace) -> int:
    if args.interval <= 0 or args.timeout <= 0:
        raise ValueError("--interval and --timeout must be more than 0 seconds")
    nc = await connect(cli_url(args))
    try:
        stop = _stop_on_signals() if args.watch else None
        while True:
            stats = await service_stats(nc, args.name, timeout=args.timeout)
            if stop is not None and sys.stdout.isatty():
                print(CLEAR_SCREEN, end="")
            say(stats_text(stats_rows(stats), args.name, args.timeout))
            if stop is None:
                return 0
            say(f"(every {args.interval:g}s; Ctrl-C to stop)")
            try:
                async with asyncio.timeout(args.interval):
                    await stop.wait()
                return 0
            except TimeoutError:
                continue  # time for the next table
    finally:
        await nc.drain()


def stats_text(rows: list[dict], name: str | None = None, timeout: float = 1.0) -> str:
    """The stats table as text: one line per endpoint of every responder (or core service) that answered."""
    if not rows:
        asked = f"$SRV.STATS.{name}" if name else "$SRV.STATS"
        return f"no responder answered {asked} within {timeout:g}s"
    cells = [[heading for heading, _, _ in STATS_COLUMNS]]
    cells += [[form.format(row[key]) for _, key, form in STATS_COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(STATS_COLUMNS))]
    numeric = {i for i, (_, _, form) in enumerate(STATS_COLUMNS) if form != "{}"}
    return "\n".join(
        "  ".join(
            cell.rjust(width) if i in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in cells
    )


LAB_SETTING_DEFAULTS = {
    # No "Would you like to get notified about official Jupyter news?" over the first notebook.
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false"},
}


def cmd_lab(args: argparse.Namespace) -> int:
    command = [sys.executable, "-m", "jupyter", "lab", f"--notebook-dir={Path(args.notebooks)}", *args.jupyter_args]
    if os.geteuid() == 0:
        command.append("--allow-root")  # containers and CI machines often run as root; Jupyter refuses otherwise
    server = None
    if not os.environ.get("NATS_URL", "").strip():
        server = EmbeddedServer().start()
    try:
        with tempfile.TemporaryDirectory(prefix="jrr-lab-") as config_dir:
            env = lab_environment(os.environ, server.url if server else None, Path(config_dir))
            if server:
                say(f"NATS_URL={server.url} (the lab's server, for its terminals; each notebook starts its own)")
            else:
                say(f"NATS_URL={redacted(env['NATS_URL'])} (every notebook and terminal uses it)")
            return _in_the_foreground(command, env)
    finally:
        if server is not None:
            server.close()


def _in_the_foreground(command: list[str], env: dict[str, str]) -> int:
    """Run `command` until it exits, leaving Ctrl-C to it: JupyterLab asks, then shuts its kernels down."""
    process = subprocess.Popen(command, env=env)
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal sends Ctrl-C to both of us
        try:
            return process.wait()
        finally:
            signal.signal(signal.SIGINT, previous)
    except KeyboardInterrupt:  # pressed before it could be left to JupyterLab, which got it too
        return 0
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(30)


def lab_environment(base: Mapping[str, str], server_url: str | None, config_dir: Path) -> dict[str, str]:
    """The environment `jupyter lab` runs in, given the URL of the server the lab started (None: NATS_URL is set).

    NATS_URL names the lab's server, for its terminals, and JRR_LAB_NATS_URL marks it as the lab's,
    so each notebook's kernel starts a server of its own (see server_url()). JUPYTER_CONFIG_PATH
    adds `config_dir`, where lab_setting_defaults() writes JupyterLab defaults: a learner's own
    settings still win.
    """
    env = dict(base)
    if server_url is not None:
        env["NATS_URL"] = env[LAB_URL_VARIABLE] = server_url
    # Terminals opened in JupyterLab then find this environment's python and nats-server first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    lab_setting_defaults(config_dir)
    config_path = [str(config_dir), *filter(None, env.get("JUPYTER_CONFIG_PATH", "").split(os.pathsep))]
    env["JUPYTER_CONFIG_PATH"] = os.pathsep.join(config_path)
    return env


def lab_setting_defaults(config_dir: Path) -> Path:
    """Write LAB_SETTING_DEFAULTS where JupyterLab reads default overrides, in `config_dir`; return the file.

    They replace the defaults of settings, like the venv's overrides.json, but live only as long as
    this lab, and a value the learner chose in Settings wins over them.
    """
    path = config_dir / "labconfig" / "default_setting_overrides.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(LAB_SETTING_DEFAULTS, indent=2) + "\n")
    return path


def cmd_access_config(args: argparse.Namespace) -> int:
    say(access_config(args.users, _passwords(args.password)).rstrip("\n"))
    return 0


def _passwords(pairs: list[str]) -> dict[str, str]:
    """The `--password USER=SECRET` options as {user: secret}; a malformed or repeated one is a ValueError."""
    passwords: dict[str, str] = {}
    for pair in pairs:
        user, equals, secret = pair.partition("=")
        if not equals or not user:
            raise ValueError(f"--password {pair!r} is not USER=SECRET, like --password alice=s3cret")
        if user in passwords:
            raise ValueError(f"--password given twice for {user!r}")
        passwords[user] = secret
    return passwords


def cmd_chaos(args: argparse.Namespace) -> int:
    from .chaos import command  # loaded on use: the other commands start without it

    return command(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_main  # loaded on use, like chaos

    url = args.url or os.environ.get("NATS_URL", "").strip() or None  # None: a fresh embedded server (or cluster)
    return asyncio.run(
        bench_main(url, quick=args.quick, emit_json=args.json, requests=args.requests, replicas=args.replicas)
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m js_request_reply", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True)

    server = commands.add_parser("server", help="run an embedded nats-server in the foreground")
    server.add_argument("--port", type=int, default=DEFAULT_PORT, help="client port (0: any free port)")
    server.add_argument("--store", default=None, help="JetStream store folder (default: a temporary one)")
    server.add_argument(
        "--users",
        nargs="+",
        default=None,
        metavar="USER",
        help="admit only admin, responder and these mailbox owners, each with a generated password "
        "(see access-config); prints the URL of each",
    )
    server.set_defaults(run=cmd_server)

    cluster = commands.add_parser(
        "cluster", help="run a JetStream cluster of embedded nats-servers (n1, n2, n3) in the foreground"
    )
    cluster.add_argument(
        "--size",
        type=int,
        default=3,
        metavar="N",
        help="number of nodes (default 3; at least 2: nats-server runs no JetStream cluster of one, use server)",
    )
    cluster.add_argument(
        "--store", default=None, metavar="DIR", help="one store per node, in DIR/n1, DIR/n2... (default: temporary)"
    )
    cluster.set_defaults(run=cmd_cluster)

    workshop = commands.add_parser(
        "workshop",
        help="run one nats-server for a class, one JetStream account per learner; print each learner's NATS_URL",
        description="Start one nats-server with JetStream and one account per learner, print a line "
        "'NAME  nats://NAME:PASSWORD@HOST:PORT' for each, and serve until Ctrl-C. Each account sees only "
        "its own subjects and streams, so every learner runs every notebook unchanged with NATS_URL set "
        "to their line. Passwords are generated at each start.",
    )
    workshop.add_argument(
        "--learners", type=int, default=None, metavar="N", help="accounts learner01 ... learnerN (or use --users)"
    )
    workshop.add_argument(
        "--users", nargs="+", default=None, metavar="NAME", help="name the learners' accounts instead, one each"
    )
    workshop.add_argument("--port", type=int, default=DEFAULT_PORT, help="client port (default 4222; 0: any free)")
    workshop.add_argument(
        "--host",
        default="0.0.0.0",
        help="address to listen on (default 0.0.0.0: every interface, so learners' machines can connect; "
        "monitoring stays on 127.0.0.1)",
    )
    workshop.add_argument(
        "--url-host",
        default=None,
        metavar="HOST",
        help="host in the printed URLs (default: --host, or when that is 0.0.0.0 this machine's IP address "
        "on its default route, which learners on the same network reach; give a DNS name or public address "
        "when they connect from elsewhere)",
    )
    workshop.add_argument("--store", default=None, metavar="DIR", help="JetStream store (default: a temporary one)")
    workshop.set_defaults(run=cmd_workshop)

    def with_url(command: argparse.ArgumentParser) -> argparse.ArgumentParser:
        command.add_argument("--url", default=None, help=f"server URL (default: NATS_URL, else {DEFAULT_URL})")
        return command

    responder = with_url(commands.add_parser("responder", help="serve the seed's menu until interrupted"))
    responder.add_argument("--stream", default=p.DEFAULT_REQUEST_STREAM)
    responder.add_argument("--durable", default="responder")
    responder.add_argument("--mailbox-stream", action="store_true", help="create REPLIES too (mailbox mode)")
    responder.add_argument(
        "--max-in-flight", type=int, default=64, help="requests handled at once by this process (default 64)"
    )
    responder.add_argument(
        "--ack-wait", type=float, default=30.0, help="seconds before an unacked request is redelivered (default 30)"
    )
    responder.add_argument(
        "--max-deliver", type=int, default=5, help="deliveries before the server gives up on a request (default 5)"
    )
    responder.set_defaults(run=lambda args: asyncio.run(_responder(args)))

    request = with_url(commands.add_parser("request", help="send one request and print the reply"))
    request.add_argument("subject")
    request.add_argument("payload", nargs="?", default="")
    request.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for the reply")
    request.add_argument("--mailbox", default=None, help="store the reply in this mailbox (REPLIES)")
    request.add_argument("--no-wait", action="store_true", help="with --mailbox: send, print the id, exit")
    request.add_argument("--ttl", type=float, default=None, help="seconds the request may wait unserved")
    request.set_defaults(run=lambda args: asyncio.run(_request(args)))

    collect = with_url(commands.add_parser("collect", help="print and take the replies waiting in a mailbox"))
    collect.add_argument("--mailbox", required=True)
    collect.add_argument("--timeout", type=float, default=5.0)
    collect.set_defaults(run=lambda args: asyncio.run(_collect(args)))

    stats = with_url(
        commands.add_parser(
            "stats",
            help="a table of every responder on the server: endpoints, requests, errors, average time ($SRV.STATS)",
        )
    )
    stats.add_argument("--name", default=None, help="only the responders of this durable (the service name)")
    stats.add_argument("--watch", action="store_true", help="print the table again every --interval s, until Ctrl-C")
    stats.add_argument(
        "--interval", type=float, default=2.0, help="seconds between two tables with --watch (default 2)"
    )
    stats.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for answers (default 1)")
    stats.set_defaults(run=lambda args: asyncio.run(_stats(args)))

    chaos = commands.add_parser(
        "chaos",
        help="kill responders and restart a server (or kill cluster nodes) of its own mid-run; "
        "count what was lost (exit 1 if any)",
    )
    chaos.add_argument("--requests", type=int, default=200, help="how many requests to send (default 200)")
    chaos.add_argument("--responders", type=int, default=3, help="responder processes (default 3)")
    chaos.add_argument("--kills", type=int, default=None, help="SIGKILLs at random points (default max(2, N/100))")
    chaos.add_argument("--server-restarts", type=int, default=None, help="server restarts mid-run (default 1)")
    chaos.add_argument(
        "--cluster",
        action="store_true",
        help="run on a 3-node cluster of its own with R3 streams, killing nodes (stream leaders) instead",
    )
    chaos.add_argument(
        "--node-kills",
        type=int,
        default=None,
        help="with --cluster: nodes killed with SIGKILL, the first the REQUESTS leader (default max(1, N/500))",
    )
    chaos.add_argument("--seed", type=int, default=1, help="seed of every random choice (default 1)")
    chaos.add_argument("--timeout", type=float, default=300.0, help="seconds until the rest counts as lost")
    chaos.add_argument("--ack-wait", type=float, default=2.0, help="responders' ack_wait: redelivery after a kill")
    chaos.add_argument("--max-deliver", type=int, default=10, help="deliveries before a request is given up")
    chaos.add_argument("--json", action="store_true", help="print the counts as JSON instead of a table")
    chaos.set_defaults(run=cmd_chaos)

    bench = commands.add_parser(
        "bench", help="JetStream request-reply against core request-reply, in one run, as ratios"
    )
    bench.add_argument("--url", default=None, help="server URL (default: NATS_URL, else a fresh embedded server)")
    bench.add_argument("--json", action="store_true", help="print JSON for machines instead of a table")
    bench.add_argument("--quick", action="store_true", help="a tiny run that checks the benchmark works")
    bench.add_argument("--requests", type=int, default=None, help="requests per measurement (default 2000)")
    bench.add_argument(
        "--replicas",
        type=int,
        choices=(1, 3),
        default=1,
        help="3: on a 3-node cluster (its own, without --url), add R3 rows with ratios to R1 (default 1)",
    )
    bench.set_defaults(run=cmd_bench)

    lab = commands.add_parser(
        "lab",
        help="open JupyterLab on the notebooks: without NATS_URL, each notebook gets a server of its own and "
        "terminals share one (other options go to jupyter lab)",
    )
    lab.add_argument("--notebooks", default="notebooks")
    lab.set_defaults(run=cmd_lab)

    access = commands.add_parser(
        "access-config",
        help="print a nats-server authorization block: admin, responder, and one mailbox owner per USER",
        description="Print the users and permissions that keep each mailbox readable by its owner alone, "
        "for a nats-server configuration file: python -m js_request_reply access-config alice bob > access.conf",
    )
    access.add_argument("users", nargs="+", metavar="USER", help="a mailbox owner, one subject token like alice")
    access.add_argument(
        "--password",
        action="append",
        default=[],
        metavar="USER=SECRET",
        help="the password of USER (admin and responder too), letters, digits and . _ ~ - only; "
        "repeatable (default: generated)",
    )
    access.set_defaults(run=cmd_access_config)
    return top


def run_command(*args: str, timeout: float = 60.0) -> str:
    """Run `python -m js_request_reply ARGS` as a separate process against this process's server.

    Returns what it printed (stdout, then stderr). Notebooks use it to play a second process:
    a requester that comes back after the first one went away.
    """
    from .server import server_url  # the kernel's server, even when it is an embedded one

    env = {**os.environ, "NATS_URL": server_url()}
    command = [sys.executable, "-m", "js_request_reply", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    return done.stdout + done.stderr


def main(argv: list[str] | None = None) -> int:
    top = parser()
    args, extra = top.parse_known_args(argv)
    if extra and args.command != "lab":
        top.error(f"unrecognized arguments: {' '.join(extra)}")
    args.jupyter_args = extra
    try:
        return args.run(args)
    except (JsRequestReplyError, ValueError) as exc:
        complain(f"error: {exc}")
        return 2
    except nats.errors.Error as exc:  # the server refused or did not answer: say so, without a traceback
        complain(f"error: {type(exc).__name__}: {exc}")
        return 2
    except KeyboardInterrupt:
        return 130
