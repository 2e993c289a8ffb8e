"""``manage.py sendtestmail``: send a test message and show the SMTP conversation, like swaks.

Exit status (:data:`EXIT_STATUSES`): 0 every recipient accepted (or ``--check`` passed),
1 some recipients refused, 2 nothing sent because the server refused the message (sender,
every recipient, content or size), 3 nothing sent because no usable session was made
(connection, timeout, TLS, AUTH, a server that broke the protocol or hung up), 64 a usage or
configuration error found before connecting (like ``EX_USAGE`` of ``sysexits.h``), 70 an
unexpected error (a bug: ``--traceback`` shows it).  Every error is one line.

Every line printed goes through :func:`inert`: the server's text, and the user's, are
printed with control characters escaped, so a server cannot move the cursor, clear the
screen, set the window title, write the clipboard (OSC 52) or overwrite "550 relaying
denied" with "250 ok" using a CR (CWE-150).  ``--json`` prints one JSON object with the
same facts, with every control character in its strings written as a JSON escape.
"""

from __future__ import annotations

import argparse
import getpass
import json
import math
import os
import re
import socket
import sys
from contextlib import ExitStack
from email.utils import make_msgid
from typing import Any, Final, NoReturn

import django
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMessage
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import termcolors

from django_socketmail.diagnosis import diagnose
from django_socketmail.email_backend import RESULT_ATTRIBUTE, EmailBackend
from django_socketmail.oauth_providers.command import command as token_command
from django_socketmail.smtp import (
    DataError,
    InvalidAddressError,
    LocalProtocolError,
    MessageTooLargeError,
    NotSupportedError,
    RecipientsRefused,
    SenderRefused,
    SendResult,
    SendStatus,
    SocketMailError,
    TranscriptLine,
)
from django_socketmail.smtp.address import idna_encode_domain, prepare_address
from django_socketmail.smtp.reply import escape_controls
from django_socketmail.smtp.transcript import Direction

EXIT_SENT: Final = 0
EXIT_PARTIAL: Final = 1
EXIT_REFUSED: Final = 2
EXIT_SESSION_FAILED: Final = 3
EXIT_USAGE: Final = 64
EXIT_SOFTWARE: Final = 70
EXIT_STATUSES: Final = {
    EXIT_SENT: "every recipient accepted (or --check passed)",
    EXIT_PARTIAL: "some recipients refused",
    EXIT_REFUSED: "nothing sent: the server refused the sender, every recipient or the message",
    EXIT_SESSION_FAILED: "nothing sent: no usable session (connection, timeout, TLS, AUTH, "
    "protocol)",
    EXIT_USAGE: "usage or configuration error, found before connecting",
    EXIT_SOFTWARE: "unexpected error (a bug; --traceback shows it)",
}
_REFUSALS: Final = (SenderRefused, RecipientsRefused, DataError, MessageTooLargeError)
_LINE_BREAK: Final = re.compile("[\r\n]")
"""What would end a header line on the wire (header injection); Django refuses it too."""
_JSON_UNSAFE: Final = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")

PASSWORD_ENV = "SOCKETMAIL_PASSWORD"  # noqa: S105 - a variable's name, not a password
_COLORS = {
    Direction.CLIENT: {"fg": "cyan"},
    Direction.SERVER: {"fg": "green"},
    Direction.INFO: {"fg": "yellow"},
}
_ARROWS = {Direction.CLIENT: " -> ", Direction.SERVER: "<-  ", Direction.INFO: " *  "}


def inert(text: str) -> str:
    """``text`` safe to print on a terminal: one line, control characters escaped.

    The one function every printed line goes through (see
    :func:`django_socketmail.smtp.reply.escape_controls`).
    """
    return escape_controls(text)


def _seconds(value: str) -> float:
    """``--timeout``: a finite number of seconds greater than 0."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {value!r}")
    return seconds


class Command(BaseCommand):
    help = (
        "Send a test email through django-socketmail and show the SMTP conversation. "
        "Exit status "
        + "; ".join(f"{status}: {meaning}" for status, meaning in EXIT_STATUSES.items())
        + "."
    )

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        """Django's parser, whose argument errors end with :data:`EXIT_USAGE`."""
        parser = super().create_parser(prog_name, subcommand, **kwargs)

        def usage_error(message: str) -> NoReturn:
            line = inert(f"{parser.prog}: error: {message}")
            if not parser.called_from_command_line:
                raise CommandError(line, returncode=EXIT_USAGE)
            # Django parses the command line outside its CommandError handler: exit here.
            parser.print_usage(sys.stderr)
            parser.exit(EXIT_USAGE, line + "\n")

        parser.error = usage_error  # type: ignore[method-assign]
        return parser

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("email", nargs="*", help="Recipient addresses.")
        parser.add_argument("--managers", action="store_true", help="Send to MANAGERS.")
        parser.add_argument("--admins", action="store_true", help="Send to ADMINS.")
        parser.add_argument("--using", help="The MAILERS alias to use (Django 6.1+).")
        parser.add_argument("--from", dest="from_email", help="Sender (DEFAULT_FROM_EMAIL).")
        parser.add_argument("--subject", help="Subject line.")
        parser.add_argument("--body", help="Body text.")
        parser.add_argument("--host", help="SMTP server host (overrides the settings).")
        parser.add_argument("--port", type=int, help="SMTP server port.")
        parser.add_argument("--user", help="User name for AUTH.")
        parser.add_argument(
            "--password-env",
            default=PASSWORD_ENV,
            metavar="VAR",
            help=f"Environment variable holding the password (default {PASSWORD_ENV}).",
        )
        parser.add_argument("--ask-password", action="store_true", help="Prompt for the password.")
        security = parser.add_mutually_exclusive_group()
        security.add_argument("--tls", action="store_true", help="Require STARTTLS.")
        security.add_argument("--ssl", action="store_true", help="Implicit TLS (port 465).")
        security.add_argument("--no-tls", action="store_true", help="No TLS at all.")
        parser.add_argument(
            "--auth",
            metavar="MECHANISM",
            help="AUTH mechanism(s), comma-separated (SCRAM-SHA-256, XOAUTH2, OAUTHBEARER...).",
        )
        parser.add_argument(
            "--token-command",
            metavar="CMD",
            help="Command printing an OAuth 2.0 token for --user (XOAUTH2/OAUTHBEARER), run "
            "without a shell, like msmtp's passwordeval; replaces the password.",
        )
        parser.add_argument("--timeout", type=_seconds, help="Seconds allowed per reply.")
        parser.add_argument("--ca-file", help="CA bundle (PEM) that signed the certificate.")
        parser.add_argument(
            "--check",
            action="store_true",
            help="Connect, negotiate TLS, authenticate, then QUIT without sending.",
        )
        parser.add_argument("--json", action="store_true", help="Print one JSON object.")
        parser.add_argument(
            "--local-server",
            action="store_true",
            help="Start a throwaway SMTP server (STARTTLS, AUTH) on 127.0.0.1 and send "
            "through it (needs the 'demo' extra).",
        )

    # -- entry point ---------------------------------------------------------------------

    def handle(self, *args: Any, **options: Any) -> None:
        self._json = options["json"]
        self._color = self.stdout.isatty() and not options.get("no_color")
        self._transcript: list[TranscriptLine] = []
        try:
            report = self._handle(options)
        except CommandError as error:
            raise CommandError(inert(str(error)), returncode=error.returncode) from None
        except Exception as error:
            if options.get("traceback"):
                raise
            message = f"unexpected {type(error).__name__}: {error} (--traceback shows where)"
            raise CommandError(inert(message), returncode=EXIT_SOFTWARE) from None
        self._finish(report)

    def _handle(self, options: dict[str, Any]) -> dict[str, Any]:
        recipients = self._recipients(options)
        if not recipients and not options["check"]:
            raise CommandError(
                "You must specify some email recipients, or pass the --managers or "
                "--admins options.",
                returncode=EXIT_USAGE,
            )
        with ExitStack() as stack:
            overrides = self._overrides(options)
            server = None
            if options["local_server"]:
                server = self._start_local_server(stack, options, overrides)
            backend = self._backend(options, overrides)
            message = None if options["check"] else self._message(options, recipients)
            backend.transcript_listeners.append(self._on_line)
            report = self._run(backend, message)
            if server is not None and not self._json:
                self._show_received(server)
        return report

    # -- configuration -------------------------------------------------------------------

    def _recipients(self, options: dict[str, Any]) -> list[str]:
        recipients = list(options["email"])
        for flag, setting in (("managers", "MANAGERS"), ("admins", "ADMINS")):
            if options[flag]:
                for entry in getattr(settings, setting, []):
                    recipients.append(entry[1] if isinstance(entry, (tuple, list)) else entry)
        return recipients

    def _overrides(self, options: dict[str, Any]) -> dict[str, Any]:
        overrides: dict[str, Any] = {"fail_silently": False}
        for option, name in (
            ("host", "host"),
            ("port", "port"),
            ("timeout", "timeout"),
            ("ca_file", "ssl_cafile"),
        ):
            if options[option] is not None:
                overrides[name] = options[option]
        if options["host"] is not None and not options["host"].isascii():
            try:  # IDNA 2008, not the IDNA 2003 that socket would use (faß -> fass)
                overrides["host"] = idna_encode_domain(options["host"])
            except ValueError as error:
                raise CommandError(
                    f"--host {options['host']!r} {error}", returncode=EXIT_USAGE
                ) from None
        if options["tls"]:
            overrides |= {"use_tls": True, "use_ssl": False}
        elif options["ssl"]:
            overrides |= {"use_tls": False, "use_ssl": True}
        elif options["no_tls"]:
            overrides |= {"use_tls": False, "use_ssl": False}
        if options["auth"]:
            overrides["auth_mechanisms"] = [m.strip() for m in options["auth"].split(",")]
        if options["user"]:
            overrides["username"] = options["user"]
            if options["token_command"]:
                try:
                    overrides["token_provider"] = token_command(options["token_command"])
                except ValueError as error:
                    raise CommandError(f"--token-command: {error}", returncode=EXIT_USAGE) from None
            else:
                overrides["password"] = self._password(options)
        elif options["token_command"]:
            raise CommandError(
                "--token-command needs --user (the mailbox the token is for)",
                returncode=EXIT_USAGE,
            )
        return overrides

    def _password(self, options: dict[str, Any]) -> str:
        if options["ask_password"]:
            return getpass.getpass(f"Password for {options['user']}: ")
        password = os.environ.get(options["password_env"])
        if password is None:
            raise CommandError(
                f"--user needs a password: set the environment variable "
                f"{options['password_env']} or use --ask-password (never a command-line "
                "argument, which other users can see in the process list).",
                returncode=EXIT_USAGE,
            )
        return password

    def _start_local_server(
        self, stack: ExitStack, options: dict[str, Any], overrides: dict[str, Any]
    ) -> Any:
        try:
            from django_socketmail.localserver import LocalSMTPServer
        except ImportError as error:
            raise CommandError(str(error), returncode=EXIT_USAGE) from None
        server = stack.enter_context(LocalSMTPServer(tls="starttls", require_tls=True))
        ((user, password),) = server.users.items()
        overrides |= {
            "host": "127.0.0.1",
            "port": server.port,
            "use_tls": True,
            "use_ssl": False,
            "ssl_cafile": server.ca_cert_path,
            "username": user,
            "password": password,
        }
        self._say(
            f"Local SMTP server on 127.0.0.1:{server.port}: STARTTLS with a throwaway CA, "
            f"AUTH {'/'.join(('CRAM-MD5', 'PLAIN', 'LOGIN'))} as throwaway user {user}.",
            Direction.INFO,
        )
        return server

    def _backend(self, options: dict[str, Any], overrides: dict[str, Any]) -> EmailBackend:
        """The backend with the settings and the options, or a usage error (nothing sent)."""
        alias = options["using"]
        mailers = getattr(settings, "MAILERS", None) if django.VERSION >= (6, 1) else None
        if alias is not None and mailers is None:
            raise CommandError(
                "--using needs MAILERS (Django 6.1 or later).", returncode=EXIT_USAGE
            )
        try:
            if mailers is not None:
                alias = alias or "default"
                if alias not in mailers:
                    raise CommandError(
                        f"No mailer {alias!r} in MAILERS: {', '.join(mailers)}.",
                        returncode=EXIT_USAGE,
                    )
                configured = dict(mailers[alias].get("OPTIONS", {}))
                return EmailBackend(alias=alias, **(configured | overrides))
            return EmailBackend(**overrides)
        except (ImproperlyConfigured, TypeError, ValueError) as error:
            raise CommandError(f"Configuration error: {error}", returncode=EXIT_USAGE) from None

    def _message(self, options: dict[str, Any], recipients: list[str]) -> EmailMessage:
        """The test message, checked before connecting: addresses and header values."""
        sender = options["from_email"] or settings.DEFAULT_FROM_EMAIL
        for flag in ("subject", "from_email"):
            if options[flag] is not None and _LINE_BREAK.search(options[flag]):
                name = "--from" if flag == "from_email" else "--subject"
                problem = f"{name} {options[flag]!r}: a header value must be one line"
                raise CommandError(problem, returncode=EXIT_USAGE)
        for flag, address in [("--from", sender)] + [("recipient", r) for r in recipients]:
            try:
                prepare_address(address)
            except InvalidAddressError as error:
                raise CommandError(f"{flag}: {error}", returncode=EXIT_USAGE) from None
        message = EmailMessage(
            options["subject"] or f"Test email from {socket.gethostname()}",
            options["body"] or "If you're reading this, it was successful.",
            sender,
            recipients,
            headers={"Message-ID": make_msgid(domain="sendtestmail.invalid")},
        )
        try:
            message.message()  # what Django refuses (BadHeaderError, a ValueError) is refused here
        except ValueError as error:
            raise CommandError(
                f"Cannot build the message: {error}", returncode=EXIT_USAGE
            ) from None
        return message

    # -- running -------------------------------------------------------------------------

    def _run(self, backend: EmailBackend, message: EmailMessage | None) -> dict[str, Any]:
        report: dict[str, Any] = {"server": f"{backend.host}:{backend.port}"}
        error: BaseException | None = None
        result: SendResult | None = None
        try:
            backend.open()  # opened here, so the session can be described after the send
            if message is None:
                report["check"] = "passed"
            else:
                report["message_id"] = message.extra_headers["Message-ID"]
                try:
                    backend.send_messages([message])
                finally:
                    result = getattr(message, RESULT_ATTRIBUTE, None)
        except (SocketMailError, InvalidAddressError) as raised:
            error = raised
        finally:
            client = backend.client or backend.last_client
            if client is not None:
                report |= _session_report(client)
            backend.close()
        if "tls" not in report and error is not None:
            report["tls"] = None
        report |= _result_report(result)
        report["audit_log_id"] = _audit_id(report.get("message_id"), backend)
        if error is not None:
            report["error"] = {"class": type(error).__name__, "message": str(error)}
            session = backend.last_client.info if backend.last_client else None
            report["hint"] = diagnose(error, backend.options, session)
        report["exit_status"] = _exit_status(error, result, check=message is None)
        report["transcript"] = [str(line) for line in self._transcript]
        return report

    def _on_line(self, line: TranscriptLine) -> None:
        self._transcript.append(line)
        if not self._json:
            self._say(line.text, line.direction)

    # -- output ----------------------------------------------------------------------------

    def _write(self, text: str, style: Any = None) -> None:
        """Print one line, made :func:`inert` first; ``style`` colors the result."""
        line = inert(text)
        self.stdout.write(style(line) if style is not None else line)

    def _say(self, text: str, direction: Direction) -> None:
        colorize = None
        if self._color:
            colors = _COLORS[direction]
            colorize = lambda line: termcolors.colorize(line, **colors)  # noqa: E731
        self._write(_ARROWS[direction] + text, colorize)

    def _show_received(self, server: Any) -> None:
        for received in server.messages:
            self._write("")
            self._write(
                f"The local server received from {received.mail_from} for "
                f"{', '.join(received.rcpt_tos)} (queue id {received.queue_id}):"
            )
            text = received.data.decode("utf-8", "replace")
            for line in text.split("\n")[:40]:
                self._write("  | " + line.removesuffix("\r"))

    def _finish(self, report: dict[str, Any]) -> None:
        if self._json:
            text = json.dumps(report, indent=2, ensure_ascii=False)
            # json.dumps escapes C0 controls only: give the others \uXXXX escapes too.
            self.stdout.write(_JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text))
        else:
            self._summary(report)
        status = report["exit_status"]
        if status:
            message = report.get("hint") or f"{report.get('status', 'failed')}"
            raise CommandError(inert(message), returncode=status)

    def _summary(self, report: dict[str, Any]) -> None:
        write = self._write
        write("")
        write(f"Server:     {report['server']}")
        write(f"TLS:        {report.get('tls') or 'none'}")
        if report.get("certificate"):
            write(f"Certificate: {report['certificate']}")
        write(f"AUTH:       {report.get('mechanism') or 'none'}")
        if "check" in report:
            write("Check:      " + ("passed" if not report.get("error") else "failed"))
        for address, outcome in report.get("recipients", {}).items():
            write(f"Recipient:  {address}: {outcome['status']} ({outcome['reply'] or '-'})")
        if report.get("status"):
            write(f"Status:     {report['status']}")
        if report.get("final_reply"):
            write(f"Reply:      {report['final_reply']}")
        if report.get("queue_id"):
            write(f"Queue id:   {report['queue_id']}")
        if report.get("elapsed") is not None:
            write(f"Elapsed:    {report['elapsed'] * 1000:.0f} ms")
        if report.get("audit_log_id"):
            write(
                f"Audit log:  message #{report['audit_log_id']} "
                f"(admin: /admin/django_socketmail/messagelog/{report['audit_log_id']}/change/)"
            )
        if report.get("error"):
            write(f"Error:      {report['error']['message']}", self.style.ERROR)


def _session_report(client: Any) -> dict[str, Any]:
    info = client.info
    tls = f"{info.tls_version} {info.tls_cipher}" if info.tls_version else None
    return {
        "tls": tls,
        "certificate": info.peer_certificate,
        "mechanism": info.auth_mechanism,
        "greeting": str(info.greeting) if info.greeting else None,
    }


def _result_report(result: SendResult | None) -> dict[str, Any]:
    if result is None:
        return {}
    final = result.final_reply
    return {
        "status": result.status.value,
        "recipients": {
            r.address: {
                "status": r.status.value,
                "code": r.reply.code if r.reply else None,
                "reply": r.reply.one_line() if r.reply else None,
            }
            for r in result.recipients
        },
        "final_reply": final.one_line() if final else None,
        "queue_id": result.queue_id,
        "elapsed": round(result.elapsed, 4),
    }


def _audit_id(message_id: str | None, backend: EmailBackend) -> int | None:
    """The audit row of the message just sent, if the log is on and the table exists."""
    if message_id is None or not backend.options.audit_log:
        return None
    from django.db import DatabaseError, router

    from django_socketmail.models import MessageLog

    alias = backend.options.audit_database or router.db_for_read(MessageLog)
    try:
        pk = (
            MessageLog.objects.using(alias)
            .filter(message_id=message_id)
            .values_list("pk", flat=True)
            .last()
        )
    except DatabaseError:  # not migrated: there is no entry to show
        return None
    return int(pk) if pk is not None else None


def _exit_status(error: BaseException | None, result: SendResult | None, *, check: bool) -> int:
    """The exit status for what happened (see :data:`EXIT_STATUSES`)."""
    if result is not None and result.status is SendStatus.SENT:
        return EXIT_SENT
    if result is not None and result.status is SendStatus.PARTIAL:
        return EXIT_PARTIAL
    if error is None:
        return EXIT_SENT if check else EXIT_REFUSED
    if isinstance(error, _REFUSALS):
        return EXIT_REFUSED
    if isinstance(error, NotSupportedError) and "SMTPUTF8" in str(error):
        return EXIT_REFUSED  # this server cannot take this message's addresses
    if isinstance(error, InvalidAddressError):
        return EXIT_USAGE
    if isinstance(error, LocalProtocolError):
        return EXIT_SOFTWARE
    return EXIT_SESSION_FAILED
