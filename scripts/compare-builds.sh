#!/usr/bin/env bash
# Two builds of tardigrade side by side, alternating so that the machine's
# drift (single runs differ by up to 20-40% here) falls on both alike: for
# each of N rounds, build A then build B each start a fresh 3-node cluster on
# 127.0.0.1, take 3 s of warm-up writes, then one measured run of
# `workload kv` (etcd API, writes, clients spread over the nodes). Prints
# every run (ops/s, p50, server CPU ms per 1,000 writes, context switches
# per write of all server processes) and the means per build.
#
#   scripts/compare-builds.sh BIN_A BIN_B [clients=64] [seconds=8] [rounds=3]
#
# Copy a build aside first (cp "$CARGO_TARGET_DIR"/debug/tardigrade /tmp/a).
# Environment variables reach the servers (e.g. TARDIGRADE_TESTING_SYNC_DELAY_US).
# Needs `perf` for context switches (0 without). Ports 27100-27299.
set -euo pipefail
cd "$(dirname "$0")/.."
a="$1"
b="$2"
clients="${3:-64}"
secs="${4:-8}"
rounds="${5:-3}"
pids=()
dir=""
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; [ -n "$dir" ] && rm -rf "$dir"; }
trap cleanup EXIT
. scripts/lib/clusters.sh
one() { # prints "ops/s p50 cpu-ms/1k cs/write" for the build in $T
    dir="$(mktemp -d /tmp/compare-builds.XXXXXX)"
    pids=()
    start_tardigrade 271 >/dev/null
    local hosts; hosts="$(cluster_hosts 271)"
    "$T" workload kv --hosts "$hosts" --concurrency "$clients" --duration 3 >/dev/null 2>&1
    local c0; c0=$(cpu_ms)
    local sp=""
    if command -v perf >/dev/null 2>&1; then
        perf stat -e context-switches -x, -o "$dir/cs" -p "$(IFS=,; echo "${pids[*]}")" -- sleep "$secs" >/dev/null 2>&1 &
        sp=$!
    fi
    local out; out=$("$T" workload kv --hosts "$hosts" --concurrency "$clients" --duration "$secs" 2>/dev/null)
    if [ -n "$sp" ]; then wait "$sp" || true; fi
    local c1; c1=$(cpu_ms)
    local cs=0
    if [ -s "$dir/cs" ]; then cs=$(awk -F, '/context-switches/ {print $1}' "$dir/cs"); fi
    stop_all
    rm -rf "$dir"
    dir=""
    echo "$out" | kv_summary | awk -v cpu=$((c1 - c0)) -v cs="$cs" '{
        printf "%s %s %.0f %.2f\n", $2, $3, cpu * 1000 / $1, cs / $1
    }'
}
all=""
for r in $(seq 1 "$rounds"); do
    for T in "$a" "$b"; do
        line=$(one)
        echo "round $r $T: ops/s p50 cpu-ms/1k cs/w = $line"
        all+="$T $line"$'\n'
    done
done
echo "$all" | awk 'NF { n[$1]++; r[$1] += $2; p[$1] += $3; c[$1] += $4; s[$1] += $5 }
    END { for (k in n) printf "mean %s: %.0f ops/s, p50 %.2f ms, %.0f cpu-ms/1k, %.2f cs/w (%d runs)\n", k, r[k] / n[k], p[k] / n[k], c[k] / n[k], s[k] / n[k], n[k] }'
