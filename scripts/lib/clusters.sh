# Shell functions the benchmark scripts share: start a 3-node Tardigrade or a
# 3-member etcd cluster on 127.0.0.1 and remember the PIDs (in `pids`) so the
# caller's cleanup stops them. Source it after setting T (the tardigrade
# binary) and dir (a scratch directory), with `pids=()` declared.
#
# Ports: node i listens on 127.0.0.1:<prefix><i>1 (client/gRPC) and
# <prefix><i>2 (HTTP for Tardigrade, peer for etcd), e.g. prefix 250 gives
# 25001/25002, 25011/25012, 25021/25022.

# Prints the comma-separated client addresses of a cluster at `prefix`.
cluster_hosts() { echo "127.0.0.1:${1}01,127.0.0.1:${1}11,127.0.0.1:${1}21"; }

# start_tardigrade PREFIX [extra `tardigrade start` flags...]: starts three
# nodes, inits the cluster, and waits until its three bootstrap ranges have
# three voters.
start_tardigrade() {
    local prefix=$1
    shift
    local join; join=$(cluster_hosts "$prefix")
    for i in 0 1 2; do
        "$T" start --store "$dir/td$prefix$i" --listen-addr "127.0.0.1:${prefix}${i}1" \
            --http-addr "127.0.0.1:${prefix}${i}2" --join "$join" "$@" >"$dir/td$prefix$i.log" 2>&1 &
        pids+=($!)
    done
    sleep 1
    "$T" init --host "127.0.0.1:${prefix}01" >/dev/null
    for _ in $(seq 1 150); do
        n=$("$T" debug ranges --host "127.0.0.1:${prefix}21" 2>/dev/null | grep -cE 'n[123],n[123],n[123]' || true)
        [ "$n" -ge 3 ] && return 0
        sleep 0.2
    done
    echo "the Tardigrade cluster did not replicate its ranges" >&2
    return 1
}

# start_etcd PREFIX: starts three etcd members (defaults) and waits for a leader.
start_etcd() {
    local prefix=$1
    local cluster="e0=http://127.0.0.1:${prefix}02,e1=http://127.0.0.1:${prefix}12,e2=http://127.0.0.1:${prefix}22"
    for i in 0 1 2; do
        etcd --name "e$i" --data-dir "$dir/etcd$prefix$i" \
            --listen-client-urls "http://127.0.0.1:${prefix}${i}1" --advertise-client-urls "http://127.0.0.1:${prefix}${i}1" \
            --listen-peer-urls "http://127.0.0.1:${prefix}${i}2" --initial-advertise-peer-urls "http://127.0.0.1:${prefix}${i}2" \
            --initial-cluster "$cluster" --initial-cluster-state new >"$dir/etcd$prefix$i.log" 2>&1 &
        pids+=($!)
    done
    for _ in $(seq 1 100); do
        ETCDCTL_API=3 etcdctl --endpoints "$(cluster_hosts "$prefix")" endpoint status 2>/dev/null | grep -q ', true,' && return 0
        sleep 0.2
    done
    echo "the etcd cluster elected no leader" >&2
    return 1
}

# cpu_ms: total user+system CPU milliseconds of the processes in `pids`.
cpu_ms() {
    local t=0 p
    for p in "${pids[@]}"; do
        [ -r "/proc/$p/stat" ] || continue
        t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat")))
    done
    echo $((t * 1000 / $(getconf CLK_TCK)))
}

# kv_summary: reads `tardigrade workload kv`'s report on stdin and prints
# "ops ops/s p50 p99".
kv_summary() {
    awk '{
        for (i = 1; i <= NF; i++) {
            if ($i == "ops" && i == 1) ops = $(i+1)
            if ($i == "ops/s;") rate = $(i-1)
            if ($i == "p50") p50 = $(i+1)
            if ($i == "p99") p99 = $(i+1)
        }
    } END { print ops, rate, p50, p99 }'
}

# stop_all: stops every process started so far.
stop_all() {
    kill "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    pids=()
}
