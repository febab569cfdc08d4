"""The risk engine's CounterPlan as the redeem script reads it (lua/redeem.lua, "Risk"): compact JSON per item,
keys passed in KEYS (deduplicated) and named by their index, so the script declares every key it touches."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from risk.model import Assessment, CounterPlan, Finding, Lockout, Mode, Reason, Rule, Travel, Window

_MODE = {Mode.ENFORCE: "E", Mode.SHADOW: "S", Mode.OFF: ""}
_WINDOW_REASON = {
    Rule.RATE_LIMIT: Reason.RATE_LIMITED,
    Rule.DEVICE_VELOCITY: Reason.DEVICE_VELOCITY,
    Rule.CODE_VELOCITY: Reason.CODE_VELOCITY,
}
# A code's subject is its keyed hash; events and quota details carry a prefix of it, enough to correlate.
CODE_SUBJECT_CHARS = 12


class ScriptKeys:
    """KEYS of one script call: appended in order, each key once; `index` is the 1-based Lua index."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self._index: dict[str, int] = {}

    def index(self, key: str) -> int:
        found = self._index.get(key)
        if found is None:
            self.keys.append(key)
            found = self._index[key] = len(self.keys)
        return found


def scope_label(scope: str, subject: str) -> str:
    """How events and QuotaFailure name a counted scope: never a code, only a prefix of its keyed hash."""
    if scope == "code":
        subject = subject[:CODE_SUBJECT_CHARS]
    return f"{scope}:{subject}"


def _finding(finding: Finding) -> list[str]:
    return [finding.rule.value, finding.reason.value, finding.scope]


def _window(window: Window, index: Callable[[str], int]) -> list[Any]:
    quota = 1 if window.quota else 0
    label = scope_label(window.scope.value, window.subject)
    reason = _WINDOW_REASON[window.rule].value
    return [index(window.key), window.limit, window.window_ms, _MODE[window.mode], window.rule.value, reason, quota,
            label]  # fmt: skip


def _lockout(lock: Lockout, index: Callable[[str], int]) -> list[Any]:
    label = scope_label(lock.scope.value, lock.subject)
    return [index(lock.lock_key), index(lock.failures_key), lock.threshold, lock.window_ms, lock.cooldown_ms,
            _MODE[lock.mode], label]  # fmt: skip


def _travel(travel: Travel, index: Callable[[str], int]) -> list[Any]:
    return [index(travel.key), travel.max_speed_mps, travel.ttl_ms, _MODE[travel.mode]]


def _device(plan: CounterPlan, device_key: str, index: Callable[[str], int]) -> list[Any] | None:
    rules = plan.device
    limit = rules.limit if rules.limit_mode is not Mode.OFF else 0
    if rules.binding is Mode.OFF and not limit:
        return None
    return [_MODE[rules.binding], limit, _MODE[rules.limit_mode], index(device_key) if limit and device_key else 0]


def _dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"))


def encode(assessment: Assessment | None, device_key: str, keys: ScriptKeys) -> str:
    """The item's risk argument for the one-call path: "" when the engine is off, else the whole plan, counters
    and device rules (see lua/redeem.lua for the fields)."""
    if assessment is None:
        return ""
    doc = _counters(assessment, keys)
    if "x" not in doc and (device := _device(assessment.plan, device_key, keys.index)) is not None:
        doc["d"] = device
    return _dumps(doc)


def encode_counters(assessment: Assessment, keys: ScriptKeys) -> str:
    """The item's plan for lua/risk.lua (the counters as their own call): everything but the device rules."""
    return _dumps(_counters(assessment, keys))


def encode_code_part(
    assessment: Assessment, device_key: str, keys: ScriptKeys, events_key: str, *, denial: Finding | None = None,
    shadow: tuple[Finding, ...] = (),
) -> str:  # fmt: skip
    """The item's plan for lua/redeem.lua when the counters ran in their own call: the device rules, and the
    events (device findings, or `denial` / `shadow` decided without the counters) recorded into `events_key` -
    the campaign shard's outbox, the only stream in that slot (the ledger writer takes risk events from any)."""
    doc: dict[str, Any] = {"e": keys.index(events_key)}
    if shadow:
        doc["s"] = [_finding(f) for f in shadow]
    if denial is not None:
        doc["x"] = _finding(denial)
    elif (device := _device(assessment.plan, device_key, keys.index)) is not None:
        doc["d"] = device
    return _dumps(doc)


def _counters(assessment: Assessment, keys: ScriptKeys) -> dict[str, Any]:
    plan, index = assessment.plan, keys.index
    doc: dict[str, Any] = {}
    if plan.events_key:
        doc["e"] = index(plan.events_key)
    if assessment.shadow:
        doc["s"] = [_finding(f) for f in assessment.shadow]
    if assessment.denial is not None:  # decided already: the script only records it
        doc["x"] = _finding(assessment.denial)
        return doc
    if windows := [_window(w, index) for w in plan.windows if w.mode is not Mode.OFF]:
        doc["w"] = windows
    if locks := [_lockout(lock, index) for lock in plan.lockouts if lock.mode is not Mode.OFF]:
        doc["l"] = locks
    if plan.travel is not None and plan.travel.mode is not Mode.OFF:
        doc["t"] = _travel(plan.travel, index)
    return doc
