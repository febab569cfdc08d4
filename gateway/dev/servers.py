"""Throw-away redis-server and PostgreSQL processes on free ports of 127.0.0.1.

Used by the pytest session fixtures (including chaos tests that SIGKILL a server and restart it on
the same port and data dir) and by `make run`, which keeps the data under a project directory.
Nothing here touches the machine's own Redis (6379) or PostgreSQL (5432).

The code lives in processes (shared plumbing), redis_server and postgres_server; this module keeps
the public names importable from their original home.
"""

from gateway.dev.postgres_server import PostgresServer, postgres_bindir
from gateway.dev.processes import PortTakenError, free_port
from gateway.dev.redis_server import RedisServer

__all__ = ["PortTakenError", "PostgresServer", "RedisServer", "free_port", "postgres_bindir"]
