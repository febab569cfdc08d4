"""The Redis layout of a campaign shard, defined once: the meta hash the redeem script reads its rules from, the
budget hash it counts in, the per-code fields and records, and the outbox event formats. The scripts, the loader,
the statistics and the benchmark build on these names; tests hold them against the Lua sources."""

from __future__ import annotations

# rgw:{c.s}:meta, in the order redeem.lua's HMGET reads them (tests/unit/test_campaign_layout.py checks it):
#   vf, vu   the campaign's validity window, ms since epoch (vf inclusive, vu exclusive)
#   brand    the owning brand (another brand's caller sees no campaign)
#   uses     uses per code, unless the code has its own
#   vd       validity after a code's issue, ms (0: fixed dates only)
#   p        "1" while paused
#   fv       face value of a code without its own, minor units
#   st       "1" when the campaign is redeemable at listed stores only (rgw:{c.s}:stores)
#   tz       the time zone's UTC offsets over the validity window: "<from ms>:<offset s>,..." ascending
#   win      redemption hours: "<ISO weekday mask>:<start minute>:<end minute>,..." ("" = any time)
#   rw       reversal window, ms (0: no reversals)
META = ("vf", "vu", "brand", "uses", "vd", "p", "fv", "st", "tz", "win", "rw")
# Written by the publisher but read only by Python (the statistics, rebalance): the shard count and currency.
META_PYTHON_ONLY = ("shards", "cur")

# rgw:{c.s}:budget: this shard's share of the budget ("" / absent = no limit) and what it granted.
#   n, v     the shard's share of the count and value budgets
#   un, uv   count and face value granted and not reversed (redeem adds, reverse subtracts)
#   rev      reversals (redemptions granted = un + rev); iss  codes loaded into this shard
#   o:<id>   a budget transfer out of this shard in flight: "<count>|<value>|<to shard>" (lua/budget_move.lua)
#   i:<id>   a transfer received (kept, so a retried transfer is never received twice)
BUDGET = ("n", "v", "un", "uv")
BUDGET_COUNTERS = ("rev", "iss")

# A code's own state hash (rgw:{c.s}:code:<ref>), as redeem.lua reads it with one HMGET per candidate key; the
# overrides (uses, vf, vu, fv, dev) exist only for a code whose rules differ from its campaign's.
CODE = ("uses", "used", "vf", "vu", "seq", "fv", "dev")

# A use record, field u:<n> of the code hash: the outbox event's values (EVENT_V3 below) that are not the code's.
USE_RECORD = ("rid", "at", "fp", "caller", "store", "term", "dev", "lat", "lon", "acc", "idem", "client", "brand",
              "fv")  # fmt: skip
# A reversal record, field x:<n> of the code hash (use n was reversed).
REVERSAL_RECORD = ("xid", "at", "reason", "caller", "client")

# Outbox events: one field named by the format, the values joined by "|".
EVENT_V3 = ("rid", "ref", "kid", "cid", "shard", "use", "at", "fp", "caller", "store", "term", "dev", "lat", "lon",
            "acc", "idem", "client", "brand", "fv")  # fmt: skip
REVERSAL_EVENT = ("xid", "rid", "ref", "kid", "cid", "shard", "use", "at", "fv", "reason", "caller", "client",
                  "brand", "idem", "fp")  # fmt: skip
REVERSAL_FORMAT = "x1"

# Decisions Redeem counts per minute (rgw:{c.s}:stats:<minute>), by reason.
DECISION_REASONS = ("REDEEMED", "NO_USES_LEFT", "CODE_EXPIRED", "CODE_NOT_YET_VALID", "CAMPAIGN_PAUSED",
                    "BUDGET_COUNT_EXHAUSTED", "BUDGET_VALUE_EXHAUSTED", "STORE_NOT_ALLOWED",
                    "OUTSIDE_REDEMPTION_HOURS")  # fmt: skip
