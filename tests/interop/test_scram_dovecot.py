"""SCRAM-SHA-256 and SCRAM-SHA-1 against Dovecot 2.3's own SCRAM, through Postfix's
submission port (STARTTLS, Dovecot SASL): the rig's Dovecot with the two mechanisms added
to ``auth_mechanisms`` (its passdb holds the plaintext passwords, from which Dovecot derives
the SCRAM keys).  Dovecot 2.3 has no -PLUS; channel binding is tested in-process
(tests/test_scram.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.core.mail import EmailMessage

from django_socketmail.email_backend import EmailBackend
from django_socketmail.smtp import AuthenticationError
from tests.interop.conftest import require_rig
from tests.interop.rig import DOMAIN, PostfixRig

ORIGINAL: str = "auth_mechanisms = plain login cram-md5\n"


class ScramRig(PostfixRig):
    """The rig, with SCRAM-SHA-1 and SCRAM-SHA-256 in Dovecot's ``auth_mechanisms``."""

    def _write_dovecot(self) -> None:
        super()._write_dovecot()
        conf = self.dovecot_dir / "dovecot.conf"
        text = conf.read_text(encoding="utf-8")
        assert text.count(ORIGINAL) == 1, "the rig's dovecot.conf changed: update this test"
        conf.write_text(
            text.replace(ORIGINAL, ORIGINAL.rstrip("\n") + " scram-sha-1 scram-sha-256\n"),
            encoding="utf-8",
        )


@pytest.fixture(scope="module")
def scram_rig() -> Iterator[ScramRig]:
    require_rig()
    rig = ScramRig()
    rig.start()
    try:
        yield rig
    finally:
        rig.stop()


@pytest.fixture
def rig(scram_rig: ScramRig) -> ScramRig:
    scram_rig.clear_messages()
    return scram_rig


def _backend(
    rig: PostfixRig, user: str, lines: list[str], password: str | None = None, **options: Any
) -> EmailBackend:
    backend = EmailBackend(
        host=rig.server_hostname,
        port=rig.submission_port,
        use_tls=True,
        ssl_cafile=str(rig.ca_cert_path),
        username=user,
        password=rig.users[user] if password is None else password,
        timeout=10,
        local_hostname="client.test",
        audit_log=False,
        **options,
    )
    backend.transcript_listeners.append(lambda line: lines.append(str(line)))
    return backend


def _message(subject: str) -> EmailMessage:
    return EmailMessage(subject, "body\n", f"alice@{DOMAIN}", [f"bob@{DOMAIN}"])


@pytest.mark.parametrize("user", ["alice", "jürgen", "bob@example.test"])
@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_dovecot_accepts_our_scram_and_proves_itself(
    rig: ScramRig, mechanism: str, user: str
) -> None:
    lines: list[str] = []
    backend = _backend(rig, user, lines, auth_mechanisms=[mechanism])
    try:
        assert backend.send_messages([_message(f"{mechanism} as {user.encode()!r}")]) == 1
    finally:
        backend.close()
    [raw] = rig.wait_for_messages(1)
    assert f"Subject: {mechanism} as {user.encode()!r}".encode() in raw
    ehlo = next(line for line in lines if "SCRAM-SHA-256" in line and "AUTH" in line)
    assert "SCRAM-SHA-1" in ehlo  # Postfix passes on what Dovecot offers
    assert [line for line in lines if line.startswith("C: AUTH")] == [
        f"C: AUTH {mechanism} [redacted]"
    ]
    text = "\n".join(lines)
    assert rig.users[user] not in text


def test_default_preference_picks_scram_sha_256(rig: ScramRig) -> None:
    lines: list[str] = []
    backend = _backend(rig, "alice", lines)
    try:
        assert backend.send_messages([_message("default")]) == 1
    finally:
        backend.close()
    assert [line for line in lines if line.startswith("C: AUTH")] == [
        "C: AUTH SCRAM-SHA-256 [redacted]"
    ]


def test_wrong_password_is_one_535_and_no_other_mechanism(rig: ScramRig) -> None:
    lines: list[str] = []
    backend = _backend(rig, "alice", lines, password="not-alice-Secret-1")
    try:
        with pytest.raises(AuthenticationError) as info:
            backend.send_messages([_message("wrong")])
    finally:
        backend.close()
    assert info.value.smtp_code == 535
    assert [line for line in lines if line.startswith("C: AUTH")] == [
        "C: AUTH SCRAM-SHA-256 [redacted]"
    ]
    assert rig.message_paths() == []
