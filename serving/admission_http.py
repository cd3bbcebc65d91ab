"""The HTTP side of admission control: which requests it applies to, their deadlines, and the
middleware that admits, times and cancels them (:mod:`serving.admission` decides; this module acts)."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import ClientDisconnect

from serving.admission import DEADLINE, DISCONNECTED, AdmissionController, Ticket
from serving.asgi import ASGIApp, Message, Receive, Scope, Send, header_value, send_json
from serving.errors import REJECTION_KEY, OverloadedError, overloaded_response

#: Routes that run the model; everything else (health, metrics, metadata) bypasses admission.
INFERENCE_PATH = re.compile(r"^/(v1/models/[^/:]+:predict|v2/models/[^/]+/infer|invocations)$")
#: Request header with the time the client will wait, in ms. Envoy (Istio, Knative) sets it on
#: requests it forwards; any client may send it.
DEADLINE_HEADER = b"x-envoy-expected-rq-timeout-ms"


def client_timeout_s(scope: Scope) -> float | None:
    """The deadline header in seconds; absent, unparsable or not positive: ``None``."""
    raw = header_value(scope, DEADLINE_HEADER)
    try:
        ms = float(raw) if raw is not None else math.nan
    except ValueError:
        return None
    return ms / 1000.0 if ms > 0 and math.isfinite(ms) else None


def content_length(scope: Scope) -> int | None:
    """``Content-Length`` as an int (RequestGuard has already refused bad values and oversize ones)."""
    raw = header_value(scope, b"content-length")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


class AdmissionMiddleware:
    """ASGI middleware for the inference routes: admission, body-read timeout, deadline, disconnect.

    An admitted request is cancelled when its body has not arrived within ``read_timeout_s`` (408,
    connection closed), when its deadline passes before the answer starts (503), or when its client
    disconnects (nothing to answer; logged as 499). Other routes pass straight through.
    """

    def __init__(
        self,
        app: ASGIApp,
        controller: AdmissionController,
        read_timeout_s: float,
        on_admitted: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.controller = controller
        self.read_timeout_s = read_timeout_s
        self.on_admitted = on_admitted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or not INFERENCE_PATH.match(scope["path"])
        ):
            await self.app(scope, receive, send)
            return
        try:
            ticket = self.controller.enter(content_length(scope), client_timeout_s(scope))
        except OverloadedError as e:
            scope[REJECTION_KEY] = str(e)
            await overloaded_response(e)(scope, receive, send)
            return
        if self.on_admitted is not None:
            self.on_admitted()
        await _Exchange(self, ticket, scope, receive, send).run()


class _Exchange:
    """One admitted request: its timers, the watch for its client leaving, and their cancellations.

    The request runs in uvicorn's task for it; a timer or the watch cancels that task (as
    ``asyncio.timeout`` does) and :meth:`run` takes the cancellation back and answers instead.
    """

    def __init__(
        self, owner: AdmissionMiddleware, ticket: Ticket, scope: Scope, receive: Receive, send: Send
    ):
        self.app = owner.app
        self.controller = owner.controller
        self.read_timeout_s = owner.read_timeout_s
        self.ticket = ticket
        self.scope = scope
        self._receive = receive
        self._send = send
        self.outcome: str | None = None  # why the request was cancelled
        self.status = 0
        self.body_done = False
        self.response_started = False
        self.response_complete = False
        self.gone = asyncio.Event()  # the client left or the answer is complete
        self.task: asyncio.Task[Any] | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None

    async def run(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        token = self.controller.bind(self.ticket)
        self.timer = asyncio.get_running_loop().call_later(self.read_timeout_s, self.expire, "read_timeout")
        failed = False
        try:
            await self.app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            # Ours (outcome set) unless the server is also stopping (then more cancels are pending).
            if self.outcome is None or task.uncancel() > 0:
                raise
        except Exception:
            failed = True
            if self.outcome is None:
                raise
        finally:
            self.timer.cancel()
            if self.watcher is not None:
                self.watcher.cancel()
            self.gone.set()
            self.controller.unbind(token)
            served = self.outcome is None and not failed and 0 < self.status < 400
            self.controller.release(self.ticket, served=served)
        if self.outcome is not None:
            await self.answer(self.outcome)

    async def answer(self, outcome: str) -> None:
        """Close a cancelled request: 499 in the log for a client that left, else 408 or 503."""
        if outcome == DISCONNECTED:
            self.controller.shed(DISCONNECTED)
            raise ClientDisconnect()  # RequestGuard logs it as 499
        if self.response_started:
            return
        if outcome == "read_timeout":
            message = f"the request body did not arrive within {self.read_timeout_s:g} s"
            self.scope[REJECTION_KEY] = message
            await send_json(self._send, 408, orjson.dumps({"error": message}), [(b"connection", b"close")])
            return
        self.controller.shed(DEADLINE)
        retry = self.controller.retry_after_s()
        error = OverloadedError(
            f"server overloaded (deadline): not answered within its deadline; retry after {retry} s",
            reason=DEADLINE,
            retry_after_s=retry,
        )
        self.scope[REJECTION_KEY] = str(error)
        await overloaded_response(error)(self.scope, self._receive, self._send)

    # Timers and the client watch --------------------------------------------------------------
    def cancel(self, outcome: str) -> None:
        """Cancel the request once, for ``outcome`` (a second cancel could not be taken back)."""
        if self.outcome is None and self.task is not None and not self.task.done():
            self.outcome = outcome
            self.task.cancel()

    def expire(self, reason: str) -> None:
        """Read timeout or deadline: cancel the request unless its answer has started."""
        if not self.response_started and not (reason == "read_timeout" and self.body_done):
            self.cancel(reason)

    def on_body_complete(self) -> None:
        loop = asyncio.get_running_loop()
        self.body_done = True
        if self.timer is not None:
            self.timer.cancel()
        now = self.controller.clock()
        deadline = self.ticket.deadline(now, self.controller.limits.latency_budget_s)
        self.timer = loop.call_later(max(0.0, deadline - now), self.expire, DEADLINE)
        self.watcher = loop.create_task(self.watch())

    async def watch(self) -> None:
        """After the body, the next ASGI message is the client leaving or the answer completing."""
        try:
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    break
            if not self.response_complete:
                self.cancel(DISCONNECTED)
        finally:
            self.gone.set()

    # ASGI callables handed to the app -----------------------------------------------------------
    async def receive(self) -> Message:
        if self.body_done:
            await self.gone.wait()
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self.controller.add_body_bytes(self.ticket, len(message.get("body", b"")))
            if not message.get("more_body", False):
                self.on_body_complete()
            return message
        # The client left before its body arrived: end the request here, not in the app's handlers.
        self.cancel(DISCONNECTED)
        await asyncio.get_running_loop().create_future()  # the cancellation is delivered here
        raise AssertionError("unreachable")

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.response_started = True
            self.status = int(message["status"])
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.response_complete = True
        await self._send(message)
