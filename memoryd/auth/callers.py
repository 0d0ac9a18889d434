"""The daemon's side of auth: a call's metadata -> the Caller its handler gets.

    authorization: Bearer mdt_<id>_<secret>     the token (memoryd.auth.tokens)
    x-memoryd-client: <name>                    who it says it is (Stats.stacks)

With auth off (`memoryd serve` without --auth) every call is the owner's:
Caller(name) with every right, as before tokens existed. With auth on, a
call without a token, with a malformed, unknown or revoked one, or with a
wrong secret is UNAUTHENTICATED, all with one message, so the answer does
not tell a guesser which part was wrong.

Token rows are cached for TOKEN_TTL_S (1 s): a busy client costs one catalog
read a second, not one per search, and a revocation is effective within
that second. The secret is checked against the cached hash on every call.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Protocol

from memoryd.api import Caller
from memoryd.auth import tokens
from memoryd.errors import Unauthenticated

TOKEN_TTL_S = 1.0
MAX_CACHED = 10_000              # token ids remembered at once (unknown ones too)
_REFUSED = "a valid token is required: metadata 'authorization: Bearer mdt_...'"


class TokenRows(Protocol):
    """Where token rows come from (memoryd.engine.tokens.TokenStore)."""

    def row(self, token_id: str) -> dict | None: ...


class Authenticator:
    """Checks tokens against a TokenStore, with a TTL cache of its rows."""

    def __init__(self, store: TokenRows, *, ttl_s: float = TOKEN_TTL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.store, self.ttl_s, self.clock = store, ttl_s, clock
        self._rows: dict[str, tuple[float, dict | None]] = {}
        self._lock = threading.Lock()

    def _row(self, token_id: str) -> dict | None:
        now = self.clock()
        with self._lock:
            hit = self._rows.get(token_id)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        row = self.store.row(token_id)
        with self._lock:
            if len(self._rows) >= MAX_CACHED:   # e.g. someone trying ids: start over
                self._rows.clear()
            self._rows[token_id] = (now, row)
        return row

    def caller(self, token: str | None, name: str) -> Caller:
        """The Caller of a valid token, else Unauthenticated."""
        if not token:
            raise Unauthenticated(f"no token: {_REFUSED}")
        try:
            token_id, secret = tokens.parse(token)
        except Unauthenticated:
            raise Unauthenticated(f"invalid token: {_REFUSED}") from None
        row = self._row(token_id)
        if row is None or row["revoked_at"] is not None \
                or not tokens.matches(secret, row["secret_sha256"]):
            raise Unauthenticated(f"invalid or revoked token: {_REFUSED}")
        return tokens.caller_for(tokens.info(row), name)
