"""The reply to an accepted RedeemStream or DispenseStream message always fits the server's send limit.

Rule (README, "RedeemStream replies"): what a reply can carry is bounded by construction — an item's result is a
RedeemResponse (fixed-size fields) or an ItemError whose message, reason and field violations are capped here;
`batch_id` is at most MAX_BATCH_ID_CHARS ASCII characters and a message at most RGW_STREAM_MAX_ITEMS items, both
checked before anything is decided. So the largest possible reply to an accepted message is known at start-up
(`worst_reply_bytes`), and the server's send limit is set to at least that (`send_limit`). A message whose items
were decided can therefore always be answered: no redemption is made that its caller cannot learn of.
DispenseStream the same way: a message's orders take at most DISPENSE_STREAM_MAX_SECRETS secrets in all, each at
most MAX_SECRET_BYTES (the import's limit), so its worst reply is known too (`worst_dispense_reply_bytes`).
"""

from __future__ import annotations

import functools

from gateway.grpc_api.errors import Fault
from gateway.inventory.importing import MAX_SECRET as MAX_SECRET_BYTES
from gateway.pb.redemption.v1 import inventory_pb2 as inventory_pb
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.validation import MAX_BATCH_ID_CHARS, FieldViolation

MAX_ITEM_MESSAGE_BYTES = 160
MAX_REASON_BYTES = 40
# A RedeemRequest has eight leaf fields (code, four ids, three location numbers): one violation each at most.
MAX_VIOLATIONS = 8
MAX_FIELD_BYTES = 24
MAX_DESCRIPTION_BYTES = 96
MAX_SUBJECT_BYTES = 160
# The longest wait a reply names: a lockout's longest cool-down (risk/policy.py allows 7 days); longer is capped.
MAX_RETRY_MS = 7 * 24 * 3600 * 1000
# Secrets one DispenseStream message's orders may take in all (what SKUs allow per order is checked per order).
DISPENSE_STREAM_MAX_SECRETS = 1000
MAX_SUPPLIER_BYTES = 64


def retry_after_ms(value: int) -> int:
    """A retry-after as replies carry it: at most MAX_RETRY_MS, so its size is bounded too."""
    return min(value, MAX_RETRY_MS)


_UUID_CHARS = 36
_INT64_MAX = 2**63 - 1


def _cap(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, never inside a character."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode(errors="ignore") + "..."


def item_error(fault: Fault) -> pb.ItemError:
    """The per-item form of a fault, within the caps that make a reply's size bounded."""
    error = pb.ItemError(
        code=fault.code,
        message=_cap(fault.message, MAX_ITEM_MESSAGE_BYTES),
        reason=_cap(fault.reason, MAX_REASON_BYTES),
        field_violations=[_violation(v) for v in fault.violations[:MAX_VIOLATIONS]],
        quota_subject=_cap(fault.quota_subject, MAX_SUBJECT_BYTES),
    )
    if fault.retry_after_ms:
        error.retry_after.FromMilliseconds(retry_after_ms(fault.retry_after_ms))
    return error


def _violation(violation: FieldViolation) -> pb.FieldViolation:
    return pb.FieldViolation(
        field=_cap(violation.field, MAX_FIELD_BYTES), description=_cap(violation.description, MAX_DESCRIPTION_BYTES)
    )


def _worst_item_error() -> pb.ItemError:
    violation = pb.FieldViolation(field="f" * MAX_FIELD_BYTES, description="d" * MAX_DESCRIPTION_BYTES)
    error = pb.ItemError(
        code=-1,  # a negative int32 is the longest varint (10 bytes)
        message="m" * MAX_ITEM_MESSAGE_BYTES,
        reason="r" * MAX_REASON_BYTES,
        field_violations=[violation] * MAX_VIOLATIONS,
        quota_subject="s" * MAX_SUBJECT_BYTES,
    )
    error.retry_after.FromMilliseconds(MAX_RETRY_MS - 1)
    return error


def _worst_response() -> pb.RedeemStreamResult:
    response = pb.RedeemResponse(
        outcome=max(pb.Outcome.values()),
        reason="r" * MAX_REASON_BYTES,
        redemption_id="0" * _UUID_CHARS,
        campaign_id=-1,
        uses_left=-1,
        replayed=True,
        use_number=-1,
    )
    response.redeemed_at.seconds, response.redeemed_at.nanos = _INT64_MAX, 999_999_999
    response.retry_after.FromMilliseconds(MAX_RETRY_MS - 1)
    return pb.RedeemStreamResult(response=response)


@functools.cache
def worst_item_bytes() -> int:
    """The most one item's result adds to a reply: its field tag, length prefix and bytes."""
    size = max(pb.RedeemStreamResult(error=_worst_item_error()).ByteSize(), _worst_response().ByteSize())
    return 1 + _varint_bytes(size) + size  # the tag of `results` (field 2) is one byte


def _varint_bytes(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def worst_reply_bytes(items: int) -> int:
    """An upper bound of the serialized size of the reply to any accepted message of `items` items."""
    envelope = pb.RedeemStreamResponse(batch_id="b" * MAX_BATCH_ID_CHARS).ByteSize()
    return envelope + items * worst_item_bytes()


def _worst_secret_bytes() -> int:
    secret = inventory_pb.DispensedSecret(secret_id=-1, secret="s" * MAX_SECRET_BYTES,
                                          supplier="s" * MAX_SUPPLIER_BYTES, use_number=-1)  # fmt: skip
    secret.expires_at.seconds, secret.expires_at.nanos = _INT64_MAX, 999_999_999
    size = secret.ByteSize()
    return 1 + _varint_bytes(size) + size  # the tag of `secrets` (field 3) is one byte


@functools.cache
def _worst_dispense_item_bytes() -> int:
    """What one order's result adds to a reply besides its secrets; the +10 covers the two length prefixes
    (result, response) growing with the secrets inside (5 bytes each at most)."""
    response = inventory_pb.DispenseResponse(outcome=-1, reason="r" * MAX_REASON_BYTES, replayed=True)  # type: ignore[arg-type]
    size = max(inventory_pb.DispenseStreamResult(error=_worst_item_error()).ByteSize(),
               inventory_pb.DispenseStreamResult(response=response).ByteSize())  # fmt: skip
    return 1 + _varint_bytes(size) + size + 10


def worst_dispense_reply_bytes(items: int, secrets: int = DISPENSE_STREAM_MAX_SECRETS) -> int:
    """An upper bound of the serialized size of the reply to any accepted DispenseStream message."""
    envelope = inventory_pb.DispenseStreamResponse(batch_id="b" * MAX_BATCH_ID_CHARS).ByteSize()
    return envelope + items * _worst_dispense_item_bytes() + secrets * _worst_secret_bytes()


def send_limit(max_message_bytes: int, stream_max_items: int) -> int:
    """The server's send limit: the configured message limit, raised to the worst reply an accepted message of
    either stream can need (so a decided message is always answered)."""
    return max(max_message_bytes, worst_reply_bytes(stream_max_items), worst_dispense_reply_bytes(stream_max_items))
