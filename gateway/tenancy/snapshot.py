"""The registry in memory: an immutable snapshot the hot path reads without I/O.

A refresh never changes a snapshot in place: `apply` returns a new one and the caller swaps one reference, so a
request sees one consistent version from start to end without locks. `apply` copies the maps (linear in the
registry's size, milliseconds for 100k rows), which is cheap at the rate the registry changes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any, TypeVar

from gateway.tenancy import api_keys
from gateway.tenancy.model import ApiKey, Brand, Client, RiskPolicyRow, Status, Store, Terminal

K = TypeVar("K", bound=Hashable)
X = TypeVar("X", bound=Hashable)
R = TypeVar("R")

# Compared against when the key id is unknown, so that an unknown id costs the same hash and comparison as a
# known one: response times say nothing about which key ids exist.
_DUMMY_HASH = bytes(32)


@dataclass(frozen=True, slots=True)
class RegistryChanges:
    """Rows changed since some version, and the version they bring the registry to. `full`: these are all the rows
    (a load from version 0), so they replace the snapshot instead of updating it."""

    version: int
    full: bool = False
    brands: tuple[Brand, ...] = ()
    stores: tuple[Store, ...] = ()
    terminals: tuple[Terminal, ...] = ()
    clients: tuple[Client, ...] = ()
    keys: tuple[ApiKey, ...] = ()
    risk_policies: tuple[RiskPolicyRow, ...] = ()

    def __len__(self) -> int:
        rows = (self.brands, self.stores, self.terminals, self.clients, self.keys, self.risk_policies)
        return sum(len(changed) for changed in rows)


def _merge(rows: Mapping[K, R], changed: Iterable[R], id_of: Callable[[R], K]) -> Mapping[K, R]:
    merged = dict(rows)
    merged.update((id_of(row), row) for row in changed)
    return MappingProxyType(merged)


def _upsert(
    rows: Mapping[K, R], index: Mapping[X, K], changed: Iterable[R], id_of: Callable[[R], K], key_of: Callable[[R], X]
) -> tuple[Mapping[K, R], Mapping[X, K]]:
    """Rows and their natural-key index with `changed` upserted."""
    merged_rows, merged_index = dict(rows), dict(index)
    for row in changed:
        row_id = id_of(row)
        previous = merged_rows.get(row_id)
        if previous is not None:  # its natural key may have changed: drop the old entry
            merged_index.pop(key_of(previous), None)
        merged_rows[row_id] = row
        merged_index[key_of(row)] = row_id
    return MappingProxyType(merged_rows), MappingProxyType(merged_index)


def _brand_id(brand: Brand) -> int:
    return brand.id


def _slug(brand: Brand) -> str:
    return brand.slug


def _store_id(store: Store) -> int:
    return store.id


def _terminal_id(terminal: Terminal) -> int:
    return terminal.id


def _client_id(client: Client) -> str:
    return client.id


def _key_id(key: ApiKey) -> str:
    return key.key_id


def _policy_key(policy: RiskPolicyRow) -> tuple[int, int]:
    return policy.brand_id, policy.campaign_id


def _merge_policies(
    documents: Mapping[tuple[int, int], Mapping[str, Any]], changed: Iterable[RiskPolicyRow]
) -> Mapping[tuple[int, int], Mapping[str, Any]]:
    """Documents with the changed ones upserted; a cleared policy (`{}`) is dropped, as if never set."""
    merged = dict(documents)
    for policy in changed:
        if policy.document:
            merged[_policy_key(policy)] = MappingProxyType(dict(policy.document))
        else:
            merged.pop(_policy_key(policy), None)
    return MappingProxyType(merged)


def _store_key(store: Store) -> tuple[int, str]:
    return store.brand_id, store.external_id


def _terminal_key(terminal: Terminal) -> tuple[int, str]:
    return terminal.store_id, terminal.external_id


@dataclass(frozen=True, slots=True)
class Registry:
    """Every brand, store, terminal, client, key and risk-policy document at one registry version, with the indexes
    the hot path uses. The maps are read-only; build a new snapshot with `apply`.

    `risk_policies` maps (brand id, campaign id - 0 for brand-wide) to the stored document, as
    `risk.policy.PolicyBook.from_documents` takes them; cleared (empty) documents are left out."""

    version: int
    brands: Mapping[int, Brand]
    brand_ids_by_slug: Mapping[str, int]
    stores: Mapping[int, Store]
    store_ids_by_external: Mapping[tuple[int, str], int]
    terminals: Mapping[int, Terminal]
    terminal_ids_by_external: Mapping[tuple[int, str], int]
    clients: Mapping[str, Client]
    keys: Mapping[str, ApiKey]
    risk_policies: Mapping[tuple[int, int], Mapping[str, Any]]

    @classmethod
    def empty(cls) -> Registry:
        """A registry with nothing in it, at version 0 (the state before the first load)."""
        nothing: Mapping[Any, Any] = MappingProxyType({})
        return cls(0, nothing, nothing, nothing, nothing, nothing, nothing, nothing, nothing, nothing)

    def apply(self, changes: RegistryChanges) -> Registry:
        """A new snapshot with the changed rows upserted (rows are never deleted: revoke and disable are updates)."""
        if changes.full and self.version:
            return Registry.empty().apply(changes)
        if not len(changes) and changes.version == self.version:
            return self
        brands, slugs = _upsert(self.brands, self.brand_ids_by_slug, changes.brands, _brand_id, _slug)
        stores, by_store_key = _upsert(self.stores, self.store_ids_by_external, changes.stores, _store_id, _store_key)
        terminals, by_terminal_key = _upsert(
            self.terminals, self.terminal_ids_by_external, changes.terminals, _terminal_id, _terminal_key
        )
        clients = _merge(self.clients, changes.clients, _client_id)
        keys = _merge(self.keys, changes.keys, _key_id)
        policies = _merge_policies(self.risk_policies, changes.risk_policies)
        return Registry(
            changes.version, brands, slugs, stores, by_store_key, terminals, by_terminal_key, clients, keys, policies
        )

    def authenticate(self, parsed: api_keys.ParsedKey, now: datetime) -> Client | None:
        """The client a key belongs to, if the key is known, its secret matches, it is neither revoked nor past its
        expiry (`now` < expires_at), and its client is usable (see `active_client`); else None."""
        key = self.keys.get(parsed.key_id)
        matches = api_keys.verify(parsed, _DUMMY_HASH if key is None else key.secret_hash)
        if key is None or not matches or key.revoked_at is not None:
            return None
        if key.expires_at is not None and now >= key.expires_at:
            return None
        return self.active_client(key.client_id)

    def active_client(self, client_id: str) -> Client | None:
        """The client, if it exists, is not revoked and its brand (platform clients have none) is active.

        Revocation takes effect when it is committed, whatever the clocks say, so revoked_at is not compared with
        the time."""
        client = self.clients.get(client_id)
        if client is None or client.revoked_at is not None:
            return None
        if client.brand_id is not None and not self._brand_active(client.brand_id):
            return None
        return client

    def _brand_active(self, brand_id: int) -> bool:
        brand = self.brands.get(brand_id)
        return brand is not None and brand.status is Status.ACTIVE

    def brand(self, brand_id: int) -> Brand | None:
        """A brand by id, whatever its status."""
        return self.brands.get(brand_id)

    def brand_by_slug(self, slug: str) -> Brand | None:
        """A brand by its slug, whatever its status."""
        brand_id = self.brand_ids_by_slug.get(slug)
        return None if brand_id is None else self.brands.get(brand_id)

    def store(self, store_id: int) -> Store | None:
        """A store by id, whatever its status."""
        return self.stores.get(store_id)

    def store_by_external(self, brand_id: int, external_id: str) -> Store | None:
        """A brand's store by the brand's own id for it."""
        store_id = self.store_ids_by_external.get((brand_id, external_id))
        return None if store_id is None else self.stores.get(store_id)

    def terminal(self, terminal_id: int) -> Terminal | None:
        """A terminal by id, whatever its status."""
        return self.terminals.get(terminal_id)

    def terminal_by_external(self, store_id: int, external_id: str) -> Terminal | None:
        """A store's terminal by the brand's own id for it."""
        terminal_id = self.terminal_ids_by_external.get((store_id, external_id))
        return None if terminal_id is None else self.terminals.get(terminal_id)
