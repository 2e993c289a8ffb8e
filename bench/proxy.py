"""A TCP delay proxy on 127.0.0.1 that adds round-trip time and counts the client's turns.

Each *route* listens on a free port of 127.0.0.1 and forwards every connection to a
target.  Bytes are forwarded as they are (TLS passes through untouched), each chunk
``delay`` seconds after it arrived, in each direction, so a round trip costs
``2 * delay`` more.  Forwarding is scheduled, not serialized: a chunk is read as soon as
it arrives and written when it is due, while later chunks are already being read, so a
pipelined stream keeps its throughput and only gains the delay.

A new connection's upstream side is opened ``handshake_delay`` seconds after the
client's connection was accepted (``3 * delay`` by default), so the server's greeting
reaches the client two round trips after ``connect()`` returned, as over a real network
where the TCP handshake costs one round trip.

It counts, per route: ``connections``; ``turns``, the number of times a client sent data
after having received data since its previous send (every time the client waited for
the server: its round trips); and the bytes each way.  SMTP with one recipient, for
example, takes 4 turns per message in lock-step (MAIL, RCPT, DATA, content), 2 with
PIPELINING (MAIL+RCPT+DATA, content) and 1 when the content and the next envelope go
together.

Everything is bounded: connections per route, bytes buffered per direction, and the
proxy's lifetime (``max_seconds``); :meth:`DelayProxy.stop` closes every connection.

Use it in a thread::

    with DelayProxy([Route("sink", ("127.0.0.1", 2525), delay=0.005)]) as proxy:
        port = proxy.port("sink")      # connect here instead of 2525
        ...
        print(proxy.stats("sink"))     # {"connections": 1, "turns": 12, ...}

or as a separate process (so its CPU time is not the benchmark's), which prints
``LISTENING <route> <port>`` per route, then ``READY``, and answers commands on stdin:
``stats <route>`` (one JSON line), ``reset`` (``OK``); end of input stops it::

    python bench/proxy.py --route sink=127.0.0.1:2525,5 [--max-seconds 900]

:class:`ProxyProcess` runs that process and talks to it.  Standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any, Final

if sys.path and os.path.realpath(sys.path[0] or ".") == os.path.dirname(os.path.realpath(__file__)):
    # Run as a script, bench/ comes first on sys.path, where a module of this directory
    # could shadow a standard library module (a bench/queue.py once shadowed queue, which
    # asgiref and concurrent.futures import).
    del sys.path[0]

__all__ = ["DelayProxy", "ProxyProcess", "Route", "RouteStats"]

HOST: Final = "127.0.0.1"
CHUNK: Final = 65536
"""Most bytes read at once."""
MAX_QUEUED_CHUNKS: Final = 1024
"""Chunks waiting for their time per direction (at most 64 MiB); then reading pauses."""
MAX_CONNECTIONS: Final = 2000
"""Connections a route accepts in its lifetime; later ones are closed at once."""
MAX_SECONDS: Final = 900.0
"""The proxy stops by itself after this long."""
CONNECT_TIMEOUT: Final = 10.0
START_TIMEOUT: Final = 10.0


@dataclass(frozen=True, slots=True)
class Route:
    """Listen on a free port of 127.0.0.1; forward to ``target`` with ``delay`` each way."""

    name: str
    target: tuple[str, int]
    delay: float = 0.0
    """Seconds added to every chunk, in each direction."""
    handshake_delay: float | None = None
    """Seconds before the upstream connection is opened; None: ``3 * delay``."""

    @property
    def connect_wait(self) -> float:
        return 3 * self.delay if self.handshake_delay is None else self.handshake_delay


@dataclass(slots=True)
class RouteStats:
    """What a route has seen since it started or was last reset."""

    connections: int = 0
    turns: int = 0
    bytes_up: int = 0
    """Client to server."""
    bytes_down: int = 0
    """Server to client."""
    refused: int = 0
    """Connections closed at once: over the limit, or the target did not answer."""


@dataclass(slots=True)
class _Turns:
    """One connection's turn detector: has the client received data since it last sent?"""

    stats: RouteStats
    received: bool = False

    def client_sent(self, data: bytes) -> None:
        self.stats.bytes_up += len(data)
        if self.received:
            self.stats.turns += 1
            self.received = False

    def client_received(self, data: bytes) -> None:
        self.stats.bytes_down += len(data)
        self.received = True


@dataclass(slots=True)
class _Listener:
    route: Route
    server: asyncio.base_events.Server | None = None
    port: int = 0
    stats: RouteStats = field(default_factory=RouteStats)
    accepted: int = 0


class DelayProxy:
    """The proxy's event loop, in a thread of its own (see the module docstring)."""

    def __init__(
        self,
        routes: Iterable[Route],
        *,
        max_seconds: float = MAX_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._listeners = {route.name: _Listener(route) for route in routes}
        self._max_seconds = max_seconds
        self._max_connections = max_connections
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._stopped = threading.Event()
        self._stop_event: asyncio.Event | None = None

    def __enter__(self) -> DelayProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- control (any thread) -----------------------------------------------------------

    def start(self) -> None:
        """Bind every route and start forwarding; returns once all ports listen."""
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="delay-proxy", daemon=True
        )
        self._thread.start()
        ready.result(timeout=START_TIMEOUT)

    def stop(self) -> None:
        """Close every listener and connection and end the thread.  Idempotent."""
        loop, thread = self._loop, self._thread
        event = self._stop_event
        if loop is not None and event is not None and not self._stopped.is_set():
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(event.set)
        if thread is not None:
            thread.join(timeout=10)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stopped.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the proxy stopped (by :meth:`stop` or its lifetime); True if it did."""
        return self._stopped.wait(timeout)

    def port(self, name: str) -> int:
        """The port of 127.0.0.1 that route ``name`` listens on."""
        return self._listeners[name].port

    def routes(self) -> list[Route]:
        return [listener.route for listener in self._listeners.values()]

    def stats(self, name: str) -> dict[str, int]:
        """Route ``name``'s counters (read in the proxy's thread)."""
        stats: dict[str, int] = self._in_loop(lambda: asdict(self._listeners[name].stats))
        return stats

    def reset(self) -> None:
        """Zero every route's counters (in place: open connections keep counting into them)."""

        def zero() -> None:
            for listener in self._listeners.values():
                for name in asdict(listener.stats):
                    setattr(listener.stats, name, 0)

        self._in_loop(zero)

    def _in_loop(self, function: Callable[[], Any]) -> Any:
        if self._loop is None or self._stopped.is_set():
            raise RuntimeError("the proxy is not running")
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def call() -> None:
            try:
                future.set_result(function())
            except BaseException as error:  # handed to the caller
                future.set_exception(error)

        self._loop.call_soon_threadsafe(call)
        return future.result(timeout=10)

    # -- the loop -------------------------------------------------------------------------

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            asyncio.run(self._main(ready))
        except BaseException as error:
            if not ready.done():
                ready.set_exception(error)
        finally:
            self._stopped.set()

    async def _main(self, ready: concurrent.futures.Future[None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = stop = asyncio.Event()
        try:
            for listener in self._listeners.values():
                listener.server = await asyncio.start_server(
                    functools.partial(self._accept, listener),
                    HOST,
                    0,
                    reuse_address=True,
                )
                listener.port = listener.server.sockets[0].getsockname()[1]
        except BaseException as error:
            ready.set_exception(error)
            await self._shutdown()
            return
        ready.set_result(None)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), self._max_seconds)
        await self._shutdown()

    async def _shutdown(self) -> None:
        for listener in self._listeners.values():
            if listener.server is not None:
                listener.server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        for listener in self._listeners.values():
            if listener.server is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(listener.server.wait_closed(), 5)

    def _accept(
        self, listener: _Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.get_running_loop().create_task(self._connection(listener, reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connection(
        self, listener: _Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        route, stats = listener.route, listener.stats
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            listener.accepted += 1
            if listener.accepted > self._max_connections:
                stats.refused += 1
                return
            stats.connections += 1
            if route.connect_wait > 0:
                await asyncio.sleep(route.connect_wait)
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(*route.target), CONNECT_TIMEOUT
                )
            except (OSError, asyncio.TimeoutError):
                stats.refused += 1
                return
            upstream = up_writer
            self._writers.add(up_writer)
            turns = _Turns(stats)
            await _all_or_first_error(
                _forward(reader, up_writer, route.delay, on_read=turns.client_sent),
                _forward(up_reader, writer, route.delay, on_write=turns.client_received),
            )
        except OSError:
            pass  # a peer reset its side: the connection ends, like over a real network
        finally:
            for side in (writer, upstream):
                if side is not None:
                    self._writers.discard(side)
                    side.close()


async def _forward(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    delay: float,
    *,
    on_read: Callable[[bytes], None] | None = None,
    on_write: Callable[[bytes], None] | None = None,
) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay`` seconds after it arrived.

    Reading and writing are two tasks joined by a bounded queue of ``(due, chunk)``: order
    is kept, and a chunk waiting for its time never holds up the reading of the next.
    End of input is passed on as a half-close once everything before it went out.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(MAX_QUEUED_CHUNKS)

    async def read_side() -> None:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            if on_read is not None:
                on_read(data)
            await queue.put((loop.time() + delay, data))
        await queue.put(None)

    async def write_side() -> None:
        while True:
            item = await queue.get()
            if item is None:
                break
            due, data = item
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            if on_write is not None:
                on_write(data)
            await writer.drain()
        if writer.can_write_eof() and not writer.transport.is_closing():
            writer.write_eof()

    await _all_or_first_error(read_side(), write_side())


async def _all_or_first_error(*coroutines: Coroutine[Any, Any, None]) -> None:
    """Run ``coroutines`` together until all end or one fails; then cancel the others and
    raise that failure."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


# -- as a separate process -----------------------------------------------------------------


def _parse_route(text: str) -> Route:
    """``name=host:port[,delay_ms[,handshake_ms]]`` -> :class:`Route`."""
    name, _, rest = text.partition("=")
    target, *numbers = rest.split(",")
    host, _, port = target.rpartition(":")
    if not name or not host or not port.isdigit() or len(numbers) > 2:
        raise argparse.ArgumentTypeError(f"bad route {text!r}: name=host:port[,ms[,ms]]")
    delay = float(numbers[0]) / 1000 if numbers else 0.0
    handshake = float(numbers[1]) / 1000 if len(numbers) > 1 else None
    return Route(name, (host, int(port)), delay, handshake)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a :class:`DelayProxy` until stdin ends (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--route",
        type=_parse_route,
        action="append",
        required=True,
        help="name=host:port[,delay_ms[,handshake_ms]] (repeatable)",
    )
    parser.add_argument("--max-seconds", type=float, default=MAX_SECONDS)
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    proxy = DelayProxy(
        args.route, max_seconds=args.max_seconds, max_connections=args.max_connections
    )
    proxy.start()
    try:
        for route in proxy.routes():
            print(f"LISTENING {route.name} {proxy.port(route.name)}", flush=True)
        print("READY", flush=True)
        stdin = sys.stdin.buffer
        while proxy.running:
            readable, _, _ = select.select([stdin], [], [], 0.5)
            if not readable:
                continue
            line = stdin.readline()
            if not line:
                break
            words = line.decode().split()
            if words[:1] == ["stats"] and len(words) == 2:
                print(json.dumps(proxy.stats(words[1])), flush=True)
            elif words == ["reset"]:
                proxy.reset()
                print("OK", flush=True)
            else:
                print(f"ERROR unknown command {line.decode().strip()!r}", flush=True)
    finally:
        proxy.stop()
    return 0


def end_child(process: subprocess.Popen[bytes]) -> None:
    """End a child that stops at end of input: close its stdin, wait up to 10 s, then kill."""
    assert process.stdin is not None
    with contextlib.suppress(OSError):
        process.stdin.close()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class ProxyProcess:
    """Run ``proxy.py`` as a child process and talk to it (its CPU is not ours).

    The child stops when :meth:`stop` closes its stdin, when this process dies (same end
    of input), or after ``max_seconds``.
    """

    def __init__(self, routes: Iterable[Route], *, max_seconds: float = MAX_SECONDS) -> None:
        self._routes = list(routes)
        self._max_seconds = max_seconds
        self._process: subprocess.Popen[bytes] | None = None
        self._ports: dict[str, int] = {}
        self._buffer = b""

    def __enter__(self) -> ProxyProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        command = [sys.executable, os.path.abspath(__file__), "--max-seconds"]
        command.append(str(self._max_seconds))
        for route in self._routes:
            spec = f"{route.name}={route.target[0]}:{route.target[1]},{route.delay * 1000:g}"
            if route.handshake_delay is not None:
                spec += f",{route.handshake_delay * 1000:g}"
            command += ["--route", spec]
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            words = self._line(deadline).split()
            if words == ["READY"]:
                return
            if len(words) == 3 and words[0] == "LISTENING":
                self._ports[words[1]] = int(words[2])
            else:
                self.stop()
                raise RuntimeError(f"proxy did not start: {' '.join(words)!r}")

    def port(self, name: str) -> int:
        return self._ports[name]

    def stats(self, name: str) -> dict[str, int]:
        return dict(json.loads(self._ask(f"stats {name}")))

    def reset(self) -> None:
        if self._ask("reset") != "OK":
            raise RuntimeError("proxy did not reset")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        end_child(process)
        assert process.stdout is not None
        process.stdout.close()

    def _ask(self, command: str) -> str:
        process = self._process
        if process is None or process.stdin is None:
            raise RuntimeError("the proxy is not running")
        process.stdin.write(command.encode() + b"\n")
        process.stdin.flush()
        return self._line(time.monotonic() + 10)

    def _line(self, deadline: float) -> str:
        """The child's next line of output; reads the pipe unbuffered so that ``select``
        never waits for a line already read."""
        process = self._process
        assert process is not None
        assert process.stdout is not None
        fd = process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, remaining))
            chunk = os.read(fd, 65536) if ready else b""
            if not chunk:
                raise RuntimeError("no answer from the proxy process")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode().strip()


def measure_rtt(host: str, port: int, *, probes: int = 20) -> float:
    """Median seconds of ``probes`` SMTP NOOP round trips to ``host:port`` (a sanity check)."""
    timings = []
    with socket.create_connection((host, port), timeout=10) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        for _ in range(probes):
            started = time.perf_counter()
            sock.sendall(b"NOOP\r\n")
            reader.readline()
            timings.append(time.perf_counter() - started)
        sock.sendall(b"QUIT\r\n")
        reader.readline()
        reader.close()
    timings.sort()
    return timings[len(timings) // 2]


if __name__ == "__main__":
    sys.exit(main())
