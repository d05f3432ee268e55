#!/usr/bin/env bash
# Tardigrade against etcd on this machine, in one run: a 3-node Tardigrade
# cluster and a 3-member etcd cluster on 127.0.0.1 (own data directories,
# fsync on both: their defaults), one after the other, driven by the same
# tool with the same requests (`tardigrade workload kv`, etcd's v3 API,
# 256-byte values, 100,000 keys, clients spread over the three nodes). Rows:
# writes at 1, 16, 64 and 256 clients; 95% reads at 64 clients. Each row runs
# RUNS times (mean and min-max); CPU is every server process's user+system
# time from /proc/PID/stat, per 1,000 operations.
#
#   scripts/bench-vs-etcd.sh [seconds per run, default 10] [runs, default 3]
#   (or: make bench-vs-etcd)
#
# Installs etcd-server if missing (scripts/setup.sh test). Listens on
# 127.0.0.1 ports 25000-26999; stops everything it started, by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
runs="${2:-3}"
scripts/setup.sh test
T="${CARGO_TARGET_DIR:-$HOME/.cache/tardigrade/target}/debug/tardigrade"
[ -x "$T" ] || { echo "build first: make build" >&2; exit 1; }
dir="$(mktemp -d /tmp/bench-vs-etcd.XXXXXX)"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
. scripts/lib/clusters.sh
rows=("writes 1:1:0" "writes 16:16:0" "writes 64:64:0" "writes 256:256:0" "95% reads 64:64:95")
declare -A result
bench() { # system hosts
    local system=$1 hosts=$2
    for row in "${rows[@]}"; do
        local label="${row%%:*}" rest="${row#*:}"
        local clients="${rest%%:*}" reads="${rest#*:}"
        local all=""
        for r in $(seq 1 "$runs"); do
            local c0; c0=$(cpu_ms)
            local out
            out=$("$T" workload kv --hosts "$hosts" --concurrency "$clients" --read-percent "$reads" \
                --duration "$secs" --seed "$r" 2>/dev/null)
            local c1; c1=$(cpu_ms)
            # ops, ops/s, p50, p99, cpu ms per 1,000 ops
            all+=$(echo "$out" | kv_summary | awk -v cpu=$((c1 - c0)) '{
                printf "%s %s %s %s %.0f\n", $1, $2, $3, $4, ($1 > 0 ? cpu * 1000 / $1 : 0)
            }')$'\n'
        done
        result["$system|$label"]=$(echo "$all" | awk 'NF {
            n++; r += $2; p50 += $3; p99 += $4; cpu += $5
            if (min == "" || $2 < min) min = $2; if ($2 > max) max = $2
        } END { printf "%.0f %.0f %.0f %.2f %.2f %.0f", r / n, min, max, p50 / n, p99 / n, cpu / n }')
        echo "  $system $label: ${result["$system|$label"]}  (ops/s mean min max, p50 p99 ms, cpu ms/1k ops)" >&2
    done
}

echo "== Tardigrade, 3 nodes ==" >&2
start_tardigrade 250
bench tardigrade "$(cluster_hosts 250)"
stop_all

etcd_version="$(etcd --version | awk 'NR == 1 {print $3}')"  # awk reads it all: no SIGPIPE under pipefail
echo "== etcd $etcd_version, 3 members ==" >&2
start_etcd 260
bench etcd "$(cluster_hosts 260)"

echo
echo "$(date -u +%F), $(nproc) cores, etcd $etcd_version, ${secs}s x ${runs} runs per row, 256-byte values, 100k keys"
printf '| %-14s | %-24s | %-13s | %-9s | %-24s | %-13s | %-9s | %-11s | %-9s |\n' \
    row "tardigrade ops/s (min-max)" "p50/p99 ms" "cpu ms/1k" "etcd ops/s (min-max)" "p50/p99 ms" "cpu ms/1k" "ops/s ratio" "cpu ratio"
printf '|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n' ---------------- -------------------------- --------------- ----------- -------------------------- --------------- ----------- ------------- -----------
for row in "${rows[@]}"; do
    label="${row%%:*}"
    read -r tr tmin tmax tp50 tp99 tcpu <<<"${result["tardigrade|$label"]}"
    read -r er emin emax ep50 ep99 ecpu <<<"${result["etcd|$label"]}"
    printf '| %-14s | %-24s | %-13s | %-9s | %-24s | %-13s | %-9s | %-11s | %-9s |\n' "$label" \
        "$tr ($tmin-$tmax)" "$tp50/$tp99" "$tcpu" "$er ($emin-$emax)" "$ep50/$ep99" "$ecpu" \
        "$(awk -v a="$tr" -v b="$er" 'BEGIN { printf "%.2fx", (b > 0 ? a / b : 0) }')" \
        "$(awk -v a="$tcpu" -v b="$ecpu" 'BEGIN { printf "%.2fx", (b > 0 ? a / b : 0) }')"
done
