"""Lua scripts in batches, by EVALSHA on a ``Lane`` (no ``SCRIPT EXISTS`` round trip, which
redis-py's pipeline sends before every batch holding a script).  The entries that come back
NOSCRIPT (Redis restarted and lost its script cache) did not run, so they are loaded and run
again.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    here, except when the connection fails: then that is raised).  ``redis`` loads scripts
    Redis forgot."""
    results = await lane.execute([evalsha(*call) for call in calls])
    again = [i for i, r in enumerate(results) if is_noscript(r)]
    if again:
        for script in {id(calls[i][0]): calls[i][0] for i in again}.values():
            script.sha = await redis.script_load(script.script)
        retried = await lane.execute([evalsha(*calls[i]) for i in again])
        for i, res in zip(again, retried, strict=True):
            results[i] = res
    return results


def is_noscript(reply: Any) -> bool:
    return isinstance(reply, NoScriptError) or (
        isinstance(reply, Exception) and str(reply).startswith("NOSCRIPT")
    )
