# Shared by the scripts in deploy/scripts: sourced after setting SCRIPT_TAG (the log prefix).

log() { echo "${SCRIPT_TAG}: $*"; }
die() { echo "${SCRIPT_TAG}: error: $*" >&2; exit 1; }

# Run a noisy command with its output kept aside; show that output only if it fails.
quietly() {
    local out rc=0
    out=$(mktemp)
    "$@" >"$out" 2>&1 || rc=$?
    ((rc == 0)) || cat "$out" >&2
    rm -f "$out"
    return "$rc"
}
