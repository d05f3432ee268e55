#!/usr/bin/env bash
# The long transaction run: a three-node cluster, the bank and list-append
# workloads at once, with the process nemesis (SIGKILL and restart, SIGSTOP
# and SIGCONT, and restarts with the wall clock skewed within half the
# maximum offset) striking during the bank's run. Each workload prints its
# operations by outcome, the faults and the verdict; the append history is
# kept in the scratch directory (printed at the end) if KEEP=1.
#
#   scripts/txn-soak.sh [seconds, default 600]
#
# Needs the built binary (make build). Everything listens on 127.0.0.1 ports
# 27000-27999 and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-600}"
T="${CARGO_TARGET_DIR:-$HOME/.cache/tardigrade/target}/debug/tardigrade"
[ -x "$T" ] || { echo "build first: make build" >&2; exit 1; }
dir="$(mktemp -d /tmp/txn-soak.XXXXXX)"
pids=()
cleanup() {
    kill -9 "${pids[@]}" 2>/dev/null || true
    # Nodes the nemesis restarted are its children, named in the output.
    for f in "$dir"/bank.out; do
        [ -r "$f" ] || continue
        for p in $(sed -n 's/^restarted pids: //p' "$f" | tr , ' '); do kill -9 "$p" 2>/dev/null || true; done
    done
    wait 2>/dev/null || true
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $dir"; else rm -rf "$dir"; fi
}
trap cleanup EXIT
. scripts/lib/clusters.sh

start_tardigrade 270 --max-offset-ms 500
hosts=$(cluster_hosts 270)
http="127.0.0.1:27002,127.0.0.1:27012,127.0.0.1:27022"
node_pids=$(IFS=,; echo "${pids[*]}")
echo "== bank (30 accounts, 8 clients) and append (10 keys, 8 clients), ${secs}s, nemesis on pids $node_pids =="
"$T" workload bank --hosts "$hosts" --http-hosts "$http" --accounts 30 --clients 8 --duration "$secs" \
    --nemesis --pids "$node_pids" --fault-interval 10 --fault-duration 3 --clock-skew-ms 200 --seed "$RANDOM" \
    >"$dir/bank.out" 2>"$dir/bank.err" &
bank=$!
"$T" workload append --hosts "$hosts" --http-hosts "$http" --keys 10 --clients 8 --duration "$secs" \
    --seed "$RANDOM" --history "$dir/append.jsonl" >"$dir/append.out" 2>"$dir/append.err" &
append=$!
status=0
wait "$bank" || status=1
wait "$append" || status=1
echo "---- bank ----"
cat "$dir/bank.out"
echo "---- append ----"
cat "$dir/append.out"
faults=$(grep -c '^nemesis: ' "$dir/bank.out" || true)
echo "---- $faults faults: $(grep -c 'SIGKILL.*restarted as [0-9]*$' "$dir/bank.out" || true) kills, $(grep -c SIGSTOP "$dir/bank.out" || true) pauses, $(grep -c 'clock' "$dir/bank.out" || true) clock skews"
if [ "$status" = 0 ]; then echo "verdict: consistent and serializable"; else echo "verdict: FAILED (see above and $dir)"; KEEP=1; fi
exit "$status"
