"""The risk engine's CounterPlan as the redeem script reads it (lua/redeem.lua, "Risk"): compact JSON per item,
keys passed in KEYS (deduplicated) and named by their index, so the script declares every key it touches."""

from __future__ import annotations

import functools
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
        self._index: dict[str, int] = {key: position for position, key in enumerate(keys, start=1)}

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


def _tail(values: list[Any]) -> str:
    """JSON of a list without its opening bracket: the part of an entry that follows its key indices."""
    return json.dumps(values, separators=(",", ":"))[1:]


# The hot path encodes a plan per call; everything but the key indices is the same for every attempt of a till
# under one policy, so it is encoded once per (immutable) window or lockout and reused.
@functools.lru_cache(maxsize=16_384)
def _window_tail(window: Window) -> str:
    label = scope_label(window.scope.value, window.subject)
    reason = _WINDOW_REASON[window.rule].value
    return _tail([window.limit, window.window_ms, _MODE[window.mode], window.rule.value, reason,
                  1 if window.quota else 0, label])  # fmt: skip


@functools.lru_cache(maxsize=16_384)
def _lockout_tail(lock: Lockout) -> str:
    label = scope_label(lock.scope.value, lock.subject)
    return _tail([lock.threshold, lock.window_ms, lock.cooldown_ms, _MODE[lock.mode], label])


def _window(window: Window, index: Callable[[str], int]) -> str:
    return f"[{index(window.key)},{_window_tail(window)}"


def _lockout(lock: Lockout, index: Callable[[str], int]) -> str:
    return f"[{index(lock.lock_key)},{index(lock.failures_key)},{_lockout_tail(lock)}"


def _travel(travel: Travel, index: Callable[[str], int]) -> str:
    return f"[{index(travel.key)},{_tail([travel.max_speed_mps, travel.ttl_ms, _MODE[travel.mode]])}"


def _device(plan: CounterPlan, device_key: str, index: Callable[[str], int]) -> str | None:
    rules = plan.device
    limit = rules.limit if rules.limit_mode is not Mode.OFF else 0
    if rules.binding is Mode.OFF and not limit:
        return None
    key = index(device_key) if limit and device_key else 0
    return f'["{_MODE[rules.binding]}",{limit},"{_MODE[rules.limit_mode]}",{key}]'


def _object(fields: list[str]) -> str:
    return "{" + ",".join(fields) + "}"


def encode(assessment: Assessment | None, device_key: str, keys: ScriptKeys) -> str:
    """The item's risk argument for the one-call path: "" when the engine is off, else the whole plan, counters
    and device rules (see lua/redeem.lua for the fields)."""
    if assessment is None:
        return ""
    fields = _counters(assessment, keys)
    if assessment.denial is None and (device := _device(assessment.plan, device_key, keys.index)) is not None:
        fields.append(f'"d":{device}')
    return _object(fields)


def encode_counters(assessment: Assessment, keys: ScriptKeys) -> str:
    """The item's plan for lua/risk.lua (the counters as their own call): everything but the device rules."""
    return _object(_counters(assessment, keys))


def encode_code_part(
    assessment: Assessment, device_key: str, keys: ScriptKeys, events_key: str, *, denial: Finding | None = None,
    shadow: tuple[Finding, ...] = (),
) -> str:  # fmt: skip
    """The item's plan for lua/redeem.lua when the counters ran in their own call: the device rules, and the
    events (device findings, or `denial` / `shadow` decided without the counters) recorded into `events_key` -
    the campaign shard's outbox, the only stream in that slot (the ledger writer takes risk events from any)."""
    fields = [f'"e":{keys.index(events_key)}']
    if shadow:
        fields.append('"s":' + json.dumps([_finding(f) for f in shadow], separators=(",", ":")))
    if denial is not None:
        fields.append('"x":' + json.dumps(_finding(denial), separators=(",", ":")))
    elif (device := _device(assessment.plan, device_key, keys.index)) is not None:
        fields.append(f'"d":{device}')
    return _object(fields)


def _counters(assessment: Assessment, keys: ScriptKeys) -> list[str]:
    """The plan's fields but the device rules: events, in-process findings, locks, windows, travel."""
    plan, index = assessment.plan, keys.index
    fields: list[str] = []
    if plan.events_key:
        fields.append(f'"e":{index(plan.events_key)}')
    if assessment.shadow:
        fields.append('"s":' + json.dumps([_finding(f) for f in assessment.shadow], separators=(",", ":")))
    if assessment.denial is not None:  # decided already: the script only records it
        fields.append('"x":' + json.dumps(_finding(assessment.denial), separators=(",", ":")))
        return fields
    if windows := [_window(w, index) for w in plan.windows if w.mode is not Mode.OFF]:
        fields.append('"w":[' + ",".join(windows) + "]")
    if locks := [_lockout(lock, index) for lock in plan.lockouts if lock.mode is not Mode.OFF]:
        fields.append('"l":[' + ",".join(locks) + "]")
    if plan.travel is not None and plan.travel.mode is not Mode.OFF:
        fields.append(f'"t":{_travel(plan.travel, index)}')
    return fields
