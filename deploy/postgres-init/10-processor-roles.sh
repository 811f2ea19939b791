#!/bin/sh
# The Postgres roles of the Compose stack (SPEC §3), made once when the data volume is first
# initialised: the postgres image runs /docker-entrypoint-initdb.d/* as the `postgres` OS
# user against its temporary server, with POSTGRES_USER (the schema's owner, the
# migrations' role) and POSTGRES_DB set.
#
# - processor_runtime: NOLOGIN, granted its privileges by the migrations (0004).
# - processor_app: the login of DATABASE_URL, IN ROLE processor_runtime, no DDL rights,
#   with the password of the `postgres_runtime_password` secret.
#
# Both are made only if missing, so running this again changes nothing but the password.
# The password is read by psql itself (`\set … \`cat …\``), never put on a command line,
# and quoted by format(%L), so any characters are safe.
set -eu

RUNTIME_PASSWORD_FILE="${RUNTIME_PASSWORD_FILE:-/run/secrets/postgres_runtime_password}"
if [ ! -s "$RUNTIME_PASSWORD_FILE" ]; then
    echo "processor roles: $RUNTIME_PASSWORD_FILE is missing or empty (the postgres_runtime_password secret)" >&2
    exit 1
fi
export RUNTIME_PASSWORD_FILE

psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
\set runtime_password `tr -d '\r\n' < "$RUNTIME_PASSWORD_FILE"`
SELECT 'CREATE ROLE processor_runtime NOLOGIN'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'processor_runtime') \gexec
SELECT 'CREATE ROLE processor_app LOGIN IN ROLE processor_runtime'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'processor_app') \gexec
SELECT format('ALTER ROLE processor_app LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %L', :'runtime_password') \gexec
GRANT processor_runtime TO processor_app;
\unset runtime_password
SQL
