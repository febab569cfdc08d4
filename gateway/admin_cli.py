"""`rgw brand|store|terminal|client|audit|risk`: the registry's administration (gateway/tenancy/admin_store.py and
admin_risk.py, the operations of AdminService) straight against Postgres (RGW_DATABASE_URL), each change announced
through Redis (RGW_REDIS_URL) so every gateway process applies it within about two seconds; and the risk engine's
lockouts, straight in Redis (gateway/tenancy/lockouts.py). For operators with database access:
it sees every brand, and `--brand` (an id or a slug) narrows or names one. The audit actor is `cli:<login>`.

Output: a JSON object per line, for lists and for what a change made. `client create` and `client rotate` print
the new API key on stdout and nothing else there; it is shown this once (a note on stderr says so). Bad input
prints every bad field and exits 1, having changed nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import asyncpg
from redis import exceptions as redis_errors

from gateway.domain import StoreUnavailable
from gateway.redis_client import RedisClient, connect
from gateway.settings import Settings
from gateway.tenancy import admin_risk, admin_store, api_keys, lockouts, notify
from gateway.tenancy.admin_store import IssuedKey
from gateway.tenancy.admin_tx import Committed
from gateway.tenancy.model import DEFAULT_RADIUS_M, AlreadyExists, NotFoundError, Role
from gateway.validation import FieldViolation, InvalidRequest

T = TypeVar("T")
Command = Callable[[argparse.Namespace, Settings], Awaitable[int]]

_STATUS = {"enable": "active", "disable": "disabled"}
# admin_store's field names as this command line spells them, so a violation names what to change.
_OPTIONS = {
    "brand_id": "--brand", "slug": "--slug", "name": "--name", "external_id": "--external-id", "latitude": "--lat",
    "longitude": "--lon", "time_zone": "--time-zone", "status": "--status", "role": "--role", "label": "--label",
    "store_id": "--store", "terminal_id": "--terminal", "env": "--env", "grace": "--grace", "limit": "--limit",
    "radius_m": "--radius-m", "document": "--file", "scope": "--scope", "subject": "--subject",
}  # fmt: skip
_REDIS_DOWN = (redis_errors.RedisError, OSError, TimeoutError)


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no login name in the environment nor in the password database
        return "cli:unknown"


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _print(*rows: Any) -> None:
    """One JSON object per line (dataclasses of the registry's model)."""
    for row in rows:
        print(json.dumps(dataclasses.asdict(row), default=_json_default))


def _print_violations(violations: Sequence[FieldViolation]) -> None:
    print("rgw: invalid request, nothing was changed:", file=sys.stderr)
    for v in violations:
        option = _OPTIONS.get(v.field)
        print(f"  {option} ({v.field})" if option else f"  {v.field}", v.description, sep=": ", file=sys.stderr)


@dataclasses.dataclass
class _Session:
    """One command's connections and settings, and the registry version it committed but could not announce."""

    conn: asyncpg.Connection
    redis: RedisClient
    settings: Settings
    actor: str
    unannounced: int = 0  # 0: none

    async def commit(self, change: Callable[..., Awaitable[Committed[T]]], **arguments: Any) -> T:
        """Make one change and announce it. Redis is asked first: a change no gateway would hear of is not made."""
        return (await self.commit_versioned(change, **arguments)).value

    async def commit_versioned(self, change: Callable[..., Awaitable[Committed[T]]], **arguments: Any) -> Committed[T]:
        """As commit, with the registry version the change produced."""
        await self.redis.ping()
        committed = await change(self.conn, actor=self.actor, **arguments)
        try:
            await notify.publish(self.redis, committed.version)
        except _REDIS_DOWN:
            self.unannounced = committed.version
        return committed

    async def brand_id(self, named: str | None) -> int | None:
        """The brand `--brand` names, by id or slug (None: not given)."""
        if named is None:
            return None
        for brand in await admin_store.list_brands(self.conn):
            if str(brand.id) == named or brand.slug == named:
                return brand.id
        raise InvalidRequest([FieldViolation("brand_id", f"names no brand: {named[:64]!r}")])

    async def one_brand(self, named: str) -> int:
        """The brand a required `--brand` names."""
        brand_id = await self.brand_id(named)
        assert brand_id is not None  # argparse required it
        return brand_id


Work = Callable[[_Session, argparse.Namespace], Awaitable[None]]


async def _run(settings: Settings, args: argparse.Namespace, work: Work) -> int:
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        print(f"rgw: cannot reach Postgres (RGW_DATABASE_URL): {type(exc).__name__}", file=sys.stderr)
        return 1
    redis = connect(*settings.redis_target, pool_size=1, timeout_s=max(settings.redis_timeout_seconds, 5))
    session = _Session(conn, redis, settings, _actor())
    try:
        return await _outcome(session, args, work)
    finally:
        await redis.aclose()
        await conn.close()


async def _outcome(session: _Session, args: argparse.Namespace, work: Work) -> int:
    """Run the work; refusals are messages and exit status 1, never tracebacks."""
    try:
        await work(session, args)
    except InvalidRequest as exc:
        _print_violations(exc.violations)
        return 1
    except (AlreadyExists, NotFoundError) as exc:
        print(f"rgw: {exc}; nothing was changed", file=sys.stderr)
        return 1
    except (*_REDIS_DOWN, StoreUnavailable) as exc:  # the ping before a change, or a lockout call: nothing changed
        print(
            f"rgw: Redis (RGW_REDIS_URL) is unreachable ({type(exc).__name__}); nothing was changed",
            file=sys.stderr,
        )
        return 1
    if session.unannounced:
        print(f"rgw: committed as registry version {session.unannounced}, but Redis did not take the announcement: "
              "gateways apply it with the next announced change (make one, e.g. repeat a revoke)",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _command(work: Work) -> Command:
    async def run(args: argparse.Namespace, settings: Settings) -> int:
        return await _run(settings, args, work)

    return run


# ---------------------------------------------------------------------------------------------------- the work


async def _brand_create(s: _Session, args: argparse.Namespace) -> None:
    _print(await s.commit(admin_store.create_brand, slug=args.slug, name=args.name))


async def _brand_list(s: _Session, args: argparse.Namespace) -> None:
    _print(*await admin_store.list_brands(s.conn))


async def _brand_status(s: _Session, args: argparse.Namespace) -> None:
    brand_id = await s.brand_id(args.brand)
    _print(await s.commit(admin_store.set_brand_status, brand_id=brand_id, status=_STATUS[args.action]))


async def _store_create(s: _Session, args: argparse.Namespace) -> None:
    _print(await s.commit(
        admin_store.create_store, brand_id=await s.brand_id(args.brand), external_id=args.external_id,
        name=args.name, latitude=args.lat, longitude=args.lon, time_zone=args.time_zone, radius_m=args.radius_m,
    ))  # fmt: skip


async def _store_update(s: _Session, args: argparse.Namespace) -> None:
    _print(await s.commit(
        admin_store.update_store, brand_id=await s.brand_id(args.brand), store_id=args.id, name=args.name,
        latitude=args.lat, longitude=args.lon, time_zone=args.time_zone, radius_m=args.radius_m,
    ))  # fmt: skip


async def _store_list(s: _Session, args: argparse.Namespace) -> None:
    _print(*await admin_store.list_stores(s.conn, brand_id=await s.brand_id(args.brand)))


async def _store_status(s: _Session, args: argparse.Namespace) -> None:
    brand_id = await s.brand_id(args.brand)
    status = _STATUS[args.action]
    _print(await s.commit(admin_store.set_store_status, brand_id=brand_id, store_id=args.id, status=status))


async def _terminal_create(s: _Session, args: argparse.Namespace) -> None:
    brand_id = await s.brand_id(args.brand)
    terminal = await s.commit(
        admin_store.create_terminal, brand_id=brand_id, store_id=args.store, external_id=args.external_id
    )
    _print(terminal)


async def _terminal_list(s: _Session, args: argparse.Namespace) -> None:
    brand_id = await s.brand_id(args.brand)
    _print(*await admin_store.list_terminals(s.conn, brand_id=brand_id, store_id=args.store))


async def _terminal_status(s: _Session, args: argparse.Namespace) -> None:
    brand_id = await s.brand_id(args.brand)
    _print(await s.commit(
        admin_store.set_terminal_status, brand_id=brand_id, terminal_id=args.id, status=_STATUS[args.action]
    ))  # fmt: skip


def _show_key(issued: IssuedKey, what: str) -> None:
    """The key alone on stdout (for `$(rgw client create ...)`); everything about it on stderr."""
    print(issued.plaintext)
    client = issued.client
    brand = f"brand {client.brand_id}" if client.brand_id is not None else "every brand"
    print(f"rgw: {what} for client {client.id} ({client.role}, {brand}), key id {issued.key_id}. The key above is "
          "shown this once and never again: store it now.", file=sys.stderr)  # fmt: skip
    if issued.previous_keys_expire_at is not None:
        print(f"rgw: the previous keys stop working at {issued.previous_keys_expire_at.isoformat()}", file=sys.stderr)


async def _client_create(s: _Session, args: argparse.Namespace) -> None:
    issued = await s.commit(
        admin_store.create_client, brand_id=await s.brand_id(args.brand), role=args.role, label=args.label,
        store_id=args.store, terminal_id=args.terminal, env=args.env or s.settings.key_env,
    )  # fmt: skip
    _show_key(issued, "a new key")


async def _client_list(s: _Session, args: argparse.Namespace) -> None:
    _print(*await admin_store.list_clients(s.conn, brand_id=await s.brand_id(args.brand)))


async def _client_revoke(s: _Session, args: argparse.Namespace) -> None:
    brand_id = await s.brand_id(args.brand)
    _print(await s.commit(admin_store.revoke_client, brand_id=brand_id, client_id=args.client_id))


async def _client_rotate(s: _Session, args: argparse.Namespace) -> None:
    issued = await s.commit(
        admin_store.rotate_client_key, brand_id=await s.brand_id(args.brand), client_id=args.client_id,
        grace=timedelta(seconds=s.settings.key_rotation_grace_seconds if args.grace is None else args.grace),
        env=args.env or s.settings.key_env,
    )  # fmt: skip
    _show_key(issued, "a rotated key")


def _policy_file(path: str) -> object:
    """The JSON document in the file (`-`: standard input)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidRequest([FieldViolation("document", f"cannot be read: {exc.strerror or exc}")]) from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest([FieldViolation("document", f"must be a JSON object ({exc})")]) from None


async def _policy_set(s: _Session, args: argparse.Namespace) -> None:
    document = _policy_file(args.file)
    brand_id = await s.one_brand(args.brand)
    stored = await s.commit_versioned(
        admin_risk.set_risk_policy, brand_id=brand_id, campaign_id=args.campaign, document=document
    )
    _print(stored.value)
    print(f"rgw: stored as registry version {stored.version}", file=sys.stderr)


async def _policy_show(s: _Session, args: argparse.Namespace) -> None:
    brand_id = await s.one_brand(args.brand)
    levels = await admin_risk.get_risk_policy(s.conn, brand_id=brand_id, campaign_id=args.campaign)
    shown = {**dataclasses.asdict(levels.stored), "effective": admin_risk.effective_document(levels)}
    print(json.dumps(shown))


async def _lockouts(s: _Session, args: argparse.Namespace) -> None:
    found = await lockouts.list_lockouts(s.redis, brand_id=await s.one_brand(args.brand))
    _print(*found.entries)
    if found.truncated:
        print(f"rgw: only the first {lockouts.MAX_LISTED} lockouts are listed", file=sys.stderr)


async def _unlock(s: _Session, args: argparse.Namespace) -> None:
    lifted = await lockouts.lift_audited(
        s.conn, redis=s.redis, actor=s.actor, brand_id=await s.one_brand(args.brand), scope=args.scope,
        subject=args.subject,
    )  # fmt: skip
    print(json.dumps({"scope": args.scope, "subject": args.subject, "lifted": lifted}))


async def _audit_list(s: _Session, args: argparse.Namespace) -> None:
    _print(*await admin_store.list_audit(s.conn, brand_id=await s.brand_id(args.brand), limit=args.limit))


# ------------------------------------------------------------------------------------------------------ parser

Sub: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
_BRAND_HELP = "the brand, by id or slug"


def _group(sub: Sub, name: str, text: str) -> Sub:
    return sub.add_parser(name, help=text).add_subparsers(dest="action", required=True)


def _action(group: Sub, name: str, text: str, work: Work, *, brand: str = "optional") -> argparse.ArgumentParser:
    """A subcommand running `work`; with `--brand` (required, optional - default every brand - or none)."""
    cmd = group.add_parser(name, help=text)
    if brand != "none":
        cmd.add_argument("--brand", required=brand == "required", help=_BRAND_HELP)
    cmd.set_defaults(run=_command(work))
    return cmd


def _status_actions(group: Sub, entity: str, work: Work) -> None:
    for verb in ("disable", "enable"):
        cmd = _action(group, verb, f"{verb} a {entity}", work)
        cmd.add_argument("id", type=int, help=f"the {entity}'s id")


def _brand_commands(sub: Sub) -> None:
    group = _group(sub, "brand", "brands (tenants)")
    create = _action(group, "create", "create a brand; prints it", _brand_create, brand="none")
    create.add_argument("--slug", required=True, help="a-z, 0-9 and -, e.g. acme")
    create.add_argument("--name", required=True)
    _action(group, "list", "list every brand", _brand_list, brand="none")
    for verb in ("disable", "enable"):
        cmd = _action(group, verb, f"{verb} a brand (a disabled brand's clients are refused)", _brand_status,
                      brand="none")  # fmt: skip
        cmd.add_argument("brand", help=_BRAND_HELP)


def _store_commands(sub: Sub) -> None:
    group = _group(sub, "store", "a brand's stores")
    create = _action(group, "create", "create a store; prints it", _store_create, brand="required")
    create.add_argument("--external-id", required=True, help="the brand's id for it (RedeemRequest.store_id)")
    create.add_argument("--name", required=True)
    create.add_argument("--lat", type=float, required=True, help="latitude, degrees")
    create.add_argument("--lon", type=float, required=True, help="longitude, degrees")
    create.add_argument("--time-zone", required=True, help="IANA name, e.g. Europe/Paris")
    create.add_argument("--radius-m", type=float, default=DEFAULT_RADIUS_M, help="geofence radius, metres "
                        f"(default {DEFAULT_RADIUS_M:g})")  # fmt: skip
    update = _action(group, "update", "change a store (only the options given); prints it", _store_update)
    update.add_argument("id", type=int, help="the store's id")
    update.add_argument("--name")
    update.add_argument("--lat", type=float, help="latitude, degrees")
    update.add_argument("--lon", type=float, help="longitude, degrees")
    update.add_argument("--time-zone", help="IANA name, e.g. Europe/Paris")
    update.add_argument("--radius-m", type=float, help="geofence radius, metres")
    _action(group, "list", "list stores", _store_list)
    _status_actions(group, "store", _store_status)


def _terminal_commands(sub: Sub) -> None:
    group = _group(sub, "terminal", "the tills of a brand's stores")
    create = _action(group, "create", "create a terminal; prints it", _terminal_create, brand="required")
    create.add_argument("--store", type=int, required=True, help="the store's id")
    create.add_argument("--external-id", required=True, help="the brand's id for it (RedeemRequest.terminal_id)")
    listing = _action(group, "list", "list terminals", _terminal_list)
    listing.add_argument("--store", type=int, help="only this store's (id)")
    _status_actions(group, "terminal", _terminal_status)


def _client_commands(sub: Sub) -> None:
    group = _group(sub, "client", "API clients and their keys")
    create = _action(group, "create", "create a client; prints its key, once", _client_create)
    create.add_argument("--role", required=True, help=f"one of {', '.join(Role)} (platform: no --brand)")
    create.add_argument("--label", required=True, help="what it is, for people")
    create.add_argument("--store", type=int, help="bind a pos or internal client to this store (id)")
    create.add_argument("--terminal", type=int, help="bind a pos or internal client to this terminal (id)")
    _action(group, "list", "list clients", _client_list)
    revoke = _action(group, "revoke", "revoke a client and all its keys", _client_revoke)
    revoke.add_argument("client_id")
    rotate = _action(group, "rotate", "give a client a new key (printed once); the old ones end after --grace",
                     _client_rotate)  # fmt: skip
    rotate.add_argument("client_id")
    rotate.add_argument("--grace", type=float, help="seconds the old keys keep working (default: "
                        "RGW_KEY_ROTATION_GRACE_SECONDS)")  # fmt: skip
    for cmd in (create, rotate):
        cmd.add_argument("--env", help=f"the key's environment tag: {', '.join(api_keys.ENVIRONMENTS)} (default: "
                         "RGW_KEY_ENV)")  # fmt: skip


def _risk_commands(sub: Sub) -> None:
    group = _group(sub, "risk", "the risk engine: policies and lockouts")
    policies = _group(group, "policy", "a brand's risk policy, brand-wide or of one campaign")
    put = _action(policies, "set", "store a policy document ({} clears it); prints it", _policy_set, brand="required")
    put.add_argument("--file", required=True, help="the JSON document (- for standard input)")
    show = _action(policies, "show", "the stored document and the policy in effect", _policy_show, brand="required")
    for cmd in (put, show):
        cmd.add_argument("--campaign", type=int, default=0, help="a campaign of the brand (default 0: brand-wide)")
    _action(group, "lockouts", "the brand's current lockouts, as JSON lines", _lockouts, brand="required")
    unlock = _action(group, "unlock", "lift a lockout and forget its failures", _unlock, brand="required")
    unlock.add_argument("--scope", required=True, choices=[str(scope) for scope in lockouts.LIFTABLE])
    unlock.add_argument("--subject", required=True, help="client id, store external id, or <store>/<terminal>")


def add_registry_commands(sub: Sub) -> None:
    """Register `rgw brand|store|terminal|client|audit|risk`."""
    _brand_commands(sub)
    _store_commands(sub)
    _terminal_commands(sub)
    _client_commands(sub)
    _risk_commands(sub)
    audit = _action(_group(sub, "audit", "the audit log of registry changes"), "list", "newest first", _audit_list)
    audit.add_argument("--limit", type=int, default=100, help=f"at most this many (1 to {admin_store.MAX_AUDIT_LIMIT})")
