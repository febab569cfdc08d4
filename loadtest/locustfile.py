"""Locust scenarios against the redemption gateway: one User class per scenario, each task tagged with it.

    LaunchPeak  (tag launch_peak)  many terminals redeeming fresh single-use codes, each code once
    HotCodes    (tag hot_codes)    many terminals redeeming a few multi-use codes at once
    Attacker    (tag attacker)     guesses: well-formed codes never issued (OUTCOME_NOT_FOUND) and mistyped ones
                                   (INVALID_ARGUMENT, expected: not a failure), until the lockout engages:
                                   then OUTCOME_RISK_DENIED:LOCKED_OUT, counted apart in the report
    Mixed       (tag mixed)        Validate, Redeem, and retries with the same idempotency key, which must be
                                   replayed with the first redemption id (a failure otherwise)

Pick scenarios by class name (`locust -f loadtest/locustfile.py LaunchPeak Attacker`), with `--tags`, or in the
web UI with `--class-picker`. The gateway is `--host HOST:PORT`. The codes come from `python -m loadtest.prepare`:
`--rgw-data DIR` (or RGW_LOADTEST_DATA). Distributed, every worker reads the same data and takes every N-th fresh
code, N = `--rgw-workers` (or RGW_LOADTEST_WORKERS), so no fresh code is used twice; hot codes are shared on
purpose.
"""

from __future__ import annotations

import itertools
import logging
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent  # gevent ships no types
import grpc
from locust import constant, events, tag, task
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment
from locust.exception import LocustError, StopUser
from locust.runners import MasterRunner
from locust.stats import CSV_STATS_INTERVAL_SEC

from gateway import codes
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from loadtest.grpc_user import Check, GrpcUser
from loadtest.prepare import Manifest

log = logging.getLogger("loadtest")
STORES = 50
# A campaign id far beyond any real one: guesses routed to it are NOT_FOUND as codes of an unknown campaign.
UNKNOWN_CAMPAIGN = codes.MAX_CAMPAIGN_ID
BERLIN = pb.Location(latitude=52.5200, longitude=13.4050, accuracy_m=25)


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]  # locust's EventHook is untyped
def _arguments(parser: LocustArgumentParser) -> None:
    parser.add_argument("--rgw-data", env_var="RGW_LOADTEST_DATA", default="", help="data dir of loadtest.prepare")
    parser.add_argument(
        "--rgw-workers", env_var="RGW_LOADTEST_WORKERS", type=int, default=1,
        help="workers sharing the data dir (distributed runs); each takes every N-th fresh code",
    )  # fmt: skip


@dataclass
class Shared:
    """What every user of this process shares. Greenlets switch only at I/O and taking a code does none, so a
    plain iterator hands each fresh code to exactly one user without a lock."""

    manifest: Manifest
    fresh_codes: list[str]
    hot_codes: list[str]
    api_key: str = field(repr=False)
    attacker_key: str = field(repr=False)
    _fresh: Iterator[str] | None = field(default=None, init=False)

    @classmethod
    def load(cls, directory: Path) -> Shared:
        manifest = Manifest.read(directory)
        fresh = (directory / manifest.fresh.file).read_text().split()
        hot = (directory / manifest.hot.file).read_text().split()
        key, attacker_key = ((directory / name).read_text().strip()
                             for name in (manifest.key_file, manifest.attacker_key_file))  # fmt: skip
        return cls(manifest, fresh, hot, key, attacker_key)

    def take_fresh(self, environment: Environment) -> str | None:
        """The next unused fresh code of this worker's share, or None when the share is used up."""
        if self._fresh is None:  # the worker index is known only once the master acknowledged this worker
            self._fresh = iter(self.fresh_codes[_share(environment) :: _workers(environment)])
        return next(self._fresh, None)


_shared: list[Shared] = []  # one element once loaded; a list so no `global` statement is needed


def _workers(environment: Environment) -> int:
    return int(getattr(environment.parsed_options, "rgw_workers", 1))


def _share(environment: Environment) -> int:
    index = int(getattr(environment.runner, "worker_index", 0))  # 0 when not distributed
    workers = _workers(environment)
    if not 0 <= index < workers:
        raise LocustError(f"worker index {index} with --rgw-workers {workers}: set it to the number of workers")
    return index


def _runs(task: Any, tags: set[str] | None, excluded: set[str]) -> bool:
    tag_set: set[str] = getattr(task, "locust_tag_set", set())
    return (tags is None or bool(tag_set & tags)) and not tag_set & excluded


def _select_by_tags(environment: Environment) -> None:
    """Locust's --tags / --exclude-tags filter tasks but keep a scenario left with none, whose users then fail on
    every turn; a scenario is all-or-nothing here, so drop those."""
    options = environment.parsed_options
    tags = set(getattr(options, "tags", None) or ()) or None
    excluded = set(getattr(options, "exclude_tags", None) or ())
    kept = [user for user in environment.user_classes if any(_runs(t, tags, excluded) for t in user.tasks)]
    if not kept:
        raise LocustError(f"no scenario has tasks tagged {sorted(tags or ())} outside {sorted(excluded)}")
    environment.user_classes[:] = kept


@events.init.add_listener  # type: ignore[untyped-decorator]  # locust's EventHook is untyped
def _on_init(environment: Environment, **_: Any) -> None:
    _select_by_tags(environment)
    # Loaded at start-up so a wrong data dir stops Locust at once; the master sends no traffic and needs none.
    if not isinstance(environment.runner, MasterRunner):
        _shared.append(Shared.load(_data_dir(environment)))
    # gevent's clock advances only when its loop runs, which it has not since locust was imported. The --run-time
    # timer Locust starts next would otherwise end the run early by the whole start-up (seconds on a busy machine).
    gevent.get_hub().loop.update_now()


def _data_dir(environment: Environment) -> Path:
    directory = getattr(environment.parsed_options, "rgw_data", "")
    if not directory:
        raise LocustError("no load-test data: pass --rgw-data DIR (or RGW_LOADTEST_DATA) from loadtest.prepare")
    return Path(directory)


@events.quitting.add_listener  # type: ignore[untyped-decorator]  # locust's EventHook is untyped
def _final_csv(environment: Environment, **_: Any) -> None:
    # Locust rewrites its CSV files once a second and not again at exit, so they would miss the last second. The
    # users have stopped by now: one more turn of its writer makes the files match the final summary.
    if getattr(environment.parsed_options, "csv_prefix", None):
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)


def shared() -> Shared:
    if not _shared:
        raise LocustError("load-test data was not loaded (the init event did not run)")
    return _shared[0]


_terminal_numbers = itertools.count(1)


class Terminal(GrpcUser):
    """A till: one store and terminal id per user, so idempotency scopes (caller, key, code) never collide."""

    abstract = True
    wait_time = constant(0)

    store_prefix = "store"

    def on_start(self) -> None:
        self.api_key = self.client_key(shared())
        super().on_start()
        number = next(_terminal_numbers)
        self.store_id = f"{self.store_prefix}-{number % STORES}"
        self.terminal_id = f"{type(self).__name__.lower()}-{number}"

    def client_key(self, data: Shared) -> str:
        """The API key this till calls with."""
        return data.api_key

    def redeem_request(self, code: str, **extra: Any) -> pb.RedeemRequest:
        return pb.RedeemRequest(
            code=code, idempotency_key=uuid.uuid4().hex, store_id=self.store_id, terminal_id=self.terminal_id, **extra
        )


class LaunchPeak(Terminal):
    """Many terminals redeeming fresh single-use codes, each code once: every answer should be REDEEMED."""

    weight = 4

    @tag("launch_peak")
    @task
    def redeem_fresh_code(self) -> None:
        code = shared().take_fresh(self.environment)
        if code is None:
            log.warning("%s: fresh codes used up; prepare more (--fresh) for this run", self.terminal_id)
            raise StopUser
        self.redeem(self.redeem_request(code))


class HotCodes(Terminal):
    """Many terminals redeeming the same few multi-use codes: contention on single Redis keys."""

    weight = 2

    @tag("hot_codes")
    @task
    def redeem_hot_code(self) -> None:
        self.redeem(self.redeem_request(random.choice(shared().hot_codes)))  # noqa: S311 - load, not secrets


class Attacker(Terminal):
    """Guesses codes: well-formed ones (valid check character) that were never issued, and mistyped ones, which the
    gateway rejects offline with INVALID_ARGUMENT - expected here, so not a failure. Every guess counts towards
    the lockout: after 10 (the default) the terminal is locked out and even its well-formed guesses are declined
    OUTCOME_RISK_DENIED:LOCKED_OUT. Its own client and stores, so its lockouts never reach the honest tills."""

    weight = 1
    expected_codes = frozenset({grpc.StatusCode.INVALID_ARGUMENT})
    store_prefix = "attacker-store"

    def client_key(self, data: Shared) -> str:
        return data.attacker_key

    def _guess(self) -> str:
        manifest = shared().manifest
        known = random.choice((manifest.fresh, manifest.hot))  # noqa: S311
        if random.random() < 0.1:  # noqa: S311
            return codes.generate(codes.Route(UNKNOWN_CAMPAIGN, 0))
        return codes.generate(codes.Route(known.campaign_id, random.randrange(known.shards)))  # noqa: S311

    @tag("attacker")
    @task(3)
    def guess_unissued_code(self) -> None:
        self.redeem(self.redeem_request(self._guess()))

    @tag("attacker")
    @task(1)
    def try_mistyped_code(self) -> None:
        self.redeem(self.redeem_request(mistype(self._guess())))


def mistype(code: str) -> str:
    """The code with one character replaced by another: the check character catches every such typo."""
    at = random.randrange(len(code))  # noqa: S311 - load, not secrets
    wrong = random.choice(codes.ALPHABET.replace(code[at], ""))  # noqa: S311
    return code[:at] + wrong + code[at + 1 :]


def replay_of(first: pb.RedeemResponse) -> Check:
    """A check for a retry: it must be the first answer again, marked replayed."""

    def check(retry: pb.RedeemResponse) -> str | None:
        if not retry.replayed:
            return f"retry not replayed: outcome {pb.Outcome.Name(retry.outcome)}"
        if retry.redemption_id != first.redemption_id or retry.use_number != first.use_number:
            return "retry replayed a different redemption"
        return None

    return check


class Mixed(Terminal):
    """A realistic till: checks a code, redeems it, retries (as after a lost answer), and sometimes sees a code
    presented twice."""

    weight = 2

    def on_start(self) -> None:
        super().on_start()
        self.used: list[str] = []

    @tag("mixed")
    @task(4)
    def validate_redeem_retry(self) -> None:
        code = shared().take_fresh(self.environment)
        if code is None:
            log.warning("%s: fresh codes used up; prepare more (--fresh) for this run", self.terminal_id)
            raise StopUser
        self.validate(pb.ValidateRequest(code=code, store_id=self.store_id, terminal_id=self.terminal_id))
        request = self.redeem_request(code, customer_device_id=f"app-{self.terminal_id}", location=BERLIN)
        first = self.redeem(request)
        if first is None or first.outcome != pb.OUTCOME_REDEEMED:
            return  # declines are not recorded, so a retry would be decided again: nothing to check
        self.used = [*self.used[-9:], code]
        self.redeem(request, check=replay_of(first))

    @tag("mixed")
    @task(1)
    def redeem_used_code(self) -> None:
        if self.used:  # a new attempt (new key) at a code this till already redeemed: ALREADY_REDEEMED
            self.redeem(self.redeem_request(random.choice(self.used)))  # noqa: S311
