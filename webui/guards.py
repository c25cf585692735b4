"""What keeps one client from wearing the server down: repeated wrong logins are slowed, and a client that sends its
request slowly (headers dripped a byte at a time, a body that stalls) is cut off instead of holding a connection
for ever."""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from typing import Any

from starlette.responses import JSONResponse


class LoginThrottle:
    """After ``failures`` wrong logins within ``window`` seconds, a client's next attempts are a 429 with
    Retry-After until the oldest failure is ``window`` seconds old. An attempt is a request with an Authorization
    header (the API's basic login) or a POST to Gradio's /login; a request without any login (a browser's first
    try, a client that has none) is not counted. Clients are told apart by address; at most ``clients`` are
    remembered (the longest quiet forgotten first), so that the record itself stays small."""

    def __init__(self, app: Any, failures: int = 5, window: float = 60.0, clients: int = 10_000):
        self.app, self.failures, self.window, self.clients = app, failures, window, clients
        self.record: OrderedDict[str, deque[float]] = OrderedDict()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self._is_login(scope):
            await self.app(scope, receive, send)
            return
        client = scope["client"][0] if scope.get("client") else "-"
        wait = self._wait(client)
        if wait > 0:
            message = f"too many wrong logins from {client}: try again in {wait:.0f} s"
            await JSONResponse({"detail": message}, status_code=429,
                               headers={"Retry-After": str(int(wait) + 1)})(scope, receive, send)
            return

        async def noting_failure(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] in (400, 401):
                self._fail(client)
            await send(message)

        await self.app(scope, receive, noting_failure)

    @staticmethod
    def _is_login(scope: dict) -> bool:
        if scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/login"):
            return True
        return any(name.lower() == b"authorization" for name, _ in scope.get("headers", []))

    def _wait(self, client: str) -> float:
        """Seconds until ``client`` may try again (0: now)."""
        times = self.record.get(client)
        if not times:
            return 0.0
        now = time.monotonic()
        while times and now - times[0] > self.window:
            times.popleft()
        return self.window - (now - times[0]) if len(times) >= self.failures else 0.0

    def _fail(self, client: str) -> None:
        times = self.record.pop(client, None) or deque(maxlen=self.failures)
        times.append(time.monotonic())
        self.record[client] = times
        while len(self.record) > self.clients:
            self.record.popitem(last=False)


def with_deadlines(protocol: type[asyncio.Protocol], seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol ``protocol`` (h11's or httptools') where a client has ``seconds`` to send a request's
    headers, and may not go silent for longer while it sends the body; else the connection is closed. uvicorn has no
    such limit: a client dripping its headers held its connection for ever (slowloris). The connection's keep-alive
    wait is ``seconds`` too (A1111's --timeout-keep-alive)."""

    class WithDeadlines(protocol):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.timeout_keep_alive = seconds
            self.deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._arm()  # the first request's headers

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._sending_body():
                self._arm()  # the body may take long, but not pause long

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request's headers

        def connection_lost(self, exc: Exception | None) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
            self.deadline = self.loop.call_later(seconds, self._overdue)

        def _sending_body(self) -> bool:
            cycle = self.cycle
            return cycle is not None and not cycle.response_complete and cycle.more_body

        def _overdue(self) -> None:
            if self.transport.is_closing() or self.transport.get_protocol() is not self:  # closed, or a websocket now
                return
            cycle = self.cycle
            if cycle is None or cycle.response_complete or self._sending_body():
                self.transport.close()

    WithDeadlines.__name__ = WithDeadlines.__qualname__ = f"{protocol.__name__}WithDeadlines"
    return WithDeadlines
