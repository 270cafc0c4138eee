"""Lua scripts in batches, by EVALSHA on a ``Lane`` (no ``SCRIPT EXISTS`` round trip, which
redis-py's pipeline sends before every batch holding a script).  The entries that come back
NOSCRIPT (Redis restarted and lost its script cache) did not run, so they are loaded and run
again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from .lane import Lane

ScriptCall = tuple[AsyncScript, Sequence[Any], Sequence[Any]]  # script, keys, args


def evalsha(script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    return ["EVALSHA", script.sha, len(keys), *keys, *args]


async def run_scripts(redis: Redis, lane: Lane, calls: Sequence[ScriptCall]) -> list[Any]:
    """Each call's reply, in order; a failed call's reply is its exception (never raised
    here, except when the connection fails: then that is raised)."""
    scripts = {id(script): script for script, _, _ in calls}.values()
    return await execute(redis, lane, [evalsha(*call) for call in calls], scripts)


async def execute(
    redis: Redis, lane: Lane, commands: Sequence[Sequence[Any]], scripts: Iterable[AsyncScript]
) -> list[Any]:
    """``lane.execute`` for commands among which are EVALSHAs of ``scripts``: the ones
    that come back NOSCRIPT are run again once ``redis`` has loaded the scripts (a
    script's sha is its text's, so the commands stay as they are)."""
    results = await lane.execute(commands)
    again = [i for i, r in enumerate(results) if is_noscript(r)]
    if again:
        for script in scripts:
            await redis.script_load(script.script)
        retried = await lane.execute([commands[i] for i in again])
        for i, res in zip(again, retried, strict=True):
            results[i] = res
    return results


def is_noscript(reply: Any) -> bool:
    return isinstance(reply, NoScriptError) or (
        isinstance(reply, Exception) and str(reply).startswith("NOSCRIPT")
    )
