"""DSN against the real Postfix (3.7 advertises DSN): our parameters on the wire, and the
success notification Postfix sends back carrying our ENVID and ORCPT."""

from __future__ import annotations

from django.core.mail import EmailMessage

from django_socketmail import DeliveryOptions
from django_socketmail.email_backend import EmailBackend
from django_socketmail.smtp import SendResult, SendStatus
from tests.interop.rig import BOUNCE_PREFIX, DOMAIN, PostfixRig


def test_a_success_dsn_comes_back_with_our_envid(maildir_clean: PostfixRig) -> None:
    rig = maildir_clean
    backend = EmailBackend(
        host=rig.server_hostname,
        port=rig.submission_port,
        use_tls=True,
        ssl_cafile=str(rig.ca_cert_path),
        username="alice",
        password=rig.users["alice"],
        audit_log=False,
        timeout=10,
        local_hostname="client.test",
    )
    msg = EmailMessage("dsn", "body\n", f"Shop <shop@{DOMAIN}>", [f"bob@{DOMAIN}"])
    msg.socketmail_delivery = DeliveryOptions(  # type: ignore[attr-defined]
        notify=("SUCCESS", "FAILURE"),
        ret="HDRS",
        envid="auto",
        orcpt=True,
        envelope_sender=f"alice@{DOMAIN}",
    )
    lines: list[str] = []
    backend.transcript_listeners.append(lambda line: lines.append(str(line)))
    assert backend.send_messages([msg]) == 1
    result = msg.socketmail_result  # type: ignore[attr-defined]
    assert isinstance(result, SendResult)
    assert result.status is SendStatus.SENT and result.dsn_sent
    envid = result.envid
    assert envid and len(envid) == 32
    assert any(f"RET=HDRS ENVID={envid}" in line for line in lines)
    assert any("NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@" in line for line in lines)

    delivered = rig.wait_for_messages(2, timeout=20)
    reports = [raw for raw in delivered if b"multipart/report" in raw]
    assert len(reports) == 1, [raw[:300] for raw in delivered]
    report = reports[0]
    assert f"Original-Envelope-Id: {envid}".encode() in report
    assert f"Original-Recipient: rfc822;bob@{DOMAIN}".encode() in report
    assert b"Action: delivered" in report


def test_a_bounce_for_an_unknown_user_carries_our_envid_back(maildir_clean: PostfixRig) -> None:
    rig = maildir_clean
    backend = EmailBackend(
        host=rig.server_hostname,
        port=rig.plain_port,
        audit_log=False,
        timeout=10,
        local_hostname="client.test",
    )
    msg = EmailMessage("bounce me", "body\n", f"shop@{DOMAIN}", [f"{BOUNCE_PREFIX}x@{DOMAIN}"])
    msg.socketmail_delivery = DeliveryOptions(  # type: ignore[attr-defined]
        notify=("FAILURE",), ret="HDRS", envid="auto", envelope_sender=f"alice@{DOMAIN}"
    )
    assert backend.send_messages([msg]) == 1  # accepted: the bounce comes later
    envid = msg.socketmail_result.envid  # type: ignore[attr-defined]
    (bounce,) = rig.wait_for_messages(1, timeout=20)
    assert b"multipart/report" in bounce
    assert f"Original-Envelope-Id: {envid}".encode() in bounce
    assert b"Action: failed" in bounce and b"5.1.1" in bounce
