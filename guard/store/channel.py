"""Redis commands on a connection held for them: the guard's hot round trips (a web worker's
admissions and appended observations, a monitor's detector state and its reads of the streams).

redis-py's client costs about 200 us of CPU per round trip here (its connection pool, retry
machinery, response callbacks, and a task per write for the write's timeout), several times what
the round trip itself costs. A ``RedisChannel`` takes one connection from the client's pool
(connected, authenticated and on its database as the URL says), writes the packed commands of a
batch on it and reads their raw replies with the connection's parser, under one timeout for the
round trip (the connection's ``_writer`` and ``_parser``: redis-py 5 to 8, as pinned). One batch
is in flight at a time (a lock keeps the replies in step; its users, a ``Coalescer``'s sender or a
monitor's loop, never wait on it)."""
from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

if sys.version_info >= (3, 11, 3):
    from asyncio import timeout
else:  # missing, or flawed before 3.11.3 (as redis-py, which then depends on async-timeout)
    from async_timeout import timeout

ScriptCall = tuple[AsyncScript, Sequence, Sequence]
"""A script (its SHA1 and source), its keys and its other arguments."""


class RedisChannel:
    """Batches of commands, each batch in one round trip on a connection of ``client``'s pool. A
    reply that is an error comes back as its ``ResponseError``; a script Redis does not know (a
    restarted or flushed server) is loaded and run again. A connection that failed or timed out is
    dropped (its stream may hold replies not read); a broken connection (a pooled socket that died
    with a restarted server) is replaced and the batch sent once more, as the client's own retry
    would. Failing to reach Redis raises redis-py's ``ConnectionError``, or ``TimeoutError`` when a
    round trip takes more than ``timeout`` seconds."""

    def __init__(self, client: aioredis.Redis, timeout: float):
        self._pool, self._timeout = client.connection_pool, timeout
        self._connection: AbstractConnection | None = None
        self._lock = asyncio.Lock()

    async def call(self, script: AsyncScript, keys: Sequence, args: Sequence) -> object:
        """One call's reply; an error reply is raised."""
        reply = (await self.call_many([(script, keys, args)]))[0]
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def call_many(self, calls: list[ScriptCall]) -> list[object]:
        """Each call's reply, in order (an error reply as its exception)."""
        replies = await self.execute([evalsha(call) for call in calls])
        unknown = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if unknown:  # those ran nowhere: load their scripts, run them again
            scripts = list({calls[i][0].sha: calls[i][0].script for i in unknown}.values())
            again = await self.execute([*(("SCRIPT", "LOAD", script) for script in scripts),
                                        *(evalsha(calls[i]) for i in unknown)])
            for i, reply in zip(unknown, again[len(scripts):]):
                replies[i] = reply
        return replies

    async def execute(self, commands: list[tuple]) -> list[object]:
        """The raw reply to each of ``commands`` (an error reply as its exception), in one round trip."""
        async with self._lock:
            try:
                return await self._send(commands)
            except RedisConnectionError:  # e.g. a pooled socket that died with a restarted server
                return await self._send(commands)

    async def _send(self, commands: list[tuple]) -> list[object]:
        """The replies to ``commands``, sent together on the held connection (dropped on failure)."""
        if self._connection is None:
            self._connection = await self._pool.get_connection()
        connection = self._connection
        try:
            async with timeout(self._timeout):
                if not connection.is_connected:
                    await connection.connect()
                connection._writer.writelines(encode(commands))
                return [await connection._parser.read_response() for _ in commands]
        except BaseException as error:
            self._connection = None
            await connection.disconnect(nowait=True)
            await self._pool.release(connection)
            if isinstance(error, asyncio.TimeoutError):
                raise RedisTimeoutError(f"no reply from Redis within {self._timeout} s") from None
            raise

    async def close(self) -> None:
        """Give the held connection back to the pool."""
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await self._pool.release(connection)


def encode(commands: list[tuple]) -> list[bytes]:
    """``commands`` in the RESP wire format, as pieces to write in order (values are not copied):
    each argument as bytes, a ``str`` in UTF-8, a number as its ``repr`` (as redis-py encodes them)."""
    pieces = []
    for command in commands:
        pieces.append(b"*%d\r\n" % len(command))
        for argument in command:
            if not isinstance(argument, bytes):
                argument = (argument if isinstance(argument, str) else repr(argument)).encode()
            pieces += (b"$%d\r\n" % len(argument), argument, b"\r\n")
    return pieces


def evalsha(call: ScriptCall) -> tuple:
    script, keys, args = call
    return ("EVALSHA", script.sha, len(keys), *keys, *args)
