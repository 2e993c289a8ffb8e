"""Queue ids from the final replies of the servers our users send through."""

from __future__ import annotations

import pytest

from django_socketmail.smtp.result import parse_queue_id

FINAL_REPLIES = [
    ("Postfix", "2.0.0 Ok: queued as 4Xyz1Ab2Cd", "4Xyz1Ab2Cd"),
    ("Postfix, long ids", "2.0.0 Ok: queued as 4Qp5Rk2gZ9z9vRf", "4Qp5Rk2gZ9z9vRf"),
    ("Postfix, CHUNKING", "2.0.0 Ok: 3899394 bytes queued as 4Qp5Rk2gZ9", "4Qp5Rk2gZ9"),
    ("Exim", "OK id=1xZ0iO-0007Ae-0J", "1xZ0iO-0007Ae-0J"),
    # Dovecot submission 2.3 passes its relay's reply on verbatim (seen with Postfix behind).
    ("Dovecot submission", "2.0.0 Ok: 465 bytes queued as 589FB20C051", "589FB20C051"),
    ("OpenSMTPD", "2.0.0 ed0414e9 Message accepted for delivery", "ed0414e9"),
    ("OpenSMTPD, older", "2.0.0: 5f3c29a1 Message accepted for delivery", "5f3c29a1"),
    (
        "Microsoft 365",
        "2.6.0 <a1b2@example.com> [InternalId=64948479836185, Hostname=AM0PR01MB1234."
        "eurprd01.prod.exchangelabs.com] 1234 bytes in 0.123, 10.118 KB/sec Queued mail for "
        "delivery",
        "64948479836185",
    ),
    (
        "Gmail",
        "2.0.0 OK  1700000000 a1-20020a170906abcd00b0012345678sor123 - gsmtp",
        "a1-20020a170906abcd00b0012345678sor123",
    ),
    (
        "Amazon SES",
        "Ok 0100018b4f2e1c3d-5a6b7c8d-1234-4e5f-9a0b-1c2d3e4f5a6b-000000",
        "0100018b4f2e1c3d-5a6b7c8d-1234-4e5f-9a0b-1c2d3e4f5a6b-000000",
    ),
    ("unknown format", "2.0.0 Thanks", None),
    ("a 250 to RSET", "2.0.0 Ok", None),
]


@pytest.mark.parametrize(
    ("server", "text", "expected"), FINAL_REPLIES, ids=[r[0] for r in FINAL_REPLIES]
)
def test_queue_id_of_each_server(server: str, text: str, expected: str | None) -> None:
    assert parse_queue_id(text) == expected
