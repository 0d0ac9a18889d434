"""API tokens: their format, their hash, their roles (the catalog table that
keeps them is memoryd.engine.tokens).

A token is `mdt_<id>_<secret>`: `id` is 12 hex digits (public: it names the
token in `memctl token list|revoke` and in logs), `secret` 64 hex digits
(32 random bytes). The catalog stores only SHA-256(secret). A plain hash, not
a slow KDF, is enough here because the secret is 256 random bits, not a
password: nothing is gained by guessing from the hash, and a check costs a
microsecond, so it can run on every call. Comparisons are constant-time.

Roles (api.ROLES): read (search, get, export, list, info), write (read +
add, update, remove, bank and session life cycle, within the tenant), admin
(everything on every tenant: tenant quotas, tokens). Tenant tokens act only
within their tenant; admin tokens have no tenant.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from memoryd import api
from memoryd.api import TokenInfo
from memoryd.errors import InvalidArgument, Unauthenticated

PREFIX = "mdt"
TOKEN = re.compile(r"^mdt_([0-9a-f]{12})_([0-9a-f]{64})$")
TOKEN_ID = re.compile(r"^[0-9a-f]{12}$")


def new_token() -> tuple[str, str, str]:
    """(id, secret, the whole token) of a fresh random token."""
    token_id, secret = secrets.token_hex(6), secrets.token_hex(32)
    return token_id, secret, f"{PREFIX}_{token_id}_{secret}"


def parse(token: str) -> tuple[str, str]:
    """(id, secret), or Unauthenticated for anything that is not a token."""
    m = TOKEN.fullmatch(token.strip()) if isinstance(token, str) else None
    if m is None:
        raise Unauthenticated("malformed token: expected mdt_<12 hex>_<64 hex>")
    return m.group(1), m.group(2)


def token_id_of(text: str) -> str:
    """The id of a token id or of a whole token (`memctl token revoke` takes either)."""
    text = text.strip()
    if TOKEN_ID.fullmatch(text):
        return text
    m = TOKEN.fullmatch(text)
    if m is None:
        raise InvalidArgument(f"not a token id (12 hex digits) or token: {text[:16]!r}")
    return m.group(1)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def matches(secret: str, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(secret).encode(), stored_digest.encode())


def check_role(tenant: str | None, role: str) -> None:
    """InvalidArgument unless (tenant, role) makes a token: a tenant token is
    read or write within one tenant, an admin token has no tenant."""
    if role not in api.ROLES:
        raise InvalidArgument(f"role must be one of {', '.join(api.ROLES)}; got {role!r}")
    if role == "admin" and tenant is not None:
        raise InvalidArgument("an admin token acts on every tenant: give it no tenant")
    if role != "admin" and tenant is None:
        raise InvalidArgument(f"a {role} token needs a tenant (or make an admin token)")
    if tenant is not None and not api.name_ok(tenant):
        raise InvalidArgument(f"bad tenant name {tenant!r}")


def caller_for(t: TokenInfo, name: str) -> api.Caller:
    """The Caller a valid token makes: its tenant, its role's rights."""
    return api.Caller(name, tenant=t.tenant, rights=api.ROLES[t.role], token_id=t.id)


def info(row) -> TokenInfo:
    return TokenInfo(id=row["id"], tenant=row["tenant"], role=row["role"], name=row["name"],
                     created_at=float(row["created_at"]),
                     revoked_at=None if row["revoked_at"] is None else float(row["revoked_at"]))
