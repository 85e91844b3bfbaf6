#!/usr/bin/env bash
# Start a private PostgreSQL 15 cluster in DIR on a free loopback port; print its SQLAlchemy URL.
# Usage: .ci/postgres.sh start DIR | .ci/postgres.sh stop DIR
set -euo pipefail
cmd=$1 dir=$2
bin=$(ls -d /usr/lib/postgresql/15/bin 2>/dev/null || dirname "$(command -v pg_ctl)")
as_pg() { if [ "$(id -u)" = 0 ]; then (cd / && su postgres -s /bin/bash -c "$*"); else bash -c "$*"; fi; }
case "$cmd" in
start)
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown postgres "$dir"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  as_pg "$bin/initdb -D '$dir/data' -U fvlm --auth=trust -E UTF8 >'$dir/initdb.log' 2>&1"
  # fsync off: the tests kill processes, never the machine, so durability of PG itself is moot
  as_pg "$bin/pg_ctl -D '$dir/data' -l '$dir/server.log' -w -t 60 start \
    -o \"-p $port -k '$dir' -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300\"" >/dev/null
  echo "postgresql+psycopg://fvlm@127.0.0.1:$port/postgres"
  ;;
stop)
  as_pg "$bin/pg_ctl -D '$dir/data' -m fast -w stop" >/dev/null || true
  ;;
esac
