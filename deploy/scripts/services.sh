#!/usr/bin/env bash
# Start the local PostgreSQL 15 and Redis the tests use, if they are not already up (idempotent).
#
# On this machine kind both come from Debian's packages and are normally started before a session;
# after a restart they may be down, and on a bare Debian bookworm they may be missing. Afterwards:
# PostgreSQL answers on 127.0.0.1:5432 (user postgres, trust auth) with pgvector available and a
# database sluicegate_test; Redis answers on 127.0.0.1:6379.
set -euo pipefail

PG_MAJOR=${PG_MAJOR:-15}
PG_CLUSTER=${PG_CLUSTER:-main}
TEST_DB=${SLUICEGATE_TEST_DB:-sluicegate_test}
WAIT_S=${SERVICES_WAIT_S:-30}
PSQL=(psql -h 127.0.0.1 -p 5432 -U postgres -X -v ON_ERROR_STOP=1 -Atq)
HERE=$(cd "$(dirname "$0")" && pwd)
APT_UPDATED=0

SCRIPT_TAG=services
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

apt_install() {
    [[ $(id -u) == 0 ]] || die "must run as root to install $*"
    if ((APT_UPDATED == 0)); then
        log "apt-get update"
        quietly apt-get -o DPkg::Lock::Timeout=300 update || die "apt-get update failed"
        APT_UPDATED=1
    fi
    log "installing $*"
    quietly env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends "$@" \
        || die "apt-get install $* failed"
}

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 -t 1 2>/dev/null; }
redis_up() { [[ $(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null) == PONG ]]; }

# Wait until "$1" succeeds, at most WAIT_S seconds.
wait_for() {
    local check=$1 what=$2 deadline=$((SECONDS + WAIT_S))
    until "$check"; do
        ((SECONDS < deadline)) || die "$what did not answer within ${WAIT_S}s"
        sleep 0.2
    done
    log "$what is up"
}

# A package-fresh cluster authenticates TCP clients by password; the tests and this machine kind
# connect as postgres without one, so trust loopback (and only loopback) as the kind does.
trust_loopback() {
    local hba=/etc/postgresql/$PG_MAJOR/$PG_CLUSTER/pg_hba.conf
    grep -qE '^host\s+all\s+all\s+127\.0\.0\.1/32\s+trust' "$hba" && return 0
    log "trusting 127.0.0.1 in $hba"
    sed -i '1i host all all 127.0.0.1/32 trust\nlocal all all trust' "$hba"
    pg_ctlcluster --skip-systemctl-redirect "$PG_MAJOR" "$PG_CLUSTER" reload
}

ensure_postgres() {
    local installed_now=0
    if [[ ! -x /usr/lib/postgresql/$PG_MAJOR/bin/postgres ]]; then
        apt_install "postgresql-$PG_MAJOR" "postgresql-client-$PG_MAJOR"
        installed_now=1
    fi
    if ! pg_up; then
        log "starting PostgreSQL $PG_MAJOR/$PG_CLUSTER"
        pg_ctlcluster --skip-systemctl-redirect "$PG_MAJOR" "$PG_CLUSTER" start \
            || die "pg_ctlcluster could not start $PG_MAJOR/$PG_CLUSTER (see /var/log/postgresql/)"
    fi
    wait_for pg_up "PostgreSQL on 127.0.0.1:5432"
    ((installed_now == 0)) || trust_loopback
    "${PSQL[@]}" -d postgres -c 'SELECT 1' >/dev/null \
        || die "cannot connect as postgres over 127.0.0.1 without a password (check pg_hba.conf)"
}

ensure_redis() {
    command -v redis-server >/dev/null || apt_install redis-server
    # redis-cli builds the tests' Redis Cluster; openssl makes the TLS test server's certificate.
    command -v redis-cli >/dev/null || apt_install redis-tools
    command -v openssl >/dev/null || apt_install openssl
    if ! redis_up; then
        log "starting Redis"
        mkdir -p /var/lib/redis /var/log/redis
        redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
            --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log \
            || die "redis-server could not start (see /var/log/redis/ci.log)"
    fi
    wait_for redis_up "Redis on 127.0.0.1:6379"
}

ensure_pgvector() {
    if [[ -z $("${PSQL[@]}" -d postgres -c "SELECT 1 FROM pg_available_extensions WHERE name='vector'") ]]; then
        bash "$HERE/build_pgvector.sh"
    fi
}

ensure_test_db() {
    if [[ -z $("${PSQL[@]}" -d postgres -c "SELECT 1 FROM pg_database WHERE datname='$TEST_DB'") ]]; then
        log "creating database $TEST_DB"
        createdb -h 127.0.0.1 -p 5432 -U postgres "$TEST_DB"
    fi
    PGOPTIONS='-c client_min_messages=warning' \
        "${PSQL[@]}" -d "$TEST_DB" -c 'CREATE EXTENSION IF NOT EXISTS vector'
    log "database $TEST_DB ready (pgvector enabled)"
}

ensure_postgres
ensure_redis
ensure_pgvector
ensure_test_db
