"""Lua scripts in batches, by EVALSHA on a ``Lane`` (no ``SCRIPT EXISTS`` round trip, which
redis-py's pipeline sends before every batch holding a script).  The entries that come back
NOSCRIPT (Redis restarted and lost its script cache, or a worker's first calls) did not run,
so they are loaded and run again; a lane source's batch ahead of everything submitted since
(``settled``), so a later round trip's scripts never run, nor answer, before them.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from ..core.running import settle
from .lane import Done, Lane

ScriptCall = tuple[AsyncScript, Sequence[Any], Sequence[Any]]  # script, keys, args


def evalsha(script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    return ["EVALSHA", script.sha, len(keys), *keys, *args]


async def run_scripts(lane: Lane, calls: Sequence[ScriptCall]) -> list[Any]:
    """Each call's reply, in order; a failed call's reply is its exception (never raised
    here, except when the connection fails: then that is raised)."""
    scripts = {id(script): script for script, _, _ in calls}.values()
    return await execute(lane, [evalsha(*call) for call in calls], scripts)


async def execute(
    lane: Lane, commands: Sequence[Sequence[Any]], scripts: Iterable[AsyncScript]
) -> list[Any]:
    """``lane.execute`` for commands among which are EVALSHAs of ``scripts``: the ones
    that come back NOSCRIPT are run again once the scripts are loaded (a script's sha is
    its text's, so the commands stay as they are), as ``settled`` does."""
    fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
    lane.submit(commands, settled(lane, commands, scripts, functools.partial(settle, fut)))
    return await fut


def is_noscript(reply: Any) -> bool:
    return isinstance(reply, NoScriptError) or (
        isinstance(reply, Exception) and str(reply).startswith("NOSCRIPT")
    )


def settled(
    lane: Lane,
    commands: Sequence[Sequence[Any]],
    scripts: Iterable[AsyncScript],
    then: Callable[[list[Any] | BaseException], None],
    on_retry: Callable[[], None] | None = None,
) -> Done:
    """The ``Done`` of a lane source's batch with ``execute``'s NOSCRIPT handling:
    ``then`` gets the replies at once, or (when some entries came back NOSCRIPT) with the
    next round trip, at whose head the scripts are loaded and those entries run again
    (``Lane.retry_first``): nothing submitted since runs before them, in Redis or in its
    callbacks.  ``on_retry`` is called when that happens, before the next round trip's
    batches are taken."""
    return functools.partial(_settle, lane, commands, list(scripts), then, on_retry)


def _settle(
    lane: Lane,
    commands: Sequence[Sequence[Any]],
    scripts: list[AsyncScript],
    then: Callable[[list[Any] | BaseException], None],
    on_retry: Callable[[], None] | None,
    result: list[Any] | BaseException,
) -> None:
    if isinstance(result, BaseException) or not any(is_noscript(r) for r in result):
        then(result)
        return
    again = [i for i, r in enumerate(result) if is_noscript(r)]
    loads = [["SCRIPT", "LOAD", script.script] for script in scripts]
    if on_retry is not None:
        on_retry()
    lane.retry_first([*loads, *(commands[i] for i in again)],
                     functools.partial(_rerun_done, then, result, again, len(loads)))


def _rerun_done(
    then: Callable[[list[Any] | BaseException], None], results: list[Any], again: list[int],
    loads: int, replies: list[Any] | BaseException,
) -> None:
    """The replies of a batch's entries run again replace their NOSCRIPT replies; a failed
    load fails the batch.  (Loaded on the lane: right after a restart, the usual reason
    for NOSCRIPT, the client's idle pooled connections are dead and fail their first
    command.)"""
    if isinstance(replies, BaseException):
        then(replies)
        return
    failed = next((r for r in replies[:loads] if isinstance(r, Exception)), None)
    if failed is not None:
        then(failed)
        return
    for i, res in zip(again, replies[loads:], strict=True):
        results[i] = res
    then(results)
