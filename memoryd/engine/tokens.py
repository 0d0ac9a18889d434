"""TokenStore: the catalog's `tokens` table (memoryd.engine.schema), behind
the token rules of memoryd.auth.tokens. Only SHA-256(secret) is written.
"""
from __future__ import annotations

import time

import sqlalchemy as sa

from memoryd.api import CreatedToken, TokenInfo
from memoryd.auth.tokens import check_role, digest, info, new_token
from memoryd.engine.catalog import Catalog
from memoryd.engine.schema import tokens
from memoryd.errors import InvalidArgument, NotFound


class TokenStore:
    """The catalog's `tokens` table."""

    def __init__(self, catalog: Catalog):
        self.engine = catalog.engine

    def create(self, tenant: str | None, role: str, name: str = "") -> CreatedToken:
        check_role(tenant, role)
        if not isinstance(name, str) or len(name) > 64 or not all(" " <= c <= "~" for c in name):
            raise InvalidArgument(f"token name must be at most 64 printable ASCII characters; "
                                  f"got {name!r:.80}")
        token_id, secret, token = new_token()
        with self.engine.begin() as c:
            c.execute(tokens.insert().values(id=token_id, name=name, tenant=tenant, role=role,
                                             secret_sha256=digest(secret), created_at=time.time(),
                                             revoked_at=None))
        return CreatedToken(info=self.get(token_id), token=token)

    def row(self, token_id: str) -> dict | None:
        """The whole row, hash included (the Authenticator's lookup); None if unknown."""
        with self.engine.connect() as c:
            row = c.execute(sa.select(tokens).where(tokens.c.id == token_id)).mappings().first()
        return None if row is None else dict(row)

    def get(self, token_id: str) -> TokenInfo:
        row = self.row(token_id)
        if row is None:
            raise NotFound(f"no token '{token_id}'")
        return info(row)

    def list(self, tenant: str | None = None) -> list[TokenInfo]:
        q = sa.select(tokens).order_by(tokens.c.created_at, tokens.c.id)
        if tenant is not None:
            q = q.where(tokens.c.tenant == tenant)
        with self.engine.connect() as c:
            return [info(r) for r in c.execute(q).mappings()]

    def revoke(self, token_id: str) -> TokenInfo:
        """Mark it revoked (idempotent: a second revoke keeps the first time)."""
        with self.engine.begin() as c:
            c.execute(tokens.update().where(tokens.c.id == token_id,
                                            tokens.c.revoked_at.is_(None))
                      .values(revoked_at=time.time()))
        return self.get(token_id)

    def has_admin(self) -> bool:
        with self.engine.connect() as c:
            return c.execute(sa.select(tokens.c.id).where(
                tokens.c.role == "admin", tokens.c.revoked_at.is_(None)).limit(1)).first() \
                is not None


class CatalogTokens:
    """The token plane over a catalog alone, no data dir: how the first admin
    token of a cluster is made (`memctl --catalog-url URL token create --admin`),
    where no one process owns the catalog and a LocalMemory would take one
    shard's place. The owner of the catalog has every right."""

    def __init__(self, url: str):
        self.catalog = Catalog(url)
        self.tokens = TokenStore(self.catalog)

    def create_token(self, tenant: str | None = None, role: str = "write", name: str = "", *,
                     caller=None) -> CreatedToken:
        return self.tokens.create(tenant, role, name)

    def list_tokens(self, tenant: str | None = None, *, caller=None) -> list[TokenInfo]:
        return self.tokens.list(tenant)

    def revoke_token(self, token_id: str, *, caller=None) -> TokenInfo:
        return self.tokens.revoke(token_id)

    def close(self) -> None:
        self.catalog.close()
