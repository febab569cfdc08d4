"""The risk engine's pure part: in-process rules and the CounterPlan the gateway runs in Redis. No I/O.

In-process rules, in the order their findings are reported (the first enforced one is the denial):
terminal binding (TERMINAL_STORE), store geofence, campaign region. Impossible travel only goes into the plan: it
needs the device's last place, which lives in Redis. Every finding carries its rule's mode; SHADOW findings are
recorded and admitted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from risk import keys
from risk.geo import within_radius
from risk.model import (
    Assessment,
    CounterPlan,
    DeviceRules,
    FailurePolicy,
    Finding,
    Lockout,
    Mode,
    Place,
    Reason,
    RiskRequest,
    Rule,
    Scope,
    Travel,
    Window,
)
from risk.policy import LockoutSpec, Policy, PolicyBook

_WINDOW_RULES = (
    (Scope.CLIENT, Rule.RATE_LIMIT),
    (Scope.TERMINAL, Rule.RATE_LIMIT),
    (Scope.STORE, Rule.RATE_LIMIT),
    (Scope.BRAND, Rule.RATE_LIMIT),
    (Scope.DEVICE, Rule.DEVICE_VELOCITY),
    (Scope.CODE, Rule.CODE_VELOCITY),
)
_LOCKOUT_SCOPES = (Scope.TERMINAL, Scope.STORE, Scope.CLIENT)
# The rules whose data is the counters in Redis (what a failure policy decides on when they cannot be reached).
_COUNTER_RULES = (Rule.LOCKOUT, Rule.RATE_LIMIT, Rule.DEVICE_VELOCITY, Rule.CODE_VELOCITY, Rule.IMPOSSIBLE_TRAVEL)
_BRAND_SUBJECT = "-"  # the brand scope has one subject; a key part must not be empty


_CALLER_SCOPES = frozenset({Scope.CLIENT, Scope.TERMINAL, Scope.STORE, Scope.BRAND})
# Plan parts of this many callers (client, store, terminal, campaign) are kept; a till's next attempt reuses them.
CALLER_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class _WindowRule:
    """One window of a policy, everything but the request's subject."""

    scope: Scope
    rule: Rule
    limit: int
    window_ms: int
    mode: Mode
    per_campaign: bool

    def window(self, brand_id: int, campaign_id: int, subject: str) -> Window:
        key = keys.window_key(brand_id, campaign_id if self.per_campaign else 0, self.scope, subject)
        quota = self.rule is Rule.RATE_LIMIT  # the caller's own quota, not a decline
        return Window(self.rule, self.scope, subject, key, self.limit, self.window_ms, self.mode, quota)


@dataclass(frozen=True, slots=True)
class _Compiled:
    """What a policy asks of every request, worked out once per policy instead of once per request."""

    caller_windows: tuple[_WindowRule, ...]  # client, terminal, store, brand: the same for every attempt of a till
    attempt_windows: tuple[_WindowRule, ...]  # device, code
    lockouts: tuple[tuple[Scope, LockoutSpec], ...]
    lockout_mode: Mode
    device: DeviceRules
    closed: frozenset[Rule]  # enforced counter rules that fail closed

    @classmethod
    def of(cls, policy: Policy) -> _Compiled:
        windows = [
            _WindowRule(scope, rule, spec.limit, spec.window_ms, policy.mode(rule), spec.per_campaign)
            for scope, rule in _WINDOW_RULES
            if (spec := policy.limits.get(scope)) is not None and policy.mode(rule) is not Mode.OFF
        ]
        lockout_mode = policy.mode(Rule.LOCKOUT)
        specs = {} if lockout_mode is Mode.OFF else policy.lockout
        # No `uses` means no limit even with the mode on: the script then sees limit 0 and mode OFF, never a
        # limit of zero uses that an ENFORCE mode could read as "deny every use".
        limit_mode = policy.mode(Rule.DEVICE_LIMIT) if policy.device_uses else Mode.OFF
        limit = 0 if limit_mode is Mode.OFF else policy.device_uses
        return cls(
            caller_windows=tuple(w for w in windows if w.scope in _CALLER_SCOPES),
            attempt_windows=tuple(w for w in windows if w.scope not in _CALLER_SCOPES),
            lockouts=tuple((scope, specs[scope]) for scope in _LOCKOUT_SCOPES if scope in specs),
            lockout_mode=lockout_mode,
            device=DeviceRules(policy.mode(Rule.DEVICE_BINDING), limit, limit_mode),
            closed=frozenset(
                rule
                for rule in _COUNTER_RULES
                if policy.mode(rule) is Mode.ENFORCE and policy.failure[rule] is FailurePolicy.CLOSED
            ),
        )


@dataclass(frozen=True, slots=True)
class _CallerParts:
    """The parts of a plan fixed by the caller (client, store, terminal) and campaign: built once, then reused."""

    windows: tuple[Window, ...]
    lockouts: tuple[Lockout, ...]
    events_key: str


def _caller_parts(compiled: _Compiled, caller: tuple[int, int, str, str, str]) -> _CallerParts:
    brand_id, campaign_id, client_id, store_id, terminal_id = caller
    subjects = {
        Scope.CLIENT: client_id,
        Scope.TERMINAL: keys.terminal_subject(store_id, terminal_id),
        Scope.STORE: store_id,
        Scope.BRAND: _BRAND_SUBJECT,
    }
    windows = tuple(w.window(brand_id, campaign_id, subjects[w.scope]) for w in compiled.caller_windows)
    lockouts = tuple(
        Lockout(
            scope,
            subjects[scope],
            keys.lock_key(brand_id, scope, subjects[scope]),
            keys.failures_key(brand_id, scope, subjects[scope]),
            spec.threshold,
            spec.window_ms,
            spec.cooldown_ms,
            compiled.lockout_mode,
        )
        for scope, spec in compiled.lockouts
    )
    return _CallerParts(windows, lockouts, keys.events_key(brand_id))


class RiskEngine:
    """Assesses attempts against the current policy book (`book` is called per attempt: the gateway swaps books
    when the registry changes)."""

    def __init__(self, book: Callable[[], PolicyBook]) -> None:
        self._book = book
        self._compiled_book: PolicyBook | None = None
        # Keyed by id(): a book's policies live as long as the book, and both caches are dropped with the book.
        self._compiled: dict[int, _Compiled] = {}
        self._callers: dict[tuple[int, int, int, str, str, str], _CallerParts] = {}

    def policy(self, brand_id: int, campaign_id: int) -> Policy:
        """The effective policy of a brand's campaign in the current book."""
        return self._book().effective(brand_id, campaign_id)

    def assess(self, request: RiskRequest) -> Assessment:
        """Run the in-process rules and build the attempt's CounterPlan (pure; built even after a denial, since the
        gateway records the denial through the plan's events_key)."""
        policy, compiled = self._current(request.brand_id, request.campaign_id)
        findings: list[Finding] = []
        bind = _terminal_rule(policy, request, findings)
        place = _location_rules(policy, request, findings)
        denial = next((f for f in findings if f.mode is Mode.ENFORCE), None)
        shadow = tuple(f for f in findings if f.mode is Mode.SHADOW)
        caller = (request.brand_id, request.campaign_id, request.client_id, request.store_id, request.terminal_id)
        parts = self._parts(compiled, caller)
        return Assessment(denial, shadow, _plan(policy, compiled, parts, request, place), bind)

    def failure_plan(self, brand_id: int, client_id: str, store_id: str, terminal_id: str) -> CounterPlan:
        """Lockouts only, under the brand's policy: for failures found before Redis (a bad check character), whose
        campaign is unknown. Same keys as `assess`."""
        _, compiled = self._current(brand_id, 0)
        parts = self._parts(compiled, (brand_id, 0, client_id, store_id, terminal_id))
        return CounterPlan(lockouts=parts.lockouts, events_key=parts.events_key)

    def _current(self, brand_id: int, campaign_id: int) -> tuple[Policy, _Compiled]:
        book = self._book()
        if book is not self._compiled_book:
            self._compiled_book, self._compiled, self._callers = book, {}, {}
        policy = book.effective(brand_id, campaign_id)
        compiled = self._compiled.get(id(policy))
        if compiled is None:
            compiled = self._compiled[id(policy)] = _Compiled.of(policy)
        return policy, compiled

    def _parts(self, compiled: _Compiled, caller: tuple[int, int, str, str, str]) -> _CallerParts:
        key = (id(compiled), *caller)
        parts = self._callers.get(key)
        if parts is None:
            if len(self._callers) >= CALLER_CACHE_SIZE:
                del self._callers[next(iter(self._callers))]  # the oldest: FIFO keeps the busy tills well enough
            parts = self._callers[key] = _caller_parts(compiled, caller)
        return parts


def _terminal_rule(policy: Policy, request: RiskRequest, findings: list[Finding]) -> bool:
    """TERMINAL_STORE: a registered terminal must name its own store; returns whether to bind an unknown one."""
    mode = policy.mode(Rule.TERMINAL_STORE)
    if mode is Mode.OFF:
        return False
    if request.terminal_store is not None:
        if request.terminal_store != request.store_id:
            findings.append(Finding(Rule.TERMINAL_STORE, Reason.TERMINAL_STORE_MISMATCH, mode))
        return False
    if policy.unknown_terminal == "deny":
        findings.append(Finding(Rule.TERMINAL_STORE, Reason.UNKNOWN_TERMINAL, mode))
    return policy.unknown_terminal == "bind_first" and request.counts


def _usable_place(policy: Policy, request: RiskRequest) -> tuple[Place | None, Reason | None]:
    """The location if usable, else why not (None when the policy admits requests without one)."""
    place = request.location
    if place is not None and place.accuracy_m <= policy.max_accuracy_m:
        return place, None
    if policy.missing_location != "deny":
        return None, None
    return None, Reason.LOCATION_REQUIRED if place is None else Reason.LOCATION_TOO_INACCURATE


def _location_rules(policy: Policy, request: RiskRequest, findings: list[Finding]) -> Place | None:
    """STORE_GEOFENCE and CAMPAIGN_REGION; returns the usable location (travel needs it)."""
    place, problem = _usable_place(policy, request)
    mode = policy.mode(Rule.STORE_GEOFENCE)
    if mode is not Mode.OFF and (reason := _geofence(policy, request, place, problem)) is not None:
        findings.append(Finding(Rule.STORE_GEOFENCE, reason, mode))
    mode = policy.mode(Rule.CAMPAIGN_REGION)
    if mode is not Mode.OFF and policy.regions is not None:
        reason = problem if place is None else None
        if place is not None and not policy.regions.contains(place):
            reason = Reason.OUTSIDE_CAMPAIGN_REGION
        if reason is not None:
            findings.append(Finding(Rule.CAMPAIGN_REGION, reason, mode))
    return place


def _geofence(policy: Policy, request: RiskRequest, place: Place | None, problem: Reason | None) -> Reason | None:
    """Why the store geofence denies, or None.

    The store comes first: with no registered store (or no radius) the rule cannot run, and its failure policy
    decides - asking the customer for a location would change nothing."""
    store = request.store
    if store is None or store.radius_m <= 0:
        closed = policy.failure[Rule.STORE_GEOFENCE] is FailurePolicy.CLOSED
        return Reason.RISK_DATA_UNAVAILABLE if closed else None
    if place is None:
        return problem
    inside = within_radius(store.latitude, store.longitude, store.radius_m, place)
    return None if inside else Reason.OUTSIDE_STORE_RADIUS


def _plan(
    policy: Policy, compiled: _Compiled, parts: _CallerParts, request: RiskRequest, place: Place | None
) -> CounterPlan:
    windows = parts.windows
    for rule in compiled.attempt_windows:
        subject = request.device_id if rule.scope is Scope.DEVICE else request.code_ref
        if subject:  # no customer device (or code ref) given: nothing to count
            windows += (rule.window(request.brand_id, request.campaign_id, subject),)
    travel = _travel(policy, request, place)
    return CounterPlan(
        windows=windows,
        lockouts=parts.lockouts,
        travel=travel,
        device=compiled.device if request.device_id else _without_device(policy, compiled.device),
        events_key=parts.events_key,
        closed=_closed(compiled.closed, windows, parts.lockouts, travel) if compiled.closed else (),
    )


def _closed(
    closed: frozenset[Rule], windows: tuple[Window, ...], lockouts: tuple[Lockout, ...], travel: Travel | None
) -> tuple[Rule, ...]:
    """The fail-closed rules this plan actually has counters for, in a fixed order."""
    present = {window.rule for window in windows}
    if lockouts:
        present.add(Rule.LOCKOUT)
    if travel is not None:
        present.add(Rule.IMPOSSIBLE_TRAVEL)
    return tuple(rule for rule in _COUNTER_RULES if rule in closed and rule in present)


def _without_device(policy: Policy, rules: DeviceRules) -> DeviceRules:
    """No customer device was named: a device rule's data is unavailable, and its failure policy decides -
    closed keeps the rule (the script declines DEVICE_REQUIRED), open skips it."""

    def kept(rule: Rule, mode: Mode) -> Mode:
        return mode if policy.failure[rule] is FailurePolicy.CLOSED else Mode.OFF

    binding = kept(Rule.DEVICE_BINDING, rules.binding)
    limit_mode = kept(Rule.DEVICE_LIMIT, rules.limit_mode)
    if (binding, limit_mode) == (rules.binding, rules.limit_mode):
        return rules
    return DeviceRules(binding, rules.limit if limit_mode is not Mode.OFF else 0, limit_mode)


def _travel(policy: Policy, request: RiskRequest, place: Place | None) -> Travel | None:
    """Impossible travel needs a customer device and a usable location; without either there is nothing to
    compare, so the rule skips (it never asks for a location itself)."""
    mode = policy.mode(Rule.IMPOSSIBLE_TRAVEL)
    if mode is Mode.OFF or not request.device_id or place is None:
        return None
    key = keys.travel_key(request.brand_id, request.device_id)
    return Travel(key, policy.max_speed_mps, place.latitude, place.longitude, policy.travel_memory_ms, mode)
