"""SASL mechanisms against their RFC vectors."""

from __future__ import annotations

import base64

import pytest

from django_socketmail.smtp.sasl import MECHANISMS, CramMD5, Login, Plain, UnexpectedChallenge


def test_cram_md5_rfc2195_vector() -> None:
    mechanism = CramMD5("tim", "tanstaaftanstaaf")
    assert mechanism.initial_response() is None
    response = mechanism.respond(b"<1896.697170952@postoffice.reston.mci.net>")
    assert base64.b64encode(response) == b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw"
    with pytest.raises(UnexpectedChallenge):
        mechanism.respond(b"again")


def test_plain_rfc4616_message() -> None:
    mechanism = Plain("tim", "tanstaaftanstaaf")
    assert mechanism.initial_response() == b"\0tim\0tanstaaftanstaaf"


def test_plain_after_empty_challenge_then_no_more() -> None:
    mechanism = Plain("u", "p")
    mechanism.initial_response()
    assert mechanism.respond(b"") == b"\0u\0p"
    with pytest.raises(UnexpectedChallenge):
        mechanism.respond(b"")


def test_login_answers_by_order_not_text() -> None:
    mechanism = Login("user", "secret")
    assert mechanism.respond(b"Password:") == b"user"  # the text is irrelevant
    assert mechanism.respond(b"whatever") == b"secret"
    with pytest.raises(UnexpectedChallenge):
        mechanism.respond(b"Username:")


def test_utf8_credentials() -> None:
    assert Plain("jürgen", "pässwörd").initial_response() == "\0jürgen\0pässwörd".encode()
    response = CramMD5("jürgen", "pässwörd").respond(b"<1@x>")
    assert response.startswith("jürgen ".encode())


def test_registry_and_cleartext_flags() -> None:
    assert list(MECHANISMS) == ["CRAM-MD5", "PLAIN", "LOGIN"]
    assert not CramMD5.sends_password and Plain.sends_password and Login.sends_password


def test_repr_hides_credentials() -> None:
    assert "secret" not in repr(Plain("user", "secret"))
