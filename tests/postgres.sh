#!/usr/bin/env bash
# Starts a private, throw-away PostgreSQL cluster for the tests and prints its URL.
# Usage: eval "$(bash tests/postgres.sh start)"   -> exports KGW_TEST_POSTGRES_URL, KGW_PG_DIR
#        bash tests/postgres.sh stop "$KGW_PG_DIR"
#        bash tests/postgres.sh pause|resume "$KGW_PG_DIR"   (stop the server, keep the data)
set -euo pipefail
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -n "$bin" ] || { echo "no PostgreSQL server: apt-get install postgresql" >&2; exit 1; }
case "${1:-start}" in
start)
    port=${KGW_PG_PORT:-54329}
    # A cluster already listening there (another run's, a developer's): take the next
    # free port rather than fail.
    while (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$((port + 1)); done
    dir=$(mktemp -d /tmp/kgw-pg.XXXXXX)
    chown postgres "$dir"
    echo "$port" >"$dir/port"
    su postgres -c "$bin/initdb -D $dir/data -U postgres --auth=trust -E UTF8" >/dev/null
    su postgres -c "$bin/pg_ctl -D $dir/data -l $dir/log -o '-p $port -k $dir -c listen_addresses=127.0.0.1' -w start" >/dev/null
    echo "export KGW_PG_DIR=$dir KGW_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:$port/postgres"
    ;;
pause)
    dir=${2:?the cluster directory}
    su postgres -c "$bin/pg_ctl -D $dir/data -m fast -w stop" >/dev/null
    ;;
resume)
    dir=${2:?the cluster directory}
    port=$(cat "$dir/port")
    su postgres -c "$bin/pg_ctl -D $dir/data -l $dir/log -o '-p $port -k $dir -c listen_addresses=127.0.0.1' -w start" >/dev/null
    ;;
stop)
    dir=${2:?the cluster directory}
    su postgres -c "$bin/pg_ctl -D $dir/data -m fast stop" >/dev/null || true
    rm -rf "$dir"
    ;;
esac
