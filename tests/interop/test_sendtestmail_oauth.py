"""``sendtestmail --auth XOAUTH2 --token-command CMD`` as a new user would run it, against
Postfix's submission port whose Dovecot checks the token at an introspection endpoint."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from tests.interop.rig import DOMAIN
from tests.interop.test_oauth_dovecot import Introspection, OAuthRig, introspection, oauth_rig

__all__ = ["introspection", "oauth_rig"]  # the fixtures, shared with that module

pytestmark = pytest.mark.django_db(transaction=True)


def _sendtestmail(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    try:
        call_command("sendtestmail", *args, stdout=out, stderr=io.StringIO())
    except CommandError as error:
        return error.returncode, out.getvalue() + "\nERROR: " + str(error)
    return 0, out.getvalue()


@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
def test_sendtestmail_with_a_token_command(
    oauth_rig: OAuthRig, introspection: Introspection, tmp_path: Path, mechanism: str
) -> None:
    oauth_rig.clear_messages()
    introspection.asked.clear()
    introspection.active.clear()
    introspection.active["cli-token-fresh"] = "alice"
    script = tmp_path / "token.py"
    script.write_text(  # an expired token first, the fresh one when asked to refresh
        "import os\n"
        "print('cli-token-fresh' if os.environ['SOCKETMAIL_FORCE_REFRESH'] == '1' "
        "else 'cli-token-expired')\n"
    )
    status, out = _sendtestmail(
        "--host", oauth_rig.server_hostname, "--port", str(oauth_rig.submission_port),
        "--tls", "--ca-file", str(oauth_rig.ca_cert_path), "--user", "alice",
        "--auth", mechanism, "--token-command", f"{sys.executable} {script}",
        "--from", f"alice@{DOMAIN}", f"bob@{DOMAIN}",
    )  # fmt: skip
    assert status == 0, out
    assert introspection.asked == ["cli-token-expired", "cli-token-fresh"]
    assert f"AUTH {mechanism} [redacted]" in out
    assert "cli-token" not in out
    oauth_rig.wait_for_messages(1)


def test_sendtestmail_diagnoses_a_token_refused_twice(
    oauth_rig: OAuthRig, introspection: Introspection
) -> None:
    introspection.active.clear()
    status, out = _sendtestmail(
        "--host", oauth_rig.server_hostname, "--port", str(oauth_rig.submission_port),
        "--tls", "--ca-file", str(oauth_rig.ca_cert_path), "--user", "alice",
        "--auth", "XOAUTH2", "--token-command", "echo revoked-token", "--check",
    )  # fmt: skip
    assert status == 3, out
    assert "The OAuth token was refused, also after a refresh" in out
