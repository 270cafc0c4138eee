"""Lua scripts in pipelines without redis-py's extra round trip.

redis-py's pipeline sends ``SCRIPT EXISTS`` before every execution that contains a script:
one more round trip per batch.  Here scripts go out as plain EVALSHA; the entries that come
back NOSCRIPT (Redis restarted and lost its script cache) did not run, so they are loaded
and run again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

ScriptCall = tuple[AsyncScript, Sequence[Any], Sequence[Any]]  # script, keys, args


async def run_scripts(redis: Redis, calls: Sequence[ScriptCall]) -> list[Any]:
    """Each call's reply, in order; a failed call's reply is its exception (never raised
    here, except when the pipeline itself fails: then that is raised)."""
    results = await _run(redis, calls)
    again = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
    if again:
        for script in {id(calls[i][0]): calls[i][0] for i in again}.values():
            script.sha = await redis.script_load(script.script)
        for i, res in zip(again, await _run(redis, [calls[i] for i in again]), strict=True):
            results[i] = res
    return results


async def _run(redis: Redis, calls: Sequence[ScriptCall]) -> list[Any]:
    pipe = redis.pipeline(transaction=False)
    for script, keys, args in calls:
        pipe.evalsha(script.sha, len(keys), *keys, *args)
    return list(await pipe.execute(raise_on_error=False))
