"""A client that leaves before its answer: noticed while its request does long work (a
whole-instance conversion, a frame decoded, an image rendered), and that work stopped.

hypercorn (0.18) does not cancel a request's handler when its client goes (the connection
closed, or, over HTTP/2, the stream reset): it queues `http.disconnect` on the request's
`receive` channel, which nobody reads before the response starts. A conversion of minutes
for a client gone ran to its end, its WADO_CONVERSIONS_AT_ONCE turn and a core held, and
one queued behind it for a client gone as well still began once its turn came.

A safe request (GET, HEAD: nothing it does is left half done when it stops) is served with
its channel relayed by a Departure (app.py). Long work runs inside `stopped_if_gone()`:
work for a client already gone never begins (ClientGone), and work under way is cancelled
when the disconnect comes (a conversion at its next frame: retrieve.instances). Only then is
the channel watched, by one task for the rest of the request, so a request doing no such
work (a cached frame, a search, an instance sent as stored) costs no task. The watcher never
swallows what the handler may read: a request body message it reads is held for the
handler (an empty one that is not the last holds nothing, and is passed over), and past one
with bytes that is not the last it stops watching (a GET has no body; a STOW is not
watched).

The request's Departure is found through a context variable, which its handler's task and
the tasks it starts (a streamed body's) inherit: the code doing the work need not be handed
it through every layer between the route and the worker thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import anyio

__all__ = ["ClientGone", "Departure", "Message", "Receive", "stopped_if_gone", "watched"]

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]

_CURRENT: contextvars.ContextVar[Departure | None] = contextvars.ContextVar(
    "dicomweb_departure", default=None
)


class ClientGone(Exception):
    """The request's client went away before its answer was made (app.py: audited 499, as a
    client that leaves a response part-way is)."""


class Departure:
    """One request's `receive` channel, relayed to its handler (`receive`), and watched for
    the client leaving while work runs in `stopped_if_gone`."""

    __slots__ = ("_gone", "_held", "_reading", "_receive", "_scopes", "_watcher")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._gone: Message | None = None  # the disconnect, once it came
        self._held: collections.deque[Message] | None = None  # read by the watcher, not taken
        self._reading = False  # a read of the server's channel is under way
        self._scopes: set[anyio.CancelScope] = set()  # work to cancel when the client goes
        self._watcher: asyncio.Task[None] | None = None

    @property
    def gone(self) -> bool:
        return self._gone is not None

    async def receive(self) -> Message:
        """The next message for the handler: what the watcher read and holds first; the
        disconnect again and again once it came (ASGI: every later receive returns it)."""
        while True:
            if self._held:
                return self._held.popleft()
            if self._gone is not None:
                return self._gone
            watcher = self._watcher
            if watcher is None or watcher.done():
                return await self._read()
            # The watcher reads: what it reads is held for us (it stops after a body message
            # that is not the last), or it is the disconnect.
            await asyncio.wait([watcher])

    async def _read(self) -> Message:
        self._reading = True
        try:
            message = await self._receive()
        finally:
            self._reading = False
        if message["type"] == "http.disconnect":
            self._gone = message
            for scope in self._scopes:
                scope.cancel()
        return message

    def watch(self, scope: anyio.CancelScope) -> bool:
        """Cancel `scope` when the client goes. Whether the channel is watched from now on
        by a watcher started here (one per request): not when it is being read already
        (that read sees the disconnect), nor while the handler has a body message the
        watcher read to take first."""
        self._scopes.add(scope)
        if self._reading or (self._watcher is not None and not self._watcher.done()):
            return False
        if self._held and self._held[-1].get("more_body", False):
            return False
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return True

    def unwatch(self, scope: anyio.CancelScope) -> None:
        self._scopes.discard(scope)

    async def _watch(self) -> None:
        with contextlib.suppress(Exception):  # the channel failed (an idle body's 408)
            while self._gone is None:
                message = await self._read()
                if message["type"] != "http.request":
                    continue  # the disconnect (the loop ends); nothing else is sent
                if not message.get("body") and message.get("more_body", False):
                    # No body, and more to come: an HTTP/2 GET whose END_STREAM comes on an
                    # empty DATA frame after its HEADERS (RFC 9113 8.1), which hypercorn
                    # relays as an empty message. Nothing in it for the handler, nothing to
                    # read ahead: watching goes on (it stopped here, the client's leaving
                    # never seen). Not held: a stream of empty frames holds no memory.
                    continue
                if self._held is None:
                    self._held = collections.deque()
                self._held.append(message)
                if message.get("more_body", False):
                    return  # more body to come: the handler reads it, not us

    @property
    def watching(self) -> bool:
        """Whether a watcher was started (close has one to stop)."""
        return self._watcher is not None

    async def close(self) -> None:
        """The request is over: its watcher, if any, is stopped (and waited for)."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None and not watcher.done():
            watcher.cancel()
            await asyncio.wait([watcher])  # its cancellation is not ours to raise


class watched:
    """`departure` is the current request's inside the block (stopped_if_gone finds it). A
    class, not a generator: every GET and HEAD enters one."""

    __slots__ = ("_departure", "_token")

    def __init__(self, departure: Departure) -> None:
        self._departure = departure
        self._token: contextvars.Token[Departure | None] | None = None

    def __enter__(self) -> None:
        self._token = _CURRENT.set(self._departure)

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None
        _CURRENT.reset(self._token)


@contextlib.asynccontextmanager
async def stopped_if_gone() -> AsyncIterator[None]:
    """Long work for the current request: ClientGone raised at once if its client went away
    already, else the work cancelled (ClientGone raised when the cancellation ends it) if the
    client goes while it runs. A no-op outside a watched request (DIMSE, a direct call)."""
    departure = _CURRENT.get()
    if departure is None:
        yield
        return
    if departure.gone:
        raise ClientGone("the client went away")
    scope = anyio.CancelScope()
    try:
        if departure.watch(scope):
            # The watcher just started reads what the channel holds before the work begins:
            # a disconnect queued already (the client left while the request waited for the
            # database, or behind other work) stops it here, before it takes a worker thread.
            await asyncio.sleep(0)
            if departure.gone:
                raise ClientGone("the client went away")
        with scope:
            yield
    finally:
        departure.unwatch(scope)
    if scope.cancelled_caught:
        raise ClientGone("the client went away")
