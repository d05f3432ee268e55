#!/usr/bin/env bash
# Where a write's time goes: starts a 3-node Tardigrade cluster on 127.0.0.1,
# runs `tardigrade workload kv` (etcd API, writes only, clients spread over the
# three nodes) while `perf record` samples every node, and prints
#   - per write, from each node's /metrics: raft messages and frames sent,
#     fsyncs, proposals, forwarded requests;
#   - each node's CPU (user+system ms per 1,000 writes, from /proc/PID/stat);
#   - the share of samples per thread kind (scheduler, tokio workers, ...),
#     kernel against user space, and the top symbols.
#
#   scripts/profile-writes.sh [clients, default 64] [seconds, default 10]
#
# KEEP=FILE keeps the perf data there.
# Needs `perf` (Debian's linux-perf; installed if missing). Ports 27000-27299.
set -euo pipefail
cd "$(dirname "$0")/.."
clients="${1:-64}"
secs="${2:-10}"
command -v perf >/dev/null 2>&1 || { apt-get install -y -qq linux-perf >/dev/null; }
T="${CARGO_TARGET_DIR:-$HOME/.cache/tardigrade/target}/debug/tardigrade"
[ -x "$T" ] || { echo "build first: make build" >&2; exit 1; }
dir="$(mktemp -d /tmp/profile-writes.XXXXXX)"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; if [ -n "${KEEP:-}" ]; then cp "$dir/perf.data" "$KEEP"; fi; rm -rf "$dir"; }
trap cleanup EXIT
. scripts/lib/clusters.sh
start_tardigrade 270
hosts="$(cluster_hosts 270)"
tck=$(getconf CLK_TCK)
metric() { # node-index metric-name: its value (sum over label sets)
    curl -s "http://127.0.0.1:270${1}2/metrics" | awk -v m="$2" '$1 == m || index($1, m "{") == 1 { s += $2 } END { printf "%.0f", s }'
}
names=(tardigrade_raft_messages_sent_total tardigrade_raft_frames_sent_total tardigrade_raft_fsyncs_total
    tardigrade_raft_proposals_total tardigrade_raft_messages_received_total)
declare -A before
snap() {
    for i in 0 1 2; do
        for m in "${names[@]}"; do before["$1|$i|$m"]=$(metric "$i" "$m"); done
        before["$1|$i|cpu"]=$(awk '{print $14 + $15}' "/proc/${pids[$i]}/stat")
    done
}
# Warm up (memtables, connections), then measure.
"$T" workload kv --hosts "$hosts" --concurrency "$clients" --duration 3 >/dev/null 2>&1
snap a
perf record -F 999 -g -o "$dir/perf.data" -p "$(IFS=,; echo "${pids[*]}")" -- sleep "$((secs + 1))" >/dev/null 2>&1 &
perfpid=$!
out=$("$T" workload kv --hosts "$hosts" --concurrency "$clients" --duration "$secs" 2>/dev/null)
snap b
wait "$perfpid" || true
ops=$(echo "$out" | kv_summary | awk '{print $1}')
echo "workload: $out"
echo
printf '%-6s %10s %10s %10s %10s %10s %12s\n' node msgs/w frames/w fsyncs/w props/w recv/w cpu-ms/1k-w
for i in 0 1 2; do
    row=()
    for m in "${names[@]}"; do
        row+=("$(awk -v a="${before["a|$i|$m"]}" -v b="${before["b|$i|$m"]}" -v n="$ops" 'BEGIN { printf "%.2f", (b - a) / n }')")
    done
    cpu=$(awk -v a="${before["a|$i|cpu"]}" -v b="${before["b|$i|cpu"]}" -v n="$ops" -v t="$tck" 'BEGIN { printf "%.0f", (b - a) * 1000 / t * 1000 / n }')
    printf '%-6s %10s %10s %10s %10s %10s %12s\n' "n$((i + 1))" "${row[@]}" "$cpu"
done
echo
echo "== samples per node and thread kind =="
perf report -i "$dir/perf.data" --no-children -g none --sort pid,comm --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -12
echo
echo "== kernel against user space =="
perf report -i "$dir/perf.data" --no-children -g none --sort dso --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -8
echo
echo "== top symbols =="
perf report -i "$dir/perf.data" --no-children -g none --sort sym --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -30
