#!/usr/bin/env bash
# The long coordination run: a three-node cluster and the coordination
# workload (watchers checked against every acknowledged write, leases kept
# alive and checked never to expire, lockers whose writes are fenced by
# their lock key's revision) with the process nemesis (SIGKILL and restart,
# SIGSTOP and SIGCONT) striking throughout. Prints the faults, the counts
# and the verdict.
#
#   scripts/coord-soak.sh [seconds, default 600]
#
# Needs the built binary (make build). Everything listens on 127.0.0.1 ports
# 29000-29999 and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-600}"
T="${CARGO_TARGET_DIR:-$HOME/.cache/tardigrade/target}/debug/tardigrade"
[ -x "$T" ] || { echo "build first: make build" >&2; exit 1; }
dir="$(mktemp -d /tmp/coord-soak.XXXXXX)"
pids=()
cleanup() {
    kill -9 "${pids[@]}" 2>/dev/null || true
    # Nodes the nemesis restarted are its children, named in the output.
    if [ -r "$dir/coord.out" ]; then
        for p in $(sed -n 's/^restarted pids: //p' "$dir/coord.out" | tr , ' '); do kill -9 "$p" 2>/dev/null || true; done
    fi
    wait 2>/dev/null || true
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $dir"; else rm -rf "$dir"; fi
}
trap cleanup EXIT
. scripts/lib/clusters.sh

start_tardigrade 290
hosts=$(cluster_hosts 290)
node_pids=$(IFS=,; echo "${pids[*]}")
echo "== coordination (2 writers, 3 watchers, 4 leases, 3 lockers), ${secs}s, nemesis on pids $node_pids =="
status=0
"$T" workload coordination --hosts "$hosts" --duration "$secs" --watchers 3 --leases 4 --lockers 3 \
    --nemesis --pids "$node_pids" --faults kill,pause --fault-interval 6 --fault-duration 3 --seed "$RANDOM" \
    >"$dir/coord.out" 2>"$dir/coord.err" || status=1
cat "$dir/coord.out"
echo "---- $(grep -c '^nemesis: ' "$dir/coord.out" || true) faults"
if [ "$status" = 0 ]; then echo "verdict: every check held"; else echo "verdict: FAILED (see above and $dir)"; tail -20 "$dir/coord.err"; KEEP=1; fi
exit "$status"
