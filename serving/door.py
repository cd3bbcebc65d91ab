"""Limits at the door: request-head size and count, slow and idle connections (uvicorn's httptools).

uvicorn has no limit on the size of a request head with httptools and no timeout for a request that
is still arriving, so one client can stall the event loop with a 96 MB header (it is accumulated by
repeated concatenation) or hold connections open forever by sending a few bytes and stopping.
:class:`DoorProtocol` is uvicorn's own protocol with four additions, all decided before the ASGI
app sees the request:

* a head (request line and headers) over ``max_header_bytes`` or with more than ``max_headers``
  fields is answered 431 and the connection closed; at most ``max_header_bytes`` of it is parsed;
* a head not complete within ``read_timeout_s`` of its first byte is answered 408 and closed (the
  body's own timeout is :class:`serving.admission_http.AdmissionMiddleware`'s);
* a connection that never sends a byte is closed after ``--timeout_keep_alive``, as uvicorn does
  only between requests;
* a request answered before its body arrived (503, 413, 404) has ``read_timeout_s`` for the rest of
  its body, which uvicorn reads and discards (closing at once could reset the connection before
  the client reads the answer); past that the connection is closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

access_logger = logging.getLogger("serving.access")


@dataclass(frozen=True)
class DoorLimits:
    """Connection-level limits (flags ``--max_header_kb``, ``--max_headers``, ``--read_timeout_s``)."""

    max_header_bytes: int
    max_headers: int
    read_timeout_s: float


class DoorProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of :class:`DoorLimits`.

    uvicorn builds one per connection as ``http_protocol_class(config=..., server_state=...,
    app_state=..., _loop=...)``; bind the limits with ``functools.partial``.
    """

    def __init__(
        self, *args: Any, limits: DoorLimits, on_refuse: Callable[[int], None] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.on_refuse = on_refuse
        self._in_head = True  # between requests, or inside a request's head
        self._head_bytes = 0
        self._heads = 0  # request heads completed on this connection
        self._header_count = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._refused = False

    # Connection ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn arms its keep-alive timer after each response only; data_received disarms it.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused or self.transport.is_closing():
            return
        if not self._in_head:
            super().data_received(data)
            return
        room = self.limits.max_header_bytes - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            super().data_received(data)
            return
        # Parse only what the limit allows: if the head is not complete by then, it is too large.
        heads = self._heads
        if room > 0:
            self._head_bytes += room
            super().data_received(data[:room])
        if self._heads == heads:
            if not self._refused and not self.transport.is_closing():
                self._refuse(431, f"request headers over the limit of {self.limits.max_header_bytes:,} bytes")
            return
        self.data_received(data[room:])

    # Parser callbacks ------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_count = 0
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.read_timeout_s, self._head_timed_out)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count <= self.limits.max_headers:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        self._in_head = False
        self._heads += 1
        if self._header_count > self.limits.max_headers:
            self._refuse(431, f"more than {self.limits.max_headers} request header fields")
            return
        self._body_timer = self.loop.call_later(self.limits.read_timeout_s, self._body_timed_out)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._cancel_body_timer()
        self._in_head = True
        self._head_bytes = 0
        if not self._refused:
            super().on_message_complete()

    # Refusals --------------------------------------------------------------------------------
    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self._refused and not self.transport.is_closing():
            self._refuse(408, f"request headers did not arrive within {self.limits.read_timeout_s:g} s")

    def _body_timed_out(self) -> None:
        # While the app still reads the body, its 408 is the app's (AdmissionMiddleware); a body
        # still arriving after its request was answered is only holding the connection.
        self._body_timer = None
        if self.cycle is not None and self.cycle.response_complete and not self.transport.is_closing():
            self.transport.close()

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with a JSON error and close; the ASGI app never sees the request."""
        self._refused = True
        self._cancel_head_timer()
        if self.cycle is None or self.cycle.response_complete:
            body = json.dumps({"error": message}).encode()
            head = b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            self.transport.write(STATUS_LINE[status] + head % len(body) + body)
        # else a response on this connection is still being written: just close
        self.transport.close()
        client = self.client[0] if self.client else None
        entry = {"event": "refused", "status": status, "error": message, "client": client}
        access_logger.warning(json.dumps(entry))
        if self.on_refuse is not None:
            try:
                self.on_refuse(status)
            except Exception:  # metrics must never break the server
                access_logger.exception("refusal observer failed")
