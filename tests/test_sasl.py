"""SASL mechanisms against their RFC vectors."""

from __future__ import annotations

import base64

import pytest

from django_socketmail.smtp.sasl import MECHANISMS, CramMD5, Login, Plain, UnexpectedChallenge
from django_socketmail.smtp.secret import Secret


def test_cram_md5_rfc2195_vector() -> None:
    mechanism = CramMD5("tim", Secret("tanstaaftanstaaf"))
    assert mechanism.initial_response() is None
    response = mechanism.respond(b"<1896.697170952@postoffice.reston.mci.net>").reveal()
    assert base64.b64encode(response) == b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw"
    with pytest.raises(UnexpectedChallenge):
        mechanism.respond(b"again")


def test_plain_rfc4616_message() -> None:
    mechanism = Plain("tim", Secret("tanstaaftanstaaf"))
    assert mechanism.initial_response() == Secret(b"\0tim\0tanstaaftanstaaf")


def test_plain_after_empty_challenge_then_no_more() -> None:
    mechanism = Plain("u", Secret("p"))
    mechanism.initial_response()
    assert mechanism.respond(b"").reveal() == b"\0u\0p"
    with pytest.raises(UnexpectedChallenge):
        mechanism.respond(b"")


def test_login_answers_by_order_not_text() -> None:
    mechanism = Login("user", Secret("secret"))
    assert mechanism.respond(b"Password:").reveal() == b"user"  # the text is irrelevant
    assert mechanism.respond(b"whatever").reveal() == b"secret"
    with pytest.raises(UnexpectedChallenge):
        mechanism.respond(b"Username:")


def test_utf8_credentials() -> None:
    initial = Plain("jürgen", Secret("pässwörd")).initial_response()
    assert initial is not None and initial.reveal() == "\0jürgen\0pässwörd".encode()
    response = CramMD5("jürgen", Secret("pässwörd")).respond(b"<1@x>").reveal()
    assert response.startswith("jürgen ".encode())


def test_registry_and_cleartext_flags() -> None:
    assert list(MECHANISMS) == [
        "SCRAM-SHA-256-PLUS",
        "SCRAM-SHA-256",
        "SCRAM-SHA-1",
        "CRAM-MD5",
        "PLAIN",
        "LOGIN",
        "XOAUTH2",
        "OAUTHBEARER",
    ]
    assert not CramMD5.sends_password and Plain.sends_password and Login.sends_password


def test_repr_hides_credentials() -> None:
    assert "secret" not in repr(Plain("user", Secret("secret")))


def test_responses_are_secrets_that_do_not_print() -> None:
    for response in (
        Plain("user", Secret("hunter22")).initial_response(),
        Login("user", Secret("hunter22")).respond(b"Username:"),
        CramMD5("user", Secret("hunter22")).respond(b"<1@x>"),
    ):
        assert isinstance(response, Secret)
        assert "hunter22" not in repr(response) and "hunter22" not in str(response)
        assert "user" not in f"{response}"
