#!/usr/bin/env bash
# A cut-down docker-entrypoint.sh of the official postgres image, keeping every step that
# touches the data volume, in the same order and under the same users:
#
#   as root:      create $PGDATA, chmod 0700, chown it to postgres,
#                 then re-exec this script as postgres (exec gosu postgres "$BASH_SOURCE")
#   as postgres:  if $PGDATA/PG_VERSION is missing: initdb, a temporary server started by
#                 pg_ctl (unix socket only), some init SQL, pg_ctl -m fast stop
#                 finally exec "$@" (`postgres ...`: found on PATH, so the pgfence shim
#                 when it is installed first on PATH)
#
# Like the real one, `pg_ctl` and `initdb` start the server binary next to themselves,
# never the `postgres` found on PATH: only `exec "$@"` reaches a shim.
# Environment: PGDATA (required), PGHOST (socket directory), PGPORT.
set -Eeo pipefail

# A first argument that looks like an option means `postgres` (as in the official script).
if [ "${1:0:1}" = '-' ]; then
	set -- postgres "$@"
fi

want_help() {
	local arg
	for arg; do
		case "$arg" in
			-'?' | --help | --describe-config | -V | --version) return 0 ;;
		esac
	done
	return 1
}

if [ "$1" = 'postgres' ] && ! want_help "$@"; then
	: "${PGDATA:?PGDATA must be set}"
	: "${PGHOST:=/var/run/postgresql}"
	: "${PGPORT:=5432}"
	export PGHOST PGPORT

	if [ "$(id -u)" = '0' ]; then
		mkdir -p "$PGDATA"
		chmod 00700 "$PGDATA" || :
		find "$PGDATA" \! -user postgres -exec chown postgres '{}' +
		echo "entrypoint: stepping down to postgres on $HOSTNAME"
		exec gosu postgres "$BASH_SOURCE" "$@"
	fi

	if [ ! -s "$PGDATA/PG_VERSION" ]; then
		echo "entrypoint: initialising $PGDATA on $HOSTNAME"
		initdb -D "$PGDATA" --username=postgres --auth=trust --no-sync \
			--encoding=UTF8 --locale=C --data-checksums
		pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -p $PGPORT -k $PGHOST" -w start
		psql -v ON_ERROR_STOP=1 -X -q -U postgres -d postgres <<-EOSQL
			CREATE TABLE fence_init (host text NOT NULL, at timestamptz NOT NULL DEFAULT now());
			INSERT INTO fence_init (host) VALUES ('$HOSTNAME');
		EOSQL
		pg_ctl -D "$PGDATA" -m fast -w stop
		echo "entrypoint: init process complete on $HOSTNAME"
	else
		echo "entrypoint: $PGDATA already holds a database; skipping initialisation"
	fi
fi

exec "$@"
