"""The catalog as memoryd wrote it before Alembic: tenants, banks, sessions,
tokens, usage.

A catalog written then (tables, no alembic_version) is stamped 0001 after its
missing columns are added (memoryd.engine.database._add_missing_columns), so
this revision runs only on a fresh database. Written out, not taken from the
live tables, so it stays the schema of that time.

Revision ID: 0001
Revises:
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("quota_bytes", sa.BigInteger, nullable=True),
        sa.Column("used_bytes", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "banks",
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
        sa.Column("quota_bytes", sa.BigInteger, nullable=True),
        sa.Column("used_bytes", sa.BigInteger, nullable=False),
        sa.Column("count", sa.BigInteger, nullable=False),
        sa.Column("frozen", sa.Boolean, nullable=False),
        sa.Column("trained", sa.Boolean, nullable=False),
        sa.Column("checksum", sa.String(80), nullable=False),
        sa.Column("storage", sa.String(128), nullable=False),
        sa.Column("tier", sa.String(8), nullable=False, server_default="ram"),
        sa.Column("eviction", sa.String(8), nullable=False, server_default="reject"),
        sa.Column("key_version", sa.String(128), nullable=False, server_default=""),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("ttl_idle_s", sa.Float, nullable=True),
        sa.Column("ttl_absolute_s", sa.Float, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("last_used_at", sa.Float, nullable=False),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, server_default=""),
        sa.Column("tenant", sa.String(64), nullable=True),
        sa.Column("role", sa.String(8), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float, nullable=True),
    )
    op.create_table(
        "usage",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("bank", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("op", sa.String(16), nullable=False),
        sa.Column("delta_bytes", sa.BigInteger, nullable=False),
        sa.Column("delta_items", sa.BigInteger, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    for name in ("usage", "tokens", "sessions", "banks", "tenants"):
        op.drop_table(name)
