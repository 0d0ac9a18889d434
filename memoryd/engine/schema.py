"""The catalog's tables (SQLAlchemy Core): tenants, banks, bank_slices,
sessions, tokens, usage; what they mean is told in memoryd.engine.catalog.

Alembic (memoryd/engine/migrations) keeps a database at these tables: a
change here needs a revision (see migrations/__init__.py), and
tests/test_catalog.py checks that head equals them.
"""
from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

tenants = sa.Table(
    "tenants", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("quota_bytes", sa.BigInteger, nullable=True),   # NULL: unlimited
    sa.Column("used_bytes", sa.BigInteger, nullable=False, default=0),
    sa.Column("created_at", sa.Float, nullable=False),
)

banks = sa.Table(
    "banks", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("tenant", sa.String(64), sa.ForeignKey("tenants.name"), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("dim", sa.Integer, nullable=False),
    sa.Column("value_dim", sa.Integer, nullable=False),
    sa.Column("value_dtype", sa.String(16), nullable=False),
    sa.Column("metric", sa.String(8), nullable=False),
    sa.Column("index_spec", sa.String(256), nullable=False),
    sa.Column("shards", sa.Integer, nullable=False),
    sa.Column("quota_bytes", sa.BigInteger, nullable=True),   # NULL: unlimited
    sa.Column("used_bytes", sa.BigInteger, nullable=False, default=0),   # sum over slices
    sa.Column("count", sa.BigInteger, nullable=False, default=0),        # sum over slices
    sa.Column("frozen", sa.Boolean, nullable=False, default=False),
    sa.Column("trained", sa.Boolean, nullable=False, default=False),     # some slice trained
    sa.Column("checksum", sa.String(80), nullable=False, default=""),    # of the slices
    sa.Column("storage", sa.String(128), nullable=False),     # the creating slice's folder (kept
                                                              # for old readers; slices have their own)
    sa.Column("tier", sa.String(8), nullable=False, server_default="ram"),
    sa.Column("eviction", sa.String(8), nullable=False, server_default="reject"),
    sa.Column("key_version", sa.String(128), nullable=False, server_default=""),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

# One row per (bank, shard process holding part of its rows).
bank_slices = sa.Table(
    "bank_slices", metadata,
    sa.Column("bank", sa.String(64), sa.ForeignKey("banks.name"), nullable=False),
    sa.Column("shard", sa.Integer, nullable=False),
    sa.Column("storage", sa.String(128), nullable=False),     # folder under that shard's banks/
    sa.Column("used_bytes", sa.BigInteger, nullable=False, default=0),
    sa.Column("count", sa.BigInteger, nullable=False, default=0),
    sa.Column("trained", sa.Boolean, nullable=False, default=False),
    sa.Column("checksum", sa.String(80), nullable=False, default="", server_default=""),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.PrimaryKeyConstraint("bank", "shard"),
)

sessions = sa.Table(
    "sessions", metadata,
    sa.Column("id", sa.String(64), primary_key=True),         # also the name of its bank
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("ttl_idle_s", sa.Float, nullable=True),
    sa.Column("ttl_absolute_s", sa.Float, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("last_used_at", sa.Float, nullable=False),
    sa.Column("shard", sa.Integer, nullable=False, server_default="0"),  # holds its bank
)

# API tokens (memoryd.auth.tokens): the secret is never stored, only its
# SHA-256; a revoked token keeps its row (revoked_at) so `token list` shows it.
tokens = sa.Table(
    "tokens", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, server_default=""),
    sa.Column("tenant", sa.String(64), nullable=True),          # NULL: admin, every tenant
    sa.Column("role", sa.String(8), nullable=False),            # read | write | admin
    sa.Column("secret_sha256", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
)

usage = sa.Table(
    "usage", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("bank", sa.String(64), nullable=False),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("op", sa.String(16), nullable=False),            # create/add/remove/delete/...
    sa.Column("delta_bytes", sa.BigInteger, nullable=False),
    sa.Column("delta_items", sa.BigInteger, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)

# Columns that came after the pre-Alembic schema (0001), by table: the
# pre-Alembic upgrade path adds the others, Alembic these.
_AFTER_PRE_ALEMBIC = {"sessions": {"shard"}, "bank_slices": None}   # None: the whole table
