"""The Redis layout of the inventory, defined once: keys (every key one script touches shares its SKU shard's hash
tag {k<sku>.<shard>}), the secret and order records, and the outbox event. Scripts, loader, status and tests build
on these; a test holds them against the Lua source."""

from __future__ import annotations

import zlib

PREFIX = "rgw"


def sku_tag(sku_id: int, shard: int) -> str:
    """The hash tag of one SKU shard."""
    return f"{{k{sku_id}.{shard}}}"


def order_shard(order_id: str, shards: int) -> int:
    """The SKU shard an order's stock is taken from: fixed by its id, so a retry finds the order."""
    return zlib.crc32(order_id.encode()) % shards


def meta_key(sku_id: int, shard: int) -> str:
    """brand, reuse (dispenses per secret), max (secrets per order)."""
    return f"{PREFIX}:{sku_tag(sku_id, shard)}:meta"


def by_expiry_key(sku_id: int, shard: int) -> str:
    """Available secret ids, score = expiry ms (earliest first; an expired one is skipped by its score)."""
    return f"{PREFIX}:{sku_tag(sku_id, shard)}:exp"


def by_cost_key(sku_id: int, shard: int) -> str:
    """Available secret ids, score = cost (cheapest first)."""
    return f"{PREFIX}:{sku_tag(sku_id, shard)}:cost"


def by_supplier_key(sku_id: int, shard: int, supplier: str) -> str:
    """One supplier's available secret ids, score = expiry ms."""
    return f"{PREFIX}:{sku_tag(sku_id, shard)}:sup:{supplier}"


def secrets_key(sku_id: int, shard: int) -> str:
    """Secret id -> SECRET_RECORD joined by '|' (ciphertext only, never plaintext)."""
    return f"{PREFIX}:{sku_tag(sku_id, shard)}:sec"


def order_key(sku_id: int, shard: int, order_id: str) -> str:
    """One order's state (ORDER fields)."""
    return f"{PREFIX}:{sku_tag(sku_id, shard)}:order:{order_id}"


def holds_key(sku_id: int, shard: int) -> str:
    """Order ids held, score = hold expiry ms."""
    return f"{PREFIX}:{sku_tag(sku_id, shard)}:holds"


def outbox_key(sku_id: int, shard: int) -> str:
    """Inventory events for the ledger writer (listed in rgw:outboxes)."""
    return f"{PREFIX}:{sku_tag(sku_id, shard)}:outbox"


def orders_key(brand_id: int) -> str:
    """The brand-wide order registry: order id -> "<sku>.<shard>|<fingerprint>"."""
    return f"{PREFIX}:{{o{brand_id}}}:orders"


# A secret's record in the secrets hash, joined by '|': what the script needs to choose and answer (the supplier
# and cost to keep every index right, the dispenses left of a reusable secret, uses so far), and the ciphertext
# the gateway decrypts for the order's answer.
SECRET_RECORD = ("supplier", "cost", "currency", "expiry_ms", "left", "used", "key_id", "nonce_b64", "ct_b64")

# An order's hash: fp (request fingerprint), st (state: held | dispensed | released | expired), ids (the secrets
# taken, "<id>;<use number>,..."), exp (hold expiry ms), at (ms of the decision), late ("1": dispensed by a
# confirm after its hold expired), strat and sup (the order's strategy - expiry | cost | supplier - and supplier:
# a late confirm takes fresh stock the way the hold did).
ORDER = ("fp", "st", "ids", "exp", "at", "late", "strat", "sup")
ORDER_STATES = ("held", "dispensed", "released", "expired")

# Outbox event: field EVENT_FORMAT = EVENT joined by "|"; secrets = "<id>;<use>;<supplier>;<cost>;<currency>,..."
# (";" and "," never occur in a supplier name: [A-Za-z0-9._:-]). Every event of an order carries the order's
# own fields (ORDER's fp, exp, strat, sup: the request fingerprint, the hold expiry ms - 0 when not a hold -, the
# strategy and supplier), so the ledger's last event of an order is enough to restore it (gateway/inventory/
# rebuild.py). They were appended: an event of EVENT_V1's length (written before them) still parses, without them.
EVENT_FORMAT = "i1"
EVENT_V1 = ("event_id", "kind", "brand", "sku", "shard", "order", "secrets", "at", "client")
EVENT = (*EVENT_V1, "order_fp", "order_exp", "order_strat", "order_sup")
EVENT_KINDS = ("dispense", "hold", "confirm", "release", "expire")
