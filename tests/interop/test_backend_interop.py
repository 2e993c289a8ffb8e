"""Our Django backend against a real Postfix + Dovecot: AUTH, TLS, refusals, content, load.

Every test sends through :class:`django_socketmail.email_backend.EmailBackend` to the rig
of :mod:`tests.interop.rig` and checks three things: what the backend returned (count,
``msg.socketmail_result``, the exception), what reached the Maildir (byte for byte, once
Postfix's own trace header fields are stripped) and what the audit log recorded (rows,
queue ids, TLS and mechanism, and never a credential in any column).

Messages have a fixed ``Message-ID``, ``Date`` and MIME boundary, so
``serialize(msg)`` before sending gives exactly the bytes the backend sends.
"""

from __future__ import annotations

import base64
import hmac
import re
import smtplib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Final

import pytest
from django.core.mail import EmailMessage
from django.db import connections, models

from django_socketmail.email_backend import EmailBackend, serialize
from django_socketmail.models import MessageLog, RecipientLog, SessionLog
from django_socketmail.smtp import SendResult, SendStatus
from django_socketmail.smtp.errors import (
    AuthenticationError,
    CleartextAuthError,
    NotSupportedError,
    RecipientsRefused,
    SenderRefused,
    TLSError,
)
from django_socketmail.smtp.result import RecipientStatus
from tests.interop.rig import DOMAIN, PostfixRig, strip_trace_headers

pytestmark = pytest.mark.django_db(transaction=True)

MECHANISMS: Final = ("PLAIN", "LOGIN", "CRAM-MD5")
USERS: Final = ("alice", "bob@example.test", "jürgen")
SENDER: Final = f"alice@{DOMAIN}"
DATE: Final = "Thu, 01 Jan 2026 12:00:00 +0000"
BOUNDARY: Final = "==socketmail-interop-boundary=="
TIMEOUT: Final = 10.0
QUEUE_ID_IN_RECEIVED: Final = re.compile(rb"\(Postfix\) with [A-Z0-9]+ id ([0-9A-Za-z]+)")


# Messages -------------------------------------------------------------------------------


class FixedMessage(EmailMessage):
    """An ``EmailMessage`` whose serialization is deterministic: fixed MIME boundary.

    Together with the explicit ``Message-ID`` and ``Date`` of :func:`make_message`,
    ``serialize(msg)`` yields the same bytes every time, so a test can compute before
    sending exactly what the backend will put on the wire.
    """

    def message(self, *args: Any, **kwargs: Any) -> Any:
        built = super().message(*args, **kwargs)
        if built.is_multipart():
            built.set_boundary(BOUNDARY)
        return built


def make_message(
    tag: str,
    to: list[str],
    *,
    subject: str | None = None,
    body: str | None = None,
    from_email: str = SENDER,
    headers: dict[str, str] | None = None,
) -> FixedMessage:
    """A message identified by ``tag`` (in its Message-ID, X-Tag header and subject)."""
    return FixedMessage(
        subject if subject is not None else f"interop {tag}",
        body if body is not None else f"Body of {tag}.\n",
        from_email,
        to,
        headers={"Message-ID": f"<{tag}@interop.test>", "Date": DATE, "X-Tag": tag}
        | (headers or {}),
    )


def expected_bytes(msg: EmailMessage) -> bytes:
    """What the Maildir must hold after :func:`strip_trace_headers`: the serialized message,
    CRLF line ends, ending in CRLF (SMTP content always ends with a line end)."""
    first = serialize(msg)
    assert serialize(msg) == first, "serialization is not deterministic"
    data = re.sub(rb"\r?\n", b"\r\n", first)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def result_of(msg: EmailMessage) -> SendResult:
    """The :class:`SendResult` the backend put on ``msg``."""
    result = getattr(msg, "socketmail_result", None)
    assert isinstance(result, SendResult), f"no socketmail_result on {msg.subject!r}"
    return result


def header(raw: bytes, name: str) -> list[bytes]:
    """Every (unfolded) value of header field ``name`` in the header of ``raw``."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    unfolded = re.sub(rb"\r\n[ \t]", b" ", head)
    prefix = name.lower().encode() + b":"
    return [
        line[len(prefix) :].strip()
        for line in unfolded.split(b"\r\n")
        if line.lower().startswith(prefix)
    ]


def postfix_queue_id(raw: bytes) -> str:
    """The queue id in the Received field Postfix added (``(Postfix) with ESMTPSA id X``)."""
    match = QUEUE_ID_IN_RECEIVED.search(raw.split(b"\r\n\r\n", 1)[0])
    assert match is not None, raw[:600]
    return match.group(1).decode()


def delivered_to(raw: bytes) -> str:
    """The envelope recipient of one delivered copy (Postfix's Delivered-To field)."""
    [value] = header(raw, "Delivered-To")
    return value.decode()


# Backends -------------------------------------------------------------------------------

BackendFactory = Callable[..., EmailBackend]


def port_options(rig: PostfixRig, kind: str) -> dict[str, Any]:
    """Options for one of the rig's ports: ``plain``, ``submission`` (STARTTLS), ``smtps``."""
    if kind == "plain":
        return {"port": rig.plain_port}
    tls = {"ssl_cafile": str(rig.ca_cert_path)}
    if kind == "submission":
        return {"port": rig.submission_port, "use_tls": True, **tls}
    assert kind == "smtps"
    return {"port": rig.smtps_port, "use_ssl": True, **tls}


@pytest.fixture
def rig(maildir_clean: PostfixRig) -> PostfixRig:
    """The session's rig with an empty Maildir."""
    return maildir_clean


@pytest.fixture
def make_backend(rig: PostfixRig) -> Iterator[BackendFactory]:
    """Build backends for the rig (``kind`` picks the port); all are closed after the test."""
    made: list[EmailBackend] = []

    def make(kind: str = "plain", **options: Any) -> EmailBackend:
        defaults: dict[str, Any] = {
            "host": rig.server_hostname,
            "timeout": TIMEOUT,
            "local_hostname": "client.test",
            "audit_log": True,
        }
        backend = EmailBackend(**(defaults | port_options(rig, kind) | options))
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


def login(rig: PostfixRig, user: str) -> dict[str, str]:
    """``username``/``password`` options for one of the rig's users."""
    return {"username": user, "password": rig.users[user]}


# Credentials in the audit log ------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def secrets_of(user: str, password: str, transcripts: Iterable[str] = ()) -> list[str]:
    """Every form of the credential that may never be stored: the password, the base64 lines
    of LOGIN, the PLAIN blob (with and without authzid) and the CRAM-MD5 answer to every
    challenge seen in ``transcripts``."""
    u, p = user.encode(), password.encode()
    secrets = [password, b64(p), b64(u), b64(b"\0" + u + b"\0" + p), b64(u + b"\0" + u + b"\0" + p)]
    for text in transcripts:
        for challenge in re.findall(r"S: 334 (\S+)", text):
            digest = hmac.new(p, base64.b64decode(challenge), "md5").hexdigest()
            secrets += [digest, b64(u + b" " + digest.encode())]
    return secrets


def text_columns(model: type[models.Model]) -> list[str]:
    return [
        field.name
        for field in model._meta.concrete_fields
        if isinstance(field, (models.CharField, models.TextField))
    ]


def assert_no_credentials(user: str, password: str) -> None:
    """No text column of any audit row holds any form of the credential."""
    transcripts = list(SessionLog.objects.values_list("transcript", flat=True))
    secrets = secrets_of(user, password, transcripts)
    rows = 0
    for model in (SessionLog, MessageLog, RecipientLog):
        for row in model.objects.values_list(*text_columns(model)):
            rows += 1
            for value in row:
                for secret in secrets:
                    assert secret not in value, f"{model.__name__} holds a credential"
    assert rows, "no audit rows to search"


def assert_error_has_no_credentials(error: BaseException, user: str, password: str) -> None:
    for text in (str(error), repr(error), repr(error.args)):
        for secret in secrets_of(user, password):
            assert secret not in text


def assert_queue_ids_match(msgs: Sequence[EmailMessage], delivered: list[bytes]) -> None:
    """Each message's ``result.queue_id`` is Postfix's ``queued as`` id, the id in the
    Received field of its delivered copies and the id of its MessageLog row."""
    by_message_id = {header(raw, "Message-ID")[0].decode(): raw for raw in delivered}
    logged = dict(MessageLog.objects.values_list("message_id", "queue_id"))
    for msg in msgs:
        result = result_of(msg)
        message_id = msg.extra_headers["Message-ID"]
        assert result.final_reply is not None
        assert result.queue_id is not None
        assert f"queued as {result.queue_id}" in result.final_reply.text
        assert postfix_queue_id(by_message_id[message_id]) == result.queue_id
        assert logged[message_id] == result.queue_id


# AUTH on every port ------------------------------------------------------------------------


def check_authenticated_send(
    rig: PostfixRig, backend: EmailBackend, user: str, mechanism: str, tls: bool
) -> None:
    """Send one message; check delivery, the result, the session row and the secrets."""
    msg = make_message(f"auth-{mechanism}", [f"bob@{DOMAIN}"], subject=f"AUTH {mechanism}")
    expected = expected_bytes(msg)
    assert backend.send_messages([msg]) == 1
    result = result_of(msg)
    assert result.status is SendStatus.SENT
    [raw] = rig.wait_for_messages(1)
    assert strip_trace_headers(raw) == expected
    assert postfix_queue_id(raw) == result.queue_id
    # "with ESMTPSA": Postfix saw an authenticated (A) session, under TLS (S) or not.
    protocol = re.search(rb"\(Postfix\) with (\S+) id", raw)
    assert protocol is not None
    assert protocol.group(1) == (b"ESMTPSA" if tls else b"ESMTPA")
    session = SessionLog.objects.get()
    assert session.outcome == "ok", session.error
    assert session.auth_mechanism == mechanism
    assert session.auth_username == user
    assert session.messages_sent == 1
    if tls:
        assert session.tls_version in ("TLSv1.2", "TLSv1.3")
        assert session.tls_cipher
        assert session.certificate
    else:
        assert session.tls_version == ""
    assert f"C: AUTH {mechanism}" in session.transcript
    assert "S: 235 " in session.transcript
    log = MessageLog.objects.get()
    assert (log.status, log.queue_id, log.final_reply_code) == ("sent", result.queue_id, 250)
    assert_no_credentials(user, rig.users[user])


@pytest.mark.parametrize("user", USERS)
@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("kind", ["submission", "smtps"])
def test_every_mechanism_inside_tls(
    rig: PostfixRig, make_backend: BackendFactory, kind: str, mechanism: str, user: str
) -> None:
    """PLAIN, LOGIN and CRAM-MD5, forced one at a time, for every user (jürgen: UTF-8)."""
    backend = make_backend(kind, auth_mechanisms=[mechanism], **login(rig, user))
    check_authenticated_send(rig, backend, user, mechanism, tls=True)


@pytest.mark.parametrize("user", USERS)
def test_cram_md5_without_tls(rig: PostfixRig, make_backend: BackendFactory, user: str) -> None:
    """CRAM-MD5 never sends the password: allowed on the plain port without opting in."""
    backend = make_backend("plain", auth_mechanisms=["CRAM-MD5"], **login(rig, user))
    check_authenticated_send(rig, backend, user, "CRAM-MD5", tls=False)


@pytest.mark.parametrize("user", USERS)
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_cleartext_mechanism_without_tls_is_refused(
    rig: PostfixRig, make_backend: BackendFactory, mechanism: str, user: str
) -> None:
    """PLAIN/LOGIN on the plain port: CleartextAuthError before any AUTH command, no mail."""
    backend = make_backend("plain", auth_mechanisms=[mechanism], **login(rig, user))
    with pytest.raises(CleartextAuthError) as excinfo:
        backend.send_messages([make_message("cleartext", [f"bob@{DOMAIN}"])])
    assert isinstance(excinfo.value, smtplib.SMTPException)
    assert_error_has_no_credentials(excinfo.value, user, rig.users[user])
    session = SessionLog.objects.get()
    assert session.outcome == "failed"
    assert session.error_class.endswith("CleartextAuthError")
    assert session.auth_mechanism == ""
    assert "C: AUTH" not in session.transcript
    assert "C: MAIL" not in session.transcript
    assert MessageLog.objects.count() == 0
    assert_no_credentials(user, rig.users[user])
    rig.wait_for_queue_empty()
    assert rig.read_messages() == []


@pytest.mark.parametrize("user", USERS)
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_cleartext_mechanism_allowed_without_tls(
    rig: PostfixRig, make_backend: BackendFactory, mechanism: str, user: str
) -> None:
    """``allow_cleartext_auth=True``: PLAIN/LOGIN work on the plain port, still never logged."""
    backend = make_backend(
        "plain", auth_mechanisms=[mechanism], allow_cleartext_auth=True, **login(rig, user)
    )
    check_authenticated_send(rig, backend, user, mechanism, tls=False)


def test_default_mechanisms_without_tls_pick_cram_md5(
    rig: PostfixRig, make_backend: BackendFactory
) -> None:
    """No auth_mechanisms given, no TLS: the one mechanism safe in clear text is used."""
    backend = make_backend("plain", **login(rig, "jürgen"))
    check_authenticated_send(rig, backend, "jürgen", "CRAM-MD5", tls=False)


@pytest.mark.parametrize("kind", ["submission", "smtps"])
@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_certificate_is_verified_by_host_name_and_ip(
    rig: PostfixRig, make_backend: BackendFactory, kind: str, host: str
) -> None:
    """The certificate names ``localhost`` and ``127.0.0.1``: both verify with the rig's CA."""
    backend = make_backend(kind, host=host, auth_mechanisms=["PLAIN"], **login(rig, "alice"))
    check_authenticated_send(rig, backend, "alice", "PLAIN", tls=True)
    assert SessionLog.objects.get().host == host


@pytest.mark.parametrize("kind", ["submission", "smtps"])
def test_untrusted_certificate_is_refused(
    rig: PostfixRig, make_backend: BackendFactory, kind: str
) -> None:
    """Without the rig's CA the handshake fails: TLSError, no AUTH, nothing delivered."""
    backend = make_backend(kind, ssl_cafile=None, **login(rig, "alice"))
    with pytest.raises(TLSError):
        backend.send_messages([make_message("untrusted", [f"bob@{DOMAIN}"])])
    session = SessionLog.objects.get()
    assert session.outcome == "failed"
    assert "C: AUTH" not in session.transcript
    rig.wait_for_queue_empty()
    assert rig.read_messages() == []


@pytest.mark.parametrize("kind", ["plain", "submission", "smtps"])
def test_session_set_up_has_no_delayed_ack_stall(
    rig: PostfixRig, make_backend: BackendFactory, kind: str
) -> None:
    """Connect, TLS, EHLO and AUTH take a few milliseconds here, on every port.

    Postfix sends its TLS 1.3 session tickets and then its next reply with Nagle on; unless
    the client acknowledges at once (``TCP_QUICKACK`` on Linux), that reply waits for the
    client's delayed ACK, about 40 ms per connection (SMTP-NOTES.md, "Going fast"). The
    best of five tries must stay well below that stall.
    """
    backend = make_backend(
        kind, audit_log=False, auth_mechanisms=["CRAM-MD5"], **login(rig, "alice")
    )
    timings = []
    for _ in range(5):
        began = time.monotonic()
        assert backend.open() is True
        timings.append(time.monotonic() - began)
        backend.close()
    assert min(timings) < 0.025, [f"{seconds * 1000:.1f} ms" for seconds in timings]


# Wrong password -------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("user", ["alice", "jürgen"])
def test_wrong_password_is_535_without_lockout(
    rig: PostfixRig, make_backend: BackendFactory, user: str, mechanism: str
) -> None:
    """Five wrong passwords in a row, each a quick 535 AuthenticationError that names no
    credential; the right password works at once afterwards (no lock-out, no delay)."""
    wrong = f"wrong-{user}-Pässwort-9"
    for attempt in range(5):
        backend = make_backend(
            "submission", auth_mechanisms=[mechanism], username=user, password=wrong
        )
        began = time.monotonic()
        with pytest.raises(AuthenticationError) as excinfo:
            backend.send_messages([make_message(f"wrong-{attempt}", [f"bob@{DOMAIN}"])])
        elapsed = time.monotonic() - began
        error = excinfo.value
        assert isinstance(error, smtplib.SMTPAuthenticationError)
        assert error.smtp_code == 535
        assert error.enhanced_status == "5.7.8"
        assert error.is_permanent
        assert elapsed < 2.0, f"attempt {attempt + 1} took {elapsed:.2f} s"
        assert_error_has_no_credentials(error, user, wrong)
        assert_error_has_no_credentials(error, user, rig.users[user])
    sessions = SessionLog.objects.all()
    assert [s.outcome for s in sessions] == ["failed"] * 5
    for session in sessions:
        assert session.error_class.endswith("AuthenticationError")
        assert "535" in session.error
        assert f"C: AUTH {mechanism}" in session.transcript
    assert MessageLog.objects.count() == 0
    assert_no_credentials(user, wrong)
    SessionLog.objects.all().delete()
    backend = make_backend("submission", auth_mechanisms=[mechanism], **login(rig, user))
    check_authenticated_send(rig, backend, user, mechanism, tls=True)


# Refusals ---------------------------------------------------------------------------------


def test_unauthenticated_relay_is_refused(rig: PostfixRig, make_backend: BackendFactory) -> None:
    """Plain port, no AUTH, another domain: RecipientsRefused with 554 5.7.1, a refused row."""
    backend = make_backend("plain")
    msg = make_message("relay", ["someone@elsewhere.invalid"])
    with pytest.raises(RecipientsRefused) as excinfo:
        backend.send_messages([msg])
    code, text = excinfo.value.recipients["someone@elsewhere.invalid"]
    assert code == 554
    assert text.startswith(b"5.7.1 ") and b"Relay access denied" in text
    assert not excinfo.value.is_transient
    result = result_of(msg)
    assert result.status is SendStatus.REFUSED
    log = MessageLog.objects.get()
    assert log.status == "refused"
    assert log.error_class.endswith("RecipientsRefused")
    assert log.transient is False
    assert log.queue_id == ""
    recipient = RecipientLog.objects.get()
    assert (recipient.address, recipient.status, recipient.reply_code) == (
        "someone@elsewhere.invalid",
        "refused",
        554,
    )
    rig.wait_for_queue_empty()
    assert rig.read_messages() == []


def test_partial_acceptance(rig: PostfixRig, make_backend: BackendFactory) -> None:
    """``refuse-x`` (550) and a good address: partial, count 1, only the good one delivered."""
    backend = make_backend("plain")
    msg = make_message("partial", [f"refuse-x@{DOMAIN}", f"good@{DOMAIN}"])
    expected = expected_bytes(msg)
    assert backend.send_messages([msg]) == 1
    result = result_of(msg)
    assert result.status is SendStatus.PARTIAL
    assert list(result.accepted) == [f"good@{DOMAIN}"]
    refused = result.refused[f"refuse-x@{DOMAIN}"]
    assert refused is not None and refused.code == 550 and refused.is_permanent
    [raw] = rig.wait_for_messages(1)
    rig.wait_for_queue_empty()
    assert len(rig.read_messages()) == 1
    assert delivered_to(raw) == f"good@{DOMAIN}"
    assert strip_trace_headers(raw) == expected
    log = MessageLog.objects.get()
    assert log.status == "partial"
    assert log.queue_id == result.queue_id == postfix_queue_id(raw)
    statuses = dict(RecipientLog.objects.values_list("address", "status"))
    assert statuses == {f"refuse-x@{DOMAIN}": "refused", f"good@{DOMAIN}": "delivered"}
    assert RecipientLog.objects.get(address=f"refuse-x@{DOMAIN}").reply_code == 550
    assert SessionLog.objects.get().messages_sent == 1


def test_deferred_recipient_is_transient(rig: PostfixRig, make_backend: BackendFactory) -> None:
    """``defer-`` gets 450: transient on the result, the exception and the audit row."""
    backend = make_backend("plain")
    mixed = make_message("deferred-mixed", [f"defer-y@{DOMAIN}", f"good@{DOMAIN}"])
    assert backend.send_messages([mixed]) == 1
    deferred = result_of(mixed).refused[f"defer-y@{DOMAIN}"]
    assert deferred is not None
    assert (deferred.code, deferred.is_transient) == (450, True)
    assert deferred.enhanced_status == "4.2.1"
    alone = make_message("deferred-alone", [f"defer-z@{DOMAIN}"])
    with pytest.raises(RecipientsRefused) as excinfo:
        backend.send_messages([alone])
    assert excinfo.value.is_transient
    assert excinfo.value.recipients[f"defer-z@{DOMAIN}"][0] == 450
    assert result_of(alone).status is SendStatus.REFUSED
    logs = {log.message_id: log for log in MessageLog.objects.all()}
    assert logs["<deferred-mixed@interop.test>"].status == "partial"
    assert logs["<deferred-alone@interop.test>"].status == "refused"
    assert logs["<deferred-alone@interop.test>"].transient is True
    replies = dict(RecipientLog.objects.values_list("address", "reply_code"))
    assert replies[f"defer-y@{DOMAIN}"] == replies[f"defer-z@{DOMAIN}"] == 450
    [raw] = rig.wait_for_messages(1)
    rig.wait_for_queue_empty()
    assert len(rig.read_messages()) == 1
    assert delivered_to(raw) == f"good@{DOMAIN}"


def test_submission_without_starttls_does_not_authenticate(
    rig: PostfixRig, make_backend: BackendFactory
) -> None:
    """Submission requires STARTTLS before AUTH: with ``use_tls=False`` and credentials the
    backend finds no AUTH offered and stops (never sends the password); nothing delivered."""
    backend = make_backend("submission", use_tls=False, ssl_cafile=None, **login(rig, "alice"))
    with pytest.raises(NotSupportedError) as excinfo:
        backend.send_messages([make_message("no-starttls", [f"bob@{DOMAIN}"])])
    assert "does not offer AUTH" in str(excinfo.value)
    assert_error_has_no_credentials(excinfo.value, "alice", rig.users["alice"])
    session = SessionLog.objects.get()
    assert session.outcome == "failed"
    assert session.tls_version == ""
    assert "C: AUTH" not in session.transcript
    assert "C: MAIL" not in session.transcript
    assert_no_credentials("alice", rig.users["alice"])
    rig.wait_for_queue_empty()
    assert rig.read_messages() == []


def test_submission_without_starttls_or_auth_is_530(
    rig: PostfixRig, make_backend: BackendFactory
) -> None:
    """No TLS and no credentials on submission: MAIL FROM is refused with 530 5.7.0."""
    backend = make_backend("submission", use_tls=False, ssl_cafile=None)
    msg = make_message("no-auth", [f"bob@{DOMAIN}"])
    with pytest.raises(SenderRefused) as excinfo:
        backend.send_messages([msg])
    assert excinfo.value.smtp_code == 530
    assert excinfo.value.enhanced_status == "5.7.0"
    assert result_of(msg).status is SendStatus.FAILED
    log = MessageLog.objects.get()
    assert log.status == "failed"
    assert log.error_class.endswith("SenderRefused")
    assert RecipientLog.objects.get().status == "failed"
    rig.wait_for_queue_empty()
    assert rig.read_messages() == []


# Content, byte for byte ------------------------------------------------------------------

SENDING_MODES: Final[dict[str, dict[str, bool]]] = {
    "bdat": {},
    "pipelined-data": {"chunking": False},
    "lockstep-data": {"pipelining": False},
}
"""The three ways the content can travel, as backend options."""
UTF8_SUBJECT: Final = "Grüße aus Köln \N{EN DASH} 10 € 🚀"
DOT_BODY: Final = (
    ".a line that starts with a dot\n"
    "..two dots\n"
    ".\n"
    " . \n"
    "a smuggling attempt follows\n"
    "\r\n.\r\nMAIL FROM:<evil@example.test>\r\n"
    "...\n"
    "last line\n"
)


def send_and_compare(
    rig: PostfixRig,
    backend: EmailBackend,
    msgs: Sequence[EmailMessage],
    recipient: str | None = None,
) -> list[bytes]:
    """Send ``msgs`` (one recipient each), check each arrived byte for byte; return them."""
    expected = {msg.extra_headers["Message-ID"]: expected_bytes(msg) for msg in msgs}
    assert backend.send_messages(msgs) == len(msgs)
    delivered = rig.wait_for_messages(len(msgs), recipient=recipient)
    assert len(delivered) == len(msgs)
    for raw in delivered:
        [message_id] = header(raw, "Message-ID")
        assert strip_trace_headers(raw) == expected[message_id.decode()]
    assert_queue_ids_match(msgs, delivered)
    # Postfix advertises PIPELINING and CHUNKING: by default the content goes as pipelined
    # BDAT (no dot-stuffing); with chunking off as pipelined DATA, with pipelining off as
    # lock-step DATA (both dot-stuffed). Every path must deliver the same bytes.
    options = backend.options
    verb = "C: BDAT " if options.pipelining and options.chunking else "C: DATA"
    transcripts = MessageLog.objects.values_list("transcript", flat=True)
    assert [verb in text for text in transcripts] == [True] * len(msgs)
    return delivered


@pytest.mark.parametrize("mode", SENDING_MODES, ids=list(SENDING_MODES))
def test_dot_lines(rig: PostfixRig, make_backend: BackendFactory, mode: str) -> None:
    """Lines starting with '.', a line that is only '.', and a body ending in a bare '.'.
    The big one is streamed in 64 KiB slices, each starting with a dot line."""
    to = [f"bob@{DOMAIN}"]
    dotted = ("." + "x" * 62 + "\n") * 3000  # 192 KB; every line, so every slice, starts "."
    msgs = [
        make_message("dots", to, body=DOT_BODY),
        make_message("dot-at-end", to, body="the next line is the last\n."),
        make_message("dot-only", to, body="."),
        make_message("dots-streamed", to, body=dotted + DOT_BODY),
    ]
    delivered = send_and_compare(rig, make_backend("plain", **SENDING_MODES[mode]), msgs)
    smuggled = b"\r\n.\r\nMAIL FROM:<evil@example.test>\r\n"
    assert [smuggled in raw for raw in delivered].count(True) == 2  # as body text, in two
    assert [log.status for log in MessageLog.objects.all()] == ["sent"] * 4


@pytest.mark.parametrize("mode", SENDING_MODES, ids=list(SENDING_MODES))
def test_8bit_utf8_body_and_non_ascii_headers(
    rig: PostfixRig, make_backend: BackendFactory, mode: str
) -> None:
    """8-bit UTF-8 body (BODY=8BITMIME) and RFC 2047 subject, display names, custom header."""
    msg = make_message(
        "utf8",
        ["Zoë Ångström <bob@example.test>"],
        subject=UTF8_SUBJECT,
        body="Grüße aus Köln, 10 €, emoji 🚀, ÆØÅ æøå, 日本語.\nZweite Zeile: naïve café.\n",
        from_email="Jürgen Müller <alice@example.test>",
        headers={"X-Note": "naïve café", "Reply-To": "Renée <renee@example.test>"},
    )
    expected = expected_bytes(msg)
    assert "Grüße".encode() in expected  # really 8-bit, not encoded away
    send_and_compare(
        rig, make_backend("submission", **SENDING_MODES[mode], **login(rig, "alice")), [msg]
    )
    assert "BODY=8BITMIME" in MessageLog.objects.get().transcript
    assert MessageLog.objects.get().subject == UTF8_SUBJECT


def test_smtputf8_recipient(rig: PostfixRig, make_backend: BackendFactory) -> None:
    """A non-ASCII local part goes out with SMTPUTF8 and arrives for jürgen@example.test."""
    msg = make_message("smtputf8", ["Jürgen <jürgen@example.test>"], body="Hallo Jürgen!\n")
    [raw] = send_and_compare(rig, make_backend("plain"), [msg], recipient="jürgen@example.test")
    assert delivered_to(raw) == "jürgen@example.test"
    result = result_of(msg)
    assert list(result.accepted) == ["jürgen@example.test"]
    log = MessageLog.objects.get()
    assert "SMTPUTF8" in log.transcript
    assert RecipientLog.objects.get().address == "jürgen@example.test"


def test_idna_domain(rig: PostfixRig, make_backend: BackendFactory) -> None:
    """``user@bücher.example`` (authenticated relay, delivered locally) goes out in punycode."""
    msg = make_message("idna", ["Buchhandlung <user@bücher.example>"], body="IDNA\n")
    backend = make_backend("submission", **login(rig, "bob@example.test"))
    [raw] = send_and_compare(rig, backend, [msg])
    assert delivered_to(raw) == "user@xn--bcher-kva.example"
    assert header(raw, "X-Original-To") == [b"user@xn--bcher-kva.example"]
    assert list(result_of(msg).accepted) == ["user@xn--bcher-kva.example"]
    assert "RCPT TO:<user@xn--bcher-kva.example>" in MessageLog.objects.get().transcript


@pytest.mark.parametrize("mode", SENDING_MODES, ids=list(SENDING_MODES))
def test_five_megabyte_attachment(rig: PostfixRig, make_backend: BackendFactory, mode: str) -> None:
    """A 5 MB binary attachment (about 6.8 MB in base64) arrives intact."""
    msg = make_message("attachment", [f"bob@{DOMAIN}"], body="See the attachment.\n")
    payload = bytes(range(256)) * (5 * 1024 * 1024 // 256)
    msg.attach("five-megabytes.bin", payload, "application/octet-stream")
    backend = make_backend("smtps", **SENDING_MODES[mode], **login(rig, "alice"))
    began = time.monotonic()
    [raw] = send_and_compare(rig, backend, [msg])
    assert time.monotonic() - began < 20
    assert len(raw) > 5 * 1024 * 1024 * 4 // 3
    log = MessageLog.objects.get()
    assert log.status == "sent"
    assert log.size == len(expected_bytes(msg))


def test_hundred_recipients_in_one_message(rig: PostfixRig, make_backend: BackendFactory) -> None:
    """One message to r001..r100: one transaction, every recipient gets the same bytes."""
    recipients = [f"r{number:03d}@{DOMAIN}" for number in range(1, 101)]
    msg = make_message("hundred", recipients)
    expected = expected_bytes(msg)
    backend = make_backend("plain")
    assert backend.send_messages([msg]) == 1
    result = result_of(msg)
    assert result.status is SendStatus.SENT
    assert list(result.accepted) == recipients
    assert len(result.final_replies) == 1
    delivered = rig.wait_for_messages(100)
    rig.wait_for_queue_empty()
    delivered = rig.read_messages()
    assert sorted(delivered_to(raw) for raw in delivered) == recipients
    for raw in delivered:
        assert strip_trace_headers(raw) == expected
        assert postfix_queue_id(raw) == result.queue_id
    log = MessageLog.objects.get()
    assert (log.status, log.queue_id) == ("sent", result.queue_id)
    assert RecipientLog.objects.filter(message=log, status="delivered").count() == 100


@pytest.mark.parametrize("mode", SENDING_MODES, ids=list(SENDING_MODES))
def test_two_hundred_messages_over_one_connection(
    rig: PostfixRig, make_backend: BackendFactory, mode: str
) -> None:
    """One ``send_messages()`` call with 200 messages: one session, all delivered, count 200."""
    msgs = [make_message(f"batch-{n:03d}", [f"batch-{n:03d}@{DOMAIN}"]) for n in range(200)]
    backend = make_backend("submission", **SENDING_MODES[mode], **login(rig, "alice"))
    delivered = send_and_compare(rig, backend, msgs)
    rig.wait_for_queue_empty()
    assert len(rig.read_messages()) == 200
    assert sorted(delivered_to(raw) for raw in delivered) == [msg.to[0] for msg in msgs]
    assert all(result_of(msg).status is SendStatus.SENT for msg in msgs)
    assert len({result_of(msg).queue_id for msg in msgs}) == 200
    session = SessionLog.objects.get()
    assert session.outcome == "ok"
    assert session.messages_sent == 200
    assert session.transcript.count("C: EHLO") == 2  # before and after STARTTLS, once
    assert session.transcript.count("C: AUTH") == 1
    assert MessageLog.objects.filter(session=session, status="sent").count() == 200
    assert_no_credentials("alice", rig.users["alice"])


# Concurrency (issue 7) -------------------------------------------------------------------

THREADS: Final = 8
PER_THREAD: Final = 50
BATCH: Final = 10


def tag(thread: int, index: int) -> str:
    return f"t{thread}-m{index:02d}"


def close_thread_connections() -> None:
    """Close the database connections the audit log opened in this (worker) thread.

    Django keeps one connection per thread and, for an in-memory SQLite database, its
    ``close()`` keeps the connection open (it would lose the data); Python 3.13 warns about
    a SQLite connection collected unclosed, so close the underlying one ourselves.
    """
    for connection in connections.all(initialized_only=True):
        raw = connection.connection
        connection.close()
        if raw is not None:
            raw.close()
            connection.connection = None


def run_threads(backend_for: Callable[[int], EmailBackend]) -> list[EmailMessage]:
    """8 threads send 50 tagged messages each, ``BATCH`` per ``send_messages()`` call."""
    barrier = threading.Barrier(THREADS)
    sent: list[EmailMessage] = []
    counts: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    messages = {
        thread: [
            make_message(tag(thread, i), [f"{tag(thread, i)}@{DOMAIN}"]) for i in range(PER_THREAD)
        ]
        for thread in range(THREADS)
    }

    def worker(thread: int) -> None:
        try:
            backend = backend_for(thread)
            barrier.wait(timeout=TIMEOUT)
            mine = messages[thread]
            for start in range(0, PER_THREAD, BATCH):
                chunk = mine[start : start + BATCH]
                count = backend.send_messages(chunk)
                with lock:
                    counts.append(count)
                    sent.extend(chunk)
        except BaseException as error:  # reported in the test's thread
            with lock:
                errors.append(error)
            barrier.abort()
        finally:
            close_thread_connections()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert counts == [BATCH] * (THREADS * PER_THREAD // BATCH)
    return sent


def check_delivered_exactly_once(rig: PostfixRig, sent: list[EmailMessage]) -> None:
    """Every tagged message arrived once, intact, for its own recipient, with its queue id."""
    total = THREADS * PER_THREAD
    assert len(sent) == total
    expected = {msg.extra_headers["X-Tag"]: expected_bytes(msg) for msg in sent}
    queue_ids = {msg.extra_headers["X-Tag"]: result_of(msg).queue_id for msg in sent}
    assert all(result_of(msg).status is SendStatus.SENT for msg in sent)
    rig.wait_for_messages(total, timeout=30)
    rig.wait_for_queue_empty(timeout=30)
    delivered = rig.read_messages()
    tags = Counter[str]()
    for raw in delivered:
        [name] = (value.decode() for value in header(raw, "X-Tag"))
        tags[name] += 1
        assert delivered_to(raw) == f"{name}@{DOMAIN}"
        assert strip_trace_headers(raw) == expected[name]
        assert postfix_queue_id(raw) == queue_ids[name]
    assert len(delivered) == total
    assert set(tags) == set(expected)
    assert set(tags.values()) == {1}
    assert len(set(queue_ids.values())) == total


def test_one_backend_shared_by_eight_threads(rig: PostfixRig, make_backend: BackendFactory) -> None:
    """One open backend, 8 threads, 400 messages: its lock serializes them on one session."""
    backend = make_backend("submission", **login(rig, "alice"))
    with backend:
        client = backend.client
        sent = run_threads(lambda thread: backend)
        assert backend.client is client and client is not None and client.is_connected
        assert client.info.messages_sent == THREADS * PER_THREAD
    check_delivered_exactly_once(rig, sent)
    assert SessionLog.objects.get().messages_sent == THREADS * PER_THREAD
    assert MessageLog.objects.filter(status="sent").count() == THREADS * PER_THREAD


def test_one_backend_per_thread(rig: PostfixRig, make_backend: BackendFactory) -> None:
    """8 backends, one per thread, 8 sessions at once to Postfix: 400 messages, each once,
    and 400 audit rows (concurrent SQLite writers are retried, not dropped)."""
    backends = [make_backend("submission", **login(rig, "alice")) for _ in range(THREADS)]
    for backend in backends:
        assert backend.open() is True
    sent = run_threads(lambda thread: backends[thread])
    for backend in backends:
        assert backend.client is not None
        assert backend.client.info.messages_sent == PER_THREAD
        backend.close()
    check_delivered_exactly_once(rig, sent)
    assert SessionLog.objects.count() == THREADS
    assert MessageLog.objects.filter(status="sent").count() == THREADS * PER_THREAD


def test_refused_and_sent_rows_in_one_call(rig: PostfixRig, make_backend: BackendFactory) -> None:
    """A message whose only recipient is refused and one that is sent, in one call: the
    audit log has a refused and a sent row under one session, with the right counts."""
    backend = make_backend("plain", fail_silently=True)
    refused = make_message("rows-refused", [f"refuse-a@{DOMAIN}"])
    good = make_message("rows-good", [f"good@{DOMAIN}"])
    assert backend.send_messages([refused, good]) == 1
    assert result_of(refused).status is SendStatus.REFUSED
    assert result_of(good).status is SendStatus.SENT
    [raw] = rig.wait_for_messages(1)
    assert delivered_to(raw) == f"good@{DOMAIN}"
    session = SessionLog.objects.get()
    assert session.messages_sent == 1
    statuses = dict(MessageLog.objects.values_list("message_id", "status"))
    assert statuses == {
        "<rows-refused@interop.test>": "refused",
        "<rows-good@interop.test>": "sent",
    }
    refused_rows = RecipientLog.objects.filter(status=RecipientStatus.REFUSED.value)
    assert [row.reply_code for row in refused_rows] == [550]
