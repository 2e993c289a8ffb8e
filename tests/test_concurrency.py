"""Threads: one backend shared by many threads, or one each, deliver every message once.

8 threads send 50 messages each to a real in-process server (`LocalSMTPServer`, STARTTLS
and PIPELINING).  Every message carries its own recipient and ``X-Tag`` header, so what
the server received shows that each one arrived exactly once, intact, and that the
counts and per-message results the threads saw are right.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import pytest
from django.core.mail import EmailMessage

from django_socketmail.email_backend import EmailBackend
from django_socketmail.localserver import LocalSMTPServer
from django_socketmail.smtp import SendResult, SendStatus

from .conftest import PASSWORD, USER, BackendFactory

THREADS = 8
PER_THREAD = 50


def tag(thread: int, index: int) -> str:
    return f"t{thread}-m{index}"


def tagged_message(thread: int, index: int) -> EmailMessage:
    name = tag(thread, index)
    return EmailMessage(
        f"message {name}",
        f"Body of {name}.\n.a dotted line\n",
        "sender@example.com",
        [f"{name}@example.com"],
        headers={"X-Tag": name},
    )


def run_threads(backend_for: Callable[[int], EmailBackend], *, batch: int) -> list[EmailMessage]:
    """Each thread sends its PER_THREAD messages, ``batch`` per ``send_messages()`` call,
    through ``backend_for(thread)``; returns every message once all threads are done."""
    barrier = threading.Barrier(THREADS)
    sent: list[EmailMessage] = []
    counts: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(thread: int) -> None:
        try:
            backend = backend_for(thread)
            messages = [tagged_message(thread, i) for i in range(PER_THREAD)]
            barrier.wait(timeout=10)
            for start in range(0, PER_THREAD, batch):
                chunk = messages[start : start + batch]
                count = backend.send_messages(chunk)
                with lock:
                    counts.append(count)
                    sent.extend(chunk)
        except BaseException as error:  # reported below, in the test's thread
            with lock:
                errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert sum(counts) == THREADS * PER_THREAD
    assert all(count == batch for count in counts)
    return sent


def result_of(msg: EmailMessage) -> SendResult:
    result = getattr(msg, "socketmail_result", None)
    assert isinstance(result, SendResult)
    return result


def check_delivered_once(server: LocalSMTPServer, sent: list[EmailMessage]) -> None:
    total = THREADS * PER_THREAD
    expected = {tag(t, i) for t in range(THREADS) for i in range(PER_THREAD)}
    assert len(sent) == total
    for msg in sent:
        result = result_of(msg)
        assert result.status is SendStatus.SENT
        assert list(result.accepted) == msg.to
        assert result.queue_id is not None
    received = server.wait_for_messages(total, timeout=10)
    assert len(received) == total  # nothing more arrived than was sent
    tags = Counter[str]()
    for item in received:
        (rcpt,) = item.rcpt_tos
        name = rcpt.removesuffix("@example.com")
        tags[name] += 1
        assert f"\r\nX-Tag: {name}\r\n".encode() in item.data  # its own content, intact
        assert f"Body of {name}.\r\n.a dotted line\r\n".encode() in item.data
    assert set(tags) == expected
    assert set(tags.values()) == {1}
    message_ids = Counter(
        line
        for item in received
        for line in item.data.split(b"\r\n")
        if line.startswith(b"Message-ID:")
    )
    assert len(message_ids) == total and set(message_ids.values()) == {1}
    queue_ids = {item.queue_id for item in received}
    assert len(queue_ids) == total
    assert {result_of(m).queue_id for m in sent} == queue_ids


@pytest.mark.parametrize("batch", [1, 10])
def test_one_backend_shared_by_threads(
    make_backend: BackendFactory, starttls_server: LocalSMTPServer, batch: int
) -> None:
    backend = make_backend(starttls_server, username=USER, password=PASSWORD)
    with backend:  # one session for all: the backend's lock serializes the threads
        client = backend.client
        sent = run_threads(lambda thread: backend, batch=batch)
        assert backend.client is client and client is not None and client.is_connected
        assert client.info.messages_sent == THREADS * PER_THREAD
    assert backend.client is None
    check_delivered_once(starttls_server, sent)


def test_one_backend_shared_without_opening_it(
    make_backend: BackendFactory, starttls_server: LocalSMTPServer
) -> None:
    """Not opened beforehand: every call opens (and closes) its own session, under the lock."""
    backend = make_backend(starttls_server, username=USER, password=PASSWORD)
    sent = run_threads(lambda thread: backend, batch=25)
    assert backend.client is None
    check_delivered_once(starttls_server, sent)


def test_one_backend_per_thread(
    make_backend: BackendFactory, starttls_server: LocalSMTPServer
) -> None:
    backends = [
        make_backend(starttls_server, username=USER, password=PASSWORD) for _ in range(THREADS)
    ]
    for backend in backends:
        assert backend.open() is True
    sent = run_threads(lambda thread: backends[thread], batch=1)
    for backend in backends:
        assert backend.client is not None
        assert backend.client.info.messages_sent == PER_THREAD
        backend.close()
    check_delivered_once(starttls_server, sent)
