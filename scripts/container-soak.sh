#!/usr/bin/env bash
# The long container run: deploy/docker-compose.yml on an image built from
# the dev binary, the register workload (linearizability, and every
# acknowledged insert) under the container nemesis (docker kill and start,
# pause and unpause, and partitions: network disconnect from the peers
# network and connect again), with the bank and list-append workloads
# running beside it through the same faults. Each prints its operations by
# outcome; the register run prints the faults, the longest unavailability
# (overall and after a partition) and the verdict.
#
#   scripts/container-soak.sh [seconds, default 600]
#
# Ports are published on 127.0.0.1:2x479/2x480 (below the ephemeral range); everything (containers,
# networks, volumes, the image tag) is removed at the end unless KEEP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-600}"
T="${CARGO_TARGET_DIR:-$HOME/.cache/tardigrade/target}/debug/tardigrade"
[ -x "$T" ] || { echo "build first: make build" >&2; exit 1; }
if docker compose version >/dev/null 2>&1; then DC=(docker compose); else DC=(docker-compose); fi
project=tdgsoak$$
export TARDIGRADE_IMAGE=tardigrade:soak-$$
export NODE1_ETCD_PORT=21479 NODE2_ETCD_PORT=22479 NODE3_ETCD_PORT=23479 NODE4_ETCD_PORT=24479
export NODE1_HTTP_PORT=21480 NODE2_HTTP_PORT=22480 NODE3_HTTP_PORT=23480 NODE4_HTTP_PORT=24480
dc() { "${DC[@]}" -f deploy/docker-compose.yml -p "$project" "$@"; }
dir="$(mktemp -d /tmp/container-soak.XXXXXX)"
cleanup() {
    if [ "${KEEP:-0}" = 1 ]; then echo "kept project $project and $dir"; return; fi
    dc logs --no-color >"$dir/compose.log" 2>&1 || true
    dc down -v -t 1 >/dev/null 2>&1 || true
    docker image rm -f "$TARDIGRADE_IMAGE" >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT

scripts/image.sh "$T" "$TARDIGRADE_IMAGE"
dc up -d
echo "waiting for three healthy nodes..."
for _ in $(seq 1 240); do
    healthy=0
    for s in node1 node2 node3; do
        [ "$(docker inspect --format '{{.State.Health.Status}}' "$(dc ps -q $s)" 2>/dev/null)" = healthy ] && healthy=$((healthy + 1))
    done
    [ "$healthy" = 3 ] && break
    sleep 0.5
done
[ "$healthy" = 3 ] || { echo "the cluster did not become healthy" >&2; dc logs --tail 50; exit 1; }
containers=$(for s in node1 node2 node3; do docker inspect --format '{{.Name}}' "$(dc ps -q $s)" | tr -d /; done | paste -sd,)
hosts="127.0.0.1:$NODE1_ETCD_PORT,127.0.0.1:$NODE2_ETCD_PORT,127.0.0.1:$NODE3_ETCD_PORT"
http="127.0.0.1:$NODE1_HTTP_PORT,127.0.0.1:$NODE2_HTTP_PORT,127.0.0.1:$NODE3_HTTP_PORT"
echo "== register (6 clients, 5 keys), bank (20 accounts, 4 clients), append (8 keys, 4 clients), ${secs}s; nemesis on $containers =="
"$T" workload register --hosts "$hosts" --clients 6 --keys 5 --duration "$secs" --check-seconds 300 \
    --nemesis --containers "$containers" --network "${project}_peers" --faults kill,pause,partition \
    --fault-interval 10 --fault-duration 4 --seed "$RANDOM" >"$dir/register.out" 2>"$dir/register.err" &
reg=$!
"$T" workload bank --hosts "$hosts" --http-hosts "$http" --accounts 20 --clients 4 --duration "$secs" \
    --seed "$RANDOM" >"$dir/bank.out" 2>"$dir/bank.err" &
bank=$!
"$T" workload append --hosts "$hosts" --keys 8 --clients 4 --duration "$secs" --seed "$RANDOM" \
    >"$dir/append.out" 2>"$dir/append.err" &
append=$!
status=0
wait "$reg" || status=1
wait "$bank" || status=1
wait "$append" || status=1
for w in register bank append; do
    echo "---- $w ----"
    cat "$dir/$w.out"
    [ "$status" = 0 ] || tail -5 "$dir/$w.err"
done
f="$dir/register.out"
echo "---- $(grep -c '^nemesis: ' "$f" || true) faults: $(grep -c 'docker kill' "$f" || true) kills, $(grep -c 'docker pause' "$f" || true) pauses, $(grep -c ': cut ' "$f" || true) partitions"
if [ "$status" = 0 ]; then echo "verdict: linearizable, nothing lost, serializable"; else echo "verdict: FAILED (see above and $dir)"; KEEP=1; fi
exit "$status"
