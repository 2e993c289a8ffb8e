"""What both drivers need from the operating system: name lookup and connect within a
deadline, the TLS context, TCP_QUICKACK, the peer certificate's subject.

With :mod:`.client` (blocking) and :mod:`.aio` (asyncio), the only modules that import
``socket`` and ``ssl``.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

from .address import idna_encode_domain
from .config import ClientConfig
from .errors import InvalidAddressError, SocketMailError

__all__ = [
    "ConnectionFailedError",
    "ascii_host",
    "bounded",
    "certificate_subject",
    "connect",
    "fqdn",
    "quickack",
    "resolve",
    "ssl_context",
]

_T = TypeVar("_T")


def ssl_context(config: ClientConfig) -> ssl.SSLContext:
    """The client TLS context: chain and host name verified unless ``ssl_verify`` is off.
    Cached while the CA, certificate and key files are unchanged (a rotated file is read
    again on the next connection)."""
    files = (config.ssl_cafile, config.ssl_certfile, config.ssl_keyfile)
    return _ssl_context(*files, config.ssl_verify, tuple(map(_stamp, files)))


def _stamp(path: str | None) -> tuple[int, int, int] | None:
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _ssl_context(
    cafile: str | None,
    certfile: str | None,
    keyfile: str | None,
    verify: bool,
    stamps: tuple[object, ...],
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cafile)
    if certfile or keyfile:
        context.load_cert_chain(certfile or "", keyfile)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


_FQDN: list[str] = []
"""This host's fully qualified name, once a lookup of it has finished."""


def bounded(lookup: Callable[[], _T], seconds: float) -> _T:
    """``lookup()`` in a daemon thread, waited for at most ``seconds``: the resolver has no
    timeout of its own.  Raises ``TimeoutError`` when it is still running (it finishes in
    the background)."""
    box: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            box.append((True, lookup()))
        except BaseException as error:  # handed to the waiting thread
            box.append((False, error))

    thread = threading.Thread(target=run, name="socketmail-lookup", daemon=True)
    thread.start()
    thread.join(max(0.0, seconds))
    if not box:
        raise TimeoutError
    ok, value = box[0]
    if not ok:
        raise value
    return cast("_T", value)


def fqdn(seconds: float) -> str | None:
    """This host's name (``socket.getfqdn()``), or None if the lookup takes longer."""
    if not _FQDN:
        try:
            _FQDN.append(bounded(socket.getfqdn, seconds))
        except TimeoutError:
            return None
    return _FQDN[0]


def resolve(host: str, port: int, seconds: float) -> list[Any]:
    """``getaddrinfo`` within ``seconds`` (an address literal needs no lookup); a non-ASCII
    name is looked up by its IDNA 2008 form (the socket module would use IDNA 2003)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        name = ascii_host(host)
        return bounded(lambda: socket.getaddrinfo(name, port, type=socket.SOCK_STREAM), seconds)
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)


def ascii_host(host: str) -> str:
    """``host`` as sent to the resolver and in TLS SNI: IDNA 2008 for a non-ASCII name."""
    if host.isascii():
        return host
    try:
        return idna_encode_domain(host)
    except InvalidAddressError as error:
        raise ConnectionFailedError(host, 0, OSError(f"host name not usable: {error}")) from error


def connect(addresses: list[Any], deadline: float) -> socket.socket:
    """Connect to the first of ``addresses`` (``getaddrinfo`` results) that answers, all
    within ``deadline``, like ``socket.create_connection``."""
    error: OSError | None = None
    for family, kind, proto, _name, address in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(remaining)
            sock.connect(address)
        except OSError as failure:
            sock.close()
            if isinstance(failure, TimeoutError):
                raise
            error = failure
            continue
        return sock
    raise error or OSError("no address found")


class ConnectionFailedError(SocketMailError, ConnectionError):
    """The TCP connection could not be made (refused, unreachable, name not found)."""

    def __init__(self, host: str, port: int, error: OSError) -> None:
        super().__init__(f"could not connect to {host}:{port}: {error.strerror or error}")
        self.errno = error.errno
        self.host = host
        self.port = port


def quickack(sock: socket.socket) -> None:
    """Ask Linux to acknowledge at once (``TCP_QUICKACK``; it is not sticky, so it is set
    again after the TLS handshake).  Without it a server that sends TLS 1.3 session tickets
    and then its greeting or EHLO reply with Nagle on waits ~40 ms for our delayed ACK."""
    option = getattr(socket, "TCP_QUICKACK", None)
    if option is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, option, 1)


def certificate_subject(cert: Mapping[str, Any] | None) -> str | None:
    """``commonName=mail.example.com`` from a verified peer certificate, or None."""
    if not cert:
        return None
    parts = [f"{key}={value}" for rdn in cert.get("subject", ()) for key, value in rdn]
    return ", ".join(parts) or None
