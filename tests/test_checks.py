"""System checks: stable ids, real runs through ``manage.py check``."""

from __future__ import annotations

import io

import django
import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings

from django_socketmail.checks import check_mail_configuration

NEEDS_MAILERS = pytest.mark.skipif(django.VERSION < (6, 1), reason="MAILERS is Django 6.1+")


def ids(**settings: object) -> list[str]:
    with override_settings(**settings):
        return [m.id or "" for m in check_mail_configuration()]


def mailers(**options: object) -> dict[str, object]:
    return {"MAILERS": {"default": {"BACKEND": "django_socketmail.backend", "OPTIONS": options}}}


def email(**settings: object) -> dict[str, object]:
    return {"EMAIL_BACKEND": "django_socketmail.backend", **settings}


def test_clean_configuration_has_no_messages() -> None:
    if django.VERSION >= (6, 1):
        assert ids(**mailers(host="smtp.example.com", use_tls=True)) == []
    else:
        assert ids(**email(EMAIL_HOST="smtp.example.com", EMAIL_USE_TLS=True)) == []


@pytest.mark.skipif(django.VERSION >= (6, 1), reason="EMAIL_* settings are deprecated on 6.1")
def test_email_settings_are_checked() -> None:
    assert ids(**email(EMAIL_USE_TLS=True, EMAIL_USE_SSL=True)) == ["socketmail.E002"]
    assert ids(**email(EMAIL_HOST_USER="u", EMAIL_HOST_PASSWORD="p")) == ["socketmail.W001"]
    assert ids(**email(EMAIL_USE_SSL=True, EMAIL_PORT=587)) == ["socketmail.W004"]
    assert ids(**email(SOCKETMAIL={"ssl_verify": False})) == ["socketmail.W003"]
    assert ids(**email(SOCKETMAIL={"timeout": 3})) == ["socketmail.E001"]
    settings = email(EMAIL_HOST_USER="u", EMAIL_HOST_PASSWORD="p")
    settings["SOCKETMAIL"] = {"allow_cleartext_auth": True}
    assert ids(**settings) == ["socketmail.W002"]


@NEEDS_MAILERS
def test_mailers_are_checked() -> None:
    assert ids(**mailers(host="h", use_tls=True, use_ssl=True)) == ["socketmail.E002"]
    assert ids(**mailers(host="h", auth_mechanisms=["NTLM"])) == ["socketmail.E001"]
    assert ids(**mailers(host="h", username="u", password="p")) == ["socketmail.W001"]
    assert ids(**mailers(host="h", port=465)) == ["socketmail.W004"]
    assert ids(**mailers(host="h", use_tls=True, ssl_verify=False)) == ["socketmail.W003"]


@pytest.mark.django_db(databases=["default", "audit"])  # 6.1: JSONField checks ask the DBs
def test_manage_check_runs_our_checks() -> None:
    if django.VERSION >= (6, 1):
        broken = mailers(host="h", use_tls=True, use_ssl=True)
    else:
        broken = email(EMAIL_USE_TLS=True, EMAIL_USE_SSL=True)
    with override_settings(**broken), pytest.raises(SystemCheckError, match=r"socketmail\.E002"):
        call_command("check", stdout=io.StringIO(), stderr=io.StringIO())


@pytest.mark.skipif(django.VERSION >= (6, 1), reason="EMAIL_* settings are deprecated on 6.1")
def test_a_string_for_a_boolean_setting_is_a_warning() -> None:
    # "False" is true to Python, so Django's backend (and ours) uses TLS: accepted, warned.
    with override_settings(**email(EMAIL_USE_TLS="False")):
        (message,) = check_mail_configuration()
    assert message.id == "socketmail.W005"
    assert "EMAIL_USE_TLS" in message.msg and "'False'" in message.msg
    assert message.hint is not None and "EMAIL_USE_TLS = False" in message.hint
    assert ids(**email(EMAIL_USE_TLS=1)) == []
    assert ids(**email(EMAIL_USE_TLS=True, SOCKETMAIL={"pool": "0"})) == ["socketmail.W005"]
    # "False" is true, so with use_ssl both are on: the string is named beside the error.
    both = email(EMAIL_USE_TLS="False", EMAIL_USE_SSL=True)
    assert ids(**both) == ["socketmail.W005", "socketmail.E002"]


@NEEDS_MAILERS
def test_a_string_for_a_boolean_option_in_mailers_is_a_warning() -> None:
    with override_settings(**mailers(host="h", use_tls="no", pipelining="False")):
        messages = check_mail_configuration()
    assert [m.id for m in messages] == ["socketmail.W005", "socketmail.W005"]
    assert "MAILERS['default']['OPTIONS']['pipelining']" in messages[0].msg
    assert messages[0].hint is not None and "'pipelining': False" in messages[0].hint
    assert "MAILERS['default']['OPTIONS']['use_tls']" in messages[1].msg
    assert ids(**mailers(host="h", use_tls=1)) == []
