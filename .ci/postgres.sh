# Sourced by `./dev test` before pytest: a PostgreSQL for the catalog tests
# (tests/pg_util.py), named by MEMORYD_TEST_PG_URL.
#   - MEMORYD_TEST_PG_URL already set: that server is used, nothing is started.
#   - else, as root (CI, a fresh machine): PostgreSQL is installed if missing,
#     a throwaway cluster is started (as user postgres) on a free loopback
#     port, in a temp dir, and pg_test_stop (call it when the tests end)
#     stops it and removes it. Not root but PostgreSQL installed: the same,
#     as this user.
#   - else: one line says the PostgreSQL tests will be skipped.
# Needs bash; defines pg_test_stop in every case.

_pg_dir=""
_pg_as() {   # run as the postgres user (initdb refuses root)
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
_pg_find() {
  _pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$_pg_bin" ] && [ -x "$_pg_bin/initdb" ]
}
pg_test_stop() {
  if [ -n "$_pg_dir" ] && [ -d "$_pg_dir" ]; then
    _pg_as "$_pg_bin/pg_ctl" -D "$_pg_dir/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$_pg_dir"
  fi
  _pg_dir=""
}

_pg_start() {
  if ! _pg_find; then
    echo "postgres.sh: installing PostgreSQL for the catalog tests" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    _pg_find || return 1
  fi
  _pg_dir=$(mktemp -d /tmp/memoryd-pg.XXXXXX)
  if [ "$(id -u)" = 0 ]; then chown postgres "$_pg_dir"; fi
  _pg_as "$_pg_bin/initdb" -D "$_pg_dir/data" -A trust -U postgres >"$_pg_dir/initdb.log" 2>&1 \
    || { cat "$_pg_dir/initdb.log" >&2; return 1; }
  local port
  port=$("${PY:-python3}" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  _pg_as "$_pg_bin/pg_ctl" -D "$_pg_dir/data" -l "$_pg_dir/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $_pg_dir -c fsync=off -c max_connections=200" start >/dev/null \
    || { cat "$_pg_dir/server.log" >&2; return 1; }
  export MEMORYD_TEST_PG_URL="postgresql+psycopg://postgres@127.0.0.1:$port/postgres"
  echo "postgres.sh: PostgreSQL $("$_pg_bin/postgres" --version | awk '{print $3}') for the tests at 127.0.0.1:$port" >&2
}

if [ -n "${MEMORYD_TEST_PG_URL:-}" ]; then
  :
elif [ "$(id -u)" = 0 ] || _pg_find; then
  if ! _pg_start; then
    pg_test_stop
    echo "postgres.sh: PostgreSQL did not start; the PostgreSQL tests will fail under CI, skip elsewhere" >&2
  fi
else
  echo "postgres.sh: no PostgreSQL here (not root to install it, MEMORYD_TEST_PG_URL unset): the PostgreSQL tests will be skipped" >&2
fi
