"""Lua scripts in batches, by EVALSHA on a ``Lane`` (no ``SCRIPT EXISTS`` round trip, which
redis-py's pipeline sends before every batch holding a script).  The entries that come back
NOSCRIPT (Redis restarted and lost its script cache) did not run, so they are loaded and run
again.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

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
    its text's, so the commands stay as they are)."""
    results = await lane.execute(commands)
    return await _rerun(lane, commands, scripts, results)


async def _rerun(
    lane: Lane, commands: Sequence[Sequence[Any]], scripts: Iterable[AsyncScript],
    results: list[Any],
) -> list[Any]:
    again = [i for i, r in enumerate(results) if is_noscript(r)]
    if again:
        # loaded on the lane too: right after a restart (the usual reason for NOSCRIPT) the
        # client's idle pooled connections are dead and fail their first command
        loads = await lane.execute([["SCRIPT", "LOAD", script.script] for script in scripts])
        failed = next((r for r in loads if isinstance(r, Exception)), None)
        if failed is not None:
            raise failed
        retried = await lane.execute([commands[i] for i in again])
        for i, res in zip(again, retried, strict=True):
            results[i] = res
    return results


def is_noscript(reply: Any) -> bool:
    return isinstance(reply, NoScriptError) or (
        isinstance(reply, Exception) and str(reply).startswith("NOSCRIPT")
    )


_RERUNS: set[asyncio.Task[list[Any]]] = set()  # held until done (the loop keeps weak refs)


def settled(
    lane: Lane,
    commands: Sequence[Sequence[Any]],
    scripts: Iterable[AsyncScript],
    then: Callable[[list[Any] | BaseException], None],
) -> Done:
    """The ``Done`` of a lane source's batch with ``execute``'s NOSCRIPT handling:
    ``then`` gets the replies at once, or (when some entries came back NOSCRIPT) once the
    scripts are loaded and those entries run again, from a task."""
    return functools.partial(_settle, lane, commands, list(scripts), then)


def _settle(
    lane: Lane,
    commands: Sequence[Sequence[Any]],
    scripts: list[AsyncScript],
    then: Callable[[list[Any] | BaseException], None],
    result: list[Any] | BaseException,
) -> None:
    if isinstance(result, BaseException) or not any(is_noscript(r) for r in result):
        then(result)
        return
    task = asyncio.get_running_loop().create_task(_rerun(lane, commands, scripts, result))
    _RERUNS.add(task)

    def _done(t: asyncio.Task[list[Any]]) -> None:
        _RERUNS.discard(t)
        if t.cancelled():
            then(ConnectionError("lane closed"))
        else:
            exc = t.exception()
            then(exc if exc is not None else t.result())

    task.add_done_callback(_done)
