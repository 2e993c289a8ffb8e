"""``manage.py sendtestmail`` against real in-process servers: output, diagnosis, exit status."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from django_socketmail.localserver import LocalSMTPServer
from django_socketmail.models import MessageLog

from .conftest import PASSWORD, USER

pytestmark = pytest.mark.django_db(transaction=True)


def run(*args: str) -> tuple[int, str]:
    """Run the command; return (exit status, stdout + error message)."""
    out = io.StringIO()
    try:
        call_command("sendtestmail", *args, stdout=out, stderr=io.StringIO())
    except CommandError as error:
        return error.returncode, out.getvalue() + "\nERROR: " + str(error)
    return 0, out.getvalue()


def target(server: LocalSMTPServer, *extra: str) -> list[str]:
    args = ["--host", "127.0.0.1", "--port", str(server.port), "--timeout", "3"]
    if server.tls != "none":
        args += ["--ca-file", server.ca_cert_path]
    args += ["--tls"] if server.tls == "starttls" else ["--ssl"] if server.tls == "implicit" else []
    return args + list(extra)


@pytest.fixture
def password(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("SOCKETMAIL_PASSWORD", PASSWORD)
    return PASSWORD


def test_local_server_demo_prints_conversation_summary_and_audit_row() -> None:
    status, out = run("--local-server", "you@example.com")
    assert status == 0, out
    assert " -> EHLO " in out
    assert " -> STARTTLS" in out
    assert "<-  235 " in out
    assert " -> [redacted]" in out
    assert "TLS:        TLSv1." in out
    assert "AUTH:       CRAM-MD5" in out
    assert "Recipient:  you@example.com: delivered (250 OK)" in out
    assert "Status:     sent" in out
    assert "Queue id:   " in out
    assert "The local server received from webmaster@localhost for you@example.com" in out
    log = MessageLog.objects.get()
    assert f"Audit log:  message #{log.pk}" in out


def test_json_and_no_password_anywhere(starttls_server: LocalSMTPServer, password: str) -> None:
    status, out = run(*target(starttls_server, "--user", USER, "--json"), "x@example.com")
    assert status == 0, out
    report = json.loads(out)
    assert report["status"] == "sent"
    assert report["mechanism"] == "CRAM-MD5"
    assert report["recipients"]["x@example.com"]["code"] == 250
    assert report["queue_id"] == starttls_server.messages[0].queue_id
    assert report["exit_status"] == 0
    assert any(line.startswith("C: AUTH CRAM-MD5") for line in report["transcript"])
    assert password not in out


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_each_mechanism_and_check_mode(
    starttls_server: LocalSMTPServer, password: str, mechanism: str
) -> None:
    status, out = run(*target(starttls_server, "--user", USER, "--auth", mechanism, "--check"))
    assert status == 0, out
    assert f"AUTH:       {mechanism}" in out
    assert "Check:      passed" in out
    assert " -> MAIL" not in out
    assert starttls_server.messages == []
    assert password not in out


def test_no_recipient_is_a_command_error() -> None:
    with pytest.raises(CommandError, match="recipients"):
        call_command("sendtestmail", stdout=io.StringIO())


def test_password_only_from_environment_or_prompt(starttls_server: LocalSMTPServer) -> None:
    with pytest.raises(CommandError, match="SOCKETMAIL_PASSWORD"):
        call_command("sendtestmail", *target(starttls_server, "--user", USER), "x@example.com")


def test_partial_is_exit_1(starttls_server: LocalSMTPServer) -> None:
    status, out = run(*target(starttls_server), "ok@example.com", "nobody@example.com")
    assert status == 1
    assert "nobody@example.com: refused (550 5.1.1" in out


DIAGNOSES: list[tuple[str, dict[str, Any], list[str], str]] = [
    ("refused recipients", {}, ["nobody@example.com"], "refused every recipient"),
    ("wrong password", {}, ["--user", USER, "x@example.com"], "Wrong user name or password"),
    (
        "mechanism not offered",
        {"mechanisms": ("PLAIN",)},
        ["--user", USER, "--auth", "CRAM-MD5", "x@example.com"],
        "change --auth",
    ),
    (
        "too large",
        {"size_limit": 500},
        ["--body", "x" * 2000, "x@example.com"],
        "send a smaller message",
    ),
]


@pytest.mark.parametrize(("case", "server_options", "args", "hint"), DIAGNOSES)
def test_diagnoses_on_a_starttls_server(
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    server_options: dict[str, Any],
    args: list[str],
    hint: str,
) -> None:
    monkeypatch.setenv("SOCKETMAIL_PASSWORD", "not-the-password")
    users = {USER: PASSWORD}
    refuse = lambda a: (550, "5.1.1 no such user") if a.startswith("nobody") else None  # noqa: E731
    with LocalSMTPServer(users=users, refuse_recipients=refuse, **server_options) as server:
        status, out = run(*target(server, *args))
    assert status == 2, case
    assert hint in out, out
    assert "not-the-password" not in out
    assert PASSWORD not in out


def test_connection_refused() -> None:
    with LocalSMTPServer(tls="none") as gone:
        port = gone.port
    status, out = run("--host", "127.0.0.1", "--port", str(port), "x@example.com")
    assert status == 2
    assert "Nothing accepts connections on 127.0.0.1" in out


def test_starttls_not_offered(plain_server: LocalSMTPServer) -> None:
    status, out = run(*target(plain_server, "--tls", "x@example.com"))
    assert status == 2
    assert "does not offer STARTTLS" in out
    assert plain_server.messages == []


def test_implicit_tls_expected(implicit_server: LocalSMTPServer) -> None:
    args = ["--host", "127.0.0.1", "--port", str(implicit_server.port), "--tls", "--timeout", "1"]
    status, out = run(*args, "x@example.com")
    assert status == 2
    assert "implicit TLS" in out
    assert "--ssl" in out


def test_ssl_against_a_starttls_port(starttls_server: LocalSMTPServer) -> None:
    args = ["--host", "127.0.0.1", "--port", str(starttls_server.port), "--ssl", "--timeout", "2"]
    status, out = run(*args, "--ca-file", starttls_server.ca_cert_path, "x@example.com")
    assert status == 2
    assert "use --tls" in out


def test_certificate_not_trusted(starttls_server: LocalSMTPServer) -> None:
    status, out = run(
        "--host", "127.0.0.1", "--port", str(starttls_server.port), "--tls", "x@example.com"
    )
    assert status == 2
    assert "--ca-file" in out


def test_auth_not_offered_before_starttls(starttls_server: LocalSMTPServer, password: str) -> None:
    args = ["--host", "127.0.0.1", "--port", str(starttls_server.port), "--no-tls"]
    status, out = run(*args, "--user", USER, "x@example.com")
    assert status == 2
    assert "add --tls" in out


def test_cleartext_auth_refused(plain_server: LocalSMTPServer, password: str) -> None:
    status, out = run(*target(plain_server, "--user", USER, "--auth", "PLAIN", "x@example.com"))
    assert status == 2
    assert "without encryption" in out
    assert password not in out
