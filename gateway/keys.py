"""Every Redis key the gateway uses, built in one place (invariant 7: one campaign shard, one slot).

Everything one redemption touches shares the campaign shard's hash tag `{c<campaign>.<shard>}`, so one script
call can do the whole redemption, on a single Redis and unchanged on Redis Cluster.

    rgw:{c42.0}:meta               hash   the campaign's rules, as this shard needs them (fields: META in
                                          gateway/campaigns/layout.py)
    rgw:{c42.0}:budget             hash   this shard's share of the budget and what it has granted (BUDGET in
                                          gateway/campaigns/layout.py), issued codes, reversals, and budget
                                          transfers between shards in flight (lua/budget_move.lua)
    rgw:{c42.0}:stores             set    the store external ids the campaign is redeemable at (meta "st" = 1)
    rgw:{c42.0}:b:<bucket>         hash   issued codes, compactly: field = characters BUCKET_CHARS..REF_CHARS
                                          of the code_ref, value = the code's issue time in seconds (the bucket
                                          is the code_ref's first BUCKET_CHARS hex characters: small hashes
                                          stay listpacks, ~38 bytes a code instead of ~200 for a key per code)
    rgw:{c42.0}:code:<code_ref>    hash   one code's own state, once it has any: its overrides of the campaign's
                                          rules (uses, vf, vu, fv, dev), counters, use records (u:<n>), reversal
                                          records (x:<n>) and idempotency records (i:/r:<scope>) - see
                                          lua/redeem.lua
    rgw:{c42.0}:outbox             stream redemption events waiting for the ledger writer (consumer group
                                          "ledger"; entries are deleted once Postgres has committed them)
    rgw:{c42.0}:deadletter         stream outbox entries the writer could not record after retries
    rgw:{c42.0}:dev:<device>       string uses of the campaign shard's codes by one customer device (the risk
                                          engine's DEVICE_LIMIT, counted inside the redeem script)
    rgw:{c42.0}:stats:<minute>     hash   Redeem's decided attempts in one minute (<minute> = unix ms of the
                                          script's "now" // 60000, the injected clock's) by reason: REDEEMED,
                                          NO_USES_LEFT, CODE_EXPIRED, CODE_NOT_YET_VALID. Counted inside the
                                          redeem script (no extra round trip); never a replay, a Validate, an
                                          unknown code (CODE_NOT_FOUND: the campaign is only what the guessed
                                          code's text claims) or a risk denial (risk_events has those). Expires
                                          STATS_TTL_MS after its first write. Read by `rgw campaign status`.

A brand's directory of imported codes (they carry no route), one hash tag per brand:
    rgw:{d<brand>}:dir:<bucket>    hash   field = characters BUCKET_CHARS..REF_CHARS of the dir_ref, value =
                                          "<campaign>.<shard>" (gateway/campaigns/directory.py)

Outside any campaign shard:
    rgw:outboxes                   set    every outbox stream's key: the writer's directory of streams (the
                                          campaign shards' outboxes and each brand's risk-event stream,
                                          rgw:{r<brand>}:events - risk/keys.py)
    rgw:initialised                string set when Redis state was built from Postgres (rgw rebuild-redis);
                                          without it the gateway refuses to redeem
"""

from __future__ import annotations

PREFIX = "rgw"


def shard_tag(campaign_id: int, shard: int) -> str:
    """The hash tag of one campaign shard."""
    return f"{{c{campaign_id}.{shard}}}"


def meta_key(campaign_id: int, shard: int) -> str:
    """The campaign shard's rules."""
    return f"{PREFIX}:{shard_tag(campaign_id, shard)}:meta"


def code_key(campaign_id: int, shard: int, code_ref: str) -> str:
    """One code's state."""
    return f"{PREFIX}:{shard_tag(campaign_id, shard)}:code:{code_ref}"


def budget_key(campaign_id: int, shard: int) -> str:
    """The campaign shard's share of the budget and its counters."""
    return f"{PREFIX}:{shard_tag(campaign_id, shard)}:budget"


def stores_key(campaign_id: int, shard: int) -> str:
    """The stores the campaign may be redeemed at (when restricted)."""
    return f"{PREFIX}:{shard_tag(campaign_id, shard)}:stores"


# A code_ref (64 hex characters) is kept in Redis as BUCKET_CHARS of bucket and REF_CHARS - BUCKET_CHARS of field:
# 96 bits, so two codes of one campaign shard never meet (a million codes: a chance of about 1e-17), and 65,536
# buckets per shard keep every bucket a listpack up to ~5 million codes a shard at Redis' default
# hash-max-listpack-entries of 128 (the servers this project starts allow 512).
BUCKET_CHARS = 4
REF_CHARS = 24


def bucket_key(campaign_id: int, shard: int, code_ref: str) -> str:
    """The hash holding this issued code among its bucket's."""
    return f"{PREFIX}:{shard_tag(campaign_id, shard)}:b:{code_ref[:BUCKET_CHARS]}"


def bucket_field(code_ref: str) -> str:
    """The code's field in its bucket."""
    return code_ref[BUCKET_CHARS:REF_CHARS]


def directory_tag(brand_id: int) -> str:
    """The hash tag of a brand's directory of imported codes."""
    return f"{{d{brand_id}}}"


def directory_key(brand_id: int, dir_ref: str) -> str:
    """The hash holding an imported code's route among its bucket's."""
    return f"{PREFIX}:{directory_tag(brand_id)}:dir:{dir_ref[:BUCKET_CHARS]}"


def outbox_key(campaign_id: int, shard: int) -> str:
    """The campaign shard's outbox stream."""
    return f"{PREFIX}:{shard_tag(campaign_id, shard)}:outbox"


def deadletter_key(campaign_id: int, shard: int) -> str:
    """Outbox entries that could not be recorded in the ledger."""
    return f"{PREFIX}:{shard_tag(campaign_id, shard)}:deadletter"


def device_key(campaign_id: int, shard: int, device_id: str) -> str:
    """Uses of this campaign shard's codes by one customer device."""
    return f"{PREFIX}:{shard_tag(campaign_id, shard)}:dev:{device_id}"


# The decision counters' minute and lifetime (lua/redeem.lua sets the expiry: its STATS_TTL_MS is this value, a
# test holds them together). Two hours: `rgw campaign status` reads the last 60 minutes and the one before.
STATS_MINUTE_MS = 60_000
STATS_TTL_MS = 2 * 3600 * 1000


def stats_minute(now_ms: int) -> int:
    """The minute (since the Unix epoch) a decision made at `now_ms` is counted in."""
    return now_ms // STATS_MINUTE_MS


def stats_key(campaign_id: int, shard: int, minute: int) -> str:
    """Redeem's decided attempts of this campaign shard in one minute (`stats_minute`), by reason."""
    return f"{PREFIX}:{shard_tag(campaign_id, shard)}:stats:{minute}"


OUTBOXES = f"{PREFIX}:outboxes"
# The tenant registry's change notifications (gateway/tenancy/): a pub/sub channel for speed and a version key
# every process polls as the backstop. Neither is in a campaign shard; on Redis Cluster pub/sub reaches every
# node's subscribers and the version key lives in its own slot.
REGISTRY_CHANNEL = f"{PREFIX}:registry"
REGISTRY_VERSION = f"{PREFIX}:registry:version"
INITIALISED = f"{PREFIX}:initialised"


def node_marker_key(n: int) -> str:
    """The n-th candidate for a Redis Cluster master's own "initialised" marker (durability.mark_initialised picks,
    per master, the first whose slot that master serves)."""
    return f"{PREFIX}:{{n{n}}}:initialised"


LEDGER_GROUP = "ledger"
