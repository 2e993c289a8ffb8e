"""One line saying what went wrong with a mail configuration and which setting fixes it.

Used by ``sendtestmail``; built from the exception and the options in use, never from a
credential.
"""

from __future__ import annotations

import errno

from .conf import BackendOptions
from .smtp import (
    AuthenticationError,
    CleartextAuthError,
    ConnectError,
    ConnectionFailedError,
    DataError,
    MessageTooLargeError,
    NotSupportedError,
    RecipientsRefused,
    RemoteProtocolError,
    SenderRefused,
    ServerDisconnected,
    SessionInfo,
    SMTPTimeoutError,
    TLSError,
)
from .smtp.oauth import TokenProviderError
from .smtp.reply import Reply

__all__ = ["diagnose"]


def diagnose(
    error: BaseException, options: BackendOptions, session: SessionInfo | None = None
) -> str:
    """What to change, for the common failures; a generic line otherwise.

    ``session`` (what the failed session learned) sharpens the advice: a timeout before
    any greeting usually means the server expects implicit TLS.
    """
    where = f"{options.host}:{options.port}"
    if isinstance(error, TokenProviderError):
        return f"The OAuth token provider failed: {error} (token_provider, --token-command)."
    if isinstance(error, ConnectionFailedError):
        if error.errno == errno.ECONNREFUSED:
            return f"Nothing accepts connections on {where}: check host and port (--host/--port)."
        return f"Cannot reach {where} ({error}): check the host name and the network."
    if isinstance(error, SMTPTimeoutError):
        greeted = session is not None and session.greeting is not None
        if not greeted and not options.use_ssl and session is not None:
            port = "Port 465 expects" if options.port == 465 else "The server may expect"
            return (
                f"No greeting from {where} within {options.timeout:g} s. {port} implicit "
                "TLS (it waits for a TLS handshake): use --ssl (use_ssl=True)."
            )
        return (
            f"{where} did not answer within {options.timeout:g} s: check host, port and "
            "firewall, or raise --timeout."
        )
    if isinstance(error, TLSError):
        text = str(error)
        plain_reply = "WRONG_VERSION_NUMBER" in text or "record layer" in text or "EOF" in text
        if plain_reply and options.use_ssl:
            return (
                f"{where} speaks plain SMTP, not implicit TLS: use --tls (STARTTLS, "
                "use_tls=True) instead of --ssl, or port 465 for --ssl."
            )
        if "certificate" in text.lower() or "hostname" in text.lower():
            return (
                "The server's certificate is not trusted or does not match the host name: "
                "pass --ca-file (ssl_cafile) with the CA that signed it, and use the host "
                "name the certificate names."
            )
        return f"TLS failed with {where}: {text}"
    if isinstance(error, CleartextAuthError):
        return (
            "Refusing to send the password without encryption: use --tls or --ssl "
            "(use_tls/use_ssl), or allow_cleartext_auth=True if you accept the risk."
        )
    if isinstance(error, NotSupportedError):
        text = str(error)
        if "does not offer AUTH" in text:
            return (
                "The server offers no AUTH here; most servers offer it only after "
                "STARTTLS: add --tls (use_tls=True)."
            )
        if "does not offer STARTTLS" in text or "refused STARTTLS" in text:
            if options.port == 465:
                return "Port 465 uses implicit TLS, not STARTTLS: use --ssl (use_ssl=True)."
            return (
                f"{where} does not offer STARTTLS: use the submission port (587) for "
                "--tls, or port 465 with --ssl."
            )
        if "needs an OAuth 2.0 token" in text:
            return (
                "The server accepts only OAuth 2.0 here (XOAUTH2/OAUTHBEARER; Microsoft 365 "
                "once Basic authentication is off) and no token provider is set: set "
                "token_provider, or pass --token-command."
            )
        if "no usable AUTH mechanism" in text:
            return f"{text[0].upper()}{text[1:]}: change --auth (auth_mechanisms)."
        if "SMTPUTF8" in text:
            return f"{text}: use an ASCII address for this server."
        return text
    if isinstance(error, AuthenticationError) and _basic_auth_off(error.reply):
        return _BASIC_AUTH_OFF.format(reply=error.reply.one_line())
    if isinstance(error, AuthenticationError) and "OAuth token was refused" in error.note:
        return (
            "The OAuth token was refused, also after a refresh: it is expired or revoked, "
            "issued for another audience or scope (Microsoft 365: "
            "https://outlook.office365.com/.default; Gmail: https://mail.google.com/), or "
            "its app may not send as --user (Microsoft 365: SMTP.SendAsApp and the mailbox "
            "granted to the app's service principal)."
        )
    if isinstance(error, AuthenticationError):
        if error.smtp_code == 535:
            return "Wrong user name or password (535): check --user and the password."
        if error.is_transient:
            return f"Authentication temporarily failed ({error.reply.one_line()}): try later."
        return f"Authentication failed: {error}."
    if isinstance(error, ConnectError):
        return f"The server refused the session: {error.reply.one_line()}."
    if isinstance(error, SenderRefused) and _basic_auth_off(error.reply):
        return _BASIC_AUTH_OFF.format(reply=error.reply.one_line())
    if isinstance(error, SenderRefused):
        return (
            f"The server refused the sender <{error.sender}> ({error.reply.one_line()}): use "
            "an address this account may send as (--from, DEFAULT_FROM_EMAIL)."
        )
    if isinstance(error, RecipientsRefused):
        codes = {r.code for r in error.replies.values()}
        hint = " (relaying denied? authenticate with --user)" if codes & {550, 554} else ""
        return f"The server refused every recipient{hint}: {error}."
    if isinstance(error, MessageTooLargeError):
        return f"{error}: send a smaller message."
    if isinstance(error, DataError):
        return f"The server refused the message: {error.reply.one_line()}."
    if isinstance(error, ServerDisconnected):
        return f"{where} closed the connection: {error}."
    if isinstance(error, RemoteProtocolError):
        return f"{where} broke the SMTP protocol: {error}."
    return f"{type(error).__name__}: {error}"


_BASIC_AUTH_OFF = (
    "The provider has turned password (Basic) authentication off ({reply}): use OAuth 2.0, "
    "token_provider (README: 'Microsoft 365 and Gmail (OAuth2)') or --token-command."
)


def _basic_auth_off(reply: Reply) -> bool:
    """Microsoft 365's refusals of Basic authentication: ``550 5.7.30`` (client submission),
    ``535 5.7.139`` (SMTP AUTH disabled for the tenant or the mailbox)."""
    text = reply.text.lower()
    return reply.enhanced_status in ("5.7.30", "5.7.139") or "basic authentication is" in text
