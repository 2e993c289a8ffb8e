"""The sans-I/O session core: bytes in, events out; ordering rules; transcript redaction."""

from __future__ import annotations

import subprocess
import sys

import pytest

from django_socketmail.smtp.commands import (
    Auth,
    AuthResponse,
    Data,
    Ehlo,
    MailFrom,
    Quit,
    RcptTo,
    Rset,
    StartTLS,
)
from django_socketmail.smtp.errors import LocalProtocolError, RemoteProtocolError
from django_socketmail.smtp.protocol import (
    NEED_DATA,
    Greeting,
    MessageContent,
    ReplyReceived,
    SessionState,
    SMTPConnection,
)
from django_socketmail.smtp.reply import Reply
from django_socketmail.smtp.secret import Secret


def greeted(extensions: bytes = b"250-mx\r\n250 PIPELINING\r\n") -> SMTPConnection:
    conn = SMTPConnection()
    conn.receive_data(b"220 mx ESMTP\r\n")
    assert conn.next_event() == ReplyReceived(Greeting(), Reply(220, ("mx ESMTP",)))
    assert conn.send(Ehlo("client.example")) == b"EHLO client.example\r\n"
    conn.receive_data(extensions)
    event = conn.next_event()
    assert isinstance(event, ReplyReceived) and event.reply.code == 250
    return conn


def test_nothing_before_greeting() -> None:
    conn = SMTPConnection()
    with pytest.raises(LocalProtocolError, match="greeting"):
        conn.send(Ehlo("c"))
    assert conn.next_event() is NEED_DATA


def test_greeting_421_closes() -> None:
    conn = SMTPConnection()
    conn.receive_data(b"421 busy\r\n")
    conn.next_event()
    assert conn.state is SessionState.CLOSED
    with pytest.raises(LocalProtocolError, match="closed"):
        conn.send(Ehlo("c"))


def test_extensions_parsed_including_old_auth_form() -> None:
    conn = greeted(
        b"250-mx\r\n250-pipelining\r\n250-SIZE 1000\r\n250-AUTH=LOGIN\r\n250 AUTH PLAIN LOGIN\r\n"
    )
    assert conn.can_pipeline()
    assert conn.extensions.size_limit == 1000
    assert conn.extensions.auth_mechanisms == ("LOGIN", "PLAIN")


def test_lockstep_without_pipelining() -> None:
    conn = greeted(b"250 mx\r\n")
    conn.send(MailFrom("a@x"))
    with pytest.raises(LocalProtocolError, match="no PIPELINING"):
        conn.send(RcptTo("b@x"))


def test_pipelined_transaction_bytes_and_reply_pairing() -> None:
    conn = greeted()
    conn.pipelining = True
    wire = b"".join(
        [conn.send(MailFrom("a@x", ("SIZE=10",))), conn.send(RcptTo("b@x")), conn.send(Data())]
    )
    assert wire == b"MAIL FROM:<a@x> SIZE=10\r\nRCPT TO:<b@x>\r\nDATA\r\n"
    with pytest.raises(LocalProtocolError, match="RFC 2920"):
        conn.send(Rset())  # DATA ends the group
    conn.receive_data(b"250 ok\r\n550 no\r\n354 go\r\n")
    events = [conn.next_event() for _ in range(3)]
    assert [(type(e.command).__name__, e.reply.code) for e in events] == [  # type: ignore[union-attr]
        ("MailFrom", 250),
        ("RcptTo", 550),
        ("Data", 354),
    ]
    assert conn.state is SessionState.AWAITING_CONTENT
    with pytest.raises(LocalProtocolError, match="awaits message content"):
        conn.send(Rset())
    payload = b"".join(conn.send_content(b"Subject: t\r\n\r\n.hidden\r\n"))
    assert payload == b"Subject: t\r\n\r\n..hidden\r\n.\r\n"
    # Content may open a group: the next envelope follows without waiting.
    assert conn.send(MailFrom("a@x")) == b"MAIL FROM:<a@x>\r\n"
    assert conn.pending == (MessageContent(23, 3), MailFrom("a@x"))


def test_bdat_framing() -> None:
    conn = greeted()
    conn.pipelining = True
    conn.send(MailFrom("a@x"))
    conn.send(RcptTo("b@x"))
    assert conn.send_bdat(4, lines=1) == b"BDAT 4 LAST\r\n"  # the 4 octets follow as is
    assert "C: [message content: 4 bytes, 1 lines]" in conn.transcript.render()


def test_content_only_after_354() -> None:
    conn = greeted()
    with pytest.raises(LocalProtocolError, match="354"):
        conn.send_content(b"x\r\n")


def test_starttls_injection_detected() -> None:
    conn = greeted(b"250-mx\r\n250 STARTTLS\r\n")
    conn.send(StartTLS())
    conn.receive_data(b"220 go ahead\r\n250-injected\r\n250 AUTH PLAIN\r\n")
    with pytest.raises(RemoteProtocolError, match="injection"):
        conn.next_event()
    assert conn.state is SessionState.TLS_HANDSHAKE


def test_starttls_forgets_extensions() -> None:
    conn = greeted(b"250-mx\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
    conn.send(StartTLS())
    conn.receive_data(b"220 go ahead\r\n")
    conn.next_event()
    with pytest.raises(LocalProtocolError, match="TLS handshake"):
        conn.send(Ehlo("c"))
    conn.tls_established()
    assert not conn.extensions and not conn.pipelining
    assert conn.send(Ehlo("c")) == b"EHLO c\r\n"


def test_unsolicited_reply() -> None:
    conn = greeted()
    conn.receive_data(b"250 surprise\r\n")
    with pytest.raises(RemoteProtocolError, match="unsolicited"):
        conn.next_event()


def test_unsolicited_421_closes() -> None:
    conn = greeted()
    conn.receive_data(b"421 4.4.2 idle timeout\r\n")
    event = conn.next_event()
    assert isinstance(event, ReplyReceived) and event.command is None
    assert conn.state is SessionState.CLOSED


def test_command_injection_refused() -> None:
    conn = greeted()
    with pytest.raises(LocalProtocolError, match="control character"):
        conn.send(MailFrom("a@x\r\nRCPT TO:evil@x"))
    with pytest.raises(LocalProtocolError, match="angle bracket"):
        conn.send(RcptTo("a@x> NOTIFY=NEVER"))


def test_transcript_redacts_auth_and_summarizes_content() -> None:
    conn = greeted(b"250-mx\r\n250 AUTH PLAIN LOGIN\r\n")
    assert conn.send(Auth("PLAIN", Secret(b"\0u\0p"))) == b"AUTH PLAIN AHUAcA==\r\n"
    conn.receive_data(b"334 \r\n")
    conn.next_event()
    assert conn.send(AuthResponse(Secret(b"secret"))) == b"c2VjcmV0\r\n"
    conn.receive_data(b"235 ok\r\n")
    conn.next_event()
    conn.send(Data())
    conn.receive_data(b"354 go\r\n")
    conn.next_event()
    conn.send_content(b"secret body\r\n")
    text = conn.transcript.render()
    assert "AHUAcA==" not in text and "c2VjcmV0" not in text and "secret body" not in text
    assert "C: AUTH PLAIN [redacted]" in text and "C: [redacted]" in text
    assert "C: [message content: 13 bytes, 1 lines]" in text
    assert text.startswith("S: 220 mx ESMTP\nC: EHLO client.example\nS: 250-mx")


def test_quit_closes() -> None:
    conn = greeted()
    conn.send(Quit())
    conn.receive_data(b"221 bye\r\n")
    conn.next_event()
    assert conn.state is SessionState.CLOSED


def test_client_package_does_not_import_django() -> None:
    code = (
        "import sys, django_socketmail.smtp, django_socketmail.smtp.client;"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'django'], 'django imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_package_import_does_not_import_models() -> None:
    code = (
        "import sys, django_socketmail;"
        "assert 'django_socketmail.models' not in sys.modules;"
        "assert 'django_socketmail.email_backend' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_only_the_drivers_touch_sockets_clocks_or_threads() -> None:
    """The sans-I/O modules import no socket, ssl, selector, clock or thread: only the
    drivers (client.py, aio.py) and what they share (transport.py) do."""
    import ast
    from pathlib import Path

    import django_socketmail.smtp as package

    io = {"socket", "ssl", "select", "selectors", "asyncio", "time", "threading"}
    drivers = {"client", "aio", "transport", "driver"}
    offenders = []
    for path in Path(package.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module.split(".")[0]]
            offenders += [(path.stem, n) for n in names if n in io and path.stem not in drivers]
    assert offenders == [("result", "time"), ("transcript", "time")]
