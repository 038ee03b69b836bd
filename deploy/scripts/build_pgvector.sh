#!/usr/bin/env bash
# Build and install pgvector for PostgreSQL 15 from Debian's source package (idempotent).
#
# Why from source: bookworm packages no pgvector for PostgreSQL 15, but trixie's source package
# builds against bookworm's postgresql-server-dev-15. Only a deb-src entry for trixie is added, so
# apt never installs a trixie binary. Fast no-op when the extension is already available.
set -euo pipefail

PG_MAJOR=${PG_MAJOR:-15}
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/$PG_MAJOR/bin/pg_config}
PSQL=(psql -h 127.0.0.1 -U postgres -X -v ON_ERROR_STOP=1 -Atq)
CHECK_DB=${PGVECTOR_CHECK_DB:-test}
SRC_LIST=/etc/apt/sources.list.d/sluicegate-trixie-src.sources
BUILD_ROOT=${PGVECTOR_BUILD_DIR:-/var/tmp/sluicegate-pgvector}

SCRIPT_TAG=pgvector
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Here every step must succeed: a failing one ends the build with its output shown.
must() { quietly "$@" || die "'$*' failed"; }

extension_available() {
    [[ "$("${PSQL[@]}" -d postgres -c "SELECT 1 FROM pg_available_extensions WHERE name='vector'")" == 1 ]]
}

add_trixie_deb_src() {
    [[ -f "$SRC_LIST" ]] && return 0
    log "adding trixie deb-src entry ($SRC_LIST)"
    cat >"$SRC_LIST" <<'SOURCES'
# Added by sluicegate deploy/scripts/build_pgvector.sh: source packages only (no binaries).
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
}

install_build_deps() {
    log "apt-get update"
    must apt-get -o DPkg::Lock::Timeout=300 update
    log "installing postgresql-server-dev-$PG_MAJOR and build tools"
    must env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends \
        "postgresql-server-dev-$PG_MAJOR" build-essential dpkg-dev
}

fetch_source() {
    local name
    # The source package is called pgvector; fall back to the binary name if that ever changes.
    for name in pgvector "postgresql-$PG_MAJOR-pgvector"; do
        if apt-cache showsrc "$name" 2>/dev/null | grep -q '^Package:'; then
            log "fetching source package $name into $BUILD_ROOT"
            # apt verifies the files against the signed Sources index, so dpkg-source need not
            # check the .dsc's own signature (that would need the maintainers' keyring).
            (cd "$BUILD_ROOT" && must apt-get source --download-only "$name" \
                && must dpkg-source -x --no-check "$(ls -t ./*.dsc | head -n1)" src)
            return 0
        fi
    done
    die "no pgvector source package found in the trixie deb-src index"
}

build_and_install() {
    log "building (make PG_CONFIG=$PG_CONFIG)"
    must make -C "$BUILD_ROOT/src" PG_CONFIG="$PG_CONFIG" -j"$(nproc)"
    log "installing (make install)"
    must make -C "$BUILD_ROOT/src" PG_CONFIG="$PG_CONFIG" install
}

verify() {
    PGOPTIONS='-c client_min_messages=warning' \
        "${PSQL[@]}" -d "$CHECK_DB" -c 'CREATE EXTENSION IF NOT EXISTS vector' \
        || die "CREATE EXTENSION vector failed in database $CHECK_DB"
    log "ok: vector $("${PSQL[@]}" -d "$CHECK_DB" -c "SELECT extversion FROM pg_extension WHERE extname='vector'") in database $CHECK_DB"
}

main() {
    "${PSQL[@]}" -d postgres -c 'SELECT 1' >/dev/null \
        || die "PostgreSQL is not answering on 127.0.0.1:5432 (start it: bash deploy/scripts/services.sh)"
    if extension_available; then
        log "already installed"
        verify
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "must run as root to install packages"
    add_trixie_deb_src
    install_build_deps
    [[ -x "$PG_CONFIG" ]] || die "$PG_CONFIG missing after installing postgresql-server-dev-$PG_MAJOR"
    rm -rf "$BUILD_ROOT" && mkdir -p "$BUILD_ROOT"
    # apt downloads as the unprivileged _apt user when it can write the target directory.
    if id _apt >/dev/null 2>&1; then chown _apt "$BUILD_ROOT"; fi
    fetch_source
    build_and_install
    extension_available || die "built and installed, but PostgreSQL still lists no 'vector' extension"
    verify
    rm -rf "$BUILD_ROOT"
}

main "$@"
