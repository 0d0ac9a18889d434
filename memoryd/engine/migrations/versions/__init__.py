"""Catalog revisions, oldest first: 0001 the schema before Alembic, 0002 bank slices."""
