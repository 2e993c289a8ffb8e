"""Check the Postfix + Dovecot rig itself, with Python's smtplib as the reference client.

These tests pin down what the interop tests of our own client may rely on: the
extensions each port advertises, which AUTH mechanisms work for which user, that
failed logins are answered fast, every time, and what arrives in the Maildir.
"""

from __future__ import annotations

import base64
import hmac
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop import conftest
from tests.interop.conftest import NOT_INSTALLED, require_rig
from tests.interop.rig import (
    DEFAULT_USERS,
    DOMAIN,
    MESSAGE_SIZE_LIMIT,
    PostfixRig,
    strip_trace_headers,
)

ALICE = "alice"
JURGEN = "jürgen"
TIMEOUT = 10.0


def _greeted(client: smtplib.SMTP, starttls: ssl.SSLContext | None = None) -> smtplib.SMTP:
    """EHLO (and STARTTLS + EHLO again with ``starttls``); close the client if that fails."""
    try:
        client.ehlo()
        if starttls is not None:
            client.starttls(context=starttls)
            client.ehlo()
    except BaseException:
        client.close()
        raise
    return client


def _plain(rig: PostfixRig) -> smtplib.SMTP:
    """Connect to the plain port and EHLO (no TLS)."""
    client = smtplib.SMTP(rig.host, rig.plain_port, local_hostname="client.test", timeout=TIMEOUT)
    return _greeted(client)


def _submission(rig: PostfixRig) -> smtplib.SMTP:
    """Connect to the submission port, EHLO, STARTTLS (verifying the rig's CA), EHLO."""
    client = smtplib.SMTP(
        rig.host, rig.submission_port, local_hostname="client.test", timeout=TIMEOUT
    )
    return _greeted(client, starttls=rig.client_ssl_context())


def _smtps(rig: PostfixRig) -> smtplib.SMTP:
    """Connect to the implicit-TLS port (verifying the rig's CA) and EHLO."""
    client = smtplib.SMTP_SSL(
        rig.host,
        rig.smtps_port,
        local_hostname="client.test",
        timeout=TIMEOUT,
        context=rig.client_ssl_context(),
    )
    return _greeted(client)


CONNECT = {"plain": _plain, "submission": _submission, "smtps": _smtps}


@pytest.fixture(params=["submission", "smtps"])
def tls_client(request: pytest.FixtureRequest, postfix_rig: PostfixRig) -> Iterator[smtplib.SMTP]:
    """An EHLO'd client inside TLS, on the submission port (STARTTLS) or the smtps port."""
    with CONNECT[request.param](postfix_rig) as client:
        yield client


def _b64(data: bytes) -> str:
    """Return ``data`` in base64 as an ASCII string, as an SMTP AUTH line."""
    return base64.b64encode(data).decode("ascii")


def auth_plain(client: smtplib.SMTP, user: str, password: str) -> tuple[int, bytes]:
    """C: AUTH PLAIN base64(NUL user NUL password) in UTF-8 (RFC 4616); return the reply."""
    blob = b"\0" + user.encode() + b"\0" + password.encode()
    return client.docmd("AUTH", "PLAIN " + _b64(blob))


def auth_login(client: smtplib.SMTP, user: str, password: str) -> tuple[int, bytes]:
    """C: AUTH LOGIN, then base64 user and password lines in UTF-8; return the last reply."""
    code, reply = client.docmd("AUTH", "LOGIN")
    if code != 334:
        return code, reply
    code, reply = client.docmd(_b64(user.encode()))
    if code != 334:
        return code, reply
    return client.docmd(_b64(password.encode()))


def auth_cram_md5(client: smtplib.SMTP, user: str, password: str) -> tuple[int, bytes]:
    """C: AUTH CRAM-MD5; S: 334 challenge; C: base64(user SP hex HMAC-MD5) (RFC 2195)."""
    code, challenge = client.docmd("AUTH", "CRAM-MD5")
    if code != 334:
        return code, challenge
    digest = hmac.new(password.encode(), base64.b64decode(challenge), "md5").hexdigest()
    return client.docmd(_b64(user.encode() + b" " + digest.encode()))


BY_HAND = {"PLAIN": auth_plain, "LOGIN": auth_login, "CRAM-MD5": auth_cram_md5}


def _auth_mechanisms(client: smtplib.SMTP) -> set[str]:
    """Return the SASL mechanisms of the client's last EHLO reply (empty if no AUTH)."""
    return set(client.esmtp_features.get("auth", "").upper().split())


# Start-up and shutdown --------------------------------------------------------------


def test_startup_takes_a_few_seconds_at_most(postfix_rig: PostfixRig) -> None:
    """Writing the configs, starting both daemons and three 220s: well under 5 s."""
    assert 0 < postfix_rig.startup_seconds < 5


def test_stop_ends_every_process_and_is_idempotent() -> None:
    """A second, private rig: after stop() none of its processes exists, not even a zombie."""
    require_rig()
    rig = PostfixRig()
    rig.start()
    try:
        pids = rig.pids()
        base_dir = rig.base_dir
        assert len(pids) >= 5  # supervisor, Postfix master + children, Dovecot + children
        assert rig.running
    finally:
        rig.stop()
    rig.stop()
    assert not rig.running
    assert not base_dir.exists()
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []


@pytest.mark.parametrize("ci", ["", "true"])
def test_missing_daemons_skip_here_but_fail_under_ci(
    monkeypatch: pytest.MonkeyPatch, ci: str
) -> None:
    """No Postfix/Dovecot: a skip with the install hint; with CI set, a failure."""
    monkeypatch.setattr(conftest, "missing_binaries", lambda: ["postfix", "dovecot"])
    monkeypatch.setenv("CI", ci)
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(outcome) as excinfo:
        require_rig()
    if ci:
        assert str(excinfo.value).startswith(NOT_INSTALLED)
    else:
        assert excinfo.value.msg == NOT_INSTALLED


def test_interop_tests_are_marked(request: pytest.FixtureRequest) -> None:
    """conftest.py marks everything in tests/interop/ with ``interop``."""
    assert request.node.get_closest_marker("interop") is not None


def test_certificate_is_for_localhost_and_127_0_0_1(postfix_rig: PostfixRig) -> None:
    """The rig's CA verifies both names; the system's CAs do not know the rig."""
    for name in ("localhost", "127.0.0.1"):
        with (
            socket.create_connection((postfix_rig.host, postfix_rig.smtps_port), TIMEOUT) as raw,
            postfix_rig.client_ssl_context().wrap_socket(raw, server_hostname=name) as tls,
        ):
            assert tls.recv(512).startswith(b"220 ")
    with (
        socket.create_connection((postfix_rig.host, postfix_rig.smtps_port), TIMEOUT) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ssl.create_default_context().wrap_socket(raw, server_hostname="localhost")


# EHLO ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["plain", "submission", "smtps"])
def test_ehlo_advertises_the_extensions(postfix_rig: PostfixRig, port: str) -> None:
    """Every port, inside TLS where it has it: PIPELINING, CHUNKING, SMTPUTF8, 8BITMIME, SIZE."""
    with CONNECT[port](postfix_rig) as client:
        for keyword in ("pipelining", "chunking", "smtputf8", "8bitmime", "enhancedstatuscodes"):
            assert client.has_extn(keyword), keyword
        assert client.esmtp_features["size"] == str(MESSAGE_SIZE_LIMIT)
        assert _auth_mechanisms(client) == {"PLAIN", "LOGIN", "CRAM-MD5"}


def test_plain_port_offers_starttls_and_auth_without_tls(postfix_rig: PostfixRig) -> None:
    """Plain port: STARTTLS optional, AUTH offered in clear text."""
    with _plain(postfix_rig) as client:
        assert client.has_extn("starttls")
        assert _auth_mechanisms(client) == {"PLAIN", "LOGIN", "CRAM-MD5"}


def test_submission_hides_auth_until_starttls(postfix_rig: PostfixRig) -> None:
    """Submission port: STARTTLS and no AUTH before TLS; AUTH and no STARTTLS after it."""
    with smtplib.SMTP(postfix_rig.host, postfix_rig.submission_port, timeout=TIMEOUT) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        assert client.docmd("AUTH", "PLAIN " + _b64(b"\0alice\0x"))[0] == 530
        assert client.docmd("MAIL", "FROM:<a@example.test>")[0] == 530
        client.starttls(context=postfix_rig.client_ssl_context())
        client.ehlo()
        assert not client.has_extn("starttls")
        assert _auth_mechanisms(client) == {"PLAIN", "LOGIN", "CRAM-MD5"}


# AUTH ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_smtplib_auth_for_alice_inside_tls(tls_client: smtplib.SMTP, mechanism: str) -> None:
    """smtplib's own PLAIN, LOGIN and CRAM-MD5 succeed on submission and smtps."""
    tls_client.user, tls_client.password = ALICE, DEFAULT_USERS[ALICE]
    if mechanism == "PLAIN":
        code, _ = tls_client.auth(mechanism, tls_client.auth_plain)
    elif mechanism == "LOGIN":
        code, _ = tls_client.auth(mechanism, tls_client.auth_login)
    else:
        code, _ = tls_client.auth(mechanism, tls_client.auth_cram_md5)
    assert code == 235


@pytest.mark.parametrize("user", sorted(DEFAULT_USERS))
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
@pytest.mark.parametrize("port", ["plain", "submission"])
def test_every_user_and_mechanism_by_hand(
    postfix_rig: PostfixRig, port: str, mechanism: str, user: str
) -> None:
    """UTF-8 user names and passwords (jürgen / pässwörd-€) work with every mechanism.

    By hand because smtplib encodes credentials as ASCII.
    """
    with CONNECT[port](postfix_rig) as client:
        code, reply = BY_HAND[mechanism](client, user, postfix_rig.users[user])
        assert (code, reply[:5]) == (235, b"2.7.0")


@pytest.mark.parametrize("mechanism", ["PLAIN", "CRAM-MD5"])
def test_wrong_password_is_535_fast_every_time(postfix_rig: PostfixRig, mechanism: str) -> None:
    """Five wrong passwords in a row: 535 each, none slower than 1 s, then the right one works.

    This is what Dovecot's ``auth_failure_delay = 0`` and the disabled anvil penalty
    buy: by default the 2nd..5th failure from 127.0.0.1 would take 2, 4, 8, 15 s.
    """
    for attempt in range(5):
        with _submission(postfix_rig) as client:
            began = time.monotonic()
            code, reply = BY_HAND[mechanism](client, JURGEN, f"wrong-{attempt}")
            elapsed = time.monotonic() - began
        assert (code, reply[:5]) == (535, b"5.7.8")
        assert elapsed < 1.0, f"attempt {attempt + 1} took {elapsed:.2f} s"
    with _submission(postfix_rig) as client:
        assert BY_HAND[mechanism](client, JURGEN, postfix_rig.users[JURGEN])[0] == 235


def test_unknown_user_is_535(postfix_rig: PostfixRig) -> None:
    """A user Dovecot does not know fails like a wrong password."""
    with _submission(postfix_rig) as client:
        assert auth_plain(client, "mallory", "x")[0] == 535


# Mail ----------------------------------------------------------------------------------------

MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: Bob <bob@example.test>\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    b"Date: Thu, 01 Jan 2026 12:00:00 +0000\r\n"
    b"Message-ID: <rig-roundtrip@example.test>\r\n"
    b"Received: from earlier.example by sender.example; Thu, 01 Jan 2026 11:59:00 +0000\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln \xe2\x82\xac \xf0\x9f\x9a\x80\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b" . \r\n"
    b"last line\r\n"
)


def test_delivered_message_equals_what_was_sent(maildir_clean: PostfixRig) -> None:
    """8-bit UTF-8 body and dot lines survive; only Postfix's trace fields are added."""
    with _plain(maildir_clean) as client:
        refused = client.sendmail(
            "alice@example.test", ["bob@example.test"], MESSAGE, mail_options=["BODY=8BITMIME"]
        )
    assert refused == {}
    [raw] = maildir_clean.wait_for_messages(1)
    assert raw.startswith(b"Return-Path: <alice@example.test>\r\n")
    assert b"\r\nDelivered-To: bob@example.test\r\n" in raw
    assert strip_trace_headers(raw) == MESSAGE


def test_postfix_adds_no_date_or_message_id(maildir_clean: PostfixRig) -> None:
    """local_header_rewrite_clients is empty: a bare message arrives bare."""
    bare = b"Subject: bare\r\n\r\nbody\r\n"
    with _plain(maildir_clean) as client:
        client.sendmail("a@example.test", ["b@example.test"], bare)
    [raw] = maildir_clean.wait_for_messages(1)
    assert strip_trace_headers(raw) == bare


def test_refused_recipient_among_accepted_ones(maildir_clean: PostfixRig) -> None:
    """refuse-* gets 550 5.1.1 and defer-* 450 4.2.1 at RCPT; the others get the message."""
    with _plain(maildir_clean) as client:
        refused = client.sendmail(
            "alice@example.test",
            ["refuse-x@example.test", "bob@example.test", "defer-y@example.test"],
            b"Subject: partial\r\n\r\nbody\r\n",
        )
    assert {address: reply[0] for address, reply in refused.items()} == {
        "refuse-x@example.test": 550,
        "defer-y@example.test": 450,
    }
    assert refused["refuse-x@example.test"][1].startswith(b"5.1.1 ")
    [raw] = maildir_clean.wait_for_messages(1)
    assert b"Delivered-To: bob@example.test\r\n" in raw
    maildir_clean.wait_for_queue_empty()
    assert maildir_clean.read_messages("refuse-x@example.test") == []


def test_unauthenticated_relay_is_refused(postfix_rig: PostfixRig) -> None:
    """Plain port, no AUTH: another domain is refused with 554 5.7.1 (relay denied)."""
    with _plain(postfix_rig) as client:
        client.mail("alice@example.test")
        code, reply = client.rcpt("someone@elsewhere.invalid")
    assert (code, reply[:5]) == (554, b"5.7.1")
    assert b"Relay access denied" in reply


def test_authenticated_relay_is_delivered_locally(maildir_clean: PostfixRig) -> None:
    """After AUTH another domain is accepted, and kept here: the rig never sends mail out."""
    with _submission(maildir_clean) as client:
        client.login(ALICE, maildir_clean.users[ALICE])
        client.sendmail(
            "alice@example.test", ["someone@elsewhere.invalid"], b"Subject: x\r\n\r\nx\r\n"
        )
    assert len(maildir_clean.wait_for_messages(1, recipient="Someone@Elsewhere.invalid")) == 1


def test_submission_requires_auth_for_mail(postfix_rig: PostfixRig) -> None:
    """Submission and smtps: MAIL FROM before AUTH is 530 5.7.0, after AUTH it is 250."""
    for connect in (_submission, _smtps):
        with connect(postfix_rig) as client:
            code, reply = client.docmd("MAIL", "FROM:<alice@example.test>")
            assert (code, reply[:5]) == (530, b"5.7.0")
            client.login(ALICE, postfix_rig.users[ALICE])
            assert client.docmd("MAIL", "FROM:<alice@example.test>")[0] == 250


def test_hundred_recipients_in_one_transaction(maildir_clean: PostfixRig) -> None:
    """r001..r100@example.test: every one accepted, each gets its own copy in the Maildir."""
    recipients = [f"r{number:03d}@{DOMAIN}" for number in range(1, 101)]
    with _plain(maildir_clean) as client:
        assert client.sendmail("a@example.test", recipients, b"Subject: many\r\n\r\nx\r\n") == {}
    assert len(maildir_clean.wait_for_messages(100)) == 100
    assert len(maildir_clean.read_messages("r042@example.test")) == 1


def test_smtputf8_recipient(maildir_clean: PostfixRig) -> None:
    """SMTPUTF8: a non-ASCII local part is accepted and delivered."""
    message = "Subject: utf8\r\nTo: jürgen@example.test\r\n\r\nHallo Jürgen\r\n".encode()
    with _plain(maildir_clean) as client:
        refused = client.sendmail(
            "alice@example.test",
            ["jürgen@example.test"],
            message,
            mail_options=["SMTPUTF8", "BODY=8BITMIME"],
        )
    assert refused == {}
    [raw] = maildir_clean.wait_for_messages(1, recipient="jürgen@example.test")
    assert strip_trace_headers(raw) == message


def test_bdat_chunks(maildir_clean: PostfixRig) -> None:
    """CHUNKING: two BDAT chunks, no dot-stuffing, one 250 per chunk."""
    first = b"Subject: chunked\r\n\r\n.not stuffed\r\n"
    last = b"second chunk\r\n"
    with _plain(maildir_clean) as client:
        assert client.docmd("MAIL", "FROM:<a@example.test>")[0] == 250
        assert client.docmd("RCPT", "TO:<b@example.test>")[0] == 250
        for chunk, suffix in ((first, ""), (last, " LAST")):
            client.send(f"BDAT {len(chunk)}{suffix}\r\n".encode() + chunk)
            assert client.getreply()[0] == 250
    [raw] = maildir_clean.wait_for_messages(1)
    assert strip_trace_headers(raw) == first + last


def test_message_over_size_limit_is_refused_at_mail(postfix_rig: PostfixRig) -> None:
    """MAIL FROM with SIZE= above the advertised limit: 552 5.3.4."""
    with _plain(postfix_rig) as client:
        code, reply = client.docmd("MAIL", f"FROM:<a@example.test> SIZE={MESSAGE_SIZE_LIMIT + 1}")
    assert (code, reply[:5]) == (552, b"5.3.4")


def test_bare_lf_in_data_is_rejected(postfix_rig: PostfixRig) -> None:
    """smtpd_forbid_bare_newline = reject: a bare LF (SMTP smuggling) is never accepted."""
    with _plain(postfix_rig) as client:
        client.mail("a@example.test")
        client.rcpt("b@example.test")
        assert client.docmd("DATA")[0] == 354
        client.send(b"Subject: smuggle\r\n\r\nbare\n.\nMAIL FROM:<x@example.test>\r\n.\r\n")
        code, _ = client.getreply()
    assert code >= 500


def test_clear_messages_empties_the_maildirs(maildir_clean: PostfixRig) -> None:
    """clear_messages() waits for the queue and leaves no message behind."""
    with _plain(maildir_clean) as client:
        client.sendmail("a@example.test", ["c@example.test"], b"Subject: x\r\n\r\nx\r\n")
    maildir_clean.wait_for_messages(1)
    maildir_clean.clear_messages()
    assert maildir_clean.read_messages() == []
    assert maildir_clean.queue_size() == 0


# Helpers --------------------------------------------------------------------------------------


def test_strip_trace_headers_keeps_the_senders_own_fields() -> None:
    """Only the leading delivery fields and the first Received go; folding is respected."""
    delivered = (
        b"Return-Path: <a@example.test>\r\n"
        b"X-Original-To: b@example.test\r\n"
        b"Delivered-To: b@example.test\r\n"
        b"Received: from client.test (unknown [127.0.0.1])\r\n"
        b"\tby localhost (Postfix) with ESMTP id 4Xyz\r\n"
        b"\tfor <b@example.test>; Thu,  1 Jan 2026 12:00:00 +0000 (UTC)\r\n"
        b"Received: from earlier.example by sender.example\r\n"
        b"Subject: x\r\n"
        b"Delivered-To: kept@example.test\r\n"
        b"\r\n"
        b"Return-Path: body\r\n"
    )
    assert strip_trace_headers(delivered) == (
        b"Received: from earlier.example by sender.example\r\n"
        b"Subject: x\r\n"
        b"Delivered-To: kept@example.test\r\n"
        b"\r\n"
        b"Return-Path: body\r\n"
    )
    assert strip_trace_headers(b"Subject: x\n\nbody\n") == b"Subject: x\n\nbody\n"


def test_rig_users_include_a_non_ascii_one() -> None:
    """The accounts the interop tests log in with (documented in rig.DEFAULT_USERS)."""
    assert DEFAULT_USERS[ALICE].isascii()
    assert not JURGEN.isascii()
    assert not DEFAULT_USERS[JURGEN].isascii()
