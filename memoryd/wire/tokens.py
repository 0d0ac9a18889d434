"""API tokens to and from memoryd.v1 messages (both ends; memoryd.auth has the rules)."""
from __future__ import annotations

from memoryd.api import CreatedToken, TokenInfo
from memoryd.v1 import memory_pb2 as pb


def token_to_pb(t: TokenInfo) -> pb.Token:
    m = pb.Token(id=t.id, name=t.name, tenant=t.tenant or "", role=t.role,
                 created_at=t.created_at)
    if t.revoked_at is not None:
        m.revoked_at = t.revoked_at
    return m


def token_from_pb(m: pb.Token) -> TokenInfo:
    return TokenInfo(id=m.id, tenant=m.tenant or None, role=m.role, name=m.name,
                     created_at=m.created_at,
                     revoked_at=m.revoked_at if m.HasField("revoked_at") else None)


def created_to_pb(c: CreatedToken) -> pb.CreateTokenResponse:
    return pb.CreateTokenResponse(info=token_to_pb(c.info), token=c.token)


def created_from_pb(m: pb.CreateTokenResponse) -> CreatedToken:
    return CreatedToken(info=token_from_pb(m.info), token=m.token)
