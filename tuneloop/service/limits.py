"""limits: what the service refuses before any JSON is parsed, and texts it cannot encode.

`BodyLimit` is ASGI middleware: a declared Content-Length over the limit is
refused at once (the body is never read); a body without one (chunked) is
counted as it streams and refused at the first byte past the limit. A body
that is not UTF-8, or that nests JSON deeper than any request needs, is
refused before parsing too. Refusals are JSON `{"detail": "..."}` naming the
limit, never the input.

Time is bounded as well as size, so no slow client can hold the service: a
request's head must arrive within `header_seconds` (`HeaderTimeoutProtocol`,
the HTTP protocol under uvicorn, since the app only sees complete heads) and
its body within `body_seconds`, else 408 and the connection closes; at most
`max_pending_bodies` bodies are read at once (503 beyond, at once, unread).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def text_problem(text: str) -> str | None:
    """Why `text` cannot be stored or tokenised, or None. JSON's \\ud800 escapes
    decode to lone surrogates, which no encoder (tokenizer, database) accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"is not valid Unicode: a lone surrogate at character {error.start}"
    return None


def declared_length(scope: Scope) -> tuple[int | None, str | None]:
    """(Content-Length, None), (None, None) when absent, or (None, why) when malformed."""
    values = [v for k, v in scope.get("headers", []) if k.lower() == b"content-length"]
    if not values:
        return None, None
    if len(set(values)) > 1 or not values[0].isdigit():
        return None, "the Content-Length header is not one non-negative integer"
    return int(values[0]), None


@dataclass(frozen=True)
class SlowClientLimits:
    """How long a client may take, and how many may be sending bodies at once."""

    header_seconds: float = 10.0  # from the connection (or the end of its last answer) to a complete request head
    body_seconds: float = 30.0  # from a complete head to the body's last byte: 1 MB at 35 KB/s
    max_pending_bodies: int = 32  # bodies read at once: at most 32 x serve.max_body_bytes held


def libc_trim() -> Callable[[int], Any] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


MALLOC_TRIM = libc_trim()


def release_memory() -> None:
    """Hand freed heap pages back to the OS. Refused bodies arrive in ~64 KB chunks
    that glibc keeps after they are freed, so a burst of slow clients would leave the
    service's memory high for good; trimming once the last of them is gone returns it."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


def refusal_message(status: int, detail: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> tuple[dict, dict]:
    """The ASGI start and body messages of a JSON refusal that closes the connection."""
    body = json.dumps({"detail": detail}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"connection", b"close"), *headers]}
    return start, {"type": "http.response.body", "body": body}


async def refuse(send: Send, status: int, detail: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    for message in refusal_message(status, detail, headers):
        await send(message)


MAX_JSON_DEPTH = 32  # a request nests 2 levels; the JSON parser's own limit (~1000) is a RecursionError
JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


def json_depth_over(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `body` opens more than `limit` arrays or objects inside one another
    (brackets inside JSON strings do not count)."""
    if body.count(b"[") + body.count(b"{") <= limit:  # the usual case: no scan at all
        return False
    depth = 0
    for byte in re.sub(rb"[^\[\]{}]", b"", JSON_STRING.sub(b"", body)):
        depth += 1 if byte in b"[{" else -1
        if depth > limit:
            return True
    return False


class BodyLimit:
    """Refuses request bodies over `max_bytes` (413), not UTF-8 or nested too deep (422),
    arriving too slowly (408) or beyond the bodies being read at once (503), before the app
    sees them."""

    def __init__(self, app: Callable, max_bytes: int, limits: SlowClientLimits = SlowClientLimits()):
        self.app, self.max_bytes, self.limits = app, max_bytes, limits
        self.pending = 0  # bodies being read now (one event loop: no lock needed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length, malformed = declared_length(scope)
        if malformed:
            await refuse(send, 400, malformed)
            return
        too_big = f"the request body is over serve.max_body_bytes = {self.max_bytes} bytes"
        if length is not None and length > self.max_bytes:
            await refuse(send, 413, too_big)
            return
        if self.pending >= self.limits.max_pending_bodies:
            await refuse(send, 503, f"{self.pending} requests are sending their bodies, the most the service reads "
                                    "at once; retry shortly", ((b"retry-after", b"1"),))
            return
        self.pending += 1
        try:
            body = await self.read_body(receive, send, too_big)
        finally:
            self.pending -= 1
        if body is None:
            if self.pending == 0:  # the last refused or abandoned body: give its memory back
                release_memory()
            return
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as error:
            await refuse(send, 422, f"the request body is not valid UTF-8 (byte {error.start})")
            return
        if json_depth_over(body):
            await refuse(send, 422, f"invalid request: the body nests JSON more than {MAX_JSON_DEPTH} levels deep")
            return
        await self.app(scope, replay(body, receive), send)

    async def read_body(self, receive: Receive, send: Send, too_big: str) -> bytes | None:
        """The whole body, or None once it was refused (413, 408) or the client left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_seconds
        chunks, size, more = [], 0, True
        while more:  # bounded: never more than max_bytes (+ one chunk) held, never past the deadline
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                await refuse(send, 408, f"the request body did not arrive within {self.limits.body_seconds:g} s "
                                        f"({size} bytes came)")
                return None
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await refuse(send, 413, too_big)
                return None
            more = message.get("more_body", False)
        return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the buffered body once, then waits on the client."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, with a deadline on each request head: a client that
    sends nothing, or part of a head, for `header_seconds` is answered 408 and
    disconnected. (The app sees a request only once its head is complete, so this
    cannot be middleware; without it a half-sent head holds its connection forever.)"""

    header_seconds = SlowClientLimits.header_seconds

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # still reading a head (a new one on a kept-alive connection)
            self._arm_head_timer()
        elif self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_seconds, self._head_too_slow)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE or self.cycle is not None \
                and not self.cycle.response_complete:
            return
        start, body = refusal_message(408, f"the request head did not arrive within {self.header_seconds:g} s")
        head = b"".join([b"HTTP/1.1 408 Request Timeout\r\n",
                         *(name + b": " + value + b"\r\n" for name, value in start["headers"]), b"\r\n"])
        self.transport.write(head + body["body"])
        self.transport.close()


def header_timeout_protocol(seconds: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class to hand uvicorn (`http=`), with its head deadline."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_seconds": seconds})
