"""API keys, scopes and quotas (docs/security.md).

Keys live in the file named by CMN_AUTH_FILE, one per line: `<sha256 hex of the key> <scopes> [name]`, scopes a
comma-separated subset of SCOPES. The file holds hashes only; it is re-read on SIGHUP and on /admin/reload.
Clients send `Authorization: Bearer <key>` (admin routes also take `X-API-Key`, and CMN_API_KEY is one more admin
key). Without CMN_AUTH_FILE auth is off: every route but /admin is open, and there are no per-key quotas.

Token buckets, all on the event loop (no locks): requests per key, work per key (in scored pairs, what the model
thread spends on its requests), feedback events per key, per key and user, and naming ids the model does not know
per key, and wrong keys per client address (a guess of a key costs a token, an address out of tokens gets 429
whatever it sends, so a right guess cannot be told from a wrong one).
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import os
import re
import stat
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

from starlette.exceptions import HTTPException

from app.settings import Settings

SCOPES = ("recommend", "history", "feedback", "admin", "metrics")
MAX_KEY_FILE_BYTES = 1_000_000
MAX_ADDRESSES = 10_000            # client addresses whose failed attempts are remembered (least recent forgotten)
MAX_TARGETS = 100_000             # (key, user) pairs whose feedback is counted (least recent forgotten)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DIGEST = re.compile(r"[0-9a-fA-F]{64}")

AUTH_RESPONSES = {
    401: {"description": "no key, or a key the server does not know (only with CMN_AUTH_FILE set)"},
    403: {"description": "the key lacks the scope this route or this request needs"},
    429: {"description": "past the key's request rate or event quota, or too many wrong keys from this address; "
                         "Retry-After says when to retry"},
}


class KeyFileError(ValueError):
    pass


@dataclass(frozen=True)
class Key:
    digest: bytes
    scopes: frozenset[str]
    name: str


@dataclass(frozen=True)
class Caller:
    name: str                   # the key's name: event ids and quotas are per name; "" without auth
    scopes: frozenset[str]
    keyed: bool                 # False without auth: no quotas apply


OPEN = Caller("", frozenset(SCOPES) - {"admin"}, keyed=False)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name may resolve to any address
        return False


def digest_of(key: str) -> bytes:
    # header values reach us decoded as latin-1: encoding back gives the bytes the client sent
    return hashlib.sha256(key.encode("latin-1", "replace")).digest()


def parse_key_lines(text: str) -> tuple[list[Key], list[str]]:
    """The keys of the lines that parse, and an error for each line that does not (blank lines and # comments
    skipped). Errors name the line, never its content. Lines may share a name (a key being rotated): they share
    event ids and quotas; a key listed twice counts once, and is an error."""
    keys, errors = [], []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) not in (2, 3):
            errors.append(f"line {number}: expected '<sha256 hex> <scopes> [name]'")
            continue
        digest, scopes = fields[0], frozenset(fields[1].split(","))
        name = fields[2] if len(fields) == 3 else "key-" + digest[:12].lower()
        if not DIGEST.fullmatch(digest):
            errors.append(f"line {number}: the first field is not a sha256 hex digest (64 hex digits)")
        elif not scopes <= set(SCOPES):
            errors.append(f"line {number}: unknown scope {sorted(scopes - set(SCOPES))}; scopes are "
                          f"{', '.join(SCOPES)}")
        elif not NAME.fullmatch(name):
            errors.append(f"line {number}: a name is 1-64 letters, digits, '.', '_' or '-'")
        elif any(k.digest == bytes.fromhex(digest) for k in keys):
            errors.append(f"line {number}: the same key is listed twice")
        else:
            keys.append(Key(bytes.fromhex(digest), scopes, name))
    return keys, errors


def parse_keys(text: str) -> list[Key]:
    """Every line's key; KeyFileError naming the first line that does not parse."""
    keys, errors = parse_key_lines(text)
    if errors:
        raise KeyFileError(errors[0])
    return keys


def read_key_text(path: str) -> str:
    # opened without blocking and checked to be a regular file: a FIFO or a device named here must not hang the
    # server (the file is re-read on every reload)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise KeyFileError(f"CMN_AUTH_FILE: cannot open it ({e.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError("CMN_AUTH_FILE is not a regular file")
        if info.st_size > MAX_KEY_FILE_BYTES:
            raise KeyFileError(f"CMN_AUTH_FILE is larger than {MAX_KEY_FILE_BYTES} bytes")
        return os.read(fd, MAX_KEY_FILE_BYTES).decode("utf-8", "replace")
    finally:
        os.close(fd)


def read_key_file(path: str) -> list[Key]:
    """Every key of the file; KeyFileError when it cannot be read or a line does not parse (the start)."""
    try:
        return parse_keys(read_key_text(path))
    except KeyFileError as e:
        raise KeyFileError(e if str(e).startswith("CMN_AUTH_FILE") else f"CMN_AUTH_FILE {e}") from None


class TokenBucket:
    """`capacity` tokens, refilled at `rate` per second."""

    def __init__(self, rate: float, capacity: float, now: float):
        self.rate, self.capacity, self.tokens, self.stamp = rate, capacity, capacity, now

    def wait(self, n: float, now: float) -> float:
        """Seconds until `n` tokens are there (0: now)."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return max(0.0, (n - self.tokens) / self.rate)

    def take(self, n: float) -> None:
        self.tokens -= n

    def give(self, n: float) -> None:
        self.tokens = min(self.capacity, self.tokens + n)


class Buckets:
    """One TokenBucket per name, for `per_minute` tokens a minute (capacity: a minute's worth, or `burst`);
    `per_minute` 0 means no limit. With `remember`, only the names used most recently are kept."""

    def __init__(self, per_minute: float, burst: float | None = None, remember: int | None = None):
        self.rate, self.capacity = per_minute / 60, burst or per_minute
        self.remember = remember
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __bool__(self) -> bool:
        return self.rate > 0

    def get(self, name: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = TokenBucket(self.rate, self.capacity, now)
        self._buckets.move_to_end(name)
        if self.remember and len(self._buckets) > self.remember:
            self._buckets.popitem(last=False)
        return bucket


def too_many(detail: str, wait: float) -> HTTPException:
    return HTTPException(429, detail, headers={"Retry-After": str(max(1, math.ceil(wait)))})


class Auth:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.keys: list[Key] | None = read_key_file(settings.auth_file) if settings.auth_file else None
        self.admin_digest = digest_of(settings.api_key.get_secret_value()) if settings.api_key else None
        self.requests = Buckets(settings.rate_per_s * 60, settings.rate_burst)
        self.pairs = Buckets(settings.pairs_per_s * 60, settings.pairs_burst)
        # key name → until when its recommendations are refused before the body is validated: its work went past a
        # limit, and a client ignoring Retry-After must not make each refusal cost a parsed, resolved body
        self.held: dict[str, float] = {}
        self.events = Buckets(settings.feedback_events_per_min)
        self.per_user = Buckets(settings.feedback_per_user_per_hour / 60, settings.feedback_per_user_per_hour,
                                remember=MAX_TARGETS)
        self.unknown = Buckets(settings.unknown_events_per_min)
        self.failures = Buckets(settings.auth_failures_per_min, remember=MAX_ADDRESSES)

    @property
    def enabled(self) -> bool:
        return self.keys is not None

    def reload(self) -> int:
        """Re-read CMN_AUTH_FILE; returns the number of keys. The file decides, even when it has errors: the keys
        of the lines that parse are the keys (a key removed from the file is never kept because another line
        broke), and a file that cannot be read leaves no key valid. KeyFileError then says what was wrong."""
        if not self.enabled:
            return 0
        try:
            self.keys, errors = parse_key_lines(read_key_text(self.settings.auth_file))
        except KeyFileError:
            self.keys = []
            raise
        if errors:
            raise KeyFileError(f"CMN_AUTH_FILE {'; '.join(errors[:5])}" + (f" (and {len(errors) - 5} more)"
                                                                          if len(errors) > 5 else ""))
        return len(self.keys)

    # ------------------------------------------------------------------ who is calling

    def _match(self, presented: str) -> Key | None:
        digest, found = digest_of(presented), None
        for key in self.keys or ():   # every key is compared, so the time taken does not tell which one matched
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found

    def _throttle(self, address: str) -> None:
        now = time.monotonic()
        if self.failures and (wait := self.failures.get(address, now).wait(1, now)):
            raise too_many("too many wrong keys from this address", wait)

    def _wrong_key(self, address: str) -> HTTPException:
        if self.failures:
            self.failures.get(address, time.monotonic()).take(1)
        return HTTPException(401, "unknown key", headers={"WWW-Authenticate": "Bearer"})

    def _admitted(self, key: Key, scope: str) -> Caller:
        if scope not in key.scopes:
            raise HTTPException(403, f"this key lacks the {scope} scope")
        if scope == "recommend" and key.name in self.held:
            if (wait := self.held[key.name] - time.monotonic()) > 0:
                raise too_many("this key's work went past its limits (work rate or backlog); retry after "
                               "Retry-After", wait)
            del self.held[key.name]
        if self.requests:
            now = time.monotonic()
            bucket = self.requests.get(key.name, now)
            if wait := bucket.wait(1, now):
                raise too_many(f"more than {self.settings.rate_per_s:g} requests per second with this key", wait)
            bucket.take(1)
        return Caller(key.name, key.scopes, keyed=True)

    def authenticate(self, bearer: str | None, address: str, scope: str) -> Caller:
        """The caller of a route that needs `scope`: 401 without a known key, 403 without the scope, 429 past the
        key's request rate or after too many wrong keys from `address`."""
        if not self.enabled or (scope == "metrics" and self.settings.metrics_open):
            return OPEN
        self._throttle(address)
        if not bearer:
            raise HTTPException(401, "this server needs an API key: send Authorization: Bearer <key>",
                                headers={"WWW-Authenticate": "Bearer"})
        key = self._match(bearer)
        if key is None:
            raise self._wrong_key(address)
        return self._admitted(key, scope)

    def authenticate_admin(self, presented: str | None, address: str) -> None:
        """/admin/*: CMN_API_KEY, or a key of CMN_AUTH_FILE with the admin scope (as Bearer or X-API-Key); 404
        while neither is configured."""
        if self.admin_digest is None and not self.enabled:
            raise HTTPException(404, "admin routes are disabled: set CMN_API_KEY or CMN_AUTH_FILE to enable them")
        self._throttle(address)
        if not presented:
            raise HTTPException(401, "missing X-API-Key (or Authorization: Bearer) for an admin route",
                                headers={"WWW-Authenticate": "Bearer"})
        if self.admin_digest is not None and hmac.compare_digest(digest_of(presented), self.admin_digest):
            return
        key = self._match(presented)
        if key is None:
            raise self._wrong_key(address)
        self._admitted(key, "admin")

    # ------------------------------------------------------------------ what the caller may ask

    def require_history(self, caller: Caller, reqs, jobs) -> None:
        """403 unless the caller has the history scope, for any request whose answer reveals the user's
        interactions: the items it lists or leaves out, or the users behind an item. `jobs`: the requests with ids
        resolved (app/jobs.py), where a known user's `history` has joined `exclude`: its items are left out as
        seen, so they count against the same bound (issue 23: 500 `history` ids and 100 `exclude` ids hid all but
        one user's items from a recommend-only key)."""
        if "history" in caller.scopes:
            return
        limit = self.settings.exclude_without_history
        for r, job in zip(reqs, jobs):
            if not r.exclude_seen:
                reason = "exclude_seen false lists the user's own items"
            elif r.explain:
                reason = "explain names other users who interacted with each item"
            elif r.candidates is not None:
                reason = "a candidate list tells which candidates the user has seen (they are left out)"
            elif len(r.exclude) > limit:
                reason = (f"more than {limit} exclude ids page through the catalogue, and what never comes back is "
                          "the user's history")
            elif len(job.exclude) > limit:
                reason = (f"a known user's history items are left out like exclude ids, and with them more than "
                          f"{limit} ids page through the catalogue, and what never comes back is the user's history")
            else:
                continue
            raise HTTPException(403, f"this key lacks the history scope: {reason}")

    def charge_pairs(self, caller: Caller, pairs: int) -> None:
        """Take a request's work (scored pairs, a fold-in at its measured cost: app/engine.py `Throughput`) from the
        key's tokens: 429 + Retry-After until they are there, 413 for a request costing more than the key may spend
        at once."""
        if not caller.keyed or not self.pairs:
            return
        if pairs > self.pairs.capacity:
            raise HTTPException(413, f"this request costs {pairs} scored pairs; a key may spend "
                                     f"{self.pairs.capacity:g} at once (CMN_PAIRS_BURST): send fewer users, "
                                     "candidates or histories per request")
        now = time.monotonic()
        bucket = self.pairs.get(caller.name, now)
        if wait := bucket.wait(pairs, now):
            raise self.too_much_work(caller, f"past this key's work rate ({self.settings.pairs_per_s:g} scored pairs "
                                             f"a second; this request costs {pairs})", wait)
        bucket.take(pairs)

    def too_much_work(self, caller: Caller, detail: str, wait: float) -> HTTPException:
        """429 + Retry-After for a key whose work went past a limit; until then its recommendation requests are
        refused before their body is validated (`_admitted`)."""
        if caller.keyed:
            self.held[caller.name] = time.monotonic() + wait
        return too_many(detail, wait)

    def refund_pairs(self, caller: Caller, pairs: int) -> None:
        """Give back what `charge_pairs` took for a request that was not queued (the queue or the key's backlog was
        full)."""
        if caller.keyed and self.pairs:
            self.pairs.get(caller.name, time.monotonic()).give(pairs)

    def _event_charges(self, caller: Caller, events: int, unknown: int, users: list[str]) -> list:
        """(buckets, bucket name, tokens, what) for a feedback request: the key's events, its events naming unknown
        ids, and its events for each user."""
        charges = [(b, caller.name, n, what) for b, n, what in (
            (self.events, events, "feedback events"),
            (self.unknown, unknown, "events naming users or items the model does not know")) if b and n]
        if self.per_user:
            charges += [(self.per_user, f"{caller.name}\n{user}", n, "events for one user")
                        for user, n in Counter(users).items()]
        return charges

    def charge_events(self, caller: Caller, events: int, unknown: int, users: list[str]) -> None:
        """Take a feedback request's events from the key's quotas, all or nothing: 429 when a quota has not
        enough left, 413 when one request holds more than a quota allows at once. `users`: each event's user."""
        if not caller.keyed:
            return
        now, wait = time.monotonic(), 0.0
        charges = self._event_charges(caller, events, unknown, users)
        for buckets, name, n, what in charges:
            if n > buckets.capacity:
                per = "an hour" if buckets is self.per_user else "a minute"
                raise HTTPException(413, f"{n} {what} in one request; this key may send {buckets.capacity:g} "
                                         f"{per}: send fewer per request")
            wait = max(wait, buckets.get(name, now).wait(n, now))
        if wait:
            raise too_many("past this key's feedback quota (" + ", ".join(sorted({
                f"{b.capacity:g} {what} {'an hour' if b is self.per_user else 'a minute'}"
                for b, _, _, what in charges})) + ")", wait)
        for buckets, name, n, _ in charges:
            buckets.get(name, now).take(n)

    def refund_events(self, caller: Caller, events: int, unknown: int, users: list[str]) -> None:
        """Give back what `charge_events` took for a request that stored nothing."""
        if not caller.keyed:
            return
        now = time.monotonic()
        for buckets, name, n, _ in self._event_charges(caller, events, unknown, users):
            buckets.get(name, now).give(n)
