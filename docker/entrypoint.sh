#!/bin/sh
# Entrypoint of the api and trainer images: runs its arguments, after
# - with CREATE_AUTH_FILE=1 (the api image's default): creating the key file CMN_AUTH_FILE names if it is missing,
#   with one key of every scope, printed once (docker/init-secrets.sh --keys); an existing file is never touched;
# - giving libpq the PostgreSQL password that PGPASSWORD_FILE names, if set (a file holding the password alone,
#   such as /secrets/postgres-password in docker-compose.yml's secrets volume; see docs/deploy.md).
#
# Why not simpler: the password in CMN_FEEDBACK_URL or PGPASSWORD would be in the environment, where `docker
# inspect` and every child process see it; and libpq ignores a password file (PGPASSFILE) that its group or others
# may read, which a compose secret is (compose bind-mounts it with the host file's owner and mode, and uid 10001 must
# be able to read it). So the password is copied into a pgpass file private to this user on the container's /tmp (a
# tmpfs: memory, gone with the container), and PGPASSFILE names it.
set -eu

if [ "${CREATE_AUTH_FILE:-0}" = 1 ] && [ -n "${CMN_AUTH_FILE:-}" ] && [ ! -e "$CMN_AUTH_FILE" ]; then
    init=$(dirname "$0")/cmn-init-secrets                  # its name in the images; in the repository:
    [ -f "$init" ] || init=$(dirname "$0")/init-secrets.sh
    sh "$init" --keys "$CMN_AUTH_FILE"
fi
unset CREATE_AUTH_FILE

if [ -n "${PGPASSWORD_FILE:-}" ]; then
    if [ ! -r "$PGPASSWORD_FILE" ]; then
        echo "entrypoint: PGPASSWORD_FILE=$PGPASSWORD_FILE cannot be read (with compose, the init service makes it: docker compose logs init)" >&2
        exit 2
    fi
    password=$(head -n 1 "$PGPASSWORD_FILE")
    if [ -z "$password" ]; then
        echo "entrypoint: PGPASSWORD_FILE=$PGPASSWORD_FILE is empty" >&2
        exit 2
    fi
    PGPASSFILE=$(mktemp "${TMPDIR:-/tmp}/pgpass.XXXXXX")
    # (mktemp makes it mode 0600) host:port:database:user:password, any host, port, database and user; `\` and `:` escaped as libpq expects
    printf '*:*:*:*:%s\n' "$(printf '%s' "$password" | sed 's/[\\:]/\\&/g')" >"$PGPASSFILE"
    export PGPASSFILE
    unset PGPASSWORD_FILE password
fi

exec "$@"
