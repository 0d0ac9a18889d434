"""Alembic migrations of the catalog (memoryd.engine.catalog).

memoryd runs them itself when it opens a catalog (Catalog.__init__, or
memoryd.engine.database.upgrade(url) for tools): no alembic.ini is needed at
run time. A developer who changes the tables of schema.py adds a revision:

    alembic -c memoryd/engine/migrations/alembic.ini -x url=sqlite:////tmp/c.db upgrade head
    alembic -c memoryd/engine/migrations/alembic.ini -x url=sqlite:////tmp/c.db \\
        revision --autogenerate -m "what changed"

then reads the generated file over (write it out explicitly, as 0001 and
0002 are) and names it NNNN_what.py with revision "NNNN".
tests/test_catalog.py checks that head equals the tables of schema.py.
"""
