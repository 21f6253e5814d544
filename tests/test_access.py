"""Per-user permissions: the configuration nats-server accepts, the names and passwords it refuses,
and a server with users that admits each user under its own URL and inbox prefix.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import js_request_reply as jrr
from js_request_reply.access import access_config, all_permissions, check_users, passwords_for
from js_request_reply.errors import PermissionDenied
from js_request_reply.server import find_binary

RENAMED = {
    "request_stream": "ORDERS",
    "request_subjects": ("orders.*", "rush.>"),
    "reply_stream": "ANSWERS",
    "reply_prefix": "answers",
}
ALICE_PASSWORD = "alice-s3cret"


def server_accepts(config: str, path: Path) -> subprocess.CompletedProcess:
    """`nats-server -t -c`: the pinned server parses `config` (an authorization block) and checks it."""
    path.write_text(config)
    return subprocess.run([find_binary(), "-t", "-c", str(path)], capture_output=True, text=True, timeout=30)


def config_passwords(config: str) -> dict[str, str]:
    return dict(re.findall(r'"user": "([^"]+)",\s*"password": "([^"]+)"', config))


@pytest.fixture(scope="module")
def secured():
    """One server for this module that admits admin, responder, alice and bob; alice's password is given."""
    with jrr.EmbeddedServer(users=["alice", "bob"], passwords={"alice": ALICE_PASSWORD}) as server:
        yield server


# -- the configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize("names", [{}, RENAMED], ids=["default-streams", "renamed-streams"])
def test_nats_server_accepts_the_config(tmp_path, names):
    config = access_config(["alice", "bob"], **names)

    checked = server_accepts(config, tmp_path / "access.conf")

    assert checked.returncode == 0, checked.stdout + checked.stderr
    for name in names.get("request_subjects", ()):
        assert f'"{name}"' in config, f"{name} is in no user's permissions"


def test_nats_server_check_rejects_a_broken_config(tmp_path):
    # So that the test above means something: `-t` does refuse a block it cannot parse.
    broken = access_config(["alice"]).rstrip().removesuffix("}")

    checked = server_accepts(broken, tmp_path / "broken.conf")

    assert checked.returncode != 0


def test_config_has_admin_responder_then_each_user_in_order():
    config = access_config(["bob", "alice"])

    assert list(config_passwords(config)) == ["admin", "responder", "bob", "alice"]
    assert [perms.user for perms in all_permissions(["bob", "alice"])] == ["admin", "responder", "bob", "alice"]


def test_given_passwords_are_used_and_the_others_are_generated():
    config = access_config(["alice", "bob"], {"alice": ALICE_PASSWORD, "admin": "admin.pw_1~"})

    passwords = config_passwords(config)

    assert passwords["alice"] == ALICE_PASSWORD
    assert passwords["admin"] == "admin.pw_1~"
    assert passwords["bob"] and passwords["responder"]


def test_generated_passwords_differ_per_user_and_per_call():
    first, second = passwords_for(["alice", "bob"]), passwords_for(["alice", "bob"])

    assert list(first) == ["admin", "responder", "alice", "bob"]
    assert len(set(first.values())) == 4, "two users share a generated password"
    assert not set(first.values()) & set(second.values()), "two calls generated the same password"


@pytest.mark.parametrize(
    "users, message",
    [
        (["a.b"], "user 'a.b' must be one subject token"),
        (["alice*"], "user 'alice*' must be one subject token"),
        ([">"], "user '>' must be one subject token"),
        ([""], "user '' must be one subject token"),
        (["al ice"], "user 'al ice' must be one subject token"),
        (["alice", "bob", "alice"], "users named more than once: alice"),
        (["alice", "admin"], "admin is a role, not a mailbox owner"),
        (["responder"], "responder is a role, not a mailbox owner"),
    ],
)
def test_bad_users_are_refused_saying_why(users, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        access_config(users)
    with pytest.raises(ValueError, match=re.escape(message)):
        check_users(users)


@pytest.mark.parametrize("function", [check_users, all_permissions, access_config])
def test_a_string_of_users_is_refused_instead_of_read_letter_by_letter(function):
    with pytest.raises(TypeError, match=re.escape("users must be a list of names, like ['alice', 'bob']")):
        function("alice")


@pytest.mark.parametrize("password", ["two words", "p@ss", "a:b", "x/y", "", "sécret"])
def test_passwords_that_cannot_travel_in_a_url_are_refused(password):
    with pytest.raises(ValueError, match="the password of 'alice' may hold only letters, digits") as raised:
        access_config(["alice"], {"alice": password})

    assert "nats://user:password@host" in str(raised.value)


def test_a_password_for_someone_who_is_no_user_is_refused():
    with pytest.raises(ValueError, match="passwords given for unknown users: carol"):
        access_config(["alice"], {"carol": "abc"})


# -- a server with users --------------------------------------------------------------------------


def test_url_has_no_credentials_and_url_for_has_each_users(secured):
    url = urlsplit(secured.url)

    assert url.username is None and url.password is None
    assert not any(password in secured.url for password in secured.passwords.values())
    assert secured.url_for("alice") == f"nats://alice:{ALICE_PASSWORD}@{secured.host}:{secured.port}"
    for user in ("admin", "responder", "bob"):
        assert secured.url_for(user) == f"nats://{user}:{secured.passwords[user]}@{secured.host}:{secured.port}"


def test_url_for_an_unknown_user_names_the_known_ones(secured):
    with pytest.raises(ValueError, match="no user 'carol' on this server; its users are admin, responder, alice, bob"):
        secured.url_for("carol")


def test_url_for_on_a_server_without_users_says_how_to_add_them():
    with pytest.raises(ValueError, match=re.escape("this server has no users: start it with EmbeddedServer(users=")):
        jrr.EmbeddedServer().url_for("alice")


def test_passwords_without_users_are_refused():
    with pytest.raises(ValueError, match=re.escape("passwords need users: EmbeddedServer(users=")):
        jrr.EmbeddedServer(passwords={"alice": ALICE_PASSWORD})


def test_a_server_refuses_bad_users_before_it_starts():
    with pytest.raises(ValueError, match="admin is a role"):
        jrr.EmbeddedServer(users=["admin"])
    with pytest.raises(TypeError, match="users must be a list of names"):
        jrr.EmbeddedServer(users="alice")


async def test_a_wrong_password_is_refused_at_once_without_showing_it(secured):
    wrong = f"nats://alice:not-{ALICE_PASSWORD}@{secured.host}:{secured.port}"

    with pytest.raises(PermissionDenied) as raised:
        await jrr.connect(wrong)

    message = str(raised.value)
    assert "refused user 'alice'" in message
    assert "check the user name and password" in message
    assert ALICE_PASSWORD not in message, f"the message shows a password: {message}"
    assert raised.value.user == "alice"


async def test_a_connection_without_a_user_is_refused(secured):
    with pytest.raises(PermissionDenied, match="refused a connection without a user"):
        await jrr.connect(secured.url)


async def test_a_users_connection_gets_its_own_inbox_prefix(secured):
    nc = await jrr.connect(secured.url_for("alice"))
    try:
        inboxes = nc.new_inbox(), nc.new_inbox()
    finally:
        await nc.drain()

    assert bytes(nc._inbox_prefix) == b"_INBOX.alice"
    for inbox in inboxes:
        assert inbox.startswith("_INBOX.alice."), inbox
        assert len(inbox.split(".")) == 3, f"{inbox}: not _INBOX.alice.<token>"
    assert inboxes[0] != inboxes[1]


async def test_a_user_gets_core_replies_in_its_own_inbox(secured):
    # alice may subscribe to _INBOX.alice.> alone: the prefix is what lets her replies reach her.
    admin = await jrr.connect(secured.url_for("admin"))
    alice = await jrr.connect(secured.url_for("alice"))
    try:

        async def echo(msg):
            await msg.respond(b"pong from " + msg.reply.encode())

        await admin.subscribe("requests.ping", cb=echo)
        await admin.flush()
        reply = await alice.request("requests.ping", b"ping", timeout=5)
    finally:
        await alice.drain()
        await admin.drain()

    assert reply.data.startswith(b"pong from _INBOX.alice.")


async def test_a_connection_to_a_server_without_users_keeps_the_default_prefix(nc):
    first, second = nc.new_inbox(), nc.new_inbox()

    assert bytes(nc._inbox_prefix) == b"_INBOX"
    for inbox in (first, second):
        prefix, token = inbox.split(".")
        assert prefix == "_INBOX"
        assert len(token) == 22, f"{inbox}: the token after _INBOX. is not a random NUID"
    assert first != second
