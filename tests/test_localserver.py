"""Tests for django_socketmail.localserver, with smtplib as the reference client.

No Django here: these tests only talk to the server.
"""

from __future__ import annotations

import base64
import gc
import hmac
import os
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from django_socketmail.localserver import (
    MECHANISMS,
    LocalSMTPServer,
    ReceivedMessage,
    TLSMode,
    _Credentials,
)

REPO = Path(__file__).resolve().parent.parent
MESSAGE = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: hi\r\n\r\nHello.\r\n"
USER, PASSWORD = "alice", "s3cret-pass"
UTF8_USER, UTF8_PASSWORD = "jürgen.ß@例え", "pässwörd ☃"

MakeServer = Callable[..., LocalSMTPServer]


@pytest.fixture
def make_server() -> Iterator[MakeServer]:
    servers: list[LocalSMTPServer] = []

    def make(**options: Any) -> LocalSMTPServer:
        options.setdefault("users", {USER: PASSWORD, UTF8_USER: UTF8_PASSWORD})
        server = LocalSMTPServer(**options)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


def connect(server: LocalSMTPServer, host: str = "127.0.0.1") -> smtplib.SMTP:
    """An smtplib client after EHLO, under TLS if the server has it, verified by its CA."""
    if server.tls == "implicit":
        client: smtplib.SMTP = smtplib.SMTP_SSL(
            host, server.port, timeout=5, context=server.client_ssl_context()
        )
    else:
        client = smtplib.SMTP(host, server.port, timeout=5)
    client.ehlo()
    if server.tls == "starttls":
        client.starttls(context=server.client_ssl_context())
        client.ehlo()
    return client


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


# Sending


def test_plain_send(make_server: MakeServer) -> None:
    server = make_server(tls="none")
    with connect(server) as client:
        assert "starttls" not in client.esmtp_features
        assert client.sendmail("a@example.com", ["b@example.com", "c@example.com"], MESSAGE) == {}
    [message] = server.wait_for_messages(1)
    assert message == ReceivedMessage(
        mail_from="a@example.com",
        rcpt_tos=("b@example.com", "c@example.com"),
        data=MESSAGE,
        mail_options=(f"SIZE={len(MESSAGE)}",),
        rcpt_options=(),
        auth_user=None,
        tls=False,
        queue_id=message.queue_id,
    )
    assert len(message.queue_id) == 10


def test_final_reply_names_the_queue_id(make_server: MakeServer) -> None:
    server = make_server(tls="none")
    with connect(server) as client:
        client.mail("a@example.com")
        client.rcpt("b@example.com")
        code, text = client.data(MESSAGE)
    [message] = server.wait_for_messages(1)
    assert (code, text) == (250, f"OK: queued as {message.queue_id}".encode())


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_starttls_send_verified_against_the_ca(make_server: MakeServer, host: str) -> None:
    server = make_server(tls="starttls")
    with smtplib.SMTP(host, server.port, timeout=5) as client:
        client.ehlo()
        assert "starttls" in client.esmtp_features
        client.starttls(context=server.client_ssl_context())  # checks the name against host
        client.ehlo()
        assert "starttls" not in client.esmtp_features
        client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
    [message] = server.wait_for_messages(1)
    assert message.tls


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_implicit_tls_send(make_server: MakeServer, host: str) -> None:
    server = make_server(tls="implicit")
    context = server.client_ssl_context()
    with smtplib.SMTP_SSL(host, server.port, timeout=5, context=context) as client:
        client.ehlo()
        assert "starttls" not in client.esmtp_features
        client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
    [message] = server.wait_for_messages(1)
    assert message.tls


def test_certificate_is_not_trusted_without_the_ca(make_server: MakeServer) -> None:
    server = make_server(tls="starttls")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=5) as client, pytest.raises(ssl.SSLError):
        client.starttls(context=ssl.create_default_context(cafile=None, cadata=None))


def test_message_bytes_are_recorded_exactly(make_server: MakeServer) -> None:
    server = make_server(tls="none")
    body = (
        "From: a@example.com\r\nSubject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\n\r\n"
        ".one dot\r\n..two dots\r\n.\r\nbare dot above, 8-bit: grüße\r\n"
    ).encode()
    with connect(server) as client:
        client.sendmail(  # smtplib dot-stuffs: the server must undo exactly that
            "ä@example.com", ["ö@example.com"], body, mail_options=["SMTPUTF8", "BODY=8BITMIME"]
        )
        client.mail("a@example.com")
        client.rcpt("b@example.com")
        assert client.docmd("DATA")[0] == 354
        client.send(b"..stuffed\r\nlone\rCR kept\r\n.\r\n")
        assert client.getreply()[0] == 250
    first, second = server.wait_for_messages(2)
    assert first.data == body
    assert first.mail_from == "ä@example.com"
    assert first.rcpt_tos == ("ö@example.com",)
    assert set(first.mail_options) == {"SMTPUTF8", "BODY=8BITMIME", f"SIZE={len(body)}"}
    assert second.data == b".stuffed\r\nlone\rCR kept\r\n"


def test_null_reverse_path_is_recorded_as_empty(make_server: MakeServer) -> None:
    server = make_server(tls="none")
    with connect(server) as client:
        client.sendmail("<>", ["b@example.com"], MESSAGE)
    [message] = server.wait_for_messages(1)
    assert message.mail_from == ""


# Authentication


@pytest.mark.parametrize(
    ("mechanism", "initial_response"),
    [("CRAM-MD5", False), ("PLAIN", True), ("PLAIN", False), ("LOGIN", True), ("LOGIN", False)],
)
def test_auth_succeeds(make_server: MakeServer, mechanism: str, initial_response: bool) -> None:
    server = make_server(tls="starttls")
    with connect(server) as client:
        client.user, client.password = USER, PASSWORD
        authobject = getattr(client, "auth_" + mechanism.lower().replace("-", "_"))
        code, _ = client.auth(mechanism, authobject, initial_response_ok=initial_response)
        assert code == 235
        client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
    [message] = server.wait_for_messages(1)
    assert message.auth_user == USER


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize(("user", "password"), [(USER, "wrong"), ("mallory", PASSWORD)])
def test_bad_credentials_are_535(
    make_server: MakeServer, mechanism: str, user: str, password: str
) -> None:
    server = make_server(tls="starttls")
    with connect(server) as client:
        client.user, client.password = user, password
        authobject = getattr(client, "auth_" + mechanism.lower().replace("-", "_"))
        with pytest.raises(smtplib.SMTPAuthenticationError) as excinfo:
            client.auth(mechanism, authobject)
        assert excinfo.value.smtp_code == 535
        client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
    [message] = server.wait_for_messages(1)
    assert message.auth_user is None


def auth_by_hand(client: smtplib.SMTP, mechanism: str, user: str, password: str) -> int:
    """AUTH with UTF-8 credentials, which smtplib's auth_* encode as ASCII and refuse."""
    if mechanism == "PLAIN":
        return client.docmd("AUTH", "PLAIN " + b64(f"\0{user}\0{password}"))[0]
    if mechanism == "LOGIN":
        assert client.docmd("AUTH", "LOGIN")[0] == 334
        assert client.docmd(b64(user))[0] == 334
        return client.docmd(b64(password))[0]
    code, challenge = client.docmd("AUTH", "CRAM-MD5")
    assert code == 334
    digest = hmac.new(password.encode(), base64.b64decode(challenge), "md5").hexdigest()
    return client.docmd(b64(f"{user} {digest}"))[0]


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_non_ascii_credentials(make_server: MakeServer, mechanism: str) -> None:
    server = make_server(tls="starttls")
    with connect(server) as client:
        assert auth_by_hand(client, mechanism, UTF8_USER, UTF8_PASSWORD) == 235
        client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
    [message] = server.wait_for_messages(1)
    assert message.auth_user == UTF8_USER


def test_cram_md5_challenge_names_the_host(make_server: MakeServer) -> None:
    server = make_server(tls="starttls", hostname="mx.example.test")
    with connect(server) as client:
        code, challenge = client.docmd("AUTH", "CRAM-MD5")
        assert code == 334
        assert base64.b64decode(challenge).endswith(b"@mx.example.test>")
        assert client.docmd("*")[0] == 501


def test_cram_md5_matches_rfc_2195_example() -> None:
    credentials = _Credentials({"tim": "tanstaaftanstaaf"})
    challenge = b"<1896.697170952@postoffice.reston.mci.net>"
    response = base64.b64decode("dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw")
    assert credentials.check_cram_md5(challenge, response) == "tim"
    assert credentials.check_cram_md5(challenge + b" ", response) is None
    assert credentials.check_cram_md5(challenge, response.upper()) is None


def test_auth_is_only_offered_under_tls_by_default(make_server: MakeServer) -> None:
    server = make_server(tls="starttls")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=5) as client:
        client.ehlo()
        assert "auth" not in client.esmtp_features
        assert client.docmd("AUTH", "CRAM-MD5")[0] == 538
        client.starttls(context=server.client_ssl_context())
        client.ehlo()
        assert client.esmtp_features["auth"].split() == ["CRAM-MD5", "PLAIN", "LOGIN"]


def test_auth_under_implicit_tls(make_server: MakeServer) -> None:
    server = make_server(tls="implicit", auth_required=True)
    with connect(server) as client:
        assert client.esmtp_features["auth"].split() == ["CRAM-MD5", "PLAIN", "LOGIN"]
        client.login(USER, PASSWORD)
        client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
    [message] = server.wait_for_messages(1)
    assert (message.auth_user, message.tls) == (USER, True)


def test_mechanisms_are_advertised_in_the_order_given(make_server: MakeServer) -> None:
    server = make_server(tls="none", allow_cleartext_auth=True, mechanisms=["LOGIN", "PLAIN"])
    with connect(server) as client:
        assert client.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
        assert client.docmd("AUTH", "CRAM-MD5")[0] == 504
        assert auth_by_hand(client, "LOGIN", USER, PASSWORD) == 235


def test_require_tls_refuses_auth_and_mail_before_starttls(make_server: MakeServer) -> None:
    server = make_server(tls="starttls", require_tls=True, allow_cleartext_auth=True)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=5) as client:
        client.ehlo()
        assert client.docmd("AUTH", "PLAIN " + b64(f"\0{USER}\0{PASSWORD}"))[0] == 530
        assert client.mail("a@example.com")[0] == 530
        assert client.noop()[0] == 250
        client.starttls(context=server.client_ssl_context())
        client.ehlo()
        client.login(USER, PASSWORD)
        client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
    [message] = server.wait_for_messages(1)
    assert (message.auth_user, message.tls) == (USER, True)


def test_auth_required_refuses_mail_without_auth(make_server: MakeServer) -> None:
    server = make_server(tls="none", auth_required=True, allow_cleartext_auth=True)
    with connect(server) as client:
        assert client.mail("a@example.com")[0] == 530
        assert auth_by_hand(client, "CRAM-MD5", USER, PASSWORD) == 235
        client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
    [message] = server.wait_for_messages(1)
    assert (message.auth_user, message.tls) == (USER, False)


def test_default_user_is_random(make_server: MakeServer) -> None:
    first, second = make_server(users=None), make_server(users=None)
    [(user, password)] = first.users.items()
    assert user.startswith("demo-")
    assert len(password) >= 16
    assert first.users != second.users
    with connect(first) as client:
        client.login(user, password)


# Envelope policy and extensions


def test_refuse_recipients_hook(make_server: MakeServer) -> None:
    def refuse(address: str) -> tuple[int, str] | None:
        return (550, "5.1.1 No such user") if address.startswith("nobody@") else None

    server = make_server(tls="none", refuse_recipients=refuse)
    with connect(server) as client:
        refused = client.sendmail("a@example.com", ["b@example.com", "nobody@example.com"], MESSAGE)
        assert refused == {"nobody@example.com": (550, b"5.1.1 No such user")}
    [message] = server.wait_for_messages(1)
    assert message.rcpt_tos == ("b@example.com",)


def test_size_is_advertised_and_enforced(make_server: MakeServer) -> None:
    server = make_server(tls="none", size_limit=1000)
    big = MESSAGE + b"x" * 998 + b"\r\n"
    with connect(server) as client:
        assert client.esmtp_features["size"] == "1000"
        with pytest.raises(smtplib.SMTPSenderRefused) as excinfo:
            client.sendmail("a@example.com", ["b@example.com"], big)  # MAIL ... SIZE=n
        assert excinfo.value.smtp_code == 552
        client.rset()
        client.mail("a@example.com")  # no SIZE parameter: refused after the data
        client.rcpt("b@example.com")
        assert client.data(big)[0] == 552
    assert server.messages == []


def test_extensions_can_be_switched_off(make_server: MakeServer) -> None:
    server = make_server(tls="none", smtputf8=False, eightbitmime=False, size_limit=None)
    with connect(server) as client:
        assert not {"smtputf8", "8bitmime", "size", "pipelining", "auth"} & set(
            client.esmtp_features
        )
        assert client.mail("a@example.com", ["BODY=8BITMIME"])[0] == 555
        assert client.docmd("MAIL", "FROM:<a@example.com> SMTPUTF8")[0] == 501


def test_pipelined_group_is_answered_in_order(make_server: MakeServer) -> None:
    server = make_server(
        tls="none",
        pipelining=True,
        refuse_recipients=lambda address: (550, "5.1.1 No") if address == "x@b.example" else None,
    )
    with connect(server) as client:
        assert "pipelining" in client.esmtp_features
        client.send(
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<x@b.example>\r\n"
            b"RCPT TO:<y@b.example>\r\nDATA\r\n"
        )
        assert [client.getreply()[0] for _ in range(4)] == [250, 550, 250, 354]
        client.send(MESSAGE + b".\r\nRSET\r\nNOOP\r\n")
        assert [client.getreply()[0] for _ in range(3)] == [250, 250, 250]
    [message] = server.wait_for_messages(1)
    assert message.rcpt_tos == ("y@b.example",)


def test_multi_line_replies_do_not_stall(make_server: MakeServer) -> None:
    # Without TCP_NODELAY on the server side, each EHLO stalls ~40 ms (Nagle + delayed ACK).
    server = make_server(tls="none")
    with connect(server) as client:
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            client.ehlo()
            timings.append(time.perf_counter() - started)
    assert min(timings) < 0.025, timings


def test_wait_for_messages_times_out(make_server: MakeServer) -> None:
    server = make_server(tls="none")
    with pytest.raises(TimeoutError, match="expected 1 message"):
        server.wait_for_messages(1, timeout=0.05)


# Lifecycle


def socket_fds() -> set[str]:
    """The sockets this process has open (Linux)."""
    gc.collect()
    sockets = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the directory listing's own fd
            continue
        if target.startswith("socket:"):
            sockets.add(target)
    return sockets


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("tls", ["none", "starttls", "implicit"])
def test_stop_leaves_nothing_behind(tls: TLSMode) -> None:
    threads, sockets = set(threading.enumerate()), socket_fds()
    server = LocalSMTPServer(tls=tls)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with server:
            ca_dir = Path(server.ca_cert_path).parent
            assert ca_dir.is_dir()
            client = connect(server)  # still connected, under TLS if any, when it stops
            started = time.monotonic()
        assert time.monotonic() - started < 3  # no wait for the client's TLS close_notify
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
        client.close()
        del client
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
        assert set(threading.enumerate()) == threads
        assert socket_fds() == sockets
        assert not ca_dir.exists()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_lifecycle_errors() -> None:
    server = LocalSMTPServer(tls="none")
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.ca_cert_path
    server.stop()  # stopping a server that never started is fine
    with server:
        assert "running" in repr(server)
        with pytest.raises(RuntimeError, match="already running"):
            server.start()
    server.stop()
    with server, connect(server) as client:  # and it can start again
        assert client.noop()[0] == 250


def test_failed_start_cleans_up() -> None:
    with LocalSMTPServer(tls="none") as taken:
        threads = set(threading.enumerate())
        server = LocalSMTPServer(tls="none", port=taken.port)
        with pytest.raises(OSError, match="in use"):
            server.start()
        assert set(threading.enumerate()) == threads
        with pytest.raises(RuntimeError, match="not running"):
            _ = server.ca_cert_path


@pytest.mark.parametrize(
    "options",
    [
        {"tls": "ssl"},
        {"tls": "none", "require_tls": True},
        {"mechanisms": ["XOAUTH2"]},
        {"mechanisms": ["PLAIN", "PLAIN"]},
        {"size_limit": 0},
    ],
)
def test_invalid_options(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        LocalSMTPServer(**options)


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_importing_does_not_import_django() -> None:
    result = run_python(
        "import sys, django_socketmail.localserver; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'django'))"
    )
    assert (result.returncode, result.stdout) == (0, "[]\n"), result.stderr


def test_missing_extra_says_how_to_install() -> None:
    result = run_python(
        "import sys; sys.modules['aiosmtpd'] = None; import django_socketmail.localserver"
    )
    assert result.returncode == 1
    assert 'pip install "django-socketmail[demo]"' in result.stderr
