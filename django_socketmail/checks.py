"""System checks for dangerous or broken mail configuration.  Ids are stable; never renumber.

- ``socketmail.E001``: an option has an invalid value (the message says which and why).
- ``socketmail.E002``: ``use_tls`` and ``use_ssl`` are both on.
- ``socketmail.W001``: credentials without TLS: only CRAM-MD5 can be used, or the server
  refuses cleartext AUTH.
- ``socketmail.W002``: ``allow_cleartext_auth`` with no TLS: the password may cross the
  network readable by anyone on the path.
- ``socketmail.W003``: ``ssl_verify`` is off: anyone on the path can impersonate the server.
- ``socketmail.W004``: port and TLS mode disagree (465 without use_ssl, or use_ssl on 587/25).
- ``socketmail.W005``: a boolean option or ``EMAIL_*`` setting is a string; any non-empty
  string (``"False"`` too) is true, to Django's backend as to ours.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from .conf import (
    BACKEND_NAMES,
    BackendOptions,
    resolve_options,
    socketmail_mailers,
    string_booleans,
)


def _configured_backends() -> list[tuple[str, dict[str, Any] | None, bool]]:
    """(where, options, from_mailers) for each configuration that uses our backend."""
    found: list[tuple[str, dict[str, Any] | None, bool]] = []
    if isinstance(getattr(settings, "MAILERS", None), dict):
        for alias, options in socketmail_mailers().items():
            found.append((f"MAILERS[{alias!r}]", dict(options), True))
    elif getattr(settings, "EMAIL_BACKEND", "") in BACKEND_NAMES:
        found.append(("EMAIL_BACKEND", None, False))
    return found


@checks.register(checks.Tags.security, "socketmail")
def check_mail_configuration(**kwargs: Any) -> list[checks.CheckMessage]:
    """Validate every configuration of our backend and warn about unsafe ones."""
    messages: list[checks.CheckMessage] = []
    for where, options, from_mailers in _configured_backends():
        source = f"{where}['OPTIONS']"
        try:
            strings = string_booleans(options or {}, from_mailers=from_mailers, source=source)
            # A string is the likely cause of E002 ("False" is true): warned first.
            messages += [_string_boolean(*found) for found in strings]
            resolved = resolve_options(options or {}, from_mailers=from_mailers, source=source)
        except ImproperlyConfigured as error:
            code = "E002" if "mutually exclusive" in str(error) else "E001"
            messages.append(
                checks.Error(
                    f"{where}: {error}",
                    hint="Fix the value named above; see the options table in the README.",
                    id=f"socketmail.{code}",
                )
            )
            continue
        messages += _warnings(where, resolved)
    return messages


def _string_boolean(origin: str, option: str, value: str) -> checks.CheckMessage:
    """W005: a string where a bool belongs, which Python (so Django) reads as true."""
    if origin.startswith("EMAIL_"):
        setting = origin.split()[0]
        fix = f"{setting} = False to turn it off ({setting} = True to turn it on)"
        where = setting
    else:
        fix = f"{option!r}: False to turn it off ({option!r}: True to turn it on)"
        where = origin
    meaning = "on" if value else "off"
    return checks.Warning(
        f"{where} is the string {value!r}, which counts as {meaning}: "
        f"{option} is {'enabled' if value else 'disabled'}.",
        hint=f"Write a bool, not a string: {fix}.",
        id="socketmail.W005",
    )


def _warnings(where: str, options: BackendOptions) -> list[checks.CheckMessage]:
    found: list[checks.CheckMessage] = []
    encrypted = options.use_tls or options.use_ssl
    if options.username and options.password and not encrypted:
        if options.allow_cleartext_auth:
            found.append(
                checks.Warning(
                    f"{where}: allow_cleartext_auth sends the SMTP password unencrypted.",
                    hint="Set use_tls (STARTTLS) or use_ssl, and remove allow_cleartext_auth.",
                    id="socketmail.W002",
                )
            )
        else:
            found.append(
                checks.Warning(
                    f"{where}: credentials are configured without TLS; only CRAM-MD5 can "
                    "authenticate, and servers that offer only PLAIN/LOGIN will be refused.",
                    hint="Set use_tls (port 587) or use_ssl (port 465).",
                    id="socketmail.W001",
                )
            )
    if not options.ssl_verify:
        found.append(
            checks.Warning(
                f"{where}: ssl_verify is off; the server's certificate is not checked, so "
                "anyone on the network path can read the password and the mail.",
                hint="Remove ssl_verify=False; use ssl_cafile to trust a private CA.",
                id="socketmail.W003",
            )
        )
    if options.port == 465 and not options.use_ssl:
        found.append(
            checks.Warning(
                f"{where}: port 465 expects implicit TLS but use_ssl is off.",
                hint="Set use_ssl=True (and not use_tls) for port 465.",
                id="socketmail.W004",
            )
        )
    elif options.use_ssl and options.port in (25, 587):
        found.append(
            checks.Warning(
                f"{where}: use_ssl (implicit TLS) on port {options.port}, which speaks "
                "plain SMTP first.",
                hint="Use use_tls (STARTTLS) with port 587, or port 465 with use_ssl.",
                id="socketmail.W004",
            )
        )
    return found
