"""SCRAM, client side (RFC 5802, RFC 7677): SASLprep, the three messages, channel binding.

::

    C: n,,n=user,r=<client nonce>                        client-first-message
    S: r=<client nonce><server nonce>,s=<salt>,i=4096     server-first-message
    C: c=biws,r=<both nonces>,p=<ClientProof>            client-final-message
    S: v=<ServerSignature>                                server-final-message

The password never crosses the wire: the client proves it knows ``SaltedPassword =
PBKDF2(HMAC-H, SASLprep(password), salt, i)``, and the server proves it knows it too (its
signature is checked; an exchange that ends without a valid one is a failure).  Rules
checked here, each before any costly work:

- the server nonce must begin with ours and add to it (RFC 5802 §5.1 ``r``);
- the iteration count must lie between :data:`MIN_ITERATIONS` (the RFC's own floor: a
  lower count makes an offline guess at the password cheaper) and :data:`MAX_ITERATIONS`
  (a hostile server asking ten million would cost seconds of CPU per connection); a count
  outside is refused before any key is derived;
- a mandatory extension (``m=``) or a server error (``e=``) ends the exchange.

Channel binding (``-PLUS``, RFC 5802 §6) uses ``tls-server-end-point`` (RFC 5929 §4.1):
the hash of the server's certificate (DER), with the certificate's own signature hash,
except that MD5 and SHA-1 are replaced by SHA-256.

Nothing here does I/O; nothing here logs.  Error texts never contain the password, the
salted password or any key derived from it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass, field
from typing import Final

from .errors import SocketMailError
from .secret import Secret

__all__ = [
    "MAX_ITERATIONS",
    "MIN_ITERATIONS",
    "ChannelBinding",
    "SASLprepError",
    "ScramClient",
    "ScramError",
    "saslprep",
    "tls_server_end_point",
]

MIN_ITERATIONS: Final = 4096
"""Fewest iterations accepted (RFC 5802 §5.1 asks servers for at least 4096)."""
MAX_ITERATIONS: Final = 100_000
"""Most iterations accepted: 30 ms of CPU for SHA-256 or SHA-1 where this was measured
(4096 took 1.4 ms; ten million would take 3 s).  Dovecot and PostgreSQL use 4096; a server
asking more is refused before any key is derived."""

_NONCE_BYTES: Final = 24
_PRINTABLE_NO_COMMA: Final = re.compile(r"[\x21-\x2b\x2d-\x7e]+")
_DIGITS: Final = re.compile(r"[0-9]{1,10}")


class ScramError(Exception):
    """The server's side of the exchange is unacceptable (bad nonce, iteration count out of
    bounds, wrong or missing signature, a server error).  The text is safe to show."""


class SASLprepError(SocketMailError, ValueError):
    """A credential cannot be prepared with SASLprep (RFC 4013): it holds a prohibited
    character, breaks the bidirectional rule, or is empty after preparation.  The text
    names the rule, never the character or its position."""


# -- SASLprep (RFC 4013, profile of stringprep, RFC 3454) -----------------------------------

_PROHIBITED: Final = (
    (stringprep.in_table_c12, "a non-ASCII space"),
    (stringprep.in_table_c21, "an ASCII control character"),
    (stringprep.in_table_c22, "a non-ASCII control character"),
    (stringprep.in_table_c3, "a private-use character"),
    (stringprep.in_table_c4, "a non-character code point"),
    (stringprep.in_table_c5, "a surrogate code point"),
    (stringprep.in_table_c6, "a character inappropriate for plain text"),
    (stringprep.in_table_c7, "a character inappropriate for canonical representation"),
    (stringprep.in_table_c8, "a character that changes display properties"),
    (stringprep.in_table_c9, "a tagging character"),
)


def saslprep(text: str, *, what: str = "the password", allow_unassigned: bool = True) -> str:
    """``text`` prepared by SASLprep (RFC 4013 §2): non-ASCII spaces mapped to SPACE,
    "commonly mapped to nothing" characters removed, NFKC (Unicode 3.2), then prohibited
    output and the bidirectional rule (RFC 3454 §6) checked.  Unassigned code points are
    allowed by default, as for a query (RFC 5802 §2.2 prepares the password that way).

    Raise :class:`SASLprepError` naming ``what`` and the rule broken; the result may not
    be empty.
    """
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch for ch in text if not stringprep.in_table_b1(ch)
    )
    prepared = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    if not prepared:
        raise SASLprepError(f"{what} is empty after SASLprep (RFC 4013)")
    for ch in prepared:
        for test, name in _PROHIBITED:
            if test(ch):
                raise SASLprepError(f"{what} contains {name}, which SASLprep (RFC 4013) forbids")
        if not allow_unassigned and stringprep.in_table_a1(ch):
            raise SASLprepError(f"{what} contains an unassigned code point (RFC 4013)")
    if any(stringprep.in_table_d1(ch) for ch in prepared):
        if any(stringprep.in_table_d2(ch) for ch in prepared):
            raise SASLprepError(
                f"{what} mixes right-to-left and left-to-right characters (RFC 3454 §6)"
            )
        if not (stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1])):
            raise SASLprepError(
                f"{what} has right-to-left characters but does not begin and end with one "
                "(RFC 3454 §6)"
            )
    return prepared


# -- channel binding (RFC 5929 §4) ----------------------------------------------------------

_SIGNATURE_HASHES: Final = {
    "1.2.840.113549.1.1.4": "sha256",  # md5WithRSAEncryption: SHA-256 by RFC 5929 §4.1
    "1.2.840.113549.1.1.5": "sha256",  # sha1WithRSAEncryption: likewise
    "1.2.840.113549.1.1.11": "sha256",
    "1.2.840.113549.1.1.12": "sha384",
    "1.2.840.113549.1.1.13": "sha512",
    "1.2.840.113549.1.1.14": "sha224",
    "1.2.840.10045.4.1": "sha256",  # ecdsa-with-SHA1
    "1.2.840.10045.4.3.1": "sha224",
    "1.2.840.10045.4.3.2": "sha256",
    "1.2.840.10045.4.3.3": "sha384",
    "1.2.840.10045.4.3.4": "sha512",
    "1.2.840.10040.4.3": "sha256",  # dsa-with-sha1
    "2.16.840.1.101.3.4.3.1": "sha224",
    "2.16.840.1.101.3.4.3.2": "sha256",
}
_RSASSA_PSS: Final = "1.2.840.113549.1.1.10"
_DIGESTS: Final = {
    "1.3.14.3.2.26": "sha256",  # SHA-1, replaced
    "2.16.840.1.101.3.4.2.1": "sha256",
    "2.16.840.1.101.3.4.2.2": "sha384",
    "2.16.840.1.101.3.4.2.3": "sha512",
    "2.16.840.1.101.3.4.2.4": "sha224",
}


@dataclass(frozen=True, slots=True)
class ChannelBinding:
    """Channel binding data for the gs2 header and ``c=`` (RFC 5802 §6)."""

    name: str
    data: bytes = field(repr=False)


def tls_server_end_point(certificate: bytes) -> ChannelBinding | None:
    """The ``tls-server-end-point`` binding of a DER certificate (RFC 5929 §4.1): its hash
    with the hash of its signature algorithm, SHA-256 for MD5 and SHA-1.  None when the
    algorithm has no single hash (Ed25519, Ed448) or the DER cannot be read: no -PLUS then."""
    try:
        name = _signature_hash(certificate)
    except ValueError:
        return None
    if name is None:
        return None
    return ChannelBinding("tls-server-end-point", hashlib.new(name, certificate).digest())


def _signature_hash(der: bytes) -> str | None:
    _tag, start, _end = _tlv(der, 0, 0x30)  # Certificate
    _tag, _s, after_tbs = _tlv(der, start, 0x30)  # tbsCertificate
    _tag, alg_start, alg_end = _tlv(der, after_tbs, 0x30)  # signatureAlgorithm
    _tag, oid_start, oid_end = _tlv(der, alg_start, 0x06)
    oid = _oid(der[oid_start:oid_end])
    if oid != _RSASSA_PSS:
        return _SIGNATURE_HASHES.get(oid)
    # RSASSA-PSS-params: SEQUENCE { [0] hashAlgorithm DEFAULT sha1, ... } (RFC 4055 §3.1).
    if oid_end >= alg_end:
        return "sha256"
    _tag, params, params_end = _tlv(der, oid_end, 0x30)
    if params == params_end or der[params] != 0xA0:
        return "sha256"
    _tag, inner, _e = _tlv(der, params, 0xA0)
    _tag, hash_alg, _e = _tlv(der, inner, 0x30)
    _tag, h_start, h_end = _tlv(der, hash_alg, 0x06)
    return _DIGESTS.get(_oid(der[h_start:h_end]))


def _tlv(data: bytes, pos: int, tag: int) -> tuple[int, int, int]:
    """The DER element at ``pos`` (which must have ``tag``): (tag, content start, end)."""
    if pos + 2 > len(data) or data[pos] != tag:
        raise ValueError("unexpected DER")
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or pos + count > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise ValueError("DER element past the end")
    return tag, pos, pos + length


def _oid(content: bytes) -> str:
    if not content:
        raise ValueError("empty OID")
    first = min(content[0] // 40, 2)
    arcs = [first, content[0] - 40 * first]
    value = 0
    for byte in content[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    return ".".join(map(str, arcs))


# -- the exchange ---------------------------------------------------------------------------


def _saslname(name: str) -> str:
    """RFC 5802 §5.1 ``n=``: "=" as "=3D", "," as "=2C"."""
    return name.replace("=", "=3D").replace(",", "=2C")


class ScramClient:
    """One SCRAM exchange, client side, for hash ``hash_name`` (``"sha1"``, ``"sha256"``).

    ``binding``: the channel binding to use (a -PLUS mechanism); ``binding_possible``: the
    client could bind this channel but the server did not offer -PLUS (gs2 flag ``y``,
    which lets a server that does support it detect the downgrade).  ``nonce`` is for tests
    (RFC vectors); by default 24 random bytes from :mod:`secrets`, URL-safe base64.

    :meth:`first` then :meth:`final` then :meth:`verify`; :attr:`verified` is True only
    after the server's signature matched.  Credentials are prepared (SASLprep) in the
    constructor, so an unusable password fails before anything is sent.
    """

    def __init__(
        self,
        hash_name: str,
        username: str,
        password: Secret[str],
        *,
        binding: ChannelBinding | None = None,
        binding_possible: bool = False,
        nonce: str | None = None,
    ) -> None:
        self._hash = hash_name
        self._username = saslprep(username, what="the user name")
        self._password = Secret(saslprep(password.reveal()).encode("utf-8"))
        self._nonce = nonce if nonce is not None else secrets.token_urlsafe(_NONCE_BYTES)
        if not _PRINTABLE_NO_COMMA.fullmatch(self._nonce):
            raise ValueError("a SCRAM nonce is printable ASCII without a comma")
        self._binding = binding
        if binding is not None:
            self._gs2 = f"p={binding.name},,".encode("ascii")
        else:
            self._gs2 = b"y,," if binding_possible else b"n,,"
        self._first_bare = f"n={_saslname(self._username)},r={self._nonce}".encode()
        self._server_signature: bytes | None = None
        self.proof: str = ""
        """The base64 ClientProof once :meth:`final` ran (for redaction)."""
        self.verified = False

    def __repr__(self) -> str:
        return f"<ScramClient {self._hash} verified={self.verified}>"

    def first(self) -> bytes:
        """The client-first-message."""
        return self._gs2 + self._first_bare

    def final(self, server_first: bytes) -> bytes:
        """The client-final-message answering ``server_first``; raise :class:`ScramError`
        when the server's message is unacceptable (checked before deriving any key)."""
        nonce, salt, iterations = self._parse_server_first(server_first)
        channel = base64.b64encode(self._gs2 + (self._binding.data if self._binding else b""))
        without_proof = b"c=" + channel + b",r=" + nonce.encode("ascii")
        auth_message = self._first_bare + b"," + server_first + b"," + without_proof
        salted = hashlib.pbkdf2_hmac(self._hash, self._password.reveal(), salt, iterations)
        client_key = self._hmac(salted, b"Client Key")
        stored_key = hashlib.new(self._hash, client_key).digest()
        signature = self._hmac(stored_key, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self._server_signature = self._hmac(self._hmac(salted, b"Server Key"), auth_message)
        self.proof = base64.b64encode(proof).decode("ascii")
        return without_proof + b",p=" + self.proof.encode("ascii")

    def verify(self, server_final: bytes) -> None:
        """Check the server-final-message: ``v=`` must carry the expected ServerSignature
        (compared in constant time); ``e=`` is the server's error.  Raise
        :class:`ScramError` otherwise; set :attr:`verified` on success."""
        expected = self._server_signature
        if expected is None:
            raise ScramError("the server sent its final message before our proof")
        text = _ascii(server_final, "server-final-message")
        if text.startswith("e="):
            raise ScramError(f"the server reported a SCRAM error: {_shown(text[2:])}")
        if not text.startswith("v="):
            raise ScramError("the server-final-message has no verifier (v=)")
        value = text[2:].split(",", 1)[0]
        try:
            signature = base64.b64decode(value, validate=True)
        except binascii.Error:
            raise ScramError("the server's verifier is not valid base64") from None
        if not hmac.compare_digest(signature, expected):
            raise ScramError(
                "the server's signature is wrong: it did not prove that it knows the password"
            )
        self.verified = True

    def _hmac(self, key: bytes, message: bytes) -> bytes:
        return hmac.new(key, message, self._hash).digest()

    def _parse_server_first(self, message: bytes) -> tuple[str, bytes, int]:
        text = _ascii(message, "server-first-message")
        if text.startswith("m="):
            raise ScramError("the server requires a SCRAM extension we do not support (m=)")
        if text.startswith("e="):
            raise ScramError(f"the server reported a SCRAM error: {_shown(text[2:])}")
        parts = text.split(",")
        if len(parts) < 3 or [p[:2] for p in parts[:3]] != ["r=", "s=", "i="]:
            raise ScramError("the server-first-message is malformed (expected r=,s=,i=)")
        nonce, salt_text, count = (p[2:] for p in parts[:3])
        if not (
            _PRINTABLE_NO_COMMA.fullmatch(nonce)
            and nonce.startswith(self._nonce)
            and len(nonce) > len(self._nonce)
        ):
            raise ScramError("the server's nonce does not extend ours")
        try:
            salt = base64.b64decode(salt_text, validate=True)
        except binascii.Error:
            raise ScramError("the server's salt is not valid base64") from None
        if not salt:
            raise ScramError("the server's salt is empty")
        if not _DIGITS.fullmatch(count):
            raise ScramError("the server's iteration count is not a number")
        iterations = int(count)
        if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
            raise ScramError(
                f"the server asks for {iterations} iterations; accepted: "
                f"{MIN_ITERATIONS} to {MAX_ITERATIONS}"
            )
        return nonce, salt, iterations


def _shown(text: str) -> str:
    """Server text for an error message: printable ASCII only, at most 100 characters."""
    return re.sub(r"[^\x20-\x7e]", "?", text[:100])


def _ascii(message: bytes, what: str) -> str:
    try:
        return message.decode("utf-8")
    except UnicodeDecodeError:
        raise ScramError(f"the {what} is not UTF-8") from None
