"""The running event loop, looked up once per object.

``asyncio.get_running_loop()`` (and ``ensure_future``, which calls it) makes a ``getpid``
system call on every call in CPython 3.11 (a fork check); the hot path asked for the loop
about seven times per message across instances.
"""

from __future__ import annotations

import asyncio
from typing import Any


class LoopBound:
    """Mix-in for objects used from one event loop at a time: ``self.running_loop()``."""

    _loop: asyncio.AbstractEventLoop | None = None

    def running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop this object is used from; the caller must be running in it.  A closed
        loop is replaced (tests run one loop after another in one process)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop


def settle(fut: asyncio.Future[Any], outcome: Any) -> None:
    """Resolve ``fut`` with ``outcome``, or fail it when that is an exception; a future that
    is done already (cancelled by its waiter) is left as it is."""
    if fut.done():
        return
    if isinstance(outcome, BaseException):
        fut.set_exception(outcome)
    else:
        fut.set_result(outcome)
