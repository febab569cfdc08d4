"""The route of an imported code: a code a brand supplied carries no route in its text, so its brand's directory
(rgw:{d<brand>}:dir:<bucket>, written by `rgw codes import`) says which campaign shard holds it. One pipelined
round trip, for the requests of brands that import codes only; a generated code never comes here."""

from __future__ import annotations

from collections.abc import Callable

from gateway.campaigns.directory import find_route
from gateway.coderefs import KeyRing
from gateway.codes import Route
from gateway.redis_client import RedisClient
from gateway.script_calls import wrap_errors


class CodeDirectory:
    """Finds imported codes' routes; `imports(brand_id)` says whether a brand has any (the registry's flag)."""

    def __init__(self, redis: RedisClient, keyring: KeyRing, imports: Callable[[int], bool]) -> None:
        self._redis = redis
        self._keyring = keyring
        self.imports = imports

    async def find(self, brand_id: int, code: str) -> Route | None:
        """The route of the brand's imported code `code` (normalised), or None when the brand imported no such
        code. StoreUnavailable when Redis cannot answer."""
        with wrap_errors():
            return await find_route(self._redis, self._keyring, brand_id, code)
