"""limits: what the service refuses before any JSON is parsed, and texts it cannot encode.

`BodyLimit` is ASGI middleware: a declared Content-Length over the limit is
refused at once (the body is never read); a body without one (chunked) is
counted as it streams and refused at the first byte past the limit. A body
that is not UTF-8 is refused before parsing too. Refusals are JSON
`{"detail": "..."}` naming the limit, never the input.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

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


async def refuse(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refuses request bodies over `max_bytes` (413) or not UTF-8 (422) before the app sees them."""

    def __init__(self, app: Callable, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

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
        chunks, size, more = [], 0, True
        while more:  # bounded: never more than max_bytes (+ one chunk) held
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await refuse(send, 413, too_big)
                return
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as error:
            await refuse(send, 422, f"the request body is not valid UTF-8 (byte {error.start})")
            return
        await self.app(scope, replay(body, receive), send)


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
