"""A scriptable hostile SMTP server: plays broken or malicious servers on 127.0.0.1 for tests.

Standard library only. A `Script` is a list of `Step`s played against each connection, in
its own thread::

    script = Script([greet(), ehlo(["PIPELINING"]), expect(b"MAIL"), close()])
    with HostileSMTPServer(script) as server:
        ...  # point the client at server.host, server.port
        assert server.wait_closed()
    assert b"RCPT" not in server.received

`respond()` answers commands by a table of rules (verb -> response) over defaults that make a
well-behaved server, so most scenarios are one line::

    standard_session({"RCPT": cycle(reply(250, "2.1.5 Ok"), reply(550, "5.1.1 No such user"))})

Contracts:

- The server never blocks a test: every wait is a poll of at most `POLL` seconds that also
  watches `stop()`, and `stop()` joins every thread it started and closes every socket.
- It is bounded: one line is at most `max_line` bytes, one connection at most `max_received`
  bytes from the client; past that the script fails (recorded in `errors`) and the connection
  closes. A client that sends nothing (or reads nothing) for `idle_timeout` seconds fails too.
- `received` is every byte the client sent (after TLS: the decrypted bytes), in order.
- `errors` is for the script: an `expect()` that did not match, a bound exceeded, a bug.
  A client that hangs up is not an error (see `Connection.ended_by`, `Connection.completed`).
- `violations` is for the client: bare CR or LF, content lines over 1000 octets, plaintext
  sent after STARTTLS, commands sent before the reply to one that had to be last in its group.
- When a script's steps run out and it did not `close()`, the server keeps the connection open
  and records what the client sends until the client hangs up (`drain()`).
"""

from __future__ import annotations

import base64
import contextlib
import re
import selectors
import socket
import ssl
import struct
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

POLL: Final = 0.02
"""Longest time (seconds) any wait goes without looking at `stop()`."""
RECV_SIZE: Final = 65536
SEND_CHUNK: Final = 16384
MAX_CONTENT_LINE: Final = 1000
"""RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets with its CRLF."""
HOSTNAME: Final = "hostile.test"
DEFAULT_EXTENSIONS: Final = (
    "PIPELINING",
    "SIZE 10240000",
    "8BITMIME",
    "ENHANCEDSTATUSCODES",
    "AUTH PLAIN LOGIN CRAM-MD5",
)
RFC2195_CHALLENGE: Final = b"<1896.697170952@postoffice.reston.mci.net>"
PIPELINABLE: Final = frozenset({b"MAIL", b"RCPT", b"RSET", b"BDAT", b"."})
"""RFC 2920 §3.1 (and RFC 3030 for BDAT): commands that may be followed by more before their
reply when PIPELINING was advertised. `.` stands for the end of the message content."""
_KNOWN_VERBS: Final = PIPELINABLE | {
    b"EHLO",
    b"HELO",
    b"DATA",
    b"NOOP",
    b"QUIT",
    b"STARTTLS",
    b"AUTH",
    b"VRFY",
    b"EXPN",
    b"HELP",
}
_PIPELINING_AD: Final = re.compile(rb"(?im)^250[- ]PIPELINING[ \t]*\r?$")

EndedBy: TypeAlias = Literal["client", "server", "stopped", "error"]


class ScriptError(Exception):
    """The script could not go on: an expectation failed or a bound was exceeded."""


class _ClientClosed(Exception):
    """The client hung up (EOF, reset, or a failed TLS handshake)."""


class _Stopped(Exception):
    """`HostileSMTPServer.stop()` was called."""


@dataclass(frozen=True, slots=True)
class Step:
    """One action of a script: `run` gets the live `Connection`; `name` shows in errors."""

    name: str
    run: Callable[[Connection], None]

    def __repr__(self) -> str:
        return self.name


class Script:
    """The steps played, in order, against one connection; nested step lists are flattened.

    One `Script` can serve any number of connections: steps keep no state of their own.
    """

    __slots__ = ("steps",)

    def __init__(self, steps: Iterable[Step | Iterable[Step]]) -> None:
        flat: list[Step] = []
        for item in steps:
            if isinstance(item, Step):
                flat.append(item)
            else:
                flat.extend(item)
        self.steps: tuple[Step, ...] = tuple(flat)

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps)

    def __repr__(self) -> str:
        return f"Script({list(self.steps)!r})"


def _wait(sock: socket.socket, events: int, timeout: float) -> bool:
    """Whether ``sock`` is ready for ``events`` within ``timeout`` (any fd number)."""
    with selectors.DefaultSelector() as selector:
        selector.register(sock, events)
        return bool(selector.select(timeout))


def _verb(line: bytes) -> bytes:
    words = line.split(None, 1)
    return words[0].upper() if words else b""


def _reply_bytes(code: int, lines: Sequence[str | bytes]) -> bytes:
    if not lines:
        return b"%d\r\n" % code
    out = bytearray()
    for i, line in enumerate(lines):
        text = line.encode() if isinstance(line, str) else line
        sep = b" " if i == len(lines) - 1 else b"-"
        out += b"%d%s%s\r\n" % (code, sep, text)
    return bytes(out)


class Connection:
    """One client connection: the I/O that steps use, and the record tests read.

    Steps call `readline()`, `send()`, `reply()`, `read_data()`, `read_bytes()`, `sleep()`,
    `starttls()`, `close()`. Tests read the record (settled once `wait_closed()` or `stop()`
    returned): `received`, `commands`, `messages`, `errors`, `violations`, `pipelined`,
    `pipelined_violation`, `tls`, `tls_error`, `completed`, `ended_by`.
    """

    def __init__(self, server: HostileSMTPServer, sock: socket.socket, index: int) -> None:
        self.index = index
        self.server = server
        """The server this connection belongs to (its options: `tls_context`...)."""
        self._sock = sock
        self._stop = server._stop
        self._buf = bytearray()
        self._eof = False
        self._received = bytearray()
        self._unanswered: bytes | None = None
        self._chunks = bytearray()
        self._counts: Counter[bytes] = Counter()
        self._txn_counts: Counter[bytes] = Counter()
        self.commands: list[bytes] = []
        """Every command line read with `readline()`, without its line end."""
        self.messages: list[bytes] = []
        """Message contents: from `read_data()` (un-dot-stuffed) or from BDAT chunks."""
        self.errors: list[str] = []
        self.violations: list[str] = []
        self.pipelined: list[bytes] = []
        """Verbs of commands that the client followed with more bytes before their reply."""
        self.pipelined_violation = False
        """True when the client did that where RFC 2920 does not allow it (see PIPELINABLE)."""
        self.pipelining_advertised = False
        self.tls = False
        self.tls_error: str | None = None
        self.completed = False
        """True when every step of the script ran."""
        self.ended_by: EndedBy | None = None
        self.closed = False
        self.step = ""

    def __repr__(self) -> str:
        return f"<Connection {self.index} ended_by={self.ended_by} step={self.step!r}>"

    @property
    def received(self) -> bytes:
        """Every byte the client sent on this connection (decrypted after TLS), in order."""
        return bytes(self._received)

    def count(self, verb: str | bytes) -> int:
        """How many commands with this verb were read on this connection (the current too)."""
        return self._counts[_as_verb(verb)]

    def txn_count(self, verb: str | bytes) -> int:
        """Like `count()`, since the last MAIL, RSET, EHLO, HELO or end of message."""
        return self._txn_counts[_as_verb(verb)]

    # -- reading -------------------------------------------------------------------------

    def readline(self) -> bytes:
        """Read one command line; return it without its line end.

        A line ends at LF; a line not ended by CRLF, or holding a CR, is a violation.
        Reading a command while the previous one is still unanswered marks it pipelined.
        """
        raw = self._read_raw_line(self.server.max_line)
        line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        if not raw.endswith(b"\r\n"):
            self._violation("command line ended by a bare LF")
        if b"\r" in line:
            self._violation("bare CR in a command line")
        if self._unanswered is not None:
            self._early(self._unanswered)
        self._unanswered = line
        verb = _verb(line)
        if verb in {b"MAIL", b"RSET", b"EHLO", b"HELO"}:
            self.end_transaction()
        self._counts[verb] += 1
        self._txn_counts[verb] += 1
        self.commands.append(line)
        return line

    def read_data(self) -> bytes:
        """Read DATA content up to CRLF.CRLF; record it un-dot-stuffed in `messages`.

        Line ends are kept as the client sent them; bare CR/LF and lines over 1000 octets
        are violations (this is what SMTP smuggling would need).
        """
        content = bytearray()
        problems: set[str] = set()
        while True:
            raw = self._read_raw_line(self.server.max_received)
            if raw == b".\r\n":
                break
            text = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            if not raw.endswith(b"\r\n"):
                problems.add("bare LF in message content")
            if b"\r" in text:
                problems.add("bare CR in message content")
            if len(raw) > MAX_CONTENT_LINE:
                problems.add(f"message content line over {MAX_CONTENT_LINE} octets")
            content += raw[1:] if raw.startswith(b".") else raw
        for problem in sorted(problems):
            self._violation(problem)
        message = bytes(content)
        self.messages.append(message)
        self.end_transaction()
        self._unanswered = b"."
        return message

    def read_bytes(self, n: int) -> bytes:
        """Read exactly `n` bytes (a BDAT chunk) and add them to the message being built."""
        if n > self.server.max_received:
            raise ScriptError(f"read_bytes({n}) is over max_received")
        while len(self._buf) < n:
            self._wait_data()
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        self._chunks += chunk
        return chunk

    def end_bdat(self) -> bytes:
        """Record the chunks read since the last message as one message (BDAT ... LAST)."""
        message = bytes(self._chunks)
        self.messages.append(message)
        self.end_transaction()
        return message

    def end_transaction(self) -> None:
        """Reset `txn_count()` and the BDAT chunks: a new mail transaction starts."""
        self._txn_counts.clear()
        self._chunks.clear()

    def drain(self) -> None:
        """Read and record whatever the client sends until it hangs up (or `stop()`)."""
        while True:
            self._buf.clear()
            self._wait_data()

    # -- writing -------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Send raw bytes; the first send after a command is its reply (pipelining check)."""
        if self._unanswered is not None:
            if self._early_bytes(self.server.pipelining_probe):
                self._early(self._unanswered)
            self._unanswered = None
        if b"250" in data and _PIPELINING_AD.search(data):
            self.pipelining_advertised = True
        view = memoryview(data)
        deadline = time.monotonic() + self.server.idle_timeout
        while view:
            if self._stop.is_set():
                raise _Stopped
            try:
                sent = self._sock.send(view[:SEND_CHUNK])
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise ScriptError(
                        f"client read nothing for {self.server.idle_timeout}s"
                    ) from None
                continue
            except OSError as exc:
                self._eof = True
                raise _ClientClosed from exc
            view = view[sent:]
            deadline = time.monotonic() + self.server.idle_timeout

    def reply(self, code: int, *lines: str | bytes) -> None:
        """Send a well-formed reply: `code-line` for all lines but the last, `code line`."""
        self.send(_reply_bytes(code, lines))

    def run(self, response: Response, line: bytes = b"") -> None:
        """Play a rule's response: a step, a list of steps, raw bytes or fn(conn, line)."""
        if isinstance(response, Step):
            response.run(self)
        elif isinstance(response, bytes):
            self.send(response)
        elif callable(response):
            response(self, line)
        else:
            for item in response:
                if self.closed:
                    return
                self.run(item, line)

    def sleep(self, seconds: float) -> None:
        """Wait without reading commands; end early on `stop()` or when the client hangs up."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self._client_gone():
                raise _ClientClosed
            if self._stop.wait(min(POLL, remaining)):
                raise _Stopped

    def starttls(self) -> None:
        """Wrap the socket server-side with the server's `tls_context` and handshake.

        Bytes already read from the client at this point came in plaintext after STARTTLS:
        a violation; they are discarded. A failed handshake ends the connection as the
        client's doing, with the reason in `tls_error`.
        """
        context = self.server.tls_context
        if context is None:
            raise ScriptError("starttls() needs HostileSMTPServer(tls_context=...)")
        if self.tls:
            raise ScriptError("starttls() on a connection that is already TLS")
        if self._buf:
            self._violation(f"{len(self._buf)} plaintext bytes after STARTTLS, before TLS")
            self._buf.clear()
        self._unanswered = None
        try:
            self._sock = tls = context.wrap_socket(
                self._sock, server_side=True, do_handshake_on_connect=False
            )
        except OSError as exc:
            self.tls_error = str(exc) or type(exc).__name__
            self._eof = True
            raise _ClientClosed from exc
        tls.setblocking(False)
        deadline = time.monotonic() + self.server.idle_timeout
        while True:
            if self._stop.is_set():
                raise _Stopped
            if time.monotonic() > deadline:
                raise ScriptError(f"TLS handshake not done in {self.server.idle_timeout}s")
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                _wait(tls, selectors.EVENT_READ, POLL)
            except ssl.SSLWantWriteError:
                _wait(tls, selectors.EVENT_WRITE, POLL)
            except OSError as exc:
                self.tls_error = str(exc) or type(exc).__name__
                self._eof = True
                raise _ClientClosed from exc
        tls.settimeout(POLL)
        self.tls = True
        self.pipelining_advertised = False

    def close(self, *, reset: bool = False) -> None:
        """Close the connection now; with `reset`, abort it with a TCP RST (SO_LINGER 0)."""
        if self.closed:
            return
        try:
            if reset:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                # Read what is already here: it gets recorded, and close() sends FIN, not RST.
                for _ in range(64):
                    if not self._fill(0):
                        break
        except (OSError, ScriptError):
            pass
        finally:
            self.closed = True
            self._sock.close()

    # -- internals -----------------------------------------------------------------------

    def _read_raw_line(self, limit: int) -> bytes:
        while (end := self._buf.find(b"\n")) < 0:
            if len(self._buf) > limit:
                raise ScriptError(f"client line longer than {limit} bytes")
            self._wait_data()
        if end + 1 > limit:
            raise ScriptError(f"client line longer than {limit} bytes")
        raw = bytes(self._buf[: end + 1])
        del self._buf[: end + 1]
        return raw

    def _fill(self, timeout: float) -> bool:
        """Receive once, waiting at most `timeout`; True when bytes were added."""
        if self._eof or self.closed:
            return False
        self._sock.settimeout(timeout)
        try:
            data = self._sock.recv(RECV_SIZE)
        except (TimeoutError, BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except OSError as exc:
            if isinstance(exc, ssl.SSLError):
                self.tls_error = str(exc)
            self._eof = True
            return False
        finally:
            if not self.closed:
                self._sock.settimeout(POLL)
        if not data:
            self._eof = True
            return False
        room = self.server.max_received - len(self._received)
        self._received += data[:room]
        if len(data) > room:
            raise ScriptError(f"client sent more than {self.server.max_received} bytes")
        self._buf += data
        return True

    def _wait_data(self) -> None:
        deadline = time.monotonic() + self.server.idle_timeout
        while not self._fill(POLL):
            if self._eof:
                raise _ClientClosed
            if self._stop.is_set():
                raise _Stopped
            if time.monotonic() > deadline:
                raise ScriptError(f"client sent nothing for {self.server.idle_timeout}s")

    def _early_bytes(self, timeout: float) -> bool:
        """Did the client send more? Never consumes plaintext (it may be a TLS ClientHello)."""
        if self._buf:
            return True
        if self._eof:
            return False
        if self.tls:
            return self._fill(timeout)
        if not _wait(self._sock, selectors.EVENT_READ, timeout):
            return False
        try:
            peeked = self._sock.recv(1, socket.MSG_PEEK)
        except (TimeoutError, BlockingIOError):
            return False
        except OSError:
            self._eof = True
            return False
        if not peeked:
            self._eof = True
        return bool(peeked)

    def _client_gone(self) -> bool:
        if not self._eof:
            self._early_bytes(0)
        return self._eof

    def _early(self, command: bytes) -> None:
        verb = _verb(command) if command != b"." else b"."
        if verb not in _KNOWN_VERBS:
            verb = b"<other line>"  # an AUTH exchange line: do not copy it anywhere
        self.pipelined.append(verb)
        if not self.pipelining_advertised:
            reason = "PIPELINING was not advertised"
        elif verb not in PIPELINABLE:
            reason = "it must be the last command of a group"
        else:
            return
        self.pipelined_violation = True
        self._violation(f"client sent more after {verb.decode()} before its reply: {reason}")

    def _violation(self, text: str) -> None:
        self.violations.append(f"connection {self.index}: {text}")

    def _error(self, text: str) -> None:
        self.errors.append(f"connection {self.index}, step {self.step}: {text}")


Response: TypeAlias = "Step | Sequence[Step] | bytes | Callable[[Connection, bytes], None]"
"""What a rule answers with; see `Connection.run()`."""


def _as_verb(verb: str | bytes) -> bytes:
    return (verb.encode() if isinstance(verb, str) else verb).upper()


class HostileSMTPServer:
    """A scripted SMTP server on 127.0.0.1:<free port>, for one test.

    `script` is played against every connection; a sequence of scripts gives the n-th
    connection the n-th script (the last one for any further connections). With
    `implicit_tls`, each connection starts with a TLS handshake (`tls_context` required).
    `pipelining_probe` is how long (seconds) each reply waits to see whether the client
    sent more before it: 0 only sees bytes already there.
    Use as a context manager, or call `start()` and `stop()`.
    """

    def __init__(
        self,
        script: Script | Sequence[Script],
        *,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        pipelining_probe: float = 0.0,
        idle_timeout: float = 10.0,
        max_line: int = 16384,
        max_received: int = 4 * 1024 * 1024,
    ) -> None:
        scripts = [script] if isinstance(script, Script) else list(script)
        if not scripts or not all(isinstance(s, Script) for s in scripts):
            raise TypeError("script must be a Script or a non-empty sequence of Scripts")
        if implicit_tls and tls_context is None:
            raise ValueError("implicit_tls needs a tls_context")
        self._scripts = scripts
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.pipelining_probe = pipelining_probe
        self.idle_timeout = idle_timeout
        self.max_line = max_line
        self.max_received = max_received
        self.host = "127.0.0.1"
        self.port = 0
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._conns: list[Connection] = []
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> HostileSMTPServer:
        """Bind 127.0.0.1:0, listen, and accept connections in a background thread."""
        if self._listener is not None:
            raise RuntimeError("server already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind((self.host, 0))
            listener.listen(16)
            listener.settimeout(POLL)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"hostile-smtp-{self.port}", daemon=True
        )
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Stop accepting, end every connection, close every socket, join every thread.

        Returns within a few POLL intervals even with a script asleep or a client connected.
        Idempotent.
        """
        self._stop.set()
        if self._acceptor is not None:
            self._acceptor.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
        for thread in self._threads:
            thread.join(timeout=5)
        alive = [t.name for t in [self._acceptor, *self._threads] if t and t.is_alive()]
        if alive:
            raise RuntimeError(f"hostile server threads did not stop: {alive}")

    def __enter__(self) -> HostileSMTPServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def wait_closed(self, timeout: float = 2.0, count: int = 1) -> bool:
        """Wait until `count` connections were accepted and all accepted ones ended."""
        with self._cond:
            return self._cond.wait_for(
                lambda: (
                    len(self._conns) >= count and all(c.ended_by is not None for c in self._conns)
                ),
                timeout,
            )

    # -- record --------------------------------------------------------------------------

    @property
    def connections(self) -> list[Connection]:
        """The connections accepted so far, in order (a snapshot)."""
        with self._cond:
            return list(self._conns)

    @property
    def received(self) -> bytes:
        """Every byte clients sent, connection after connection."""
        return b"".join(c.received for c in self.connections)

    @property
    def commands(self) -> list[bytes]:
        return [line for c in self.connections for line in c.commands]

    @property
    def messages(self) -> list[bytes]:
        return [m for c in self.connections for m in c.messages]

    @property
    def errors(self) -> list[str]:
        return [e for c in self.connections for e in c.errors]

    @property
    def violations(self) -> list[str]:
        return [v for c in self.connections for v in c.violations]

    @property
    def pipelined_violation(self) -> bool:
        return any(c.pipelined_violation for c in self.connections)

    # -- threads -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._stop.is_set():
                sock.close()
                return
            sock.settimeout(POLL)
            with self._cond:
                conn = Connection(self, sock, len(self._conns))
                script = self._scripts[min(conn.index, len(self._scripts) - 1)]
                thread = threading.Thread(
                    target=self._serve,
                    args=(conn, script),
                    name=f"hostile-smtp-{self.port}-{conn.index}",
                    daemon=True,
                )
                self._conns.append(conn)
                self._threads.append(thread)
                self._cond.notify_all()
            thread.start()

    def _serve(self, conn: Connection, script: Script) -> None:
        ended: EndedBy = "server"
        try:
            if self.implicit_tls:
                conn.step = "implicit TLS handshake"
                conn.starttls()
            ran = 0
            for step in script.steps:
                if conn.closed:
                    break
                conn.step = step.name
                step.run(conn)
                ran += 1
            conn.completed = ran == len(script.steps)
            if not conn.closed:
                conn.step = "drain (end of script)"
                conn.drain()
        except _ClientClosed:
            ended = "client"
        except _Stopped:
            ended = "stopped"
        except ScriptError as exc:
            ended = "error"
            conn._error(str(exc))
        except Exception:
            ended = "error"
            conn._error(traceback.format_exc())
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            with self._cond:
                conn.ended_by = ended
                self._cond.notify_all()


# -- steps ---------------------------------------------------------------------------------


def send(data: bytes) -> Step:
    """Send raw bytes as they are (malformed replies, non-UTF-8, injections...)."""
    return Step(f"send({data[:40]!r})", lambda c: c.send(data))


def reply(code: int, *lines: str | bytes) -> Step:
    """Send a well-formed reply; several lines make a multi-line reply, none a bare code."""
    data = _reply_bytes(code, lines)
    return Step(f"reply({data[:40]!r})", lambda c: c.send(data))


def greet(text: str = f"{HOSTNAME} ESMTP hostile") -> Step:
    """The 220 greeting."""
    return reply(220, text)


def expect(prefix: bytes) -> Step:
    """Read one command line; fail the script unless it starts with `prefix` (any case)."""

    def run(conn: Connection) -> None:
        line = conn.readline()
        if not line.upper().startswith(prefix.upper()):
            raise ScriptError(f"expected {prefix!r}, got {line[:80]!r}")

    return Step(f"expect({prefix!r})", run)


def expect_any() -> Step:
    """Read one command line, whatever it is."""

    def run(conn: Connection) -> None:
        conn.readline()

    return Step("expect_any()", run)


def ehlo(extensions: Sequence[str] = DEFAULT_EXTENSIONS, hostname: str = HOSTNAME) -> Step:
    """Expect EHLO and answer 250 with these extension lines."""
    data = _reply_bytes(250, [hostname, *extensions])

    def run(conn: Connection) -> None:
        expect(b"EHLO").run(conn)
        conn.send(data)

    return Step(f"ehlo({list(extensions)!r})", run)


def read_data() -> Step:
    """Read message content up to CRLF.CRLF (after the script sent 354)."""

    def run(conn: Connection) -> None:
        conn.read_data()

    return Step("read_data()", run)


def read_bytes(n: int, *, last: bool = False) -> Step:
    """Read an n-byte BDAT chunk; with `last`, record the chunks as one message."""

    def run(conn: Connection) -> None:
        conn.read_bytes(n)
        if last:
            conn.end_bdat()

    return Step(f"read_bytes({n}, last={last})", run)


def drip(data: bytes, interval: float) -> Step:
    """Send `data` one byte every `interval` seconds."""

    def run(conn: Connection) -> None:
        for i in range(len(data)):
            conn.send(data[i : i + 1])
            if i + 1 < len(data):
                conn.sleep(interval)

    return Step(f"drip({data[:40]!r}, {interval})", run)


def flood(total_bytes: int, chunk: bytes = b"x" * 65536) -> Step:
    """Send `total_bytes` of `chunk` repeated, with no line end; stops if the client leaves."""

    def run(conn: Connection) -> None:
        left = total_bytes
        while left > 0:
            piece = chunk[:left]
            conn.send(piece)
            left -= len(piece)

    return Step(f"flood({total_bytes})", run)


def endless_multiline(code: int = 250, text: bytes = b"xxx") -> Step:
    """Send `code-text` lines forever: ends only when the client leaves or `stop()`."""
    batch = (b"%d-%s\r\n" % (code, text)) * 256

    def run(conn: Connection) -> None:
        while True:
            conn.send(batch)

    return Step(f"endless_multiline({code})", run)


def sleep(seconds: float) -> Step:
    """Do nothing for `seconds` (cut short by `stop()` or the client hanging up)."""
    return Step(f"sleep({seconds})", lambda c: c.sleep(seconds))


def close(*, reset: bool = False) -> Step:
    """Hang up now (FIN, or RST with `reset`); the rest of the script is skipped."""
    return Step(f"close(reset={reset})", lambda c: c.close(reset=reset))


def starttls() -> Step:
    """Handshake TLS server-side with the server's `tls_context` (after sending 220)."""
    return Step("starttls()", lambda c: c.starttls())


def drain() -> Step:
    """Answer nothing ever again; record what the client sends until it hangs up."""
    return Step("drain()", lambda c: c.drain())


def handler(fn: Callable[[Connection], None]) -> Step:
    """A step of custom logic: `fn(conn)` with the `Connection` I/O methods."""
    return Step(f"handler({getattr(fn, '__name__', fn)!r})", fn)


# -- rules ---------------------------------------------------------------------------------


def auth(
    final: Response | None = None,
    *,
    cram_challenge: str | bytes | None = None,
    extra: Response = (),
) -> Callable[[Connection, bytes], None]:
    """A rule for AUTH that speaks PLAIN, LOGIN and CRAM-MD5 (RFC 4954).

    Sends the mechanism's 334 challenges (LOGIN: "Username:", "Password:"; PLAIN: an empty
    one unless an initial response came; CRAM-MD5: `cram_challenge` as sent after "334 ",
    by default the base64 of RFC 2195's challenge), reads one line for each (`*` cancels:
    501), then plays `extra` (e.g. an unexpected further 334 step), then `final`
    (default 235). Other mechanisms get 504.
    """
    final = reply(235, "2.7.0 Authentication successful") if final is None else final
    if cram_challenge is None:
        cram_challenge = base64.b64encode(RFC2195_CHALLENGE)

    def run(conn: Connection, line: bytes) -> None:
        words = line.split()
        mechanism = words[1].upper() if len(words) > 1 else b""
        initial = len(words) > 2
        prompts: list[str | bytes]
        if mechanism == b"PLAIN":
            prompts = [] if initial else [""]
        elif mechanism == b"LOGIN":
            prompts = ["UGFzc3dvcmQ6"] if initial else ["VXNlcm5hbWU6", "UGFzc3dvcmQ6"]
        elif mechanism == b"CRAM-MD5":
            prompts = [cram_challenge]
        else:
            conn.reply(504, "5.5.4 Unrecognized authentication type")
            return
        for prompt in prompts:
            conn.reply(334, prompt)
            if conn.readline().strip() == b"*":
                conn.reply(501, "5.7.0 Authentication cancelled")
                return
        conn.run(extra, line)
        if not conn.closed:
            conn.run(final, line)

    return run


def cycle(*responses: Response) -> Callable[[Connection, bytes], None]:
    """A rule answering the n-th command of its verb on a connection with responses[n % len]."""

    def run(conn: Connection, line: bytes) -> None:
        conn.run(responses[(conn.count(_verb(line)) - 1) % len(responses)], line)

    return run


class _Responder:
    """A well-behaved SMTP server loop whose answers `rules` override verb by verb."""

    def __init__(
        self, rules: Mapping[str, Response], extensions: Sequence[str], hostname: str
    ) -> None:
        self.extensions = tuple(extensions)
        self.hostname = hostname
        self.table: dict[bytes, Response] = {
            b"EHLO": self.ehlo,
            b"HELO": reply(250, hostname),
            b"MAIL": reply(250, "2.1.0 Ok"),
            b"RCPT": reply(250, "2.1.5 Ok"),
            b"DATA": self.data,
            b"BDAT": self.bdat,
            b"RSET": reply(250, "2.0.0 Ok"),
            b"NOOP": reply(250, "2.0.0 Ok"),
            b"QUIT": [reply(221, "2.0.0 Bye"), close()],
            b"STARTTLS": self.starttls,
            b"AUTH": auth(),
            b".": self.queued,
        }
        self.table.update({_as_verb(verb): response for verb, response in rules.items()})

    def __call__(self, conn: Connection) -> None:
        while not conn.closed:
            line = conn.readline()
            conn.run(self.table.get(_verb(line), self.unknown), line)

    def ehlo(self, conn: Connection, line: bytes) -> None:
        extensions = [e for e in self.extensions if not (conn.tls and e.upper() == "STARTTLS")]
        conn.reply(250, self.hostname, *extensions)

    def data(self, conn: Connection, line: bytes) -> None:
        conn.reply(354, "End data with <CR><LF>.<CR><LF>")
        conn.read_data()
        conn.run(self.table[b"."], b".")

    def bdat(self, conn: Connection, line: bytes) -> None:
        words = line.split()
        if len(words) not in (2, 3) or not words[1].isdigit():
            conn.reply(501, "5.5.4 Syntax: BDAT size [LAST]")
            return
        size = int(words[1])
        conn.read_bytes(size)
        if len(words) == 3 and words[2].upper() == b"LAST":
            conn.end_bdat()
            conn.run(self.table[b"."], b".")
        else:
            conn.reply(250, f"2.0.0 {size} octets received")

    def starttls(self, conn: Connection, line: bytes) -> None:
        if conn.server.tls_context is None:
            conn.reply(454, "4.7.0 TLS not available")
        elif conn.tls:
            conn.reply(503, "5.5.1 TLS already active")
        else:
            conn.reply(220, "2.0.0 Ready to start TLS")
            conn.starttls()

    def queued(self, conn: Connection, line: bytes) -> None:
        conn.reply(250, f"2.0.0 Ok: queued as HOSTILE{len(conn.messages)}")

    def unknown(self, conn: Connection, line: bytes) -> None:
        conn.reply(502, "5.5.2 Error: command not recognized")


def respond(
    rules: Mapping[str, Response] | None = None,
    *,
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    hostname: str = HOSTNAME,
) -> Step:
    """Answer commands until QUIT or the client hangs up, by verb.

    Defaults behave like a good server: EHLO (250 with `extensions`, STARTTLS dropped once
    in TLS), HELO, MAIL, RCPT, RSET, NOOP 250; DATA 354, content, then the "." rule (250
    "queued as HOSTILE<n>"); BDAT reads its chunk (LAST: the "." rule); AUTH `auth()`;
    STARTTLS 220 + handshake (454 without tls_context); QUIT 221 and close; others 502.
    `rules` maps a verb (any case, or "." for the end of a message) to a `Response`.
    """
    responder = _Responder(rules or {}, extensions, hostname)
    return Step(f"respond({sorted(rules or {})})", responder)


def standard_session(
    rules: Mapping[str, Response] | None = None,
    *,
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    greeting: str = f"{HOSTNAME} ESMTP hostile",
    hostname: str = HOSTNAME,
) -> Script:
    """`greet()` then `respond()`: a whole server in one line, broken where `rules` say."""
    return Script([greet(greeting), respond(rules, extensions=extensions, hostname=hostname)])
