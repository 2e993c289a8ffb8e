"""Options: one vocabulary, one table, one place that reads settings.

Every option a backend understands is listed in :data:`OPTIONS` with its type, default
and documentation; the README's options table mirrors it (a test keeps them in step).

Precedence, first found wins:

1. the backend's keyword arguments (``MAILERS[alias]["OPTIONS"]`` on Django 6.1, or
   ``get_connection(**kwargs)``);
2. for Django's own SMTP options, and only when the backend was not built from
   ``MAILERS``, the ``EMAIL_*`` settings (``EMAIL_HOST``, ``EMAIL_PORT``, ...);
3. for django-socketmail's own options, the project-wide ``SOCKETMAIL`` settings dict;
4. the default in :data:`OPTIONS`.

Settings are read when a backend is built, never at import, so ``override_settings``
works.  Invalid values raise ``ImproperlyConfigured`` naming the option and where it came
from; ``fail_silently`` never swallows them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final, cast

import django
from django.conf import global_settings, settings
from django.core.exceptions import ImproperlyConfigured

from .oauth_providers.cache import shared_cache
from .smtp import DEFAULT_TIMEOUT, ClientConfig, Secret, TLSMode
from .smtp.delivery import DeliveryOptions
from .smtp.sasl import DEFAULT_PREFERENCE, MECHANISMS

__all__ = [
    "BACKEND_NAMES",
    "OPTIONS",
    "BackendOptions",
    "Option",
    "audit_database",
    "audit_retention",
    "resolve_options",
    "socketmail_mailers",
    "socketmail_setting",
    "string_booleans",
]


@dataclass(frozen=True, slots=True)
class Option:
    """One option: its type as documented, its default, the ``EMAIL_*`` setting it falls back
    to (Django's options only) and a one-line description."""

    type: str
    default: Any
    doc: str
    django_setting: str | None = None


OPTIONS: Final[dict[str, Option]] = {
    # Django's SMTP backend options, same names and meaning.
    "host": Option("str", "localhost", "SMTP server host name.", "EMAIL_HOST"),
    "port": Option(
        "int | None",
        None,
        "Server port.  Unset in MAILERS: 465 with use_ssl, 587 with use_tls, else 25; "
        "elsewhere EMAIL_PORT (default 25, whatever the TLS mode), as in Django's backend.",
        "EMAIL_PORT",
    ),
    "username": Option("str", "", "User name for SMTP AUTH; empty: no AUTH.", "EMAIL_HOST_USER"),
    "password": Option("str", "", "Password for SMTP AUTH.", "EMAIL_HOST_PASSWORD"),
    "use_tls": Option("bool", False, "STARTTLS, required (fails if not offered).", "EMAIL_USE_TLS"),
    "use_ssl": Option(
        "bool", False, "Implicit TLS from the first byte (port 465).", "EMAIL_USE_SSL"
    ),
    "timeout": Option(
        "float | None",
        None,
        f"Seconds allowed for each reply and write; None means {DEFAULT_TIMEOUT:g}.",
        "EMAIL_TIMEOUT",
    ),
    "ssl_certfile": Option("str | None", None, "Client certificate (PEM).", "EMAIL_SSL_CERTFILE"),
    "ssl_keyfile": Option("str | None", None, "Client certificate key (PEM).", "EMAIL_SSL_KEYFILE"),
    "fail_silently": Option("bool", False, "Swallow SMTP and network errors (not config errors)."),
    # django-socketmail's own options.
    "auth_mechanisms": Option(
        "list[str]",
        list(DEFAULT_PREFERENCE),
        "SASL mechanisms to use, in order of preference (SCRAM, CRAM-MD5, PLAIN, LOGIN, "
        "then XOAUTH2/OAUTHBEARER, which go first with a token_provider).",
    ),
    "allow_cleartext_auth": Option(
        "bool",
        False,
        "Allow PLAIN/LOGIN (password sent as is) without TLS.",
    ),
    "auth_require_channel_binding": Option(
        "bool",
        False,
        "When the server offers SCRAM-SHA-256-PLUS, use nothing without channel binding.",
    ),
    "token_provider": Option(
        "callable | str | None",
        None,
        "OAuth 2.0 token provider (or its dotted path) for XOAUTH2/OAUTHBEARER: "
        "provider(username, force_refresh=False) -> token or (token, expires_at).",
    ),
    "ssl_cafile": Option("str | None", None, "CA bundle to verify the server with (PEM)."),
    "ssl_verify": Option("bool", True, "Verify the server certificate and host name."),
    "local_hostname": Option("str | None", None, "Name sent with EHLO; default: this host's FQDN."),
    "pipelining": Option("bool", True, "Use PIPELINING when the server offers it (RFC 2920)."),
    "chunking": Option("bool", True, "Use BDAT when the server offers CHUNKING (RFC 3030)."),
    "pool": Option("bool", False, "Keep sessions open between calls, process-wide."),
    "pool_idle_timeout": Option("float", 30.0, "Seconds a pooled session may sit idle."),
    "pool_max_age": Option("float", 300.0, "Seconds after which a pooled session retires."),
    "pool_max_messages": Option("int", 1000, "Messages after which a pooled session retires."),
    "audit_log": Option("bool", True, "Record every SMTP conversation in the audit log."),
    "audit_body_bytes": Option(
        "int",
        0,
        "Store up to this many bytes of each message in the audit log; 0: none.",
    ),
    "audit_database": Option(
        "str | None",
        None,
        "Database alias for the audit log; default: the router's choice (usually 'default').",
    ),
    "audit_background": Option(
        "bool",
        False,
        "Write the audit rows in a writer thread, several calls per commit; "
        "drain_audit_log() waits for them.",
    ),
    "audit_retention_days": Option(
        "int | None",
        90,
        "Audit rows older than this are removed by socketmail_prune.",
    ),
    "queue": Option("bool", False, "Store messages and send them from a Django Task (queued)."),
    "task_backend": Option("str", "default", "The Tasks backend alias queued delivery runs on."),
    "queue_max_attempts": Option("int", 8, "Attempts before a deferred message fails."),
    "queue_max_age": Option("float", 172800.0, "Seconds before a deferred message fails."),
    "queue_resend_unknown": Option(
        "bool", False, "Send again a message whose final reply was lost (same Message-ID)."
    ),
    "max_connections": Option(
        "int | None",
        None,
        "Sessions open at once: queued delivery across every worker; coalesced async "
        "sends per event loop (3 when unset).",
    ),
    "rate_limit": Option(
        "str | None", None, "Queued delivery: messages per period across every worker: '30/min'."
    ),
    "failover": Option(
        "list", [], "Queued delivery: mailers to send through while this one's server fails."
    ),
    "failover_retry": Option(
        "float", 60.0, "Seconds a failed server is passed over before it is tried again."
    ),
    "delivery": Option(
        "dict | None", None, "Default DeliveryOptions (DSN, REQUIRETLS, envelope sender)."
    ),
}

DJANGO_OPTIONS: Final = frozenset(name for name, o in OPTIONS.items() if o.django_setting) | {
    "fail_silently"
}
OWN_OPTIONS: Final = frozenset(OPTIONS) - DJANGO_OPTIONS


def socketmail_setting(name: str) -> Any:
    """Project-wide value of one of our own options: ``SOCKETMAIL[name]`` or its default."""
    project = getattr(settings, "SOCKETMAIL", {}) or {}
    return project.get(name, OPTIONS[name].default)


BACKEND_NAMES: Final = frozenset(
    {"django_socketmail.backend", "django_socketmail.email_backend.EmailBackend"}
)
"""The dotted paths that name this backend in ``MAILERS`` or ``EMAIL_BACKEND``."""


def socketmail_mailers() -> dict[str, Mapping[str, Any]]:
    """The ``OPTIONS`` of each ``MAILERS`` alias whose backend is this one, by alias; empty
    when the project defines no ``MAILERS`` (its rows then have the alias ``""``)."""
    mailers = getattr(settings, "MAILERS", None)
    if not isinstance(mailers, Mapping):
        return {}
    return {
        alias: config.get("OPTIONS") or {}
        for alias, config in mailers.items()
        if isinstance(config, Mapping) and config.get("BACKEND") in BACKEND_NAMES
    }


def audit_retention(given: Mapping[str, Any], *, source: str) -> int | None:
    """Days of audit rows kept for a backend configured with ``given`` (a mailer's
    ``OPTIONS``): its ``audit_retention_days`` when the key is there (``None`` included,
    which keeps every row), else ``SOCKETMAIL``'s, else 90.  An invalid value raises
    ``ImproperlyConfigured`` naming where it came from."""
    if "audit_retention_days" in given:
        value, origin = given["audit_retention_days"], f"{source}['audit_retention_days']"
    else:
        value, origin = socketmail_setting("audit_retention_days"), "SOCKETMAIL"
        origin = f"{origin}['audit_retention_days']"
    try:
        return _optional_days(value)
    except ValueError as error:
        raise ImproperlyConfigured(f"{origin}: {error}") from None


def audit_database(given: Mapping[str, Any], *, source: str) -> str | None:
    """The database alias set for the audit rows of a backend configured with ``given``
    (its ``audit_database``, else ``SOCKETMAIL``'s), or None for the router's choice."""
    value, origin = given.get("audit_database"), f"{source}['audit_database']"
    if value is None:
        value, origin = socketmail_setting("audit_database"), "SOCKETMAIL['audit_database']"
    try:
        return _optional_string(value)
    except TypeError as error:
        raise ImproperlyConfigured(f"{origin}: {error}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendOptions:
    """The resolved, validated options of one backend instance.  The password is never in
    its ``repr()``."""

    host: str
    port: int
    username: str
    password: str = field(repr=False)
    use_tls: bool
    use_ssl: bool
    timeout: float
    ssl_certfile: str | None
    ssl_keyfile: str | None
    fail_silently: bool
    auth_mechanisms: tuple[str, ...]
    allow_cleartext_auth: bool
    auth_require_channel_binding: bool
    token_provider: Callable[..., Any] | None
    ssl_cafile: str | None
    ssl_verify: bool
    local_hostname: str | None
    pipelining: bool
    chunking: bool
    pool: bool
    pool_idle_timeout: float
    pool_max_age: float
    pool_max_messages: int
    audit_log: bool
    audit_body_bytes: int
    audit_database: str | None
    audit_background: bool
    audit_retention_days: int | None
    queue: bool
    task_backend: str
    queue_max_attempts: int
    queue_max_age: float
    queue_resend_unknown: bool
    max_connections: int | None
    rate_limit: tuple[int, float] | None
    failover: tuple[str | tuple[tuple[str, Any], ...], ...]
    failover_retry: float
    delivery: DeliveryOptions | None

    def client_config(self) -> ClientConfig:
        """The SMTP client's configuration for these options."""
        if self.use_ssl:
            tls = TLSMode.IMPLICIT
        elif self.use_tls:
            tls = TLSMode.STARTTLS
        else:
            tls = TLSMode.NONE
        return ClientConfig(
            host=self.host,
            port=self.port,
            tls=tls,
            timeout=self.timeout,
            username=self.username or None,
            password=Secret(self.password) if self.password else None,
            auth_mechanisms=self.auth_mechanisms,
            allow_cleartext_auth=self.allow_cleartext_auth,
            auth_require_channel_binding=self.auth_require_channel_binding,
            token_provider=shared_cache(self.token_provider) if self.token_provider else None,
            local_hostname=self.local_hostname,
            ssl_cafile=self.ssl_cafile,
            ssl_certfile=self.ssl_certfile,
            ssl_keyfile=self.ssl_keyfile,
            ssl_verify=self.ssl_verify,
            pipelining=self.pipelining,
            chunking=self.chunking,
        )


def resolve_options(given: Mapping[str, Any], *, from_mailers: bool, source: str) -> BackendOptions:
    """Resolve every option by the module's precedence and validate it.

    ``given`` holds the options passed to the backend (``None`` values count as not given,
    as in Django's backend); ``source`` names where they came from for error messages
    (``"MAILERS['default']['OPTIONS']"``).

    Settings are read on every call.  The validated result is reused while every raw value
    read (given or from settings) is the same as the last time (compared by value, the
    password by digest): building a backend per ``send_mail()`` then validates nothing
    again.  Raw values that cannot be compared so (a dict, an object such as a token
    provider, a file path whose existence is checked) make it validate every time.
    """
    values, origins = _gather(given, from_mailers=from_mailers, source=source)
    key = _cache_key(values, from_mailers=from_mailers)
    if key is not None:
        cached = _RESOLVED.get(key)
        if cached is not None:
            return cached
    options = _validate(values, origins, from_mailers=from_mailers)
    if key is not None:
        if len(_RESOLVED) >= _RESOLVED_MAX:
            _RESOLVED.clear()
        _RESOLVED[key] = options
    return options


_RESOLVED: dict[tuple[Any, ...], BackendOptions] = {}
_RESOLVED_MAX: Final = 64
_UNCACHED: Final = frozenset({"ssl_certfile", "ssl_keyfile", "ssl_cafile", "token_provider"})
"""Options whose validation looks beyond the value (a file, an import)."""


def _cache_key(values: Mapping[str, Any], *, from_mailers: bool) -> tuple[Any, ...] | None:
    """What :func:`resolve_options`'s result depends on, or None when it cannot be kept."""
    parts: list[Any] = [from_mailers, _reads_email_settings(from_mailers)]
    for name, value in values.items():
        if value is None:
            parts.append(None)
        elif name in _UNCACHED:
            return None
        elif name == "password":
            if not isinstance(value, str):
                return None
            parts.append(hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest())
        else:
            try:
                parts.append(_frozen(value))
            except TypeError:
                return None
    return tuple(parts)


def _frozen(value: Any) -> Any:
    """``value`` as a key that compares equal only to the same value of the same type (1,
    True and 1.0 are equal in Python, but a validator may take them differently); a list
    or tuple of such values too.  Anything else raises ``TypeError``."""
    kind = type(value)
    if kind in _PLAIN_TYPES:
        return (kind, value)
    if kind in (list, tuple):
        if all(type(item) is str for item in value):  # a list of names: the common case
            return (kind, tuple(value))
        return (kind, tuple(_frozen(item) for item in value))
    raise TypeError(kind.__name__)


_PLAIN_TYPES: Final = frozenset({str, int, float, bool})


def _validate(
    values: dict[str, Any], origins: Mapping[str, str], *, from_mailers: bool
) -> BackendOptions:
    """Validate the raw ``values`` (changed in place) into the backend's options; an
    invalid one raises ``ImproperlyConfigured`` naming where it came from (``origins``)."""
    for name, check in _VALIDATORS.items():
        try:
            values[name] = check(values[name])
        except (TypeError, ValueError) as error:
            raise ImproperlyConfigured(f"{origins[name]}: {error}") from None
    if values["use_tls"] and values["use_ssl"]:
        raise ImproperlyConfigured(
            f"{origins['use_tls']} and {origins['use_ssl']} are both true: use_tls (STARTTLS) "
            "and use_ssl (implicit TLS) are mutually exclusive; set one of them."
        )
    if values["port"] is None:
        values["port"] = _default_port(
            values["use_tls"], values["use_ssl"], legacy=_reads_email_settings(from_mailers)
        )
    if values["timeout"] is None:
        values["timeout"] = DEFAULT_TIMEOUT
    for name in ("ssl_certfile", "ssl_keyfile", "ssl_cafile"):
        path = values[name]
        if path is not None and not os.path.isfile(path):
            raise ImproperlyConfigured(f"{origins[name]}: file {path!r} does not exist.")
    known = {f.name for f in fields(BackendOptions)}
    return BackendOptions(**{k: v for k, v in values.items() if k in known})


def string_booleans(
    given: Mapping[str, Any], *, from_mailers: bool, source: str
) -> list[tuple[str, str, str]]:
    """``(where, option, value)`` for each boolean option whose value, found by the
    module's precedence, is a string: ``"False"``, ``"0"`` or ``"no"`` is true to Python,
    so to Django's backend and to ours.  Sorted by option name; for the system check."""
    values, origins = _gather(given, from_mailers=from_mailers, source=source)
    return [
        (origins[name], name, values[name])
        for name in sorted(OPTIONS)
        if OPTIONS[name].type == "bool" and isinstance(values[name], str)
    ]


def _gather(
    given: Mapping[str, Any], *, from_mailers: bool, source: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """Each option's raw value by the module's precedence, and where it came from."""
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    project = getattr(settings, "SOCKETMAIL", {}) or {}
    if not isinstance(project, Mapping):
        raise ImproperlyConfigured("SOCKETMAIL must be a dict of django-socketmail options.")
    unknown = sorted(set(project) - OWN_OPTIONS)
    if unknown:
        raise ImproperlyConfigured(
            f"SOCKETMAIL has unknown option(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(sorted(OWN_OPTIONS))}."
        )
    legacy = _reads_email_settings(from_mailers)
    for name, option in OPTIONS.items():
        if given.get(name) is not None:
            values[name], origins[name] = given[name], f"{source}[{name!r}]"
        elif option.django_setting and legacy:
            values[name], origins[name] = _email_setting(option.django_setting)
        elif name in project:
            values[name], origins[name] = project[name], f"SOCKETMAIL[{name!r}]"
        else:
            values[name], origins[name] = option.default, f"the default of {name!r}"
    return values, origins


def _reads_email_settings(from_mailers: bool) -> bool:
    """Whether Django's own backend, built the same way, would read the ``EMAIL_*``
    settings: when it is not built from ``MAILERS``, and on Django 6.1 only while the
    project defines no ``MAILERS`` (once it does, Django makes them unreadable)."""
    if from_mailers:
        return False
    return django.VERSION < (6, 1) or not hasattr(settings, "MAILERS")


def _email_setting(name: str) -> tuple[Any, str]:
    """The value of one ``EMAIL_*`` setting and where it came from.  Django 6.1 deprecates
    them: there one the project did not set is taken from Django's global defaults without
    reading it through ``settings`` (which would warn about a setting the project does not
    use); the value is the same."""
    if django.VERSION >= (6, 1) and not cast(Any, settings).is_overridden(name):
        return getattr(global_settings, name), f"{name} (Django's default)"
    return getattr(settings, name), name


def _default_port(use_tls: bool, use_ssl: bool, *, legacy: bool) -> int:
    """The port when none is set (``None``).  In ``MAILERS`` (Django 6.1) Django picks it
    by TLS mode.  Outside it, a ``None`` can only come from ``EMAIL_PORT = None``: Django
    passes it to smtplib, which connects to its class's default port, 465 for implicit TLS
    and 25 otherwise (even with STARTTLS)."""
    if use_ssl:
        return 465
    return 25 if legacy or not use_tls else 587


_PERIODS: Final = {"s": 1.0, "sec": 1.0, "min": 60.0, "h": 3600.0, "hour": 3600.0, "day": 86400.0}


def parse_rate(value: Any) -> tuple[int, float]:
    """``"30/min"`` as ``(30, 60.0)``: messages per period in seconds (s, min, h, day)."""
    text = _string(value).strip().lower()
    count, _, period = text.partition("/")
    if not count.isdigit() or int(count) <= 0 or period not in _PERIODS:
        raise ValueError(
            f"expected messages per period such as '30/min' (s, min, h, day), got {value!r}"
        )
    return int(count), _PERIODS[period]


def _delivery(value: Any) -> DeliveryOptions | None:
    """A :class:`~.smtp.delivery.DeliveryOptions`, or a dict of its fields."""
    if value is None or isinstance(value, DeliveryOptions):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"expected a dict of DeliveryOptions fields, got {type(value).__name__}")
    return DeliveryOptions(**value)


def _failover(value: Any) -> tuple[str | tuple[tuple[str, Any], ...], ...]:
    """MAILERS aliases (str) or option dicts over this mailer's own, in order (hashable)."""
    if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a list of MAILERS aliases or option dicts, got {value!r}")
    entries: list[str | tuple[tuple[str, Any], ...]] = []
    for entry in value:
        if isinstance(entry, str) and entry:
            entries.append(entry)
        elif isinstance(entry, dict) and set(entry) <= set(OPTIONS):
            entries.append(tuple(sorted(entry.items())))
        else:
            raise ValueError(f"a failover entry is a MAILERS alias or a dict of options: {entry!r}")
    return tuple(entries)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__} {value!r}")
    return value


def _secret(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__} (value not shown)")
    return value


def _optional_string(value: Any) -> str | None:
    return None if value is None or value == "" else _string(value)


def _boolean(value: Any) -> bool:
    """Any value, by its truth, as Django's backend takes ``use_tls`` (``if self.use_tls``).
    A string is true unless empty: :func:`string_booleans` finds them for a check."""
    return bool(value)


def _port(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"expected a port number 1-65535, got {value!r}")
    return value


def _timeout(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"expected a number of seconds > 0 (or None), got {value!r}")
    return float(value)


def _mechanisms(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a list of mechanism names, got {value!r}")
    names = tuple(_string(v).upper() for v in value)
    unknown = [n for n in names if n not in MECHANISMS]
    if unknown:
        raise ValueError(
            f"unknown SASL mechanism(s) {', '.join(unknown)}; supported: {', '.join(MECHANISMS)}"
        )
    return names


def _token_provider(value: Any) -> Callable[..., Any] | None:
    """A callable, or the dotted path of one (imported now), or None."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        from django.utils.module_loading import import_string

        try:
            value = import_string(value)
        except ImportError as error:
            raise ValueError(f"cannot import the token provider {value!r}: {error}") from None
    if not callable(value):
        raise TypeError(f"expected a callable or its dotted path, got {type(value).__name__}")
    return cast(Callable[..., Any], value)


def _positive(value: Any, unit: str, *, whole: bool = False) -> float:
    kinds = (int,) if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        raise ValueError(f"expected a number of {unit} > 0, got {value!r}")
    return value


def _non_negative(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a whole number >= 0, got {value!r}")
    return value


def _optional_days(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a number of days >= 1 (or None to keep forever), got {value!r}")
    return value


_VALIDATORS: Final[dict[str, Callable[[Any], Any]]] = {
    "host": _string,
    "port": _port,
    "username": lambda v: "" if v is None else _string(v),
    "password": lambda v: "" if v is None else _secret(v),
    "use_tls": _boolean,
    "use_ssl": _boolean,
    "timeout": _timeout,
    "ssl_certfile": _optional_string,
    "ssl_keyfile": _optional_string,
    "fail_silently": _boolean,
    "auth_mechanisms": _mechanisms,
    "allow_cleartext_auth": _boolean,
    "auth_require_channel_binding": _boolean,
    "token_provider": _token_provider,
    "ssl_cafile": _optional_string,
    "ssl_verify": _boolean,
    "local_hostname": _optional_string,
    "pipelining": _boolean,
    "chunking": _boolean,
    "pool": _boolean,
    "pool_idle_timeout": lambda v: _positive(v, "seconds"),
    "pool_max_age": lambda v: _positive(v, "seconds"),
    "pool_max_messages": lambda v: int(_positive(v, "messages", whole=True)),
    "audit_log": _boolean,
    "audit_body_bytes": _non_negative,
    "audit_database": _optional_string,
    "audit_background": _boolean,
    "audit_retention_days": _optional_days,
    "queue": _boolean,
    "task_backend": _string,
    "queue_max_attempts": lambda v: int(_positive(v, "attempts", whole=True)),
    "queue_max_age": lambda v: _positive(v, "seconds"),
    "queue_resend_unknown": _boolean,
    "max_connections": lambda v: (
        None if v is None else int(_positive(v, "connections", whole=True))
    ),
    "rate_limit": lambda v: None if v is None else parse_rate(v),
    "failover": lambda v: _failover(v),
    "failover_retry": lambda v: _positive(v, "seconds"),
    "delivery": lambda v: _delivery(v),
}
