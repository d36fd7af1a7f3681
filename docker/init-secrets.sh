#!/bin/sh
# Creates the service's secrets, each only if it is missing: it never replaces a password a database was
# initialised with, nor a key file in use. Run by docker-compose.yml's one-shot `init` service (into the volume
# `cmn-secrets`), by the api image's entrypoint for `docker run` (the key file alone), or by hand.
#
#   sh docker/init-secrets.sh [DIR]            DIR/postgres-password (a random password for the database user
#                                              `cmn`) and DIR/auth-keys (one API key with every scope, named `ops`);
#                                              DIR defaults to secrets/ next to docker/
#   sh docker/init-secrets.sh --keys FILE      FILE alone, as DIR/auth-keys above
#   sh docker/init-secrets.sh --add-key FILE SCOPES NAME
#                                              one more key, e.g. `recommend web`, appended to FILE
#
# A new key is printed once, here, on a line starting "cmn-init: API key", and stored nowhere: the key file holds
# its SHA-256. The directory is made private (0700) and the files 0600, owned by whoever runs this (uid 10001 in
# the images; postgres's entrypoint reads the password as root). Each file appears whole or not at all (written
# aside, then linked into place, which fails rather than replace a file that appeared meanwhile).
#
# Needs sh, sha256sum and python3 (the images have all three).
set -eu
umask 077

random() { python3 -c 'import secrets; print(secrets.token_urlsafe(32))'; }
digest() { printf %s "$1" | sha256sum | cut -d' ' -f1; }

# create FILE: stdin becomes FILE, unless FILE exists (then 1, and FILE is untouched; stdin is read all the same,
# so that what writes it never meets a closed pipe)
create() {
    tmp=$(mktemp "$1.XXXXXX")
    cat >"$tmp"
    if ln "$tmp" "$1" 2>/dev/null; then rm -f "$tmp"; else rm -f "$tmp"; return 1; fi
}

keys() {  # keys FILE: a key file with one key of every scope, unless FILE exists
    mkdir -p "$(dirname "$1")"
    key=$(random)
    if echo "$(digest "$key") recommend,history,feedback,admin,metrics ops" | create "$1"; then
        echo "cmn-init: $1: one key named ops, with every scope; it is shown here only, keep it:"
        echo "cmn-init: API key $key"
    else
        echo "cmn-init: $1 exists: kept"
    fi
}

case "${1:-}" in
    --keys)
        keys "$2" ;;
    --add-key)
        [ $# -eq 4 ] || { echo "usage: $0 --add-key FILE SCOPES NAME" >&2; exit 2; }
        key=$(random)
        echo "$(digest "$key") $3 $4" >>"$2"
        echo "cmn-init: $2: key $4 added, scopes $3 (reload the keys: SIGHUP or /admin/reload); shown here only:"
        echo "cmn-init: API key $key" ;;
    -*)
        echo "usage: $0 [DIR] | --keys FILE | --add-key FILE SCOPES NAME" >&2; exit 2 ;;
    *)
        dir=${1:-$(dirname "$0")/../secrets}
        mkdir -p "$dir"
        chmod 700 "$dir"
        if random | create "$dir/postgres-password"; then
            echo "cmn-init: $dir/postgres-password: a new random password"
        else
            echo "cmn-init: $dir/postgres-password exists: kept"
        fi
        keys "$dir/auth-keys" ;;
esac
