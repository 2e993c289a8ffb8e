"""Options: booleans and ports resolved exactly as Django's own SMTP backend resolves them."""

from __future__ import annotations

import smtplib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import django
import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.mail.backends.smtp import EmailBackend as DjangoBackend
from django.test import override_settings

from django_socketmail import conf
from django_socketmail.conf import OPTIONS, resolve_options
from django_socketmail.email_backend import EmailBackend

NEEDS_MAILERS = pytest.mark.skipif(django.VERSION < (6, 1), reason="MAILERS is Django 6.1+")
# On Django 6.1 every EMAIL_* setting (set or read) is a RemovedInDjango2028Warning.
EMAIL_SETTINGS_DEPRECATED = pytest.mark.filterwarnings(
    "ignore:.*setting is deprecated:PendingDeprecationWarning"
)

BOOLEANS = sorted(name for name, option in OPTIONS.items() if option.type == "bool")
FALSY: list[object] = [0, 0.0, "", [], ()]
TRUTHY: list[object] = [1, 2, 1.5, "yes", [0], ("x",)]
STRINGS: list[str] = ["False", "false", "0", "no", "off", "True", "", " "]


@contextmanager
def email_settings(**values: Any) -> Iterator[None]:
    """``EMAIL_*`` settings as a project without ``MAILERS`` has them (on Django 6.1 the
    test settings define MAILERS, which hides every EMAIL_* setting: removed here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        with override_settings(**values):
            if hasattr(settings, "MAILERS"):
                del settings.MAILERS
            yield


def test_the_boolean_options_are_known() -> None:
    assert BOOLEANS == [
        "allow_cleartext_auth",
        "audit_background",
        "audit_log",
        "auth_require_channel_binding",
        "chunking",
        "fail_silently",
        "pipelining",
        "pool",
        "queue",
        "queue_resend_unknown",
        "ssl_verify",
        "use_ssl",
        "use_tls",
    ]


@pytest.mark.parametrize("name", BOOLEANS)
@pytest.mark.parametrize("value", FALSY + TRUTHY + STRINGS)
def test_any_value_is_a_boolean_as_in_django(name: str, value: object) -> None:
    # Django's backend takes any object and tests its truth (``if self.use_tls:``).
    for from_mailers in (True, False):
        options = resolve_options({name: value}, from_mailers=from_mailers, source="OPTIONS")
        assert getattr(options, name) is bool(value)


def test_none_means_not_given() -> None:
    for name in BOOLEANS:
        options = resolve_options({name: None}, from_mailers=True, source="OPTIONS")
        assert getattr(options, name) is OPTIONS[name].default


@EMAIL_SETTINGS_DEPRECATED
@pytest.mark.parametrize("value", [1, 0, "", None, "False"])
def test_email_use_tls_and_ssl_settings_take_any_value(value: object) -> None:
    with email_settings(EMAIL_USE_TLS=value):
        assert EmailBackend().use_tls is bool(value)
        assert EmailBackend().use_ssl is False
    with email_settings(EMAIL_USE_SSL=value):
        assert EmailBackend().use_ssl is bool(value)
    # Both truthy is still Django's error; truthiness, not ``is True``, decides.
    if value:
        with (
            email_settings(EMAIL_USE_TLS=value, EMAIL_USE_SSL=1),
            pytest.raises(ImproperlyConfigured, match="mutually exclusive"),
        ):
            EmailBackend()


@pytest.mark.parametrize("value", [1, 0, "", "no"])
def test_socketmail_settings_take_any_value(value: object) -> None:
    with override_settings(SOCKETMAIL={"pool": value, "ssl_verify": value}):
        options = EmailBackend().options
    assert options.pool is bool(value)
    assert options.ssl_verify is bool(value)


def test_backend_keyword_arguments_take_any_value() -> None:
    backend: Any = EmailBackend  # its signature says bool, as Django's documentation does
    assert backend(use_tls=1).use_tls is True
    assert backend(use_ssl=0, fail_silently=1).fail_silently is True
    assert backend(pipelining=0, chunking="").options.pipelining is False


@NEEDS_MAILERS
@pytest.mark.parametrize("value", [1, 0, "", "False"])
def test_mailers_options_take_any_value(value: object) -> None:
    from django.core.mail import mailers  # type: ignore[attr-defined,unused-ignore]

    config = {"host": "h", "use_tls": value, "pool": value, "fail_silently": value}
    with override_settings(
        MAILERS={"default": {"BACKEND": "django_socketmail.backend", "OPTIONS": config}}
    ):
        backend = cast(EmailBackend, mailers.create_connection("default"))
    assert backend.use_tls is bool(value)
    assert backend.options.pool is bool(value)
    assert backend.fail_silently is bool(value)


def test_string_booleans_are_found_where_they_come_from() -> None:
    found = conf.string_booleans(
        {"use_tls": "False", "pool": "0", "chunking": False, "host": "h"},
        from_mailers=True,
        source="MAILERS['default']['OPTIONS']",
    )
    assert found == [
        ("MAILERS['default']['OPTIONS']['pool']", "pool", "0"),
        ("MAILERS['default']['OPTIONS']['use_tls']", "use_tls", "False"),
    ]
    with override_settings(SOCKETMAIL={"audit_log": "no"}):
        assert conf.string_booleans({}, from_mailers=True, source="X") == [
            ("SOCKETMAIL['audit_log']", "audit_log", "no")
        ]


# -- the port: what each Django version's own backend does, and ours with it -------------


def django_port(**kwargs: Any) -> int:
    """The port Django's own SMTP backend connects to: its ``port``, or smtplib's default
    (25, or 465 for SMTP_SSL) when that is falsy."""
    with warnings.catch_warnings():
        # 6.1: "Directly creating EmailBackend instances is deprecated."
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        backend = DjangoBackend(**kwargs)
    port: int = backend.port or (smtplib.SMTP_SSL_PORT if backend.use_ssl else smtplib.SMTP_PORT)
    return port


@EMAIL_SETTINGS_DEPRECATED
@pytest.mark.parametrize(
    ("settings_", "kwargs", "expected"),
    [
        # EMAIL_PORT is always defined (default 25): use_tls or use_ssl do not change it.
        ({"EMAIL_USE_TLS": True}, {}, 25),
        ({"EMAIL_USE_SSL": True}, {}, 25),
        ({}, {"use_tls": True}, 25),
        ({}, {"use_ssl": True}, 25),
        ({"EMAIL_USE_TLS": True, "EMAIL_PORT": 587}, {}, 587),
        ({"EMAIL_PORT": 2525}, {"use_tls": True, "port": 587}, 587),
        # EMAIL_PORT = None: smtplib's default port for the class (465 for SMTP_SSL).
        ({"EMAIL_USE_TLS": True, "EMAIL_PORT": None}, {}, 25),
        ({"EMAIL_USE_SSL": True, "EMAIL_PORT": None}, {}, 465),
    ],
)
def test_port_outside_mailers_is_djangos(
    settings_: dict[str, Any], kwargs: dict[str, Any], expected: int
) -> None:
    with email_settings(**settings_):
        assert django_port(**kwargs) == expected
        assert EmailBackend(**kwargs).port == expected


@NEEDS_MAILERS
@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"use_tls": True}, 587),
        ({"use_ssl": True}, 465),
        ({}, 25),
        ({"use_tls": True, "port": 2525}, 2525),
    ],
)
def test_port_in_mailers_is_djangos(options: dict[str, Any], expected: int) -> None:
    assert django_port(host="h", alias="default", **options) == expected
    assert EmailBackend(host="h", alias="default", **options).port == expected


def test_options_are_validated_again_only_when_a_value_read_changed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """A backend per ``send_mail()`` reuses the options validated for the same values; any
    change of a value read, even one made without Django's ``setting_changed`` signal,
    is seen by the next backend."""
    given = {"host": "mail.example.com", "port": 2525, "password": "one"}
    first = resolve_options(given, from_mailers=True, source="OPTIONS")
    assert resolve_options(dict(given), from_mailers=True, source="OPTIONS") is first

    changed = resolve_options(given | {"password": "two"}, from_mailers=True, source="OPTIONS")
    assert changed is not first and changed.password == "two"
    # The same number as a boolean and as an integer: each validated as itself.
    assert resolve_options(given | {"pipelining": 1}, from_mailers=True, source="O").pipelining
    assert resolve_options(given | {"pool": True}, from_mailers=True, source="O").pool

    project = dict(getattr(settings, "SOCKETMAIL", {}) or {})
    monkeypatch.setattr(
        settings, "SOCKETMAIL", project | {"local_hostname": "a.example"}, raising=False
    )
    assert resolve_options(given, from_mailers=True, source="O").local_hostname == "a.example"
    monkeypatch.setattr(settings, "SOCKETMAIL", project | {"local_hostname": "b.example"})
    assert resolve_options(given, from_mailers=True, source="O").local_hostname == "b.example"

    # A file's existence is checked every time.
    certificate = tmp_path / "client.pem"
    certificate.write_text("not read here")
    with_file = given | {"ssl_certfile": str(certificate)}
    assert resolve_options(with_file, from_mailers=True, source="O").ssl_certfile
    certificate.unlink()
    with pytest.raises(ImproperlyConfigured, match="does not exist"):
        resolve_options(with_file, from_mailers=True, source="O")
