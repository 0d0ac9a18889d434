"""The access rules, in one place: LocalMemory asks a Guard on every call, so
the in-process backend and the daemon (which serves a LocalMemory) agree.

A Caller carries its rights (api.RIGHTS) and, for a tenant token, the one
tenant it acts within (api.Caller). The rules:

  * a call needs its right: read (search, get, export, bank/session info and
    lists, stats, tenant info), write (add, update, remove; create, delete,
    freeze, resize, move banks; open, append, extend, close, promote
    sessions), admin (tenant quotas, tokens). Without it: PERMISSION_DENIED.
  * a tenant-scoped caller sees only its tenant's banks and sessions: another
    tenant's bank or session answers NOT_FOUND with the very message a
    missing one gets, so names do not leak through errors; lists and stats
    show only its own. Naming another tenant outright (creating a bank for
    it, listing or reading it by name) is PERMISSION_DENIED: the caller
    already knows that name, and the answer says nothing about it.
  * a spec's tenant "default" (BankSpec's and SessionSpec's default, so a
    client that names none) means the caller's own tenant.
  * a bank's own quota is a write right (the tenant's quota, set by an
    admin, bounds all of them anyway); a tenant's quota is admin.

One thing leaks by design: bank names are one namespace for the daemon, so
creating a name another tenant holds answers ALREADY_EXISTS.

No caller (None), as in-process code passes, is the owner: every right.
"""
from __future__ import annotations

from typing import Callable, Iterable

from memoryd.api import Caller
from memoryd.errors import NotFound, PermissionDenied

DEFAULT_TENANT = "default"       # BankSpec.tenant / SessionSpec.tenant when none is named


def _rights(caller: Caller) -> str:
    return ", ".join(r for r in ("read", "write", "admin") if r in caller.rights) or "none"


def need(caller: Caller | None, right: str, what: str) -> None:
    """PermissionDenied unless the caller holds `right`."""
    if caller is not None and right not in caller.rights:
        raise PermissionDenied(f"{what} needs the {right} right; this token has: "
                               f"{_rights(caller)}")


def scoped(caller: Caller | None) -> str | None:
    """The one tenant the caller may touch; None: every tenant."""
    return None if caller is None else caller.tenant


def is_admin(caller: Caller | None) -> bool:
    return caller is None or ("admin" in caller.rights and caller.tenant is None)


class Guard:
    """The checks that need to know whose a bank is.

    bank_tenant(name): the tenant of a bank (a session's bank carries its
    session's tenant); raises NotFound for a bank that does not exist.
    """

    def __init__(self, bank_tenant: Callable[[str], str]):
        self._bank_tenant = bank_tenant

    def _owns(self, tenant: str, name: str) -> bool:
        try:
            return self._bank_tenant(name) == tenant
        except NotFound:
            return False

    def bank(self, caller: Caller | None, name: str, right: str, what: str) -> str:
        """name, once the caller holds `right` and may see the bank (else NOT_FOUND)."""
        need(caller, right, what)
        tenant = scoped(caller)
        if tenant is not None and not self._owns(tenant, name):
            raise NotFound(f"no bank named '{name}'")
        return name

    def banks(self, caller: Caller | None, names: Iterable[str], right: str, what: str) -> None:
        need(caller, right, what)
        if scoped(caller) is not None:
            for name in names:
                self.bank(caller, name, right, what)

    def session(self, caller: Caller | None, sid: str, right: str, what: str) -> str:
        """sid, once the caller holds `right` and opened (its tenant did) the session."""
        need(caller, right, what)
        tenant = scoped(caller)
        if tenant is not None and not self._owns(tenant, sid):
            raise NotFound(f"no session '{sid}'")
        return sid

    def visible(self, caller: Caller | None, names: Iterable[str]) -> bool:
        """Whether every bank named is the caller's (for what stats shows)."""
        tenant = scoped(caller)
        return tenant is None or all(self._owns(tenant, n) for n in names)


def owned(caller: Caller | None, tenant: str, what: str) -> str:
    """The tenant a new bank or session belongs to: the spec's for an unscoped
    caller; the caller's own for a tenant token ("default" included)."""
    mine = scoped(caller)
    if mine is None or tenant in (DEFAULT_TENANT, mine):
        return tenant if mine is None else mine
    raise PermissionDenied(f"{what}: this token acts for tenant '{mine}', not '{tenant}'")


def listing(caller: Caller | None, tenant: str | None, what: str) -> str | None:
    """The tenant filter of a list: the caller's own for a tenant token."""
    need(caller, "read", what)
    mine = scoped(caller)
    if mine is None or tenant in (None, mine):
        return tenant if mine is None else mine
    raise PermissionDenied(f"{what}: this token acts for tenant '{mine}', not '{tenant}'")


def tenant(caller: Caller | None, name: str, right: str, what: str) -> str:
    """name, once the caller holds `right` and the tenant is its own (or it is unscoped)."""
    need(caller, right, what)
    mine = scoped(caller)
    if mine is not None and name != mine:
        raise PermissionDenied(f"{what}: this token acts for tenant '{mine}', not '{name}'")
    return name
