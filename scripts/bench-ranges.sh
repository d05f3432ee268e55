#!/usr/bin/env bash
# Many ranges on a three-node cluster: N ranges made by admin splits, every
# node listing them, random writes across them, then each idle node's raft
# messages and frames, fsyncs and CPU per second (`tardigrade workload
# splits`); and the native API's write throughput at 256 clients with the
# keys in one range, then spread over the N ranges (`workload kv --api native`).
#
#   scripts/bench-ranges.sh [ranges, default 1000] [idle seconds, default 10]
#
# Needs the built binary (make build). Listens on 127.0.0.1 ports 27000-27099
# and stops everything at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ranges="${1:-1000}"
idle="${2:-10}"
T="${CARGO_TARGET_DIR:-$HOME/.cache/tardigrade/target}/debug/tardigrade"
[ -x "$T" ] || { echo "build first: make build" >&2; exit 1; }
dir="$(mktemp -d /tmp/bench-ranges.XXXXXX)"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
. scripts/lib/clusters.sh
start_tardigrade 270
join=$(cluster_hosts 270)
hosts=$join
echo "native writes, 256 clients, keys in one range:"
"$T" workload kv --api native --hosts "$hosts" --concurrency 256 --duration 10 2>/dev/null
echo "3 nodes, 3 ranges replicated; idle before splitting:"
"$T" workload splits --hosts "$join" --http-hosts 127.0.0.1:27002,127.0.0.1:27012,127.0.0.1:27022 \
    --pids "$(IFS=,; echo "${pids[*]}")" --ranges 0 --writes 0 --idle-seconds "$idle" 2>/dev/null | grep idle || true
echo "making $ranges ranges:"
"$T" workload splits --hosts "$join" --http-hosts 127.0.0.1:27002,127.0.0.1:27012,127.0.0.1:27022 \
    --pids "$(IFS=,; echo "${pids[*]}")" --ranges "$ranges" --idle-seconds "$idle"
echo "native writes, 256 clients, keys spread over the $ranges ranges:"
"$T" workload kv --api native --hosts "$hosts" --concurrency 256 --duration 10 --seed 2 2>/dev/null
