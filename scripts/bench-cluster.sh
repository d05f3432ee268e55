#!/usr/bin/env bash
# A three-node Tardigrade cluster against a three-node etcd cluster, one after
# the other on this machine, with the same load (`tardigrade workload put`)
# sent through the leader's node and through a follower's node.
#
#   scripts/bench-cluster.sh [seconds per run, default 10]
#
# Needs the built binary (make build) and Debian's etcd (scripts/setup.sh test).
# Everything listens on 127.0.0.1 ports 25000-26999 and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
T="${CARGO_TARGET_DIR:-$HOME/.cache/tardigrade/target}/debug/tardigrade"
[ -x "$T" ] || { echo "build first: make build" >&2; exit 1; }
command -v etcd >/dev/null || { echo "etcd missing: scripts/setup.sh test" >&2; exit 1; }
dir="$(mktemp -d /tmp/bench-cluster.XXXXXX)"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
. scripts/lib/clusters.sh

run() { # label host clients
    printf '%-40s ' "$1 clients=$3"
    "$T" workload put --host "$2" --clients "$3" --duration "$secs" 2>/dev/null | head -1
    echo
}

echo "== Tardigrade, 3 nodes (start + init, defaults) =="
start_tardigrade 250
join=$(cluster_hosts 250)
# The leaseholder of the etcd range: its node's address from node status.
leader_node="$("$T" debug ranges --host 127.0.0.1:25001 | awk '$2 == "etcd" {print $6}')"
leader="$("$T" node status --host 127.0.0.1:25001 | awk -v n="$leader_node" '$1 == n {print $2}')"
follower="$(echo "$join" | tr , '\n' | grep -v "^$leader$" | head -1)"
echo "leaseholder of the etcd range: node $leader_node at $leader"
for c in 1 16; do
    run "tardigrade via leader ($leader)" "$leader" "$c"
    run "tardigrade via follower ($follower)" "$follower" "$c"
done
stop_all

echo "== etcd $(etcd --version | head -1 | awk '{print $3}'), 3 members (defaults) =="
start_etcd 260
eps=$(cluster_hosts 260)
eleader="$(ETCDCTL_API=3 etcdctl --endpoints "$eps" endpoint status | awk -F', ' '$5 == "true" {print $1}')"
efollower="$(echo "$eps" | tr , '\n' | grep -v "^$eleader$" | head -1)"
echo "etcd leader: $eleader"
for c in 1 16; do
    run "etcd via leader ($eleader)" "$eleader" "$c"
    run "etcd via follower ($efollower)" "$efollower" "$c"
done
