#!/bin/sh
# Creates the files docker-compose.yml mounts as secrets, each only if it is missing (so it never replaces a
# password a database was initialised with, nor a key in use):
#   secrets/postgres-password  a random password for the database user `cmn`
#   secrets/auth-keys          one API key with every scope, named `ops`; the key itself is printed once, here, and
#                              stored nowhere (the file holds its SHA-256)
# The directory is private to you (0700); the files in it are readable (0644) because compose bind-mounts each with
# its host owner and mode, and the containers' users (uid 10001, postgres) must read them.
#
# usage: sh docker/init-secrets.sh        (from anywhere; needs python3 and sha256sum)
set -eu
cd "$(dirname "$0")/.."

mkdir -p secrets
chmod 700 secrets

random() { python3 -c 'import secrets; print(secrets.token_urlsafe(32))'; }

if [ -e secrets/postgres-password ]; then
    echo "secrets/postgres-password exists: kept"
else
    random >secrets/postgres-password
    chmod 644 secrets/postgres-password
    echo "secrets/postgres-password: a new random password"
fi

if [ -e secrets/auth-keys ]; then
    echo "secrets/auth-keys exists: kept"
else
    key=$(random)
    echo "$(printf %s "$key" | sha256sum | cut -d' ' -f1) recommend,history,feedback,admin,metrics ops" >secrets/auth-keys
    chmod 644 secrets/auth-keys
    echo "secrets/auth-keys: one key with every scope; the key (keep it, it is stored nowhere):"
    echo "$key"
fi
