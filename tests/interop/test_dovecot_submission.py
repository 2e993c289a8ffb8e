"""Our backend against Dovecot's own submission server (2.3.19, Debian 12), in front of Postfix.

The rig of :mod:`tests.interop.rig`, started with ``dovecot_submission=True``, runs
Dovecot's submission service on ``dovecot_submission_port``: STARTTLS with the rig's
certificate, AUTH against the rig's users, every transaction relayed to the rig's Postfix,
which delivers into the Maildir. Dovecot logs into ``dovecot_log_path``.

Dovecot 2.3.19's submission server has a fault (issue 11): in DATA mode, when the next
envelope is pipelined behind the final dot (RFC 2920 §3.1 allows it), the process panics on
``assertion failed: (conn->state.pending_rcpt_cmds == 0)`` and the connection drops, after
the message before the dot was relayed but before its final reply was written. These
tests show the fault on the wire, then check what the backend must do about it: report
the message in flight as UNKNOWN or SENT (never lost silently and never sent twice), send
the rest on a new connection, say so once in the log, and stop pipelining behind the dot
to that host and port.
"""

from __future__ import annotations

import base64
import logging
import re
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
from django.core.mail import EmailMessage

from django_socketmail import session as session_module
from django_socketmail.email_backend import EmailBackend
from django_socketmail.models import MessageLog
from django_socketmail.pool import POOL, close_pool
from django_socketmail.smtp import SendResult, SendStatus
from django_socketmail.smtp.errors import ServerDisconnected
from tests.interop import conftest
from tests.interop import rig as rig_module
from tests.interop.conftest import SUBMISSION_NOT_INSTALLED, require_dovecot_submission
from tests.interop.rig import DOMAIN, PostfixRig, RigError

pytestmark = pytest.mark.django_db(transaction=True)

SENDER: Final = f"alice@{DOMAIN}"
USER: Final = "alice"
TIMEOUT: Final = 10.0
PANIC: Final = "assertion failed: (conn->state.pending_rcpt_cmds == 0)"
LEARNED: Final = "no longer pipelining across messages"
# Postfix's reply to BDAT LAST, which Dovecot relays with BDAT and passes back verbatim.
RELAYED_FINAL_REPLY: Final = re.compile(r"2\.0\.0 Ok: \d+ bytes queued as ([0-9A-Z]+)")
POSTFIX_ID_IN_RECEIVED: Final = re.compile(rb"\(Postfix\) with ESMTP id ([0-9A-Z]+)")


# Helpers ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def nothing_learned() -> None:
    """Each test starts with no server known to choke on an envelope behind the dot.

    The backend learns that per host and port for the life of the process, and the rig's
    port is the same for every test of the session.
    """
    session_module.forget_no_dot_pipelining()


def panics(rig: PostfixRig) -> int:
    """How many times Dovecot's submission server has panicked on the fault so far."""
    return rig.dovecot_log_path.read_text(errors="replace").count(PANIC)


def make_message(tag: str) -> EmailMessage:
    """A message identified by ``tag`` (header ``X-Tag``), for ``tag@example.test``."""
    return EmailMessage(
        f"dovecot {tag}",
        f"Body of {tag}.\n",
        SENDER,
        [f"{tag}@{DOMAIN}"],
        headers={"Message-ID": f"<{tag}@interop.test>", "X-Tag": tag},
    )


def result_of(msg: EmailMessage) -> SendResult:
    """The :class:`SendResult` the backend put on ``msg``."""
    result = getattr(msg, "socketmail_result", None)
    assert isinstance(result, SendResult), f"no socketmail_result on {msg.subject!r}"
    return result


def submission_backend(rig: PostfixRig, **options: Any) -> EmailBackend:
    """A backend for Dovecot's submission port: STARTTLS (verified), AUTH as alice."""
    defaults: dict[str, Any] = {
        "host": rig.server_hostname,
        "port": rig.dovecot_submission_port,
        "use_tls": True,
        "ssl_cafile": str(rig.ca_cert_path),
        "username": USER,
        "password": rig.users[USER],
        "timeout": TIMEOUT,
        "local_hostname": "client.test",
    }
    return EmailBackend(**(defaults | options))


def delivered_tags(rig: PostfixRig, at_least: int) -> Counter[str]:
    """Wait for ``at_least`` deliveries and an empty queue; count the copies per ``X-Tag``.

    Dovecot answers a message only after Postfix queued it, and Postfix delivers what it
    queued, so once the queue is empty a second copy would already be in the Maildir.
    """
    rig.wait_for_messages(at_least)
    rig.wait_for_queue_empty()
    tags = Counter[str]()
    for raw in rig.read_messages():
        head = raw.split(b"\r\n\r\n", 1)[0]
        found = re.search(rb"^X-Tag: (\S+)", head, re.MULTILINE | re.IGNORECASE)
        assert found is not None, head
        tags[found.group(1).decode()] += 1
    return tags


class RawClient:
    """Bytes in, bytes out over a plain socket: for writes no SMTP library would make."""

    def __init__(self, rig: PostfixRig) -> None:
        self.sock = socket.create_connection((rig.host, rig.dovecot_submission_port), TIMEOUT)

    def close(self) -> None:
        self.sock.close()

    def replies(self, count: int) -> bytes:
        """Read until ``count`` complete replies arrived; what was read, then ``<EOF>`` if the
        server closed first."""
        data = b""
        while len(re.findall(rb"^\d{3} [^\r\n]*\r\n", data, re.MULTILINE)) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                return data + b"<EOF>"
            data += chunk
        return data

    def send(self, data: bytes, replies: int) -> bytes:
        self.sock.sendall(data)
        return self.replies(replies)

    def login(self, rig: PostfixRig) -> None:
        """Greeting, EHLO, AUTH PLAIN (Dovecot allows it without TLS from 127.0.0.1)."""
        assert self.replies(1).startswith(b"220 ")
        assert b"250-PIPELINING" in self.send(b"EHLO client.test\r\n", 1)
        blob = base64.b64encode(f"\0{USER}\0{rig.users[USER]}".encode())
        assert self.send(b"AUTH PLAIN " + blob + b"\r\n", 1).startswith(b"235 ")


@pytest.fixture
def raw_client(dovecot_submission: PostfixRig) -> Iterator[RawClient]:
    client = RawClient(dovecot_submission)
    client.login(dovecot_submission)
    yield client
    client.close()


def envelope(tag: str) -> bytes:
    return f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{tag}@{DOMAIN}>\r\nDATA\r\n".encode()


def content(tag: str) -> bytes:
    return f"Subject: {tag}\r\nX-Tag: {tag}\r\n\r\nbody\r\n.\r\n".encode()


# The rig -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ci", ["", "true"])
def test_missing_submission_server_skips_here_but_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch, ci: str
) -> None:
    """Postfix and Dovecot there but no dovecot-submissiond: a skip with the install hint;
    with CI set, a failure."""
    monkeypatch.setattr(conftest, "_unavailable_reason", lambda: None)
    monkeypatch.setattr(conftest, "missing_submission_binaries", lambda: ["submission"])
    monkeypatch.setenv("CI", ci)
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(outcome) as excinfo:
        require_dovecot_submission()
    if ci:
        assert str(excinfo.value).startswith(SUBMISSION_NOT_INSTALLED)
    else:
        assert excinfo.value.msg == SUBMISSION_NOT_INSTALLED


def test_rig_refuses_to_start_without_the_submission_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Asked for Dovecot's submission server that is not installed, start() says which
    package to install, before writing or starting anything."""
    monkeypatch.setattr(rig_module, "missing_binaries", lambda: [])
    monkeypatch.setattr(rig_module, "missing_submission_binaries", lambda: ["submission-login"])
    rig = PostfixRig(dovecot_submission=True)
    with pytest.raises(RigError, match="apt-get install dovecot-submissiond"):
        rig.start()
    assert not rig.running
    with pytest.raises(RigError, match="no directory"):
        _ = rig.base_dir


def test_default_rig_runs_no_submission_server(postfix_rig: PostfixRig) -> None:
    """The session's ordinary rig is as before: an auth-only Dovecot, no fourth port."""
    assert postfix_rig.dovecot_submission_port == 0
    conf = (postfix_rig.dovecot_dir / "dovecot.conf").read_text()
    assert "protocols = none\nssl = no\n" in conf
    assert "submission" not in conf


def test_stop_ends_every_process_even_after_a_panic() -> None:
    """A private submission rig whose Dovecot panicked once: after stop() none of its
    processes exists (login and submission processes included) and its directory is gone."""
    require_dovecot_submission()
    rig = PostfixRig(dovecot_submission=True)
    rig.start()
    try:
        client = RawClient(rig)
        client.login(rig)
        assert client.send(envelope("stop-1"), 3).endswith(b"354 OK\r\n")
        assert client.send(content("stop-1") + envelope("stop-2"), 1) == b"<EOF>"
        client.close()
        pids = rig.pids()
        base_dir = rig.base_dir
        assert len(pids) >= 6  # supervisor, Postfix master + children, Dovecot + children
    finally:
        rig.stop()
    assert not rig.running
    assert not base_dir.exists()
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []


def test_submission_rig_starts_quickly(dovecot_submission_rig: PostfixRig) -> None:
    """Four ports, all greeting, within the ordinary rig's budget; Dovecot says 220 too."""
    rig = dovecot_submission_rig
    assert 0 < rig.startup_seconds < 5
    ports = {rig.plain_port, rig.submission_port, rig.smtps_port, rig.dovecot_submission_port}
    assert len(ports) == 4
    with socket.create_connection((rig.host, rig.dovecot_submission_port), TIMEOUT) as sock:
        greeting = sock.recv(512)
    assert greeting.startswith(b"220 localhost Dovecot"), greeting


def test_submission_relays_to_postfix_under_starttls(dovecot_submission: PostfixRig) -> None:
    """STARTTLS with the rig's certificate (verified for localhost), AUTH, one message:
    delivered by the rig's Postfix after Dovecot relayed it, both servers' trace fields on
    top, and the relay logged by Dovecot into the rig's directory."""
    rig = dovecot_submission
    msg = make_message("rig-smoke")
    assert submission_backend(rig, fail_silently=False).send_messages([msg]) == 1
    result = result_of(msg)
    assert result.status is SendStatus.SENT
    [raw] = rig.wait_for_messages(1)
    assert b"by localhost with ESMTPSA" in raw  # Dovecot's Received: TLS and AUTH
    assert POSTFIX_ID_IN_RECEIVED.search(raw) is not None
    log = rig.dovecot_log_path.read_text()
    assert f"submission({USER})" in log
    assert "Successfully relayed message" in log
    assert Path(rig.dovecot_log_path).parent == rig.base_dir


def test_refused_recipient_comes_back_through_dovecot(dovecot_submission: PostfixRig) -> None:
    """The rig's conventions hold through Dovecot: Postfix's 550 for ``refuse-*`` reaches
    the client at RCPT, the other recipient gets the message."""
    rig = dovecot_submission
    msg = make_message("refusal")
    msg.to = [f"refuse-x@{DOMAIN}", f"ok@{DOMAIN}"]
    assert submission_backend(rig, fail_silently=True).send_messages([msg]) == 1
    result = result_of(msg)
    assert result.status is SendStatus.PARTIAL
    codes = {r.address: r.reply.code if r.reply else None for r in result.recipients}
    assert codes == {f"refuse-x@{DOMAIN}": 550, f"ok@{DOMAIN}": 250}
    assert delivered_tags(rig, 1) == {"refusal": 1}
    assert rig.message_paths(f"ok@{DOMAIN}") == rig.message_paths()


@pytest.mark.parametrize("chunking", [False, True], ids=["data", "bdat"])
def test_final_reply_is_the_relays_and_names_its_queue_id(
    dovecot_submission: PostfixRig, chunking: bool
) -> None:
    """Dovecot 2.3 answers the content with its relay's final reply, verbatim: here
    Postfix's answer to ``BDAT LAST`` (Dovecot relays with BDAT), in DATA and BDAT mode
    alike. So the queue id is Postfix's (its Received field and log), not Dovecot's own
    ``id`` (in Dovecot's Received field and log, beside the relayed ``reply=``)."""
    rig = dovecot_submission
    msg = make_message(f"queue-id-{int(chunking)}")
    assert submission_backend(rig, chunking=chunking).send_messages([msg]) == 1
    result = result_of(msg)
    assert result.final_reply is not None
    assert result.final_reply.code == 250
    match = RELAYED_FINAL_REPLY.fullmatch(result.final_reply.text)
    assert match is not None, str(result.final_reply)
    assert result.queue_id == match.group(1)
    [raw] = rig.wait_for_messages(1)
    postfix_id = POSTFIX_ID_IN_RECEIVED.search(raw)
    assert postfix_id is not None and postfix_id.group(1).decode() == result.queue_id
    dovecot_id = re.search(rb"by localhost with ESMTPSA\r\n\tid (\S+)\r\n", raw)
    assert dovecot_id is not None and dovecot_id.group(1).decode() != result.queue_id
    assert f"reply=`{result.final_reply}'" in rig.dovecot_log_path.read_text()


# The fault, on the wire ------------------------------------------------------------------------


def test_envelope_behind_the_dot_kills_dovecot(
    dovecot_submission: PostfixRig, raw_client: RawClient
) -> None:
    """RFC 2920 pipelining the real server cannot take: content, dot and the next envelope
    in one write. Dovecot relays the first message, then panics before answering it."""
    rig = dovecot_submission
    before = panics(rig)
    reply = raw_client.send(envelope("wire-1"), 3)
    assert reply == b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 OK\r\n"
    after_dot = raw_client.send(content("wire-1") + envelope("wire-2"), 1)
    assert after_dot == b"<EOF>"  # not even the first message's final reply
    deadline = time.monotonic() + TIMEOUT
    while panics(rig) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert panics(rig) == before + 1
    assert delivered_tags(rig, 1) == {"wire-1": 1}  # relayed before the panic


def test_envelope_after_the_final_reply_is_fine(
    dovecot_submission: PostfixRig, raw_client: RawClient
) -> None:
    """The same bytes, but the next envelope waits for the final reply: no panic."""
    rig = dovecot_submission
    before = panics(rig)
    for tag in ("calm-1", "calm-2"):
        assert raw_client.send(envelope(tag), 3).endswith(b"354 OK\r\n")
        final = raw_client.send(content(tag), 1).decode()
        assert RELAYED_FINAL_REPLY.fullmatch(final.removeprefix("250 ").rstrip("\r\n")), final
    assert raw_client.send(b"QUIT\r\n", 1).startswith(b"221 ")
    assert delivered_tags(rig, 2) == {"calm-1": 1, "calm-2": 1}
    assert panics(rig) == before


# The backend -------------------------------------------------------------------------------


def test_backend_learns_and_resends_what_cannot_have_been_delivered(
    dovecot_submission: PostfixRig, caplog: pytest.LogCaptureFixture
) -> None:
    """Five messages in DATA mode with ``fail_silently``: Dovecot dies behind the first
    dot. The first is UNKNOWN (it was relayed, but no reply said so) or SENT; the other
    four go on a new connection that no longer pipelines behind the dot; each message
    arrives exactly once; one warning; later sends to that port do not crash Dovecot."""
    rig = dovecot_submission
    before = panics(rig)
    msgs = [make_message(f"learn-{n}") for n in range(5)]
    with caplog.at_level(logging.WARNING, logger="django_socketmail"):
        sent = submission_backend(rig, chunking=False, fail_silently=True).send_messages(msgs)
        statuses = [result_of(m).status for m in msgs]
        assert statuses[0] in (SendStatus.UNKNOWN, SendStatus.SENT)
        assert statuses[1:] == [SendStatus.SENT] * 4
        assert sent == 4 + (statuses[0] is SendStatus.SENT)
        assert panics(rig) == before + 1  # the fault happened, once
        assert session_module.learned_no_dot_pipelining(
            rig.server_hostname, rig.dovecot_submission_port
        )
        assert delivered_tags(rig, 5) == {m.extra_headers["X-Tag"]: 1 for m in msgs}
        if statuses[0] is SendStatus.UNKNOWN:
            assert result_of(msgs[0]).error is not None

        later = [make_message(f"later-{n}") for n in range(3)]
        again = submission_backend(rig, chunking=False, fail_silently=False)
        assert again.send_messages(later) == 3
    assert caplog.text.count(LEARNED) == 1
    assert panics(rig) == before + 1  # no new crash
    expected = {m.extra_headers["X-Tag"]: 1 for m in msgs + later}
    assert delivered_tags(rig, 8) == expected
    statuses_logged = dict(MessageLog.objects.values_list("message_id", "status"))
    assert statuses_logged[msgs[0].extra_headers["Message-ID"]] == statuses[0].value
    assert all(statuses_logged[m.extra_headers["Message-ID"]] == "sent" for m in msgs[1:] + later)


def test_backend_without_fail_silently_raises_the_unknown_message_error(
    dovecot_submission: PostfixRig, caplog: pytest.LogCaptureFixture
) -> None:
    """The same five messages without ``fail_silently``: the first message's error is raised
    (as Django's backend raises the first failure) and the rest are not attempted; the
    lesson is still learned and logged once; nothing is sent twice."""
    rig = dovecot_submission
    before = panics(rig)
    msgs = [make_message(f"loud-{n}") for n in range(5)]
    backend = submission_backend(rig, chunking=False, fail_silently=False)
    with (
        caplog.at_level(logging.WARNING, logger="django_socketmail"),
        pytest.raises(ServerDisconnected) as excinfo,
    ):
        backend.send_messages(msgs)
    first = result_of(msgs[0])
    assert first.status is SendStatus.UNKNOWN
    assert excinfo.value is first.error
    # Not attempted after the raise, as Django's backend: no result, not sent, not resent.
    assert [getattr(m, "socketmail_result", None) for m in msgs[1:]] == [None] * 4
    assert caplog.text.count(LEARNED) == 1
    assert panics(rig) == before + 1
    assert delivered_tags(rig, 1) == {"loud-0": 1}  # Dovecot relayed it, then died
    statuses_logged = dict(MessageLog.objects.values_list("message_id", "status"))
    assert statuses_logged == {"<loud-0@interop.test>": "unknown"}


def test_pooled_session_opened_before_the_lesson_does_not_crash_dovecot_again(
    dovecot_submission: PostfixRig, caplog: pytest.LogCaptureFixture
) -> None:
    """With ``pool=True`` and two warm sessions idle, five messages in DATA mode: Dovecot
    dies behind the first dot; the rest go on another connection -- the other idle
    session, opened before anything was learned -- which must not pipeline behind the
    dot either: one crash, one message in doubt, the other four SENT, each once."""
    rig = dovecot_submission
    before = panics(rig)
    options: dict[str, Any] = {"chunking": False, "pool": True, "fail_silently": True}
    try:
        warm = [submission_backend(rig, **options) for _ in range(2)]
        for backend in warm:
            assert backend.open() is True
        for backend in warm:
            backend.close()
        assert POOL.idle_count() == 2
        msgs = [make_message(f"pool-{n}") for n in range(5)]
        with caplog.at_level(logging.WARNING, logger="django_socketmail"):
            sent = submission_backend(rig, **options).send_messages(msgs)
        statuses = [result_of(m).status for m in msgs]
        assert delivered_tags(rig, 5) == {m.extra_headers["X-Tag"]: 1 for m in msgs}
        assert caplog.text.count(LEARNED) == 1
        assert statuses[0] in (SendStatus.UNKNOWN, SendStatus.SENT)
        assert statuses[1:] == [SendStatus.SENT] * 4
        assert sent == 4 + (statuses[0] is SendStatus.SENT)
        assert panics(rig) == before + 1
    finally:
        close_pool()


def test_backend_opened_before_the_lesson_does_not_crash_dovecot_again(
    dovecot_submission: PostfixRig,
) -> None:
    """Two backends held open (``with get_connection() as connection:`` in two workers);
    the first learns that Dovecot dies behind the dot; the second, already connected,
    must not crash it again."""
    rig = dovecot_submission
    before = panics(rig)
    first = submission_backend(rig, chunking=False, fail_silently=True)
    second = submission_backend(rig, chunking=False, fail_silently=True)
    with first, second:
        first.send_messages([make_message(f"held-a{n}") for n in range(3)])
        assert panics(rig) == before + 1
        msgs = [make_message(f"held-b{n}") for n in range(3)]
        sent = second.send_messages(msgs)
    assert delivered_tags(rig, 6) == {f"held-{x}{n}": 1 for x in "ab" for n in range(3)}
    assert [result_of(m).status for m in msgs] == [SendStatus.SENT] * 3
    assert sent == 3
    assert panics(rig) == before + 1


SENDING_MODES: Final[dict[str, dict[str, bool]]] = {
    "bdat": {},
    "pipelined-data": {"chunking": False},
    "lockstep-data": {"pipelining": False},
}


@pytest.mark.parametrize("mode", SENDING_MODES, ids=list(SENDING_MODES))
def test_many_messages_with_refusals_in_each_mode(
    dovecot_submission: PostfixRig, mode: str
) -> None:
    """Twenty messages, each to two accepted recipients and a refused one, in one call:
    PARTIAL with the 550 on the refused recipient, each accepted copy delivered once, and
    Dovecot does not crash (in pipelined DATA mode only behind the first dot, once)."""
    rig = dovecot_submission
    before = panics(rig)
    msgs = []
    for n in range(20):
        msg = make_message(f"{mode}-{n:02d}")
        msg.to = [f"{mode}-{n:02d}-a@{DOMAIN}", f"refuse-{n:02d}@{DOMAIN}", f"b{n}@{DOMAIN}"]
        msgs.append(msg)
    backend = submission_backend(rig, fail_silently=True, **SENDING_MODES[mode])
    crashes = 1 if mode == "pipelined-data" else 0  # the first dot, then learned
    assert backend.send_messages(msgs) == 20 - crashes
    for index, msg in enumerate(msgs):
        result = result_of(msg)
        # The message in flight when Dovecot died keeps its RCPT replies, but no final one.
        expected = SendStatus.UNKNOWN if index < crashes else SendStatus.PARTIAL
        assert result.status is expected, result
        codes = [r.reply.code if r.reply else None for r in result.recipients]
        assert codes == [250, 550, 250]
    tags = delivered_tags(rig, 40)
    assert tags == {m.extra_headers["X-Tag"]: 2 for m in msgs}
    assert panics(rig) - before == crashes
