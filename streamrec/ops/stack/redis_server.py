"""Redis in the local stack: Debian's ``redis-server`` with its data kept on disk.

Persistence: an append-only file under ``<state_dir>/redis``, fsynced as
``stack.redis_appendfsync`` says (every second by default, so a crash loses at most the last
second of writes, which the feature worker pushes again from Kafka); no RDB snapshots.

:func:`redis_programs` are the supervised processes, :func:`redis_healthy` their readiness
probe and :func:`finish_start` what runs once they are up (nothing for one server).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import redis

from streamrec.ops.stack.programs import Program

if TYPE_CHECKING:
    from streamrec.ops.settings import StackSettings


def redis_healthy(redis_settings: Any) -> bool:
    try:
        client = redis.Redis(host=redis_settings.host, port=redis_settings.port, socket_timeout=1)
        return bool(client.ping())
    except redis.RedisError:
        return False


def redis_command(settings: StackSettings, port: int, data_dir_name: str = "redis") -> list[str]:
    """One ``redis-server`` with its append-only file under ``<state_dir>/<data_dir_name>``."""
    data_dir = settings.paths.state_dir / data_dir_name
    data_dir.mkdir(parents=True, exist_ok=True)
    return [
        settings.stack.redis_server_bin,
        "--port",
        str(port),
        "--bind",
        settings.redis.host,
        "--dir",
        str(data_dir),
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        settings.stack.redis_appendfsync,
        "--protected-mode",
        "no",
    ]


def redis_programs(settings: StackSettings) -> list[Program]:
    """The supervised Redis process(es) of the stack."""
    redis_settings = settings.redis
    return [Program("redis", redis_command(settings, redis_settings.port), lambda: redis_healthy(redis_settings), 10)]


def finish_start(settings: StackSettings) -> None:
    """What must happen once every Redis program runs (nothing for one server)."""
    del settings
