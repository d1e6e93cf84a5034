"""A cap on the size of every HTTP request the Space reads (an ASGI middleware; app.py installs it).

gradio keeps the last value of every input of every browser session (the page as last sent, for
`max_browser_sessions` sessions, never expired by time) before any handler sees it, and reads request
bodies of any size. So a visitor's 100 MB prompt, refused by the Space's own caps in a millisecond, still
stayed in the server's memory: 20 visitors' 10 MB prompts kept +290 MiB, one 100 MB prompt +207 MiB (peak
+300) (issue 37's barrage, benchmarks/bench_space_barrage.py). Refusing oversized bodies before gradio reads
them bounds that; the Space's own checks (`space.config.capped`) still word the refusal of anything
smaller."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestSizeLimit:
    """Refuse (HTTP 413, `message` as the JSON `detail` and `error`) any request whose body is over `max_bytes`:
    by its Content-Length before reading it, or, without one (chunked), as soon as what arrived passes the cap."""

    def __init__(self, app: App, max_bytes: int, message: str) -> None:
        self.app, self.max_bytes, self.message = app, max_bytes, message

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.strip().isdigit() or int(length) > self.max_bytes:
                raw = length.strip().decode("latin-1")
                await self._refuse(send, f"{int(raw):,}" if raw.isdigit() else repr(raw[:20]))
                return
            await self.app(scope, receive, send)
            return
        if b"chunked" not in headers.get(b"transfer-encoding", b"").lower():
            await self.app(scope, receive, send)
            return
        buffered: list[Message] = []  # a chunked body: read it (up to the cap) before the app does
        size = 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(send, f"over {self.max_bytes:,}")
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, size: str) -> None:
        text = f"this request is {size} bytes; {self.message}"
        body = json.dumps({"detail": text, "error": text}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
