"""What every request meets before the app: slow-client timeouts, a request id and an access log,
auth, and the body read under a byte cap.

Two layers, because a request's head is read by uvicorn before any ASGI code runs:
- `http_protocol(header_timeout)`: uvicorn's h11 protocol, closing with 408 a
  connection whose request line and headers have not all arrived in time (a
  client trickling its headers a byte a second, or one that sends nothing).
- `Guard` (raw ASGI): gives the request an id (the client's `X-Request-Id` when
  it is a sane one), echoes it in the answer's headers, writes one JSON access
  log line, counts the answer in the metrics; checks the bearer token; reads
  the whole body under `max_body_bytes` (413 as soon as Content-Length or the
  bytes received pass it) and `body_timeout` (408), before anything parses it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid

ARRIVAL = "m0lite.arrival"  # scope key: time.monotonic() when the request arrived
REQUEST_ID = "m0lite.request_id"
OPEN_PATHS = {"/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

access_log = logging.getLogger("m0lite.access")


async def send_error(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """An error answer from raw ASGI (the guard runs before FastAPI)."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Raw ASGI middleware around the app; see the module docstring.

    `routes` are the paths counted under their own name in the metrics (others count as "other")."""

    def __init__(self, app, settings, metrics=None, routes=()):
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.routes = set(routes)
        self.token = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        arrival = scope[ARRIVAL] = time.monotonic()
        headers = dict(scope["headers"])  # lower-case names; a repeated header keeps its last value
        given_id = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = scope[REQUEST_ID] = given_id if _SANE_ID.fullmatch(given_id) else uuid.uuid4().hex
        status = [0]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self._guarded(scope, receive, send_with_id, headers)
        finally:
            seconds = time.monotonic() - arrival
            path = scope["path"]
            route = path if path in self.routes else "other"
            if self.metrics is not None and path != "/metrics":
                self.metrics.observe(route, status[0] or 499, seconds)  # 499: the client left first
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client") or ("", 0)
                access_log.info(json.dumps({
                    "request_id": request_id, "method": scope["method"], "path": path,
                    "status": status[0] or 499, "ms": round(seconds * 1000, 1), "client": client[0],
                    "bytes_in": int(length) if (length := headers.get(b"content-length", b"")).isdigit() else None,
                }))

    async def _guarded(self, scope, receive, send, headers):
        if self.token is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.token)):
                why = "missing Authorization header" if not given else "invalid API key"
                return await send_error(send, 401, f"{why}: send 'Authorization: Bearer <key>'",
                                        [(b"www-authenticate", b"Bearer")])

        cap = self.settings.max_body_bytes
        too_big = f"request body is over the limit of {cap} bytes (--max-body-bytes)"
        close = [(b"connection", b"close")]
        if b"content-length" in headers:
            try:
                declared = int(headers[b"content-length"])
            except ValueError:
                return await send_error(send, 400, "invalid Content-Length header", close)
            if declared > cap:
                return await send_error(send, 413, too_big, close)

        body, more = bytearray(), True
        deadline = time.monotonic() + self.settings.body_timeout
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                return await send_error(send, 408, f"request body not received within "
                                                   f"{self.settings.body_timeout:g} s (--body-timeout)", close)
            if message["type"] == "http.disconnect":
                return  # the client is gone; nobody to answer
            body += message.get("body", b"")
            if len(body) > cap:
                return await send_error(send, 413, too_big, close)
            more = message.get("more_body", False)

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as Starlette expects

        await self.app(scope, replay, send)


def http_protocol(header_timeout: float):
    """uvicorn's h11 protocol class, with a deadline for each request's line and headers."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    answer = json.dumps({"detail": f"request headers not received within {header_timeout:g} s "
                                   f"(--header-timeout)"}).encode()
    timeout_response = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                        b"content-length: %d\r\n\r\n%s" % (len(answer), answer))

    class HeaderTimeoutH11Protocol(H11Protocol):
        _head_timer = None

        def _waiting_for_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()  # a client that connects and sends nothing is timed out too

        def data_received(self, data: bytes) -> None:
            if self._waiting_for_head():
                self._arm()
            super().data_received(data)
            if not self._waiting_for_head():
                self._disarm()

        def on_response_complete(self) -> None:
            self._disarm()  # between requests the keep-alive timeout applies
            super().on_response_complete()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self._waiting_for_head() and not self.transport.is_closing():
                self.transport.write(timeout_response)
                self.transport.close()

    return HeaderTimeoutH11Protocol
