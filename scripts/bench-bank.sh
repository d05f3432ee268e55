#!/usr/bin/env bash
# Transactions under contention: the bank workload on a fresh three-node
# cluster with few accounts and many clients (each account on its own
# range, leases spread), reporting committed transfers per second, the
# share of retries and the transaction counters. No faults.
#
#   scripts/bench-bank.sh [seconds, default 30] [accounts, default 10] [clients, default 64]
#
# Needs the built binary (make build). Everything listens on 127.0.0.1 ports
# 28000-28999 and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-30}"
accounts="${2:-10}"
clients="${3:-64}"
T="${CARGO_TARGET_DIR:-$HOME/.cache/tardigrade/target}/debug/tardigrade"
[ -x "$T" ] || { echo "build first: make build" >&2; exit 1; }
dir="$(mktemp -d /tmp/bench-bank.XXXXXX)"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
. scripts/lib/clusters.sh

start_tardigrade 280
echo "== bank: $accounts accounts, $clients clients, ${secs}s, 3 nodes =="
"$T" workload bank --hosts "$(cluster_hosts 280)" --http-hosts "127.0.0.1:28002,127.0.0.1:28012,127.0.0.1:28022" \
    --accounts "$accounts" --clients "$clients" --duration "$secs" --read-percent 10 2>/dev/null
