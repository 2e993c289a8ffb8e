"""``manage.py sendtestmail`` against real in-process servers: output, diagnosis, exit status."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from django_socketmail.localserver import LocalSMTPServer
from django_socketmail.management.commands import sendtestmail
from django_socketmail.management.commands.sendtestmail import (
    EXIT_SESSION_FAILED,
    EXIT_SOFTWARE,
    EXIT_USAGE,
)
from django_socketmail.models import MessageLog

from .conftest import PASSWORD, USER
from .hostile.server import HostileSMTPServer, Script, cycle, reply, standard_session

ROOT = Path(__file__).resolve().parent.parent

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


DIAGNOSES: list[tuple[str, dict[str, Any], list[str], str, int]] = [
    ("refused recipients", {}, ["nobody@example.com"], "refused every recipient", 2),
    (
        "wrong password",
        {},
        ["--user", USER, "x@example.com"],
        "Wrong user name or password",
        EXIT_SESSION_FAILED,
    ),
    (
        "mechanism not offered",
        {"mechanisms": ("PLAIN",)},
        ["--user", USER, "--auth", "CRAM-MD5", "x@example.com"],
        "change --auth",
        EXIT_SESSION_FAILED,
    ),
    (
        "too large",
        {"size_limit": 500},
        ["--body", "x" * 2000, "x@example.com"],
        "send a smaller message",
        2,
    ),
]


@pytest.mark.parametrize(("case", "server_options", "args", "hint", "expected"), DIAGNOSES)
def test_diagnoses_on_a_starttls_server(
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    server_options: dict[str, Any],
    args: list[str],
    hint: str,
    expected: int,
) -> None:
    monkeypatch.setenv("SOCKETMAIL_PASSWORD", "not-the-password")
    users = {USER: PASSWORD}
    refuse = lambda a: (550, "5.1.1 no such user") if a.startswith("nobody") else None  # noqa: E731
    with LocalSMTPServer(users=users, refuse_recipients=refuse, **server_options) as server:
        status, out = run(*target(server, *args))
    assert status == expected, case
    assert hint in out, out
    assert "not-the-password" not in out
    assert PASSWORD not in out


def test_connection_refused() -> None:
    with LocalSMTPServer(tls="none") as gone:
        port = gone.port
    status, out = run("--host", "127.0.0.1", "--port", str(port), "x@example.com")
    assert status == EXIT_SESSION_FAILED
    assert "Nothing accepts connections on 127.0.0.1" in out


def test_starttls_not_offered(plain_server: LocalSMTPServer) -> None:
    status, out = run(*target(plain_server, "--tls", "x@example.com"))
    assert status == EXIT_SESSION_FAILED
    assert "does not offer STARTTLS" in out
    assert plain_server.messages == []


def test_implicit_tls_expected(implicit_server: LocalSMTPServer) -> None:
    args = ["--host", "127.0.0.1", "--port", str(implicit_server.port), "--tls", "--timeout", "1"]
    status, out = run(*args, "x@example.com")
    assert status == EXIT_SESSION_FAILED
    assert "implicit TLS" in out
    assert "--ssl" in out


def test_ssl_against_a_starttls_port(starttls_server: LocalSMTPServer) -> None:
    args = ["--host", "127.0.0.1", "--port", str(starttls_server.port), "--ssl", "--timeout", "2"]
    status, out = run(*args, "--ca-file", starttls_server.ca_cert_path, "x@example.com")
    assert status == EXIT_SESSION_FAILED
    assert "use --tls" in out


def test_certificate_not_trusted(starttls_server: LocalSMTPServer) -> None:
    status, out = run(
        "--host", "127.0.0.1", "--port", str(starttls_server.port), "--tls", "x@example.com"
    )
    assert status == EXIT_SESSION_FAILED
    assert "--ca-file" in out


def test_auth_not_offered_before_starttls(starttls_server: LocalSMTPServer, password: str) -> None:
    args = ["--host", "127.0.0.1", "--port", str(starttls_server.port), "--no-tls"]
    status, out = run(*args, "--user", USER, "x@example.com")
    assert status == EXIT_SESSION_FAILED
    assert "add --tls" in out


def test_cleartext_auth_refused(plain_server: LocalSMTPServer, password: str) -> None:
    status, out = run(*target(plain_server, "--user", USER, "--auth", "PLAIN", "x@example.com"))
    assert status == EXIT_SESSION_FAILED
    assert "without encryption" in out
    assert password not in out


# -- server text and user text reach the terminal inert (CWE-150) ---------------------------

# What a terminal would act on: ESC (CSI, OSC), BEL, a bare CR, NUL, C1 controls (CSI is
# U+009B), the line and paragraph separators, bidirectional overrides.
TERMINAL_CONTROLS = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
OSC52 = "\x1b]52;c;cm0gLXJmIH4K\x07"
TITLE = "\x1b]0;pwned\x07"
CLEAR = "\x1b[2J\x1b[H"


def hostile_escapes() -> Script:
    """A server that tries every terminal trick in its greeting, EHLO, RCPT and final reply."""
    return standard_session(
        {
            "RCPT": cycle(
                reply(250, f"2.1.5 ok {OSC52}"),
                reply(550, "5.7.1 relaying denied\r250 2.1.5 ok \u009b2J\u2028\u202e"),
            ),
            ".": reply(250, f"2.0.0 queued as X{CLEAR}"),
        },
        greeting=f"hostile.test ESMTP {TITLE}",
        hostname=f"hostile.test {OSC52}",
    )


def hostile_args(server: HostileSMTPServer, *extra: str) -> list[str]:
    return ["--host", server.host, "--port", str(server.port), "--no-tls", "--timeout", "3", *extra]


def assert_inert(text: str) -> None:
    found = TERMINAL_CONTROLS.findall(text)
    assert not found, f"raw control characters {found!r} in {text!r}"


def test_server_escape_sequences_are_printed_inert() -> None:
    with HostileSMTPServer(hostile_escapes()) as server:
        status, out = run(*hostile_args(server), "ok@example.com", "denied@example.com")
    assert status == 1, out
    assert_inert(out)
    assert "<-  220 hostile.test ESMTP \\x1b]0;pwned\\x07" in out
    assert "denied@example.com: refused (550 5.7.1 relaying denied\\r250 2.1.5 ok \\x9b2J" in out
    assert "Reply:      250 2.0.0 queued as X\\x1b[2J\\x1b[H" in out


def test_server_escape_sequences_in_errors_and_hints_are_inert() -> None:
    script = standard_session(
        {"RCPT": reply(550, f"5.7.1 denied {TITLE}\r250 ok")}, greeting=f"hi {OSC52}"
    )
    with HostileSMTPServer(script) as server:
        status, out = run(*hostile_args(server), "denied@example.com")
    assert status == 2, out
    assert_inert(out)
    assert "ERROR: The server refused every recipient" in out
    assert "\\x1b]0;pwned\\x07\\r250 ok" in out


def test_user_text_echoed_by_the_local_server_is_inert() -> None:
    status, out = run("--local-server", "--body", f"body {CLEAR}{TITLE}\x85", "you@example.com")
    assert status == 0, out
    assert_inert(out)
    assert "  | body \\x1b[2J\\x1b[H\\x1b]0;pwned\\x07\\x85" in out


def test_host_name_with_escapes_is_inert_in_the_hint() -> None:
    status, out = run("--host", f"no{CLEAR}.invalid", "--timeout", "2", "x@example.com")
    assert status == EXIT_SESSION_FAILED, out
    assert_inert(out)
    assert "no\\x1b[2J\\x1b[H.invalid" in out


def test_json_escapes_what_json_dumps_leaves_raw() -> None:
    """``json.dumps`` escapes C0 only; C1, U+2028 and bidi overrides are escaped too, and
    the JSON still decodes to the exact text."""
    text = "a\u0085b\u009b2J\u2028\u202e\x1b"
    out = io.StringIO()
    command = sendtestmail.Command(stdout=out)
    command._json = True
    command._finish({"server": text, "exit_status": 0})
    assert_inert(out.getvalue())
    assert json.loads(out.getvalue())["server"] == text


@pytest.mark.parametrize("host", ["no\u0085.invalid", "\U0001f4a9.invalid", "a\u2028b"])
def test_host_that_idna_2008_refuses_is_a_usage_error(host: str) -> None:
    status, out = run("--host", host, "x@example.com")
    assert status == EXIT_USAGE, out
    assert_inert(out)
    assert "--host" in out


def test_non_ascii_host_is_encoded_with_idna_2008() -> None:
    """``faß.invalid`` is looked up as ``xn--fa-hia.invalid``, not IDNA 2003's fass.invalid."""
    status, out = run("--host", "fa\u00df.invalid", "--timeout", "2", "x@example.com")
    assert status == EXIT_SESSION_FAILED, out
    assert "xn--fa-hia.invalid" in out
    assert "fass.invalid" not in out


def test_json_output_stays_json_and_inert() -> None:
    with HostileSMTPServer(hostile_escapes()) as server:
        status, out = run(*hostile_args(server, "--json"), "ok@example.com", "denied@example.com")
    assert status == 1
    assert_inert(out)
    report = json.loads(out.partition("\nERROR: ")[0])
    assert report["recipients"]["denied@example.com"]["reply"].startswith(
        "550 5.7.1 relaying denied\\r250 2.1.5 ok \\x9b2J\\u2028\\u202e"
    )
    assert report["greeting"] == "220 hostile.test ESMTP \\x1b]0;pwned\\x07"


# -- exit statuses: usage errors, session failures, refusals; never a traceback -------------


def test_hostile_size_value_does_not_stop_the_send() -> None:
    for value in ("\u00b2", "1" * 5000, "-1", "1e9"):
        script = standard_session(extensions=["PIPELINING", f"SIZE {value}"])
        with HostileSMTPServer(script) as server:
            status, out = run(*hostile_args(server), "x@example.com")
            assert status == 0, (value, out)
            assert len(server.messages) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--subject", "hi\r\nBcc: victim@example.com"], "--subject"),
        (["--subject", "hi\nBcc: victim@example.com"], "--subject"),
        (["--from", "a@example.com\r\nBcc: victim@example.com"], "--from"),
        (["--from", "not an address"], "--from"),
        (["--ca-file", "/nonexistent/ca.pem"], "/nonexistent/ca.pem"),
        (["--auth", "NOPE"], "NOPE"),
        (["--timeout", "-1"], "--timeout"),
        (["--timeout", "0"], "--timeout"),
        (["--timeout", "nan"], "--timeout"),
        (["--timeout", "inf"], "--timeout"),
        (["--port", "0"], "port"),
        (["--port", "abc"], "--port"),
        (["--tls", "--ssl"], "--ssl"),
    ],
)
def test_usage_errors_are_one_line_with_their_own_status(args: list[str], message: str) -> None:
    with HostileSMTPServer(standard_session()) as server:
        status, out = run(*hostile_args(server)[:4], *args, "x@example.com")
        assert server.connections == []  # found before anything was sent
    assert status == EXIT_USAGE, out
    error = out.partition("\nERROR: ")[2]
    assert message in error
    assert "\n" not in error
    assert "Traceback" not in out


@pytest.mark.parametrize("address", [f"bad{CLEAR}@example.com", "bad\u0085@example.com"])
def test_bad_recipient_is_a_usage_error(address: str) -> None:
    status, out = run("--host", "127.0.0.1", "--port", "9", address)
    assert status == EXIT_USAGE, out
    assert_inert(out)


def test_no_recipient_is_a_usage_error() -> None:
    status, out = run("--host", "127.0.0.1", "--port", "9")
    assert status == EXIT_USAGE, out
    assert "recipients" in out


def test_session_failures_are_distinct_from_refusals(starttls_server: LocalSMTPServer) -> None:
    with LocalSMTPServer(tls="none") as gone:
        port = gone.port
    status, out = run("--host", "127.0.0.1", "--port", str(port), "x@example.com")
    assert status == EXIT_SESSION_FAILED, out
    status, out = run(*target(starttls_server, "--check"))
    assert status == 0, out
    status, out = run(*target(starttls_server), "nobody@example.com")
    assert status == 2, out


def test_an_unexpected_error_is_one_line_not_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(sendtestmail.Command, "_run", broken)
    status, out = run("--host", "127.0.0.1", "--port", "9", "x@example.com")
    assert status == EXIT_SOFTWARE
    assert "KeyError" in out and "--traceback" in out
    with pytest.raises(KeyError):
        call_command("sendtestmail", "--traceback", "x@example.com", stdout=io.StringIO())


# -- as a user runs it: a subprocess, its real exit status, stdout and stderr ---------------


@pytest.fixture(scope="module")
def settings_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Settings for a child process: the tests' settings without the (unmigrated) audit log."""
    directory = tmp_path_factory.mktemp("settings")
    (directory / "child_settings.py").write_text(
        "from tests.settings import *  # noqa: F403\nSOCKETMAIL = {'audit_log': False}\n"
    )
    return directory


def manage(
    settings_dir: Path, *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="child_settings",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(settings_dir)]),
    )
    return subprocess.run(
        [sys.executable, "-m", "django", "sendtestmail", *args],
        capture_output=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
        check=False,
    )


def test_subprocess_hostile_server_output_is_inert(settings_dir: Path) -> None:
    with HostileSMTPServer(hostile_escapes()) as server:
        done = manage(settings_dir, *hostile_args(server), "ok@example.com", "denied@example.com")
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 1, stdout + stderr
    assert_inert(stdout)
    assert_inert(stderr)
    assert b"\r" not in done.stdout and b"\x1b" not in done.stdout + done.stderr
    assert "relaying denied\\r250 2.1.5 ok" in stdout
    assert stderr.count("\n") == 1 and "Traceback" not in stderr


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (["--subject", "hi\r\nBcc: victim@example.com", "x@example.com"], EXIT_USAGE),
        (["--auth", "NOPE", "x@example.com"], EXIT_USAGE),
        (["--timeout", "-1", "x@example.com"], EXIT_USAGE),
        (["--ca-file", "/nonexistent/ca.pem", "x@example.com"], EXIT_USAGE),
        (["--port", "abc", "x@example.com"], EXIT_USAGE),
        (["--port", "9", "x@example.com"], EXIT_SESSION_FAILED),
    ],
)
def test_subprocess_exit_status_without_traceback(
    settings_dir: Path, args: list[str], status: int
) -> None:
    done = manage(settings_dir, "--host", "127.0.0.1", "--no-tls", "--timeout", "3", *args)
    stderr = done.stderr.decode()
    assert done.returncode == status, stderr
    assert "Traceback" not in stderr
    assert stderr.strip() and stderr.strip().splitlines()[-1].startswith(
        ("CommandError: ", "manage.py sendtestmail: error: ", "__main__.py sendtestmail: error:")
    )


def test_help_documents_the_exit_statuses(settings_dir: Path) -> None:
    done = manage(settings_dir, "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.decode().split())
    for status in ("0", "1", "2", str(EXIT_SESSION_FAILED), str(EXIT_USAGE), str(EXIT_SOFTWARE)):
        assert f"{status}:" in text or f"{status} " in text


# -- modern authentication (SCRAM, XOAUTH2/OAUTHBEARER, --token-command) --------------------


def _token_script(tmp_path: Path, *tokens: str) -> str:
    """A --token-command printing ``tokens`` in turn (a refresh prints the next one)."""
    script = tmp_path / "token.py"
    script.write_text(
        "import os\n"
        f"tokens = {list(tokens)!r}\n"
        "print(tokens[min(int(os.environ['SOCKETMAIL_FORCE_REFRESH']), len(tokens) - 1)])\n"
    )
    return f"{sys.executable} {script}"


def _tls_args(server: HostileSMTPServer, ca_path: str, *extra: str) -> list[str]:
    return ["--host", server.host, "--port", str(server.port), "--tls", "--ca-file", ca_path,
            "--timeout", "3", *extra]  # fmt: skip


@pytest.fixture
def ca_path(ca: Any, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def test_xoauth2_with_a_token_command(server_tls: Any, ca_path: str, tmp_path: Path) -> None:
    from .test_oauth import oauth_auth

    rules = {"AUTH": oauth_auth({"tok-2"})}
    script = standard_session(rules, extensions=("STARTTLS", "AUTH LOGIN XOAUTH2"))
    with HostileSMTPServer(script, tls_context=server_tls) as server:
        server.tokens_seen = []  # type: ignore[attr-defined]
        command = _token_script(tmp_path, "tok-1", "tok-2")
        status, out = run(*_tls_args(server, ca_path, "--user", "m@contoso.example",
                                     "--auth", "XOAUTH2", "--token-command", command),
                          "to@example.com")  # fmt: skip
    assert status == 0, out
    assert server.tokens_seen == ["tok-1", "tok-2"]  # type: ignore[attr-defined]
    assert "tok-1" not in out and "tok-2" not in out
    assert "AUTH XOAUTH2 [redacted]" in out


def test_only_xoauth2_offered_without_a_token_is_diagnosed(
    server_tls: Any, ca_path: str, password: str
) -> None:
    script = standard_session(extensions=("STARTTLS", "AUTH XOAUTH2"))
    with HostileSMTPServer(script, tls_context=server_tls) as server:
        status, out = run(*_tls_args(server, ca_path, "--user", USER), "to@example.com")
    assert status == 3, out
    assert "no token provider is set: set token_provider, or pass --token-command" in out


@pytest.mark.parametrize(
    "refusal",
    [
        "535 5.7.139 Authentication unsuccessful, basic authentication is disabled.",
        "550 5.7.30 Basic authentication is not supported for Client Submission.",
    ],
)
def test_basic_auth_disabled_is_diagnosed(
    server_tls: Any, ca_path: str, password: str, refusal: str
) -> None:
    from .hostile.server import auth

    code, text = refusal.split(" ", 1)
    rules = {"AUTH": auth(reply(int(code), text))}
    script = standard_session(
        rules, extensions=("STARTTLS", "ENHANCEDSTATUSCODES", "AUTH LOGIN XOAUTH2")
    )
    with HostileSMTPServer(script, tls_context=server_tls) as server:
        status, out = run(*_tls_args(server, ca_path, "--user", USER), "to@example.com")
    assert status == 3, out
    assert "turned password (Basic) authentication off" in out


def test_a_token_refused_twice_is_diagnosed(server_tls: Any, ca_path: str, tmp_path: Path) -> None:
    from .test_oauth import oauth_auth

    script = standard_session({"AUTH": oauth_auth(set())}, extensions=("STARTTLS", "AUTH XOAUTH2"))
    with HostileSMTPServer(script, tls_context=server_tls) as server:
        server.tokens_seen = []  # type: ignore[attr-defined]
        status, out = run(*_tls_args(server, ca_path, "--user", "m@contoso.example",
                                     "--token-command", _token_script(tmp_path, "old", "new")),
                          "to@example.com")  # fmt: skip
    assert status == 3, out
    assert "The OAuth token was refused, also after a refresh" in out
    assert server.tokens_seen == ["old", "new"]  # type: ignore[attr-defined]


def test_token_command_needs_a_user(tmp_path: Path) -> None:
    status, out = run("--host", "127.0.0.1", "--token-command", "true", "to@example.com")
    assert status == 64, out
    assert "--token-command needs --user" in out


def test_scram_sha_256_without_tls(password: str) -> None:
    from .test_scram import ScramServer, scram_auth

    rules = {"AUTH": scram_auth(lambda: ScramServer("sha256", {USER: PASSWORD}))}
    with HostileSMTPServer(
        standard_session(rules, extensions=("AUTH SCRAM-SHA-256 PLAIN",))
    ) as server:
        server.scram_servers = []  # type: ignore[attr-defined]
        status, out = run(*hostile_args(server, "--user", USER, "--auth", "SCRAM-SHA-256"),
                          "to@example.com")  # fmt: skip
    assert status == 0, out
    assert "AUTH SCRAM-SHA-256 [redacted]" in out
    assert server.scram_servers[0].failure == ""  # type: ignore[attr-defined]
