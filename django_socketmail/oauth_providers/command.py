"""A token provider that runs a command and reads the token from its output, like msmtp's
``passwordeval``: ``sendtestmail --token-command CMD``, or ``token_provider`` for a token
that another program keeps fresh (``oauth2l fetch``, ``az account get-access-token``...).

No extra needed.  The command is split like a shell would (:func:`shlex.split`) but runs
without a shell; it gets ``SOCKETMAIL_USER`` and ``SOCKETMAIL_FORCE_REFRESH`` (``1`` after a
refusal) in its environment and must print the token, alone, on its standard output.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Callable
from typing import Final

from ..smtp.oauth import TokenProviderError

__all__ = ["COMMAND_TIMEOUT", "command"]

COMMAND_TIMEOUT: Final = 30.0
"""Seconds the command may run (the session's own timeout bounds the wait as well)."""


def command(cmd: str, *, timeout: float = COMMAND_TIMEOUT) -> Callable[..., str]:
    """A provider running ``cmd``; :class:`TokenProviderError` when it cannot be run, fails,
    takes longer than ``timeout`` or prints nothing.  Its standard error is not shown
    (it may hold a secret); the exit status is."""
    argv = shlex.split(cmd)
    if not argv:
        raise ValueError("the token command is empty")

    def provider(username: str, force_refresh: bool = False) -> str:
        env = os.environ | {
            "SOCKETMAIL_USER": username,
            "SOCKETMAIL_FORCE_REFRESH": "1" if force_refresh else "0",
        }
        try:
            done = subprocess.run(  # noqa: S603 - the user's own command, no shell
                argv, capture_output=True, timeout=timeout, env=env, check=False
            )
        except FileNotFoundError:
            raise TokenProviderError(f"the token command {argv[0]!r} was not found") from None
        except subprocess.TimeoutExpired:
            raise TokenProviderError(
                f"the token command did not finish within {timeout:g} s"
            ) from None
        if done.returncode != 0:
            raise TokenProviderError(f"the token command exited with status {done.returncode}")
        token = done.stdout.decode("utf-8", "replace").strip()
        if not token:
            raise TokenProviderError("the token command printed nothing")
        return token

    return provider
