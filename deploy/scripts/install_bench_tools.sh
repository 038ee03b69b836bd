#!/usr/bin/env bash
# Install what `make bench` needs (idempotent): wrk and hey (load generators), nginx (the fast
# static mock of the OpenAI API) from Debian's packages, and the LiteLLM proxy, a peer we compare
# against, in its own venv at .bench/litellm-venv so its many pins never touch our environment.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${LITELLM_VENV:-$ROOT/.bench/litellm-venv}
PYTHON=${PYTHON:-python3}
# 1.106.2 is the version the reference measurements used. Pinned on purpose: LiteLLM releases
# have been hijacked on PyPI before (1.82.7/1.82.8), so never float to whatever is newest.
LITELLM_SPEC=${LITELLM_SPEC:-litellm[proxy]==1.106.2}
PORTKEY_DIR=${PORTKEY_DIR:-$ROOT/.bench/portkey}
PORTKEY_SPEC=${PORTKEY_SPEC:-@portkey-ai/gateway@1.15.2}
PORTKEY_HONO_NODE_SERVER=${PORTKEY_HONO_NODE_SERVER:-1.14.1}
APT_PACKAGES=(wrk hey nginx-light valgrind)  # valgrind: make bench-instructions (callgrind)

SCRIPT_TAG=bench-tools
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

install_debian_packages() {
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$pkg")
    done
    if ((${#missing[@]} == 0)); then
        log "wrk, hey, nginx and valgrind already installed"
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "must run as root to install ${missing[*]}"
    local nginx_was_running=0
    pgrep -x nginx >/dev/null && nginx_was_running=1
    log "apt-get update"
    quietly apt-get -o DPkg::Lock::Timeout=300 update || die "apt-get update failed"
    log "installing ${missing[*]}"
    quietly env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends \
        "${missing[@]}" || die "apt-get install ${missing[*]} failed"
    # Where no policy-rc.d forbids it, the package starts a system nginx on port 80 of every
    # interface; the bench runs its own nginx on loopback, so stop the one the install started.
    if ((nginx_was_running == 0)) && pgrep -x nginx >/dev/null; then
        log "stopping the system nginx the package started"
        nginx -s quit 2>/dev/null || true
    fi
}

check_binaries() {
    local bin
    for bin in wrk hey nginx; do
        command -v "$bin" >/dev/null || [[ -x /usr/sbin/$bin ]] || die "$bin not found after install"
    done
}

litellm_installed_version() {
    [[ -x "$VENV/bin/python" ]] || return 1
    "$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))' 2>/dev/null
}

install_litellm() {
    local wanted=${LITELLM_SPEC##*==} have
    have=$(litellm_installed_version || true)
    if [[ -n $have && ( $have == "$wanted" || $wanted == "$LITELLM_SPEC" ) && -x $VENV/bin/litellm ]]; then
        log "LiteLLM $have already in $VENV"
        return 0
    fi
    if [[ ! -x "$VENV/bin/python" ]]; then
        log "creating venv $VENV"
        mkdir -p "$(dirname "$VENV")"
        "$PYTHON" -m venv "$VENV" || die "could not create venv $VENV"
    fi
    log "pip install '$LITELLM_SPEC' into $VENV (takes a minute)"
    quietly "$VENV/bin/python" -m pip install --disable-pip-version-check "$LITELLM_SPEC" \
        || die "pip install '$LITELLM_SPEC' failed"
    [[ -x "$VENV/bin/litellm" ]] || die "no litellm command in $VENV/bin after install"
    log "LiteLLM $(litellm_installed_version) installed in $VENV"
}

install_portkey() {
    # The Portkey gateway (Node.js) in its own npm prefix; the machine's node and npm.
    local server=$PORTKEY_DIR/node_modules/@portkey-ai/gateway/build/start-server.js
    local wanted=${PORTKEY_SPEC##*@} have hono
    have=$(node -p "require('$PORTKEY_DIR/node_modules/@portkey-ai/gateway/package.json').version" \
           2>/dev/null || true)
    hono=$(node -p "require('$PORTKEY_DIR/node_modules/@hono/node-server/package.json').version" \
           2>/dev/null || true)
    if [[ -f $server && $have == "$wanted" && $hono == "$PORTKEY_HONO_NODE_SERVER" ]]; then
        log "Portkey gateway $have (@hono/node-server $hono) already in $PORTKEY_DIR"
        return 0
    fi
    command -v npm >/dev/null || die "npm is needed for the Portkey gateway (apt-get install npm)"
    mkdir -p "$PORTKEY_DIR"
    # Portkey 1.15.2 answers every streaming request with HTTP 500 under the newest
    # @hono/node-server (../shared/bench/README.md); pinned with an npm override, it streams.
    cat > "$PORTKEY_DIR/package.json" <<JSON
{
  "private": true,
  "dependencies": {"${PORTKEY_SPEC%@*}": "$wanted"},
  "overrides": {"@hono/node-server": "$PORTKEY_HONO_NODE_SERVER"}
}
JSON
    log "npm install $PORTKEY_SPEC (@hono/node-server $PORTKEY_HONO_NODE_SERVER) into $PORTKEY_DIR"
    quietly npm install --prefix "$PORTKEY_DIR" --no-audit --no-fund \
        || die "npm install $PORTKEY_SPEC failed"
    [[ -f $server ]] || die "no $server after npm install"
    log "Portkey gateway $wanted installed in $PORTKEY_DIR"
}

install_debian_packages
check_binaries
install_litellm
install_portkey
