"""Every Redis key of the risk engine, built in one place.

Hash tags - the choice, and why it works on Redis Cluster:
every caller-scoped counter of one brand lives under the brand's risk tag `{r<brand>}`. One attempt checks
several scopes (client, terminal, store, brand, customer device, code) and must check them all before counting
any, atomically: that needs one script over keys of one slot, so the scopes of one attempt must share a tag, and
the brand is the narrowest thing they all share. The cost: one brand's risk counters are bounded by one Redis
node, and brands spread over the cluster's nodes by their tags (a brand that outgrows a node needs its limits
split over K risk shards, each holding 1/K of every limit - the way campaign budgets are split).

On a single Redis the risk part runs inside the redeem script (one awaited call); on Redis Cluster the campaign
shard and the brand's risk tag are different slots, so the risk part is its own call before the redemption
(lua/risk.lua; gateway/risk_counters.py, RGW_RISK_REDIS_URL) and failed attempts are reported after it.

    rgw:{r7}:w:<campaign>:<scope>:<subject>   zset    sliding window: one member per counted attempt, scored by
                                                       ms; <campaign> is 0 for brand-wide limits
    rgw:{r7}:f:<scope>:<subject>              zset    failed attempts (unknown codes, other brands' codes, bad
                                                       check characters) within the lockout window
    rgw:{r7}:lock:<scope>:<subject>           string  present while the scope is locked out (PX = cool-down)
    rgw:{r7}:t:<device>                       string  "lat|lon|ms" of the device's last redemption (travel)
    rgw:{r7}:events                           stream  risk events (denials, shadow hits) for the ledger writer,
                                                       listed in rgw:outboxes by every gateway every second

Subjects are the brand's own external ids (store, "store/terminal"), client ids, customer device ids and code
refs (keyed hashes): never a code, never a key.
"""

from __future__ import annotations

from risk.model import Scope

PREFIX = "rgw"


def brand_tag(brand_id: int) -> str:
    """The hash tag of one brand's risk counters."""
    return f"{{r{brand_id}}}"


def window_key(brand_id: int, campaign_id: int, scope: Scope, subject: str) -> str:
    """A sliding-window limit's members; campaign 0 for a brand-wide limit."""
    return f"{PREFIX}:{brand_tag(brand_id)}:w:{campaign_id}:{scope.value}:{subject}"


def failures_key(brand_id: int, scope: Scope, subject: str) -> str:
    """Failed attempts of a scope within the lockout window."""
    return f"{PREFIX}:{brand_tag(brand_id)}:f:{scope.value}:{subject}"


def lock_key(brand_id: int, scope: Scope, subject: str) -> str:
    """Present while the scope is locked out."""
    return f"{PREFIX}:{brand_tag(brand_id)}:lock:{scope.value}:{subject}"


def travel_key(brand_id: int, device_id: str) -> str:
    """Where and when a customer device last redeemed."""
    return f"{PREFIX}:{brand_tag(brand_id)}:t:{device_id}"


def events_key(brand_id: int) -> str:
    """The brand's risk-event stream (an outbox the ledger writer drains into risk_events)."""
    return f"{PREFIX}:{brand_tag(brand_id)}:events"


def lock_pattern(brand_id: int) -> str:
    """SCAN pattern of a brand's locks (administration only, never the hot path)."""
    return f"{PREFIX}:{brand_tag(brand_id)}:lock:*"


def terminal_subject(store_id: str, terminal_id: str) -> str:
    """Terminal external ids are unique per store, so a terminal's subject names both."""
    return f"{store_id}/{terminal_id}"
