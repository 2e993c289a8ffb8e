"""Tests of the hostile SMTP server, one per kind of scenario, with smtplib or a raw socket.

Each test is also an example of how to write that scenario: the client here is a reference
(smtplib, or `RawClient` below), never django-socketmail's own client.
"""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
import time

import pytest
import trustme

from tests.hostile.server import (
    DEFAULT_EXTENSIONS,
    Connection,
    HostileSMTPServer,
    Script,
    auth,
    close,
    cycle,
    drain,
    drip,
    ehlo,
    endless_multiline,
    expect,
    expect_any,
    flood,
    greet,
    handler,
    read_bytes,
    read_data,
    reply,
    respond,
    send,
    sleep,
    standard_session,
    starttls,
)

FROM = "from@example.com"
TO = ["a@example.com", "b@example.com", "c@example.com", "d@example.com"]
BODY = b"Subject: hi\r\n\r\nHello.\r\n.dot line\r\n"
PLAIN_BLOB = base64.b64encode(b"\0user\0s3cret-pass")


@pytest.fixture(autouse=True)
def _no_leaks(no_leaks: None) -> None:
    """Every test ends with the threads and file descriptors it started with."""


@pytest.fixture(scope="module")
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


class RawClient:
    """A bare reference client: send bytes, read bounded replies, all within `deadline`."""

    def __init__(self, server: HostileSMTPServer, deadline: float = 1.0) -> None:
        self.sock: socket.socket = socket.create_connection(server.address, timeout=deadline)
        self.deadline = time.monotonic() + deadline
        self.buf = b""

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self, limit: int = 4096) -> bytes:
        while b"\n" not in self.buf:
            if len(self.buf) > limit:
                raise ValueError("line too long")
            self.sock.settimeout(max(self.deadline - time.monotonic(), 0.001))
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def reply(self, max_lines: int = 100) -> tuple[int, list[bytes]]:
        lines = []
        for _ in range(max_lines):
            line = self.line()
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), lines
        raise ValueError("too many lines")

    def command(self, data: bytes) -> int:
        self.send(data)
        return self.reply()[0]

    def starttls(self, context: ssl.SSLContext) -> None:
        assert self.buf == b""
        self.sock = context.wrap_socket(self.sock, server_hostname="127.0.0.1")


def smtp(server: HostileSMTPServer, timeout: float = 1.0) -> smtplib.SMTP:
    return smtplib.SMTP(server.host, server.port, timeout=timeout)


# -- opening ---------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [421, 554])
def test_greeting_refused(code: int) -> None:
    with HostileSMTPServer(Script([reply(code, "go away")])) as server:
        with pytest.raises(smtplib.SMTPConnectError) as info:
            smtp(server)
        assert info.value.smtp_code == code
        assert server.wait_closed()
    assert server.received == b""
    assert server.connections[0].ended_by == "client"
    assert server.errors == []


def test_never_greets() -> None:
    with HostileSMTPServer(Script([drain()])) as server:
        started = time.monotonic()
        with pytest.raises(smtplib.SMTPServerDisconnected):
            smtp(server, timeout=0.2)
        assert time.monotonic() - started < 0.5
        assert server.wait_closed()


def test_reply_one_byte_at_a_time() -> None:
    with HostileSMTPServer(Script([drip(b"220 slow\r\n", 0.03)])) as server:
        started = time.monotonic()
        with smtp(server, timeout=0.1):  # a timeout per read is not a deadline
            assert time.monotonic() - started > 0.25
        with RawClient(server, deadline=0.1) as client, pytest.raises(TimeoutError):
            client.reply()
        started = time.monotonic()
        assert server.wait_closed(count=2)  # the drip notices the client left
        assert time.monotonic() - started < 0.3
        assert server.connections[1].ended_by == "client"


def test_ten_megabyte_line() -> None:
    with HostileSMTPServer(Script([send(b"220 "), flood(10 * 1024 * 1024)])) as server:
        with pytest.raises(smtplib.SMTPResponseException, match="Line too long"):
            smtp(server)
        assert server.wait_closed()
        assert server.connections[0].ended_by == "client"


def test_endless_multiline_reply() -> None:
    with HostileSMTPServer(Script([endless_multiline(220)])) as server:
        with RawClient(server) as client, pytest.raises(ValueError, match="too many lines"):
            client.reply(max_lines=1000)
        assert server.wait_closed()


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (b"250-first\r\n251 mismatched\r\n", 251),  # smtplib keeps the last code
        (b"2x0-not numeric\r\n250 ok\r\n", -1),  # smtplib stops at the broken line
        (b"250 caf\xe9 \xff\xfe\r\n", 250),  # not UTF-8
    ],
)
def test_malformed_replies(wire: bytes, code: int) -> None:
    script = Script([greet(), expect(b"NOOP"), send(wire)])
    with HostileSMTPServer(script) as server, smtp(server) as client:
        assert client.noop()[0] == code
        client.close()
        assert server.wait_closed()
    assert server.errors == []


def test_ehlo_refused_helo_works() -> None:
    script = standard_session({"EHLO": reply(502, "5.5.2 Error: command not recognized")})
    with HostileSMTPServer(script) as server, smtp(server) as client:
        client.sendmail(FROM, TO[:1], BODY)
    assert [c.split()[0] for c in server.commands[:2]] == [b"ehlo", b"helo"]
    assert server.messages == [BODY.replace(b"\r\n..", b"\r\n.")]


# -- authentication --------------------------------------------------------------------------


@pytest.mark.parametrize("code", [535, 454])
def test_auth_refused(code: int) -> None:
    script = standard_session(
        {"AUTH": auth(final=reply(code, f"{code // 100}.7.8 no"))},
        extensions=["AUTH PLAIN"],
    )
    with HostileSMTPServer(script) as server, smtp(server) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            client.login("user", "s3cret-pass")
        assert info.value.smtp_code == code
    assert PLAIN_BLOB in server.received  # what a test of "never sent in clear" looks at


def test_cram_md5_challenge_not_base64() -> None:
    script = standard_session({"AUTH": auth(cram_challenge="!!not*base64!!")})
    with HostileSMTPServer(script) as server, RawClient(server) as client:
        client.reply()
        client.command(b"EHLO me\r\n")
        client.send(b"AUTH CRAM-MD5\r\n")
        assert client.reply() == (334, [b"334 !!not*base64!!\r\n"])
        assert client.command(b"*\r\n") == 501  # a client should cancel like this
        assert client.command(b"QUIT\r\n") == 221
    assert server.errors == []


def test_extra_334_after_password() -> None:
    extra = [reply(334, "bW9yZT8="), expect_any()]
    script = standard_session({"AUTH": auth(extra=extra)}, extensions=["AUTH PLAIN"])
    with HostileSMTPServer(script) as server, smtp(server) as client:
        client.login("user", "s3cret-pass")
    # smtplib answers the unexpected step with the credentials again: ours must not.
    assert server.received.count(PLAIN_BLOB) == 2


# -- STARTTLS --------------------------------------------------------------------------------


def test_starttls_refused() -> None:
    script = standard_session(extensions=[*DEFAULT_EXTENSIONS, "STARTTLS"])  # no tls_context
    with HostileSMTPServer(script) as server, smtp(server) as client:
        with pytest.raises(smtplib.SMTPResponseException) as info:
            client.starttls()
        assert info.value.smtp_code == 454
    assert b"AUTH" not in server.received
    assert b"MAIL" not in server.received


def test_starttls_not_advertised() -> None:
    with (
        HostileSMTPServer(standard_session()) as server,
        smtp(server) as client,
        pytest.raises(smtplib.SMTPNotSupportedError),
    ):
        client.starttls()
    assert b"STARTTLS" not in server.received


def test_starttls_response_injection(
    server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    script = Script(
        [
            greet(),
            ehlo(["STARTTLS"]),
            expect(b"STARTTLS"),
            send(b"220 2.0.0 go ahead\r\n250 injected\r\n"),
            starttls(),
            respond(),
        ]
    )
    with HostileSMTPServer(script, tls_context=server_tls) as server:
        with RawClient(server) as client:
            client.reply()
            client.command(b"EHLO me\r\n")
            client.send(b"STARTTLS\r\n")
            assert client.reply()[0] == 220
            assert client.reply()[0] == 250  # the injected reply, read before the handshake
            client.starttls(client_tls)
            assert client.command(b"EHLO me\r\n") == 250
            assert client.command(b"QUIT\r\n") == 221
        assert server.wait_closed()
    assert server.connections[0].tls
    assert server.errors == []


def test_starttls_then_session(server_tls: ssl.SSLContext, client_tls: ssl.SSLContext) -> None:
    script = standard_session(extensions=[*DEFAULT_EXTENSIONS, "STARTTLS"])
    with HostileSMTPServer(script, tls_context=server_tls) as server, smtp(server) as client:
        client.starttls(context=client_tls)
        client.ehlo()
        assert not client.has_extn("starttls")  # not offered again inside TLS
        client.login("user", "s3cret-pass")
        client.sendmail(FROM, TO[:1], BODY)
    conn = server.connections[0]
    assert conn.tls
    assert len(conn.messages) == 1
    assert conn.violations == []


def test_implicit_tls(server_tls: ssl.SSLContext, client_tls: ssl.SSLContext) -> None:
    server = HostileSMTPServer(standard_session(), tls_context=server_tls, implicit_tls=True)
    with server, smtplib.SMTP_SSL(*server.address, context=client_tls, timeout=1) as client:
        client.sendmail(FROM, TO[:1], BODY)
    assert server.connections[0].tls
    assert len(server.messages) == 1


def test_implicit_tls_client_refuses_certificate(server_tls: ssl.SSLContext) -> None:
    server = HostileSMTPServer(standard_session(), tls_context=server_tls, implicit_tls=True)
    with server:
        with pytest.raises(ssl.SSLCertVerificationError):
            smtplib.SMTP_SSL(*server.address, context=ssl.create_default_context(), timeout=1)
        assert server.wait_closed()
    assert server.connections[0].tls_error is not None
    assert server.errors == []


# -- recipients ------------------------------------------------------------------------------


def test_every_second_rcpt_refused() -> None:
    rule = cycle(reply(250, "2.1.5 Ok"), reply(550, "5.1.1 No such user"))
    with HostileSMTPServer(standard_session({"RCPT": rule})) as server, smtp(server) as client:
        refused = client.sendmail(FROM, TO, BODY)
    assert sorted(refused) == [TO[1], TO[3]]
    assert len(server.messages) == 1


def test_all_rcpts_refused() -> None:
    script = standard_session({"RCPT": reply(550, "5.1.1 No such user")})
    with (
        HostileSMTPServer(script) as server,
        smtp(server) as client,
        pytest.raises(smtplib.SMTPRecipientsRefused),
    ):
        client.sendmail(FROM, TO, BODY)
    assert b"DATA" not in server.received


def test_too_many_recipients_per_transaction() -> None:
    def two_per_transaction(conn: Connection, line: bytes) -> None:
        if conn.txn_count("RCPT") > 2:
            conn.reply(452, "4.5.3 Too many recipients")
        else:
            conn.reply(250, "2.1.5 Ok")

    script = standard_session({"RCPT": two_per_transaction})
    with HostileSMTPServer(script) as server, smtp(server) as client:
        refused = client.sendmail(FROM, TO, BODY)
        assert {code for code, _ in refused.values()} == {452}
        assert client.sendmail(FROM, list(refused), BODY) == {}
    assert len(server.messages) == 2


# -- end of data and disconnections ----------------------------------------------------------


@pytest.mark.parametrize("code", [554, 451])
def test_refused_at_end_of_data(code: int) -> None:
    script = standard_session({".": reply(code, f"{code // 100}.6.0 rejected")})
    with HostileSMTPServer(script) as server, smtp(server) as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail(FROM, TO[:1], BODY)
        assert info.value.smtp_code == code
    assert len(server.messages) == 1  # the server did read it, then refused it


def test_disconnect_after_mail() -> None:
    with (
        HostileSMTPServer(standard_session({"MAIL": close()})) as server,
        smtp(server) as client,
        pytest.raises(smtplib.SMTPServerDisconnected),
    ):
        client.sendmail(FROM, TO[:1], BODY)
    assert server.connections[0].ended_by == "server"
    assert server.messages == []


def test_disconnect_while_body_is_sent() -> None:
    rules = {"DATA": [reply(354, "go ahead"), read_bytes(1000), close(reset=True)]}
    body = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n" * 4000
    with (
        HostileSMTPServer(standard_session(rules)) as server,
        smtp(server) as client,
        pytest.raises(smtplib.SMTPServerDisconnected),
    ):
        client.sendmail(FROM, TO[:1], body * 4)
    assert server.messages == []


def test_disconnect_after_body_before_final_reply() -> None:
    with (
        HostileSMTPServer(standard_session({".": close()})) as server,
        smtp(server) as client,
        pytest.raises(smtplib.SMTPServerDisconnected),
    ):
        client.sendmail(FROM, TO[:1], BODY)
    assert len(server.messages) == 1  # read in full, never acknowledged


def test_421_mid_session() -> None:
    rules = {"RCPT": [reply(421, "4.3.0 shutting down"), close()]}
    with (
        HostileSMTPServer(standard_session(rules)) as server,
        smtp(server) as client,
        pytest.raises(smtplib.SMTPRecipientsRefused),
    ):
        client.sendmail(FROM, TO[:1], BODY)
    assert b"DATA" not in server.received


def test_size_exceeded() -> None:
    def mail(conn: Connection, line: bytes) -> None:
        params = dict(p.split(b"=", 1) for p in line.upper().split()[2:] if b"=" in p)
        if int(params.get(b"SIZE", 0)) > 100:
            conn.reply(552, "5.3.4 Message size exceeds fixed limit")
        else:
            conn.reply(250, "2.1.0 Ok")

    script = standard_session({"MAIL": mail}, extensions=["SIZE 100"])
    with HostileSMTPServer(script) as server, smtp(server) as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as info:
            client.sendmail(FROM, TO[:1], BODY * 10)
        assert info.value.smtp_code == 552
    assert b"SIZE=" in server.received.upper()
    assert b"DATA" not in server.received


# -- pipelining, BDAT, client violations -----------------------------------------------------


@pytest.mark.parametrize(("extensions", "violation"), [([], True), (["PIPELINING"], False)])
def test_pipelining_detection(extensions: list[str], violation: bool) -> None:
    with HostileSMTPServer(standard_session(extensions=extensions)) as server:
        with RawClient(server) as client:
            client.reply()
            client.command(b"EHLO me\r\n")
            client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n")
            assert (client.reply()[0], client.reply()[0]) == (250, 250)
            client.command(b"QUIT\r\n")
        assert server.wait_closed()
    assert server.connections[0].pipelined == [b"MAIL"]
    assert server.pipelined_violation is violation


def test_data_must_end_a_pipeline_group() -> None:
    with HostileSMTPServer(standard_session()) as server, RawClient(server) as client:
        client.reply()
        client.command(b"EHLO me\r\n")
        client.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\nbody\r\n.\r\nQUIT\r\n")
        assert [client.reply()[0] for _ in range(5)] == [250, 250, 354, 250, 221]
    assert server.pipelined_violation
    assert server.connections[0].pipelined == [b"MAIL", b"RCPT", b"DATA", b"."]


def test_smtplib_never_pipelines() -> None:
    server = HostileSMTPServer(standard_session(extensions=[]), pipelining_probe=0.02)
    with server, smtp(server) as client:
        client.sendmail(FROM, TO[:2], BODY)
    assert server.connections[0].pipelined == []


def test_bdat() -> None:
    with HostileSMTPServer(standard_session()) as server, RawClient(server) as client:
        client.reply()
        client.command(b"EHLO me\r\n")
        client.command(b"MAIL FROM:<a@x>\r\n")
        client.command(b"RCPT TO:<b@x>\r\n")
        assert client.command(b"BDAT 6\r\nHello ") == 250
        assert client.command(b"BDAT 8 LAST\r\nworld\r\n.") == 250
    assert server.messages == [b"Hello world\r\n."]


def test_smuggling_attempt_is_a_violation() -> None:
    script = Script([greet(), expect(b"DATA"), reply(354, "go"), read_data(), reply(250, "ok")])
    with HostileSMTPServer(script) as server, RawClient(server) as client:
        client.reply()
        client.command(b"DATA\r\n")
        assert client.command(b"a\n.\nMAIL FROM:<x@y>\r\n.\r\n") == 250
    assert server.messages == [b"a\n\nMAIL FROM:<x@y>\r\n"]
    assert server.violations == ["connection 0: bare LF in message content"]


# -- the server's own contracts --------------------------------------------------------------


def test_expect_mismatch_is_an_error() -> None:
    script = Script([greet(), expect(b"EHLO"), reply(250, "ok")])
    with HostileSMTPServer(script) as server, RawClient(server) as client:
        client.reply()
        client.send(b"HELO me\r\n")
        with pytest.raises(EOFError):
            client.reply()
    assert server.errors == ["connection 0, step expect(b'EHLO'): expected b'EHLO', got b'HELO me'"]
    assert not server.connections[0].completed


def test_stop_does_not_hang() -> None:
    scripts = [
        Script([sleep(60)]),  # a script asleep
        Script([greet(), expect(b"NOOP")]),  # a script waiting for the client
        Script([endless_multiline()]),  # a client that does not read
        Script([flood(1 << 30)]),
    ]
    server = HostileSMTPServer(scripts).start()
    clients = [socket.create_connection(server.address) for _ in scripts]
    try:
        started = time.monotonic()
        assert not server.wait_closed(timeout=0.05, count=len(scripts))
        server.stop()
        assert time.monotonic() - started < 0.5
        assert [c.ended_by for c in server.connections] == ["stopped"] * len(scripts)
    finally:
        for client in clients:
            client.close()


def test_client_bounds() -> None:
    server = HostileSMTPServer(Script([greet(), expect_any()]), max_line=100)
    with server, RawClient(server) as client:
        client.reply()
        client.send(b"X" * 1000)
        assert server.wait_closed()
    assert server.errors == ["connection 0, step expect_any(): client line longer than 100 bytes"]


def test_idle_timeout() -> None:
    server = HostileSMTPServer(Script([greet(), expect_any()]), idle_timeout=0.1)
    with server, RawClient(server) as client:
        client.reply()
        assert server.wait_closed()
    assert server.errors == ["connection 0, step expect_any(): client sent nothing for 0.1s"]


def test_one_script_per_connection() -> None:
    server = HostileSMTPServer([Script([reply(421, "busy"), close()]), standard_session()])
    with server:
        with pytest.raises(smtplib.SMTPConnectError):
            smtp(server)
        for _ in range(2):
            with smtp(server) as client:
                client.noop()
        assert server.wait_closed(count=3)
    assert [c.ended_by for c in server.connections] == ["server"] * 3


def test_handler_step() -> None:
    def echo_twice(conn: Connection) -> None:
        for _ in range(2):
            conn.reply(250, b"echo " + conn.readline())

    script = Script([greet(), handler(echo_twice), close()])
    with HostileSMTPServer(script) as server, RawClient(server) as client:
        client.reply()
        assert client.command(b"NOOP one\r\n") == 250
        client.send(b"NOOP two\r\n")
        assert client.reply() == (250, [b"250 echo NOOP two\r\n"])
    assert server.connections[0].completed
