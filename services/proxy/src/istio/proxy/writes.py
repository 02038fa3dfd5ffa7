"""Write coalescing shared by the downstream (`HttpConnection`) and upstream
(`UpstreamConnection`) protocols: `cork` holds writes back until `uncork`, so that what one
event produces (a response head with its body and its end, a run of chunks) goes out in one
system call. `CorkedFrames` is the same for the HTTP/2 protocols, whose codec gathers frames
in its own buffer: `flush` writes them once the loop's turn is over (every stream's frames of
that turn in one write), and not while corked.

`CorkedWrites` is a mixin with no state of its own (empty `__slots__`); the class using it
provides `transport`, `pending` and `closed`. Its methods are found by ordinary method lookup,
so a write costs what it did when each class defined them itself.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from istio.http2 import H2Connection


class _Corkable(Protocol):
    transport: asyncio.Transport | None
    pending: list[bytes] | None  # writes held back while corked
    closed: bool


class CorkedWrites:
    __slots__ = ()

    # provided by the class using the mixin (see _Corkable)
    transport: asyncio.Transport | None
    pending: list[bytes] | None
    closed: bool

    def write(self, data: bytes) -> None:
        pending = self.pending
        if pending is not None:
            pending.append(data)
        elif self.transport is not None and not self.closed:
            self.transport.write(data)

    def cork(self: _Corkable) -> bool:
        """Hold writes back until `uncork`, to send what one event produces (a response head
        with its body and its end, a run of chunks) in one system call. True when this call
        corked the connection, so the caller owns the `uncork`; False when already corked."""
        if self.pending is not None:
            return False
        self.pending = []
        return True

    def uncork(self: _Corkable) -> None:
        pending, self.pending = self.pending, None
        if not pending or self.transport is None or self.closed:
            return
        if len(pending) == 1:
            self.transport.write(pending[0])
        else:
            self.transport.writelines(pending)


class CorkedFrames:
    # provided by the class using the mixin
    transport: asyncio.Transport | None
    loop: asyncio.AbstractEventLoop
    h2: H2Connection
    corked: bool
    closed: bool
    send_scheduled: bool

    def flush(self) -> None:
        """Send the queued frames at the end of this turn of the event loop, not now: what
        one turn produces on this connection (the headers, data and end of every stream it
        touched) goes out in one system call. Unless corked: `uncork` flushes."""
        if self.send_scheduled or self.corked or self.transport is None or self.closed:
            return
        self.send_scheduled = True
        self.loop.call_soon(self.send_queued)

    def send_queued(self) -> None:
        self.send_scheduled = False
        if self.transport is None or self.closed:
            return
        out = self.h2.data_to_send()
        if out:
            self.transport.write(out)

    def cork(self) -> bool:
        """True when this call corked the connection (the caller owns the `uncork`)."""
        if self.corked:
            return False
        self.corked = True
        return True

    def uncork(self) -> None:
        self.corked = False
        self.flush()
