"""SCRAM (RFC 5802, RFC 7677) and SASLprep (RFC 4013): the RFC vectors byte for byte, the
rules a hostile server tests (nonce, iteration count, signature), channel binding
(RFC 5929 §4.1), and whole sessions against an RFC 5802 server written here.

The server below is the other side of the exchange, written from the RFC for these tests:
it checks the client's proof and channel binding and can be told to misbehave.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID
from django.core.mail import EmailMessage

from django_socketmail.email_backend import EmailBackend
from django_socketmail.smtp import AuthenticationError, NotSupportedError, SocketMailError
from django_socketmail.smtp import scram as scram_module
from django_socketmail.smtp.config import ClientConfig, SessionInfo, TLSMode
from django_socketmail.smtp.opening import Opening
from django_socketmail.smtp.protocol import SMTPConnection
from django_socketmail.smtp.sasl import (
    DEFAULT_PREFERENCE,
    MECHANISMS,
    AuthContext,
    ChallengeRefused,
    ScramSHA1,
    ScramSHA256,
    ScramSHA256Plus,
)
from django_socketmail.smtp.scram import (
    MAX_ITERATIONS,
    MIN_ITERATIONS,
    SASLprepError,
    ScramClient,
    ScramError,
    saslprep,
    tls_server_end_point,
)
from django_socketmail.smtp.secret import Secret
from django_socketmail.smtp.transcript import Transcript

from .audit_text import audit_text
from .hostile.server import Connection, HostileSMTPServer, Response, reply, standard_session

# -- the RFC vectors ------------------------------------------------------------------------


def test_rfc5802_section5_scram_sha1_vector() -> None:
    client = ScramClient("sha1", "user", Secret("pencil"), nonce="fyko+d2lbbFgONRv9qkxdawL")
    assert client.first() == b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"
    final = client.final(b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096")
    assert final == (
        b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
    )
    assert not client.verified
    client.verify(b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=")
    assert client.verified


def test_rfc7677_section3_scram_sha256_vector() -> None:
    client = ScramClient("sha256", "user", Secret("pencil"), nonce="rOprNGfwEbeRWgbNEkqO")
    assert client.first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    final = client.final(
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    assert final == (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    client.verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    assert client.verified


def test_mechanisms_answer_the_rfc_exchange_as_secrets() -> None:
    mechanism = ScramSHA256("user", Secret("pencil"))
    mechanism._client = ScramClient(  # the RFC's nonce instead of a random one
        "sha256", "user", Secret("pencil"), nonce="rOprNGfwEbeRWgbNEkqO"
    )
    first = mechanism.initial_response()
    assert isinstance(first, Secret) and first.reveal() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    final = mechanism.respond(
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    assert final.reveal().endswith(b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    assert "pencil" not in repr(final) and "dHzb" not in repr(mechanism)
    assert not mechanism.server_verified()
    assert mechanism.respond(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=").reveal() == b""
    assert mechanism.server_verified()
    assert "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=" in mechanism.echo_forms()


def test_registry_preference_and_flags() -> None:
    assert DEFAULT_PREFERENCE[:3] == ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1")
    for name in ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1"):
        assert not MECHANISMS[name].sends_password  # allowed without TLS, like CRAM-MD5
    assert ScramSHA256Plus.binds_channel and not ScramSHA256.binds_channel


# -- SASLprep (RFC 4013 §3, its own examples) -----------------------------------------------


@pytest.mark.parametrize(
    ("given", "prepared"),
    [
        ("I\u00adX", "IX"),  # SOFT HYPHEN mapped to nothing
        ("user", "user"),
        ("USER", "USER"),  # case preserved
        ("\u00aa", "a"),  # NFKC
        ("\u2168", "IX"),  # NFKC
        ("pass\u00a0word", "pass word"),  # a non-ASCII space becomes SPACE
        ("p\u200bw", "pw"),  # ZERO WIDTH SPACE mapped to nothing
    ],
)
def test_saslprep_rfc4013_examples(given: str, prepared: str) -> None:
    assert saslprep(given) == prepared


@pytest.mark.parametrize(
    ("given", "rule"),
    [
        ("\u0007", "control character"),  # RFC 4013 §3 example 6
        ("\u0627\u0031", "right-to-left"),  # example 7: the bidi rule
        ("a\u0627b", "mixes right-to-left"),
        ("\ue000", "private-use"),
        ("\u00ad", "empty"),
    ],
)
def test_saslprep_refuses_prohibited_output_clearly(given: str, rule: str) -> None:
    with pytest.raises(SASLprepError, match=rule) as info:
        saslprep(given)
    assert given not in str(info.value)


def test_a_password_saslprep_refuses_fails_before_anything_is_sent() -> None:
    with pytest.raises(SASLprepError, match="the password contains an ASCII control"):
        ScramSHA256("user", Secret("bad\x07password"))
    assert isinstance(SASLprepError("x"), SocketMailError)


def test_the_prepared_password_is_what_is_hashed() -> None:
    """SASLprep makes "I\u00adX" and "IX" the same password: the same proof."""
    proofs = []
    for password in ("I\u00adX", "IX"):
        client = ScramClient("sha256", "u", Secret(password), nonce="abc")
        proofs.append(client.final(b"r=abcdef,s=c2FsdA==,i=4096"))
    assert proofs[0] == proofs[1]


def test_user_name_escaped_in_n_attribute() -> None:
    client = ScramClient("sha256", "a=b,c", Secret("p"), nonce="xyz")
    assert client.first() == b"n,,n=a=3Db=2Cc,r=xyz"


def test_nonce_is_random_printable_and_long() -> None:
    nonces = set()
    for _ in range(50):
        first = ScramClient("sha256", "u", Secret("p")).first()
        nonce = first.split(b",r=")[1]
        assert len(nonce) >= 32 and b"," not in nonce
        assert all(0x21 <= byte <= 0x7E for byte in nonce)
        nonces.add(nonce)
    assert len(nonces) == 50


# -- what a hostile server tries ------------------------------------------------------------


def _client() -> ScramClient:
    return ScramClient("sha256", "user", Secret("pencil"), nonce="ournonce")


@pytest.mark.parametrize(
    ("server_first", "message"),
    [
        (b"r=othernonceXYZ,s=c2FsdA==,i=4096", "nonce does not extend ours"),
        (b"r=ournonce,s=c2FsdA==,i=4096", "nonce does not extend ours"),  # nothing added
        (b"r=our,s=c2FsdA==,i=4096", "nonce does not extend ours"),
        (b"r=ournonceX,s=!!,i=4096", "salt is not valid base64"),
        (b"r=ournonceX,s=,i=4096", "salt is empty"),
        (b"r=ournonceX,s=c2FsdA==,i=-1", "not a number"),
        (b"r=ournonceX,s=c2FsdA==,i=" + b"9" * 5000, "not a number"),
        (b"r=ournonceX,s=c2FsdA==,i=4095", "accepted: 4096 to 100000"),
        (b"r=ournonceX,s=c2FsdA==,i=100001", "accepted: 4096 to 100000"),
        (b"m=ext,r=ournonceX,s=c2FsdA==,i=4096", "extension"),
        (b"e=other-error", "SCRAM error: other-error"),
        (b"s=c2FsdA==,r=ournonceX,i=4096", "malformed"),
        (b"r=ournonceX,s=c2FsdA==", "malformed"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_unacceptable_server_first(server_first: bytes, message: str) -> None:
    with pytest.raises(ScramError, match=message):
        _client().final(server_first)


def test_ten_million_iterations_cost_no_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object) -> bytes:
        raise AssertionError("a key was derived")

    monkeypatch.setattr(scram_module.hashlib, "pbkdf2_hmac", forbidden)
    started = time.process_time()
    with pytest.raises(ScramError, match="10000000 iterations"):
        _client().final(b"r=ournonceX,s=c2FsdA==,i=10000000")
    assert time.process_time() - started < 0.01


def test_the_cap_itself_is_accepted_and_bounded() -> None:
    started = time.process_time()
    _client().final(b"r=ournonceX,s=c2FsdA==,i=%d" % MAX_ITERATIONS)
    spent = time.process_time() - started
    assert spent < 1.0, spent  # the documented cap stays cheap
    _client().final(b"r=ournonceX,s=c2FsdA==,i=%d" % MIN_ITERATIONS)


@pytest.mark.parametrize(
    ("server_final", "message"),
    [
        (b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=", "did not prove"),  # SHA-1's, not ours
        (b"v=" + base64.b64encode(b"\0" * 32), "did not prove"),
        (b"v=@@@", "not valid base64"),
        (b"e=invalid-proof", "SCRAM error: invalid-proof"),
        (b"x=1", "no verifier"),
    ],
)
def test_wrong_or_missing_server_signature(server_final: bytes, message: str) -> None:
    client = _client()
    client.final(b"r=ournonceX,s=c2FsdA==,i=4096")
    with pytest.raises(ScramError, match=message):
        client.verify(server_final)
    assert not client.verified


def test_final_before_proof_is_refused() -> None:
    with pytest.raises(ScramError):
        _client().verify(b"v=abcd")


def test_mechanism_turns_scram_errors_into_refusals() -> None:
    mechanism = ScramSHA1("user", Secret("pencil"))
    mechanism.initial_response()
    with pytest.raises(ChallengeRefused, match="nonce"):
        mechanism.respond(b"r=notours,s=c2FsdA==,i=4096")


# -- channel binding (RFC 5929 §4.1) --------------------------------------------------------


def _certificate(key: Any, algorithm: hashes.HashAlgorithm | None, **sign: Any) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "scram.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    cert = builder.sign(key, algorithm, **sign)
    return cert.public_bytes(serialization_der())


def serialization_der() -> Any:
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        (hashes.SHA256(), "sha256"),
        (hashes.SHA384(), "sha384"),
        (hashes.SHA512(), "sha512"),
        (hashes.SHA224(), "sha224"),
    ],
)
def test_tls_server_end_point_hash_follows_the_rsa_signature(
    rsa_key: rsa.RSAPrivateKey, algorithm: hashes.HashAlgorithm, expected: str
) -> None:
    der = _certificate(rsa_key, algorithm)
    binding = tls_server_end_point(der)
    assert binding is not None and binding.name == "tls-server-end-point"
    assert binding.data == hashlib.new(expected, der).digest()


SHA256_WITH_RSA = bytes.fromhex("06092a864886f70d01010b")


@pytest.mark.parametrize("last_arc", [4, 5], ids=["md5WithRSA", "sha1WithRSA"])
def test_tls_server_end_point_replaces_md5_and_sha1_by_sha256(
    rsa_key: rsa.RSAPrivateKey, last_arc: int
) -> None:
    """RFC 5929 §4.1.  OpenSSL 3 no longer signs with MD5 or SHA-1, so the certificate's
    outer signatureAlgorithm is rewritten (same length); only the OID is read."""
    der = _certificate(rsa_key, hashes.SHA256())
    at = der.rindex(SHA256_WITH_RSA)
    old = der[:at] + SHA256_WITH_RSA[:-1] + bytes([last_arc]) + der[at + len(SHA256_WITH_RSA) :]
    binding = tls_server_end_point(old)
    assert binding is not None and binding.data == hashlib.sha256(old).digest()


def test_tls_server_end_point_with_ecdsa_pss_and_eddsa(rsa_key: rsa.RSAPrivateKey) -> None:
    der = _certificate(ec.generate_private_key(ec.SECP384R1()), hashes.SHA384())
    assert tls_server_end_point(der) == scram_module.ChannelBinding(
        "tls-server-end-point", hashlib.sha384(der).digest()
    )
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA512()), salt_length=32)
    der = _certificate(rsa_key, hashes.SHA512(), rsa_padding=pss)
    binding = tls_server_end_point(der)
    assert binding is not None and binding.data == hashlib.sha512(der).digest()
    assert tls_server_end_point(_certificate(ed25519.Ed25519PrivateKey.generate(), None)) is None
    assert tls_server_end_point(b"\x30\x82garbage") is None
    assert tls_server_end_point(b"") is None


def test_trustme_certificate_binding(ca: Any) -> None:
    cert = ca.issue_cert("127.0.0.1")
    der = x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).public_bytes(
        serialization_der()
    )
    loaded = x509.load_der_x509_certificate(der)
    assert loaded.signature_hash_algorithm is not None
    expected = loaded.signature_hash_algorithm.name
    binding = tls_server_end_point(der)
    assert binding is not None and binding.data == hashlib.new(expected, der).digest()


def test_plus_sends_the_binding_and_non_plus_says_it_could() -> None:
    der = b"0" * 10
    binding = scram_module.ChannelBinding("tls-server-end-point", b"\x01\x02")
    plus = ScramClient("sha256", "u", Secret("p"), binding=binding, nonce="n1")
    assert plus.first() == b"p=tls-server-end-point,,n=u,r=n1"
    final = plus.final(b"r=n1x,s=c2FsdA==,i=4096")
    assert final.startswith(b"c=" + base64.b64encode(b"p=tls-server-end-point,,\x01\x02") + b",")
    could = ScramClient("sha256", "u", Secret("p"), binding_possible=True, nonce="n1")
    assert could.first() == b"y,,n=u,r=n1"
    assert could.final(b"r=n1x,s=c2FsdA==,i=4096").startswith(b"c=eSws,")  # base64("y,,")
    assert not ScramSHA256Plus.usable(AuthContext())
    assert not ScramSHA256Plus.usable(AuthContext(certificate=der))  # not a certificate


# -- an RFC 5802 server, for whole sessions -------------------------------------------------


@dataclass
class ScramServer:
    """The server side of one SCRAM exchange (RFC 5802 §3 and §5), for tests.

    ``certificate``: its own DER certificate (for ``tls-server-end-point``);
    ``misbehave``: ``"foreign-nonce"``, ``"wrong-signature"``, ``"no-signature"``
    (235 right after the client's proof) or ``""``.
    """

    hash_name: str
    users: dict[str, str]
    iterations: int = 4096
    certificate: bytes | None = None
    offers_plus: bool = False
    misbehave: str = ""

    def __post_init__(self) -> None:
        self.salt = secrets.token_bytes(16)
        self.failure = ""

    def _h(self, data: bytes) -> bytes:
        return hashlib.new(self.hash_name, data).digest()

    def _hmac(self, key: bytes, data: bytes) -> bytes:
        return hmac.new(key, data, self.hash_name).digest()

    def first(self, client_first: bytes) -> bytes:
        flag, authzid, bare = client_first.split(b",", 2)
        assert authzid == b""
        self.gs2 = flag + b"," + authzid + b","
        self.flag = flag
        attrs = dict(part.split(b"=", 1) for part in bare.split(b","))
        self.user = attrs[b"n"].decode().replace("=2C", ",").replace("=3D", "=")
        self.client_first_bare = bare
        own = base64.b64encode(secrets.token_bytes(12)).decode()
        nonce = attrs[b"r"].decode() + own
        if self.misbehave == "foreign-nonce":
            nonce = "attacker" + own
        salt = base64.b64encode(self.salt).decode()
        self.server_first = f"r={nonce},s={salt},i={self.iterations}".encode()
        return self.server_first

    def final(self, client_final: bytes) -> bytes | None:
        """The server-final-message, or None (after setting ``failure``) to answer 535."""
        without_proof, _, proof_text = client_final.rpartition(b",p=")
        attrs = dict(part.split(b"=", 1) for part in without_proof.split(b","))
        expected_c = self.gs2
        if self.flag.startswith(b"p="):
            if self.flag != b"p=tls-server-end-point" or self.certificate is None:
                self.failure = "unsupported channel binding"
                return None
            binding = tls_server_end_point(self.certificate)
            assert binding is not None
            expected_c += binding.data
        elif self.flag == b"y" and self.offers_plus:
            self.failure = "downgrade: the client could bind but the server offers -PLUS"
            return None
        if base64.b64decode(attrs[b"c"]) != expected_c:
            self.failure = "channel binding mismatch"
            return None
        password = saslprep(self.users.get(self.user, secrets.token_hex(8))).encode()
        salted = hashlib.pbkdf2_hmac(self.hash_name, password, self.salt, self.iterations)
        client_key = self._hmac(salted, b"Client Key")
        auth_message = self.client_first_bare + b"," + self.server_first + b"," + without_proof
        signature = self._hmac(self._h(client_key), auth_message)
        proof = base64.b64decode(proof_text)
        recovered = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if self._h(recovered) != self._h(client_key):
            self.failure = "invalid proof"
            return None
        server_signature = self._hmac(self._hmac(salted, b"Server Key"), auth_message)
        if self.misbehave == "wrong-signature":
            server_signature = bytes(len(server_signature))
        return b"v=" + base64.b64encode(server_signature)


def scram_auth(make: Callable[[], ScramServer], *, final: Response | None = None) -> Any:
    """A hostile-server rule for ``AUTH SCRAM-*``: plays a :class:`ScramServer`; ``final``
    replaces the 235 (or the 535 the server itself would send)."""
    success = reply(235, "2.7.0 Authentication successful") if final is None else final
    failure = reply(535, "5.7.8 Authentication failed") if final is None else final

    def run(conn: Connection, line: bytes) -> None:
        words = line.split()
        if len(words) < 2 or not words[1].upper().startswith(b"SCRAM-"):
            conn.reply(504, "5.5.4 Unrecognized authentication type")
            return
        server = make()
        server.hash_name = "sha1" if words[1].upper().startswith(b"SCRAM-SHA-1") else "sha256"
        conn.server.scram_servers.append(server)  # type: ignore[attr-defined]
        initial = base64.b64decode(words[2]) if len(words) > 2 else b""
        conn.reply(334, base64.b64encode(server.first(initial)))
        answer = conn.readline().strip()
        if answer == b"*":
            conn.reply(501, "5.7.0 Authentication cancelled")
            return
        server_final = server.final(base64.b64decode(answer))
        if server_final is None:
            conn.run(failure, line)
            return
        if server.misbehave == "no-signature":
            conn.run(success, line)
            return
        conn.reply(334, base64.b64encode(server_final))
        answer = conn.readline().strip()
        if answer == b"*":
            conn.reply(501, "5.7.0 Authentication cancelled")
            return
        assert answer == b"", answer
        conn.run(success, line)

    return run


USER = "scram-user"
PASSWORD = "scram-Pa55\u00a0w\u00f6rd"  # a non-ASCII space: SASLprep maps it to SPACE
SCRAM_EXTENSIONS = ("PIPELINING", "AUTH PLAIN LOGIN CRAM-MD5 SCRAM-SHA-1 SCRAM-SHA-256")


@pytest.fixture
def scram_server() -> Iterator[Callable[..., HostileSMTPServer]]:
    servers: list[HostileSMTPServer] = []

    def start(
        *, extensions: tuple[str, ...] = SCRAM_EXTENSIONS, final: Response | None = None, **kw: Any
    ) -> HostileSMTPServer:
        rule = scram_auth(lambda: ScramServer("sha256", {USER: PASSWORD}, **kw), final=final)
        server = HostileSMTPServer([standard_session({"AUTH": rule}, extensions=extensions)])
        server.scram_servers = []  # type: ignore[attr-defined]
        servers.append(server.start())
        return server

    yield start
    for server in servers:
        server.stop()


def _backend(server: HostileSMTPServer, **options: Any) -> EmailBackend:
    defaults: dict[str, Any] = {"timeout": 2, "audit_log": False}
    return EmailBackend(
        host=server.host,
        port=server.port,
        username=USER,
        password=PASSWORD,
        local_hostname="client.example",
        **(defaults | options),
    )


APIS = ["sync", "async"]
T = TypeVar("T")


def run(awaitable: Awaitable[T]) -> T:
    """Run in a fresh event loop in asyncio's debug mode."""

    async def main() -> T:
        return await awaitable

    return asyncio.run(main(), debug=True)


def _send(backend: EmailBackend, api: str = "sync") -> int:
    """One message through ``send_messages()`` or ``await asend_messages()`` (``api``)."""
    message = EmailMessage("s", "b", "from@example.com", ["to@example.com"])
    try:
        if api == "async":
            return run(backend.asend_messages([message]))
        return backend.send_messages([message])
    finally:
        backend.close()


def _auth_lines(server: HostileSMTPServer) -> list[bytes]:
    return [c for c in server.commands if c.upper().startswith(b"AUTH")]


def _no_password_on_wire(server: HostileSMTPServer) -> None:
    wire = server.received
    for form in (PASSWORD.encode(), base64.b64encode(PASSWORD.encode()), b"Pa55"):
        assert form not in wire


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
@pytest.mark.parametrize("api", APIS)
def test_session_authenticates_without_tls_and_without_sending_the_password(
    scram_server: Callable[..., HostileSMTPServer], mechanism: str, api: str
) -> None:
    server = scram_server()
    assert _send(_backend(server, auth_mechanisms=[mechanism]), api) == 1
    assert server.wait_closed()
    assert [line.split()[1] for line in _auth_lines(server)] == [mechanism.encode()]
    assert server.scram_servers[0].failure == ""  # type: ignore[attr-defined]
    assert server.scram_servers[0].flag == b"n"  # type: ignore[attr-defined]
    assert len(server.messages) == 1
    _no_password_on_wire(server)
    assert server.errors == [] and server.violations == []


@pytest.mark.parametrize("api", APIS)
def test_default_preference_picks_scram_sha_256_first(
    scram_server: Callable[..., HostileSMTPServer],
    api: str,
) -> None:
    server = scram_server()
    assert _send(_backend(server), api) == 1  # no auth_mechanisms, no TLS, no cleartext allowed
    assert [line.split()[1] for line in _auth_lines(server)] == [b"SCRAM-SHA-256"]


@pytest.mark.parametrize(
    ("misbehave", "note"),
    [
        ("wrong-signature", "did not prove that it knows the password"),
        ("foreign-nonce", "nonce does not extend ours"),
        ("no-signature", "without proving that it knows the password"),
    ],
)
@pytest.mark.parametrize("api", APIS)
def test_a_server_that_cannot_prove_itself_is_a_failed_auth(
    scram_server: Callable[..., HostileSMTPServer], misbehave: str, note: str, api: str
) -> None:
    server = scram_server(misbehave=misbehave)
    with pytest.raises(AuthenticationError, match=note):
        _send(_backend(server), api)
    assert server.wait_closed()
    verbs = [c.split()[0].upper() for c in server.commands if c.split()]
    assert b"MAIL" not in verbs and server.messages == []
    assert len(_auth_lines(server)) == 1  # no other mechanism tried
    if misbehave != "no-signature":
        assert b"*" in server.commands  # the exchange was cancelled
    if misbehave == "foreign-nonce":
        assert len(server.commands) == verbs.index(b"AUTH") + 2 + (b"QUIT" in verbs)
    _no_password_on_wire(server)


@pytest.mark.parametrize("api", APIS)
def test_ten_million_iterations_refused_quickly_through_a_session(
    scram_server: Callable[..., HostileSMTPServer], monkeypatch: pytest.MonkeyPatch, api: str
) -> None:
    server = scram_server(iterations=10_000_000)
    calls: list[int] = []
    real = scram_module.hashlib.pbkdf2_hmac
    monkeypatch.setattr(scram_module.hashlib, "pbkdf2_hmac", lambda *a: calls.append(1) or real(*a))
    started = time.monotonic()
    with pytest.raises(AuthenticationError, match="10000000 iterations"):
        _send(_backend(server), api)
    assert time.monotonic() - started < 1.0
    assert calls == []


@pytest.mark.parametrize("api", APIS)
def test_535_after_scram_tries_no_other_mechanism(
    scram_server: Callable[..., HostileSMTPServer],
    api: str,
) -> None:
    server = scram_server()
    wrong = EmailBackend(
        host=server.host, port=server.port, username=USER, password="wrong password",
        timeout=2, audit_log=False, allow_cleartext_auth=True,
    )  # fmt: skip
    with pytest.raises(AuthenticationError) as info:
        _send(wrong, api)
    assert info.value.smtp_code == 535
    assert len(_auth_lines(server)) == 1  # PLAIN, LOGIN and CRAM-MD5 were offered too
    assert server.scram_servers[0].failure == "invalid proof"  # type: ignore[attr-defined]


@pytest.mark.parametrize("api", APIS)
def test_password_refused_by_saslprep_sends_no_auth(
    scram_server: Callable[..., HostileSMTPServer],
    api: str,
) -> None:
    server = scram_server()
    backend = EmailBackend(
        host=server.host, port=server.port, username=USER, password="bell\x07password",
        timeout=2, audit_log=False,
    )  # fmt: skip
    with pytest.raises(SASLprepError, match="SASLprep"):
        _send(backend, api)
    assert server.wait_closed()
    assert _auth_lines(server) == []


# -- channel binding in a whole opening (in memory: the driver does not yet pass the DER) --


def _opening(
    certificate: bytes | None, mechanisms: tuple[str, ...], **config: Any
) -> tuple[Opening, SMTPConnection, list[bytes]]:
    cfg = _Config(
        host="mail.test",
        port=587,
        tls=TLSMode.IMPLICIT,
        username=USER,
        password=PASSWORD,
        auth_mechanisms=mechanisms,
        **config,
    )
    conn = SMTPConnection(Transcript())
    out: list[bytes] = []
    opening = Opening(cfg, conn, SessionInfo("mail.test", 587), "client.test", out)
    opening.tls_established(certificate)
    conn.tls_established()
    return opening, conn, out


@dataclass(frozen=True, slots=True, kw_only=True)
class _Config(ClientConfig):
    """ClientConfig with ``auth_require_channel_binding`` until the lead adds it."""

    auth_require_channel_binding: bool = False


def _drive(
    opening: Opening, conn: SMTPConnection, out: list[bytes], server: ScramServer, offered: str
) -> list[bytes]:
    """Play greeting, EHLO (offering ``offered``) and the SCRAM exchange; the lines sent."""
    sent: list[bytes] = []

    def take() -> bytes:
        data = b"".join(out)
        out.clear()
        sent.append(data)
        return data

    conn.receive_data(b"220 mail.test ESMTP\r\n")
    assert opening.step() is None
    assert take().startswith(b"EHLO")
    conn.receive_data(b"250-mail.test\r\n250 AUTH " + offered.encode() + b"\r\n")
    opening.step()
    auth = take().split()
    server.hash_name = "sha256"
    first = server.first(base64.b64decode(auth[2]))
    conn.receive_data(b"334 " + base64.b64encode(first) + b"\r\n")
    opening.step()
    final = server.final(base64.b64decode(take().strip()))
    if final is None:
        conn.receive_data(b"535 5.7.8 " + server.failure.encode() + b"\r\n")
        return sent  # the next step() raises
    conn.receive_data(b"334 " + base64.b64encode(final) + b"\r\n")
    opening.step()
    assert take() == b"\r\n"
    conn.receive_data(b"235 2.7.0 ok\r\n")
    opening.step()
    assert opening.done
    return sent


@pytest.fixture(scope="module")
def server_der(rsa_key: rsa.RSAPrivateKey) -> bytes:
    return _certificate(rsa_key, hashes.SHA256())


def test_plus_binds_to_the_server_certificate(server_der: bytes) -> None:
    opening, conn, out = _opening(server_der, DEFAULT_PREFERENCE)
    server = ScramServer("sha256", {USER: PASSWORD}, certificate=server_der, offers_plus=True)
    sent = _drive(opening, conn, out, server, "SCRAM-SHA-256 SCRAM-SHA-256-PLUS PLAIN")
    assert sent[1].startswith(b"AUTH SCRAM-SHA-256-PLUS ")
    assert server.flag == b"p=tls-server-end-point" and server.failure == ""


def test_a_relayed_exchange_fails_the_binding(server_der: bytes, rsa_key: Any) -> None:
    """A man in the middle with another certificate: the server sees the wrong binding."""
    other = _certificate(rsa_key, hashes.SHA384())
    opening, conn, out = _opening(other, DEFAULT_PREFERENCE)
    server = ScramServer("sha256", {USER: PASSWORD}, certificate=server_der, offers_plus=True)
    _drive(opening, conn, out, server, "SCRAM-SHA-256-PLUS")
    assert server.failure == "channel binding mismatch"
    with pytest.raises(AuthenticationError):
        opening.step()


def test_stripped_plus_is_detected_by_a_server_that_offers_it(server_der: bytes) -> None:
    """EHLO rewritten to hide -PLUS: the client says "y" (it could bind), the real server
    offers -PLUS, so it refuses (RFC 5802 §6)."""
    opening, conn, out = _opening(server_der, DEFAULT_PREFERENCE)
    server = ScramServer("sha256", {USER: PASSWORD}, certificate=server_der, offers_plus=True)
    sent = _drive(opening, conn, out, server, "SCRAM-SHA-256")
    assert sent[1].startswith(b"AUTH SCRAM-SHA-256 ") and server.flag == b"y"
    assert server.failure.startswith("downgrade")
    with pytest.raises(AuthenticationError):
        opening.step()


def test_without_the_certificate_plus_is_not_a_candidate(server_der: bytes) -> None:
    opening, conn, out = _opening(None, DEFAULT_PREFERENCE)
    server = ScramServer("sha256", {USER: PASSWORD})
    sent = _drive(opening, conn, out, server, "SCRAM-SHA-256-PLUS SCRAM-SHA-256")
    assert sent[1].startswith(b"AUTH SCRAM-SHA-256 ") and server.flag == b"n"


@pytest.mark.parametrize(
    ("certificate", "mechanisms", "why"),
    [
        (None, DEFAULT_PREFERENCE, "certificate is not available"),
        (b"der", ("SCRAM-SHA-256",), "none of them is allowed"),
    ],
)
def test_require_channel_binding_refuses_the_plus_less_variant(
    certificate: bytes | None, mechanisms: tuple[str, ...], why: str, server_der: bytes
) -> None:
    cert = server_der if certificate == b"der" else certificate
    opening, conn, out = _opening(cert, mechanisms, auth_require_channel_binding=True)
    conn.receive_data(b"220 mail.test ESMTP\r\n")
    opening.step()
    out.clear()
    conn.receive_data(b"250-mail.test\r\n250 AUTH SCRAM-SHA-256 SCRAM-SHA-256-PLUS\r\n")
    with pytest.raises(NotSupportedError, match=why):
        opening.step()
    assert out == []  # nothing sent


def test_require_channel_binding_still_binds_when_it_can(server_der: bytes) -> None:
    opening, conn, out = _opening(server_der, DEFAULT_PREFERENCE, auth_require_channel_binding=True)
    server = ScramServer("sha256", {USER: PASSWORD}, certificate=server_der, offers_plus=True)
    sent = _drive(opening, conn, out, server, "PLAIN SCRAM-SHA-256 SCRAM-SHA-256-PLUS")
    assert sent[1].startswith(b"AUTH SCRAM-SHA-256-PLUS ")


def test_require_channel_binding_without_plus_offered_changes_nothing() -> None:
    opening, conn, out = _opening(None, DEFAULT_PREFERENCE, auth_require_channel_binding=True)
    server = ScramServer("sha256", {USER: PASSWORD})
    sent = _drive(opening, conn, out, server, "SCRAM-SHA-256")
    assert sent[1].startswith(b"AUTH SCRAM-SHA-256 ")


# -- nothing stored ----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
@pytest.mark.parametrize("api", APIS)
def test_no_scram_secret_in_any_audit_column(
    scram_server: Callable[..., HostileSMTPServer], mechanism: str, api: str
) -> None:
    """A send, then a failed one (wrong password, after a server echoing what it got):
    no form of the password nor of either client-final-message in any text column."""
    from django_socketmail.models import SessionLog

    from .test_secrets import scram_forms

    server = scram_server()
    assert _send(_backend(server, auth_mechanisms=[mechanism], audit_log=True), api) == 1
    wrong = EmailBackend(
        host=server.host, port=server.port, username=USER, password=PASSWORD + "x",
        timeout=2, auth_mechanisms=[mechanism], fail_silently=True,
    )  # fmt: skip
    assert _send(wrong, api) == 0
    assert server.wait_closed(count=2)
    forms = scram_forms(server.commands)
    assert len(forms) == 6  # two client-final-messages, three forms each
    for password in (PASSWORD, PASSWORD + "x"):
        forms += [password, base64.b64encode(password.encode()).decode(), saslprep(password)]

    dump = audit_text()
    assert SessionLog.objects.filter(auth_mechanism=mechanism).exists()
    assert "AUTH " + mechanism + " [redacted]" in dump
    assert [form for form in forms if form in dump] == []
